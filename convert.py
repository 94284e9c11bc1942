"""Load public Stable Diffusion 1.x / 2.x weights into our modules; read and write our own format.

Three sources, one result (`StableDiffusion`, stable_diffusion.py: unet, vae, text_encoder, schedule,
prediction_type, ...), all through `load_stable_diffusion`:

  1. a diffusers folder: unet/, vae/, text_encoder/, scheduler/ (+ tokenizer/), each with a config JSON
     and weights (`*.safetensors`, or `*.bin` read with torch.load(weights_only=True)). Our U-Net and
     VAE use diffusers' module names, so their weights load unrenamed; the configs are translated
     (diffusers' `attention_head_dim` is a number of HEADS; an int means the same count at every level).
     This file.
  2. an original single file (`.safetensors` / `.ckpt`) in the CompVis / Stability "ldm" layout:
     convert_ldm.py (key rules, detection, sizes from shapes, the prediction-type and EMA defaults).
  3. our own folder: config.json {"format": "clue-pytorch", ...} + model.safetensors with `unet.*`,
     `vae.*`, `text_encoder.*` (and, in a CLUE checkpoint, `style_encoder.*`) tensors: read with
     checkpoint.py, written by `save_stable_diffusion`.

Every source ends in the same audit (audit.py; STYLE.md, point 7): every parameter of ours is filled exactly
once (the new CLUE style parameters excepted: they keep their initialisation unless the source has them),
every source key is used or on an explicit ignore list, every shape is checked; anything else raises
`CheckpointError` listing the offending keys. The diffusers side has one tensor transform: the q/k/v
concatenation of the CLIP text attention (`text_encoder.hf_clip_to_open_clip`).

Refused with a message that says what was found: SDXL, SD3 / Flux / other architectures, inpainting
(9 input channels) and instruct-pix2pix (8), class-conditioned U-Nets (upscaler, unCLIP), and files
that are not checkpoints. Left out: LoRA / ControlNet files, VAE-only files, ldm yaml configs.

Exported: load_stable_diffusion, save_stable_diffusion, the diffusers config translators
(unet_config_from_diffusers, ...), and, re-exported from where they live so that `from convert import ...` keeps
working: StableDiffusion, SD_SAMPLER (stable_diffusion.py), from_ldm_state_dict (convert_ldm.py), load_audited,
is_style_param (audit.py), read_state_dict, read_checkpoint_dir, config_from_dict, atomic_write_json,
atomic_write_safetensors, CheckpointError (checkpoint.py). CLI: `python convert.py SRC OUT_DIR`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from audit import _IDENTITY, _apply_rules, _load_audited, is_style_param, load_audited  # noqa: F401 (re-export)
from checkpoint import (FORMAT, FORMAT_VERSION, CheckpointError, _naming, atomic_write_json,
                        atomic_write_safetensors, config_from_dict, read_checkpoint_dir, read_state_dict)
from convert_ldm import from_ldm_state_dict
from schedulers import NoiseSchedule
from stable_diffusion import (PREDICTION_TYPES, SD_SAMPLER, SD_SCHEDULE, StableDiffusion, _check_context,
                              _refuse_unet_variant)
from text_encoder import TextConfig, TextEncoder, hf_clip_to_open_clip, text_config_from_hf
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig


# ---------------------------------------------------------------------------------------------
# Diffusers configs -> ours
# ---------------------------------------------------------------------------------------------
# diffusers UNet2DConditionModel options and the one value SD 1.x / 2.x use (= what our U-Net builds).
_UNET_FIXED = dict(act_fn="silu", flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
                   mid_block_type="UNetMidBlock2DCrossAttn", resnet_time_scale_shift="default",
                   center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1, conv_in_kernel=3,
                   conv_out_kernel=3, attention_type="default", only_cross_attention=False,
                   dual_cross_attention=False, class_embed_type=None, num_class_embeds=None, encoder_hid_dim=None,
                   time_cond_proj_dim=None, time_embedding_dim=None, timestep_post_act=None, cross_attention_norm=None,
                   resnet_skip_time_act=False, resnet_out_scale_factor=1.0, class_embeddings_concat=False)
_VAE_FIXED = dict(act_fn="silu", shift_factor=None, latents_mean=None, latents_std=None, use_quant_conv=True,
                  use_post_quant_conv=True, mid_block_add_attention=True)


def _check_fixed(cfg: dict, fixed: dict, where: str) -> None:
    def same(value, want):
        return all(same(v, want) for v in value) if isinstance(value, list) else value == want
    odd = [f"{k}={cfg[k]!r} (we implement {v!r})" for k, v in fixed.items() if k in cfg and not same(cfg[k], v)]
    if odd:
        raise CheckpointError(f"{where}: settings that SD 1.x / 2.x do not use and we do not implement: "
                              + "; ".join(odd))


def unet_config_from_diffusers(cfg: dict, where: str = "unet/config.json", style: bool = False) -> UNetConfig:
    """diffusers UNet2DConditionModel config -> UNetConfig."""
    if cfg.get("addition_embed_type") is not None:
        raise CheckpointError(f"{where}: addition_embed_type={cfg['addition_embed_type']!r}: an SDXL-style U-Net; "
                              "only SD 1.x / 2.x are supported")
    _refuse_unet_variant(cfg.get("in_channels", 4), where)
    _check_fixed(cfg, _UNET_FIXED, where)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attention = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    mirror = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    if any(b not in attention for b in down) or up != [mirror[b] for b in reversed(down)]:
        raise CheckpointError(f"{where}: block types {down} / {up} are not the mirrored CrossAttn/plain blocks of SD")
    levels = len(down)
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]  # diffusers: "head_dim" means heads
    heads = tuple(heads) if isinstance(heads, list) else (heads,) * levels
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, list):
        if len(set(depth)) != 1:
            raise CheckpointError(f"{where}: transformer_layers_per_block={depth} varies per level (SDXL); "
                                  "SD 1.x / 2.x use one depth")
        depth = depth[0]
    context = cfg["cross_attention_dim"]
    if not isinstance(context, int):
        raise CheckpointError(f"{where}: cross_attention_dim={context!r}; expected one int")
    return UNetConfig(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                      block_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
                      attention_levels=tuple(attention[b] for b in down), num_heads=heads, context_dim=context,
                      transformer_depth=depth, linear_projection=bool(cfg.get("use_linear_projection", False)),
                      norm_groups=cfg.get("norm_num_groups", 32), resnet_eps=cfg.get("norm_eps", 1e-5), style=style,
                      upcast_attention=bool(cfg.get("upcast_attention", False)))


def vae_config_from_diffusers(cfg: dict, where: str = "vae/config.json") -> VAEConfig:
    """diffusers AutoencoderKL config -> VAEConfig (scaling_factor becomes scale_factor)."""
    _check_fixed(cfg, _VAE_FIXED, where)
    n = len(cfg["block_out_channels"])
    if cfg.get("down_block_types", ["DownEncoderBlock2D"] * n) != ["DownEncoderBlock2D"] * n or \
            cfg.get("up_block_types", ["UpDecoderBlock2D"] * n) != ["UpDecoderBlock2D"] * n:
        raise CheckpointError(f"{where}: block types {cfg.get('down_block_types')} / {cfg.get('up_block_types')} "
                              "are not AutoencoderKL's DownEncoderBlock2D / UpDecoderBlock2D")
    return VAEConfig(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                     latent_channels=cfg.get("latent_channels", 4), block_channels=tuple(cfg["block_out_channels"]),
                     layers_per_block=cfg.get("layers_per_block", 2), norm_groups=cfg.get("norm_num_groups", 32),
                     scale_factor=float(cfg.get("scaling_factor", 0.18215)))


def schedule_from_diffusers(cfg: dict, where: str = "scheduler/scheduler_config.json") -> tuple[dict, dict, str]:
    """diffusers scheduler config -> (NoiseSchedule arguments, DDIM settings, prediction type)."""
    if cfg.get("trained_betas") is not None or cfg.get("rescale_betas_zero_snr"):
        raise CheckpointError(f"{where}: trained_betas / rescale_betas_zero_snr are not supported")
    schedule = {k: cfg.get(k, v) for k, v in SD_SCHEDULE.items()}
    sampler = {k: cfg.get(k, v) for k, v in SD_SAMPLER.items()}
    return schedule, sampler, cfg.get("prediction_type", "epsilon")


def _text_mode(folder: Path, hf_config: dict) -> str:
    """SD 1 ("sd1", pad with the end token) or SD 2 ("sd2", pad with 0): the tokenizer's pad token says it;
    without a tokenizer/ folder, the activation does (QuickGELU = OpenAI CLIP = SD 1)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / "tokenizer" / name
        if f.is_file():
            pad = json.loads(f.read_text()).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad is not None:
                return "sd1" if pad == "<|endoftext|>" else "sd2"
    return "sd1" if hf_config.get("hidden_act") == "quick_gelu" else "sd2"


# Diffusers folders written before diffusers 0.14 (some SD 1.x / 2.x uploads) name the VAE's mid attention
# query / key / value / proj_attn (already Linear); diffusers renames them on load, so do we.
_DIFFUSERS_VAE_RULES = [
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value)\.",
     lambda m: f"{m[1]}.mid_block.attentions.0.to_{m[2][0]}.", None),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.proj_attn\.", r"\1.mid_block.attentions.0.to_out.0.", None),
] + _IDENTITY


# ---------------------------------------------------------------------------------------------
# The loaders
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _component_weights(folder: Path) -> tuple[dict, Path]:
    """The weights of one diffusers component folder: safetensors before .bin, full precision before fp16,
    sharded files (`*.index.json`) merged."""
    for ext in (".safetensors", ".bin"):
        for variant in ("", ".fp16"):
            for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
                f = folder / f"{stem}{variant}{ext}"
                if f.is_file():
                    return read_state_dict(f), f
                index = folder / f"{stem}{variant}{ext}.index.json"
                if index.is_file():
                    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                    return {k: v for s in shards for k, v in read_state_dict(folder / s).items()}, index
    raise FileNotFoundError(f"{folder}: no weights (diffusion_pytorch_model / model .safetensors or .bin); "
                            f"found {sorted(p.name for p in folder.iterdir())}")


def _load_diffusers_folder(folder: Path, prediction_type, style: bool) -> StableDiffusion:
    missing = [s for s in ("unet", "vae", "text_encoder", "scheduler") if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: a diffusers Stable Diffusion folder needs unet/, vae/, text_encoder/ and "
                                f"scheduler/; missing {', '.join(s + '/' for s in missing)} "
                                f"(found {sorted(p.name for p in folder.iterdir())})")
    unet_raw = _read_json(folder / "unet" / "config.json")
    with _naming(folder / "unet" / "config.json"):
        unet_cfg = unet_config_from_diffusers(unet_raw, folder / "unet" / "config.json", style)
    with _naming(folder / "vae" / "config.json"):
        vae_cfg = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"), folder / "vae" / "config.json")
    text_raw = _read_json(folder / "text_encoder" / "config.json")
    with _naming(folder / "text_encoder" / "config.json"):
        text_cfg = text_config_from_hf(text_raw, mode=_text_mode(folder, text_raw))
    _check_context(unet_cfg, text_cfg, folder)
    scheduler_raw = _read_json(folder / "scheduler" / "scheduler_config.json")
    schedule, sampler, stored_type = schedule_from_diffusers(scheduler_raw)
    prediction_type = prediction_type or stored_type
    notes = [f"text encoder: {text_cfg.act}, pad {text_cfg.pad}"]
    odd = {k: scheduler_raw[k] for k, v in (("timestep_spacing", "leading"), ("clip_sample", False),
                                            ("thresholding", False)) if scheduler_raw.get(k, v) != v}
    if odd:  # inference settings of the diffusers scheduler that our DDIM (SD's settings) does not follow
        notes.append(f"scheduler: {odd} not followed (our DDIM: leading spacing, no clipping or thresholding)")

    unet, vae, text = UNet(unet_cfg), VAE(vae_cfg), TextEncoder(text_cfg)
    weights, f = _component_weights(folder / "unet")
    _load_audited(unet, *_apply_rules(weights, _IDENTITY), "U-Net", f, keep_init=is_style_param)
    weights, f = _component_weights(folder / "vae")
    _load_audited(vae, *_apply_rules(weights, _DIFFUSERS_VAE_RULES), "VAE", f)
    weights, f = _component_weights(folder / "text_encoder")
    with _naming(f):
        weights = hf_clip_to_open_clip(weights)  # q/k/v -> in_proj; transformers -> open_clip names
    _load_audited(text, *_apply_rules(weights, _IDENTITY), "text encoder", f)
    size = unet_raw.get("sample_size", 64)
    size = size[0] if isinstance(size, list) else size
    return StableDiffusion(unet, vae, text, NoiseSchedule(**schedule, prediction_type=prediction_type),
                           prediction_type, vae_cfg.scale_factor, size * 2 ** (len(vae_cfg.block_channels) - 1),
                           sampler, "diffusers folder", notes)


def _load_ours(folder: Path, prediction_type, style) -> StableDiffusion:
    config, tensors = read_checkpoint_dir(folder)
    where = folder / "config.json"
    lacking = [k for k in ("unet", "vae", "text", "schedule") if not isinstance(config.get(k), dict)]
    if lacking:
        raise CheckpointError(f"{where}: missing the {', '.join(lacking)} section(s)")
    unet_cfg = config_from_dict(UNetConfig, config["unet"], f"{where} [unet]")
    if style is not None:
        unet_cfg = dataclasses.replace(unet_cfg, style=style)
    vae_cfg = config_from_dict(VAEConfig, config["vae"], f"{where} [vae]")
    text_cfg = config_from_dict(TextConfig, config["text"], f"{where} [text]")
    schedule = {k: v for k, v in config["schedule"].items() if k != "prediction_type"}
    prediction_type = (prediction_type or config.get("prediction_type") or config["schedule"].get("prediction_type")
                       or "epsilon")
    weights, notes = folder / "model.safetensors", []
    parts: dict[str, dict] = {}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        parts.setdefault(head, {})[rest] = v
    unet, vae, text = UNet(unet_cfg), VAE(vae_cfg), TextEncoder(text_cfg)
    unet_sd = parts.pop("unet", {})
    if not unet_cfg.style:  # a CLUE checkpoint loaded as plain SD: its style layers are left out
        dropped = [k for k in unet_sd if is_style_param(k)]
        unet_sd = {k: v for k, v in unet_sd.items() if not is_style_param(k)}
        if dropped:
            notes.append(f"U-Net: {len(dropped)} style-branch tensors left out (style=False)")
    _load_audited(unet, *_apply_rules(unet_sd, _IDENTITY), "U-Net (unet.*)", weights, keep_init=is_style_param)
    _load_audited(vae, *_apply_rules(parts.pop("vae", {}), _IDENTITY), "VAE (vae.*)", weights)
    _load_audited(text, *_apply_rules(parts.pop("text_encoder", {}), _IDENTITY), "text encoder (text_encoder.*)",
                  weights)
    extra_tensors = {f"{head}.{k}": v for head, part in parts.items() for k, v in part.items()}
    known = {"format", "version", "unet", "vae", "text", "schedule", "prediction_type", "scale_factor",
             "image_size", "sampler", "source"}
    return StableDiffusion(unet, vae, text, NoiseSchedule(**schedule, prediction_type=prediction_type),
                           prediction_type, float(config.get("scale_factor", vae_cfg.scale_factor)),
                           int(config.get("image_size") or (config.get("clue") or {}).get("image_size")
                               or (768 if prediction_type == "v_prediction" else 512)),
                           dict(config.get("sampler") or SD_SAMPLER), f"{FORMAT} folder", notes,
                           {k: v for k, v in config.items() if k not in known}, extra_tensors)


def load_stable_diffusion(path, prediction_type: str | None = None, use_ema: bool = True,
                          dtype: torch.dtype = torch.float32, style: bool | None = None,
                          unet_heads: int | tuple | None = None, text_heads: int | None = None) -> StableDiffusion:
    """Load SD 1.x / 2.x weights from a diffusers folder, an original single file or our own folder.

    prediction_type: "epsilon" or "v_prediction" overrides what the source says (folders: the scheduler
        config; single files cannot say: default epsilon for SD 1.x, v_prediction for SD 2.x).
    use_ema: single files with EMA weights (model_ema.*): load those (True) or the raw weights (False).
    dtype: the modules' parameter dtype (fp16 / bf16 for GPU inference).
    style: build the U-Net with the CLUE style cross-attention (its weights from the source when it has them,
        else the zero-initialised branch); None = as stored (our format) or without (public SD weights).
    unet_heads, text_heads: single files only; what their shapes cannot tell (defaults: 8 heads per level for
        SD 1.x, 64-dim heads for SD 2.x and for both CLIP text towers).
    Every module is returned on the CPU in eval mode.
    """
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} or None, got {prediction_type!r}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a diffusers folder, a .safetensors / "
                                f".ckpt file or a folder written by convert.py)")
    single = path.is_file()
    if not single and (unet_heads is not None or text_heads is not None):
        raise ValueError(f"{path}: unet_heads / text_heads apply to single files only; folders carry their configs")
    if single:
        model = from_ldm_state_dict(read_state_dict(path), path, prediction_type, use_ema, bool(style), unet_heads,
                                    text_heads)
    elif (path / "config.json").is_file() and _read_json(path / "config.json").get("format") == FORMAT:
        model = _load_ours(path, prediction_type, style)
    elif (path / "config.json").is_file() and not (path / "unet").is_dir():
        raise CheckpointError(f"{path}: config.json is neither ours ({FORMAT!r}) nor a diffusers pipeline's; for a "
                              "diffusers model pass the pipeline folder that holds unet/, vae/, text_encoder/")
    else:
        model = _load_diffusers_folder(path, prediction_type, bool(style))
    for module in (model.unet, model.vae, model.text_encoder):
        module.to(dtype).eval()
    return model


def save_stable_diffusion(sd: StableDiffusion, out_dir, dtype: torch.dtype | None = None,
                          extra_config: dict | None = None, extra_tensors: dict | None = None) -> None:
    """Write our format: out_dir/model.safetensors (unet.*, vae.*, text_encoder.*, extra tensors) then
    out_dir/config.json, each atomically; `dtype` casts floating-point tensors (e.g. torch.float16)."""
    tensors = {}
    for prefix, module in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder)):
        tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    tensors.update({**sd.extra_tensors, **(extra_tensors or {})})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config = {"format": FORMAT, "version": FORMAT_VERSION, "unet": asdict(sd.unet.cfg), "vae": asdict(sd.vae.cfg),
              "text": asdict(sd.text_encoder.cfg), "schedule": sd.schedule.to_dict(),
              "prediction_type": sd.prediction_type, "scale_factor": sd.scale_factor, "image_size": sd.image_size,
              "sampler": sd.sampler_config, "source": sd.source, **sd.extra_config, **(extra_config or {})}
    out_dir = Path(out_dir)
    atomic_write_safetensors(out_dir / "model.safetensors", tensors, metadata={"format": FORMAT})
    atomic_write_json(out_dir / "config.json", config)  # written last: a folder with it is complete


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Convert Stable Diffusion 1.x / 2.x weights (a diffusers folder, or an original single\n"
                    ".safetensors / .ckpt file) into this project's format: OUT_DIR/config.json +\n"
                    "OUT_DIR/model.safetensors, which load_stable_diffusion and sample.py read without conversion.\n"
                    "Prints what it found (SD 1.x / 2.x, EMA, ignored keys) and the parameter counts.",
        epilog="example:  python convert.py v2-1_768-ema-pruned.safetensors runs/sd21 --half\n"
               "          python convert.py ./stable-diffusion-v1-5 runs/sd15",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a diffusers folder (unet/, vae/, text_encoder/, scheduler/) or a single file")
    p.add_argument("out_dir", help="folder to write (created; existing files are replaced atomically)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="override the prediction type; single files cannot store it: the default is epsilon for "
                        "SD 1.x and v_prediction for SD 2.x (use epsilon for the 512 px 2.x-base files)")
    p.add_argument("--no-ema", action="store_true",
                   help="single files with EMA weights: take the raw (non-EMA) U-Net weights instead")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the size)")
    a = p.parse_args(argv)
    try:
        sd = load_stable_diffusion(a.src, prediction_type=a.prediction_type, use_ema=not a.no_ema)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"convert.py: {e}")
    save_stable_diffusion(sd, a.out_dir, dtype=torch.float16 if a.half else None)
    print(f"read      {a.src}: {sd.source}")
    for note in sd.notes:
        print(f"          {note}")
    for name, module in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder)):
        print(f"{name:<13} {sum(p.numel() for p in module.parameters()) / 1e6:9.2f} M parameters")
    print(f"prediction {sd.prediction_type}, scale factor {sd.scale_factor}, image size {sd.image_size}")
    print(f"wrote     {Path(a.out_dir) / 'config.json'}, {Path(a.out_dir) / 'model.safetensors'}"
          f" ({'float16' if a.half else 'float32'})")


if __name__ == "__main__":
    main()
