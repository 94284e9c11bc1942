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
import json
import sys
from pathlib import Path

import torch

import re
from collections.abc import Mapping

from checkpoint import (FORMAT, CheckpointError, key_listing, load_mapped, load_sd_folder, naming_errors,
                        read_state_dict, save_stable_diffusion)
from clue import StableDiffusion
from schedulers import PREDICTION_TYPES, SD_SAMPLER, SD_SCHEDULE, NoiseSchedule
from text_encoder import TextConfig, TextEncoder
from unet import UNet, UNetConfig, is_style_param
from vae import VAE, VAEConfig


# ---------------------------------------------------------------------------------------------
# Renaming rules
# ---------------------------------------------------------------------------------------------
_IDENTITY = [(r"", "", None)]


def _apply_rules(source: dict, rules, suffix_renames=()) -> tuple[list, list]:
    """Rename every key by the first rule whose regex matches its start.

    A rule is (regex, replacement, transform): `replacement` rewrites the matched prefix (a template with
    \\1 or a function of the match), `transform` (or None) changes the tensor. `suffix_renames` are
    (old, new) substrings replaced afterwards. Returns ([(source key, our key, tensor)], [unmatched keys]).
    """
    mapped, unmatched = [], []
    for key, t in source.items():
        for pattern, repl, transform in rules:
            m = re.match(pattern, key)
            if m:
                new = (repl(m) if callable(repl) else m.expand(repl)) + key[m.end():]
                for old, rep in suffix_renames:
                    new = new.replace(old, rep)
                mapped.append((key, new, transform(t) if transform else t))
                break
        else:
            unmatched.append(key)
    return mapped, unmatched


def _refuse_unet_variant(in_channels: int, where: str) -> None:
    if in_channels != 4:
        kinds = {9: "an inpainting model", 8: "an instruct-pix2pix model", 7: "an x4 upscaler"}
        kind = kinds.get(in_channels, "not SD")
        raise CheckpointError(f"{where}: the U-Net takes {in_channels} input channels ({kind}); only text-to-image "
                              "SD 1.x / 2.x (4 latent channels) is supported")


def _check_context(unet_cfg: UNetConfig, text_cfg: TextConfig, where) -> None:
    if unet_cfg.context_dim != text_cfg.width:
        raise CheckpointError(f"{where}: the U-Net attends to {unet_cfg.context_dim}-wide text tokens but the text "
                              f"encoder is {text_cfg.width} wide; the parts do not belong together")


# ---------------------------------------------------------------------------------------------
# transformers CLIPTextModel -> our names
# ---------------------------------------------------------------------------------------------
_BLOCK = r"encoder\.layers\.(\d+)\."
_HF_RENAMES = [  # (transformers name, our open_clip name)
    (r"embeddings\.token_embedding\.weight", r"token_embedding.weight"),
    (r"embeddings\.position_embedding\.weight", r"positional_embedding"),  # Embedding -> Parameter, same (77, D)
    (_BLOCK + r"layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
    (_BLOCK + r"self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (_BLOCK + r"layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
    (_BLOCK + r"mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (_BLOCK + r"mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"final_layer_norm\.(weight|bias)", r"ln_final.\1"),
]
_HF_QKV = re.compile(_BLOCK + r"self_attn\.(q|k|v)_proj\.(weight|bias)")
# Buffers and heads that SD does not use: position_ids (a saved arange in transformers-4 files),
# text_projection (CLIPTextModelWithProjection's pooled head).
_HF_IGNORED = re.compile(r"embeddings\.position_ids|text_projection\.weight")


def hf_clip_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers `CLIPTextModel` state dict to our (open_clip) parameter names.

    Accepts keys with the `text_model.` prefix (files written by transformers 4, e.g. the SD 1.5 /
    2.1 repositories) or without it (transformers 5). The one real transform: nn.MultiheadAttention
    stores q, k and v as one matrix, so `in_proj_weight = cat([q_proj.weight, k_proj.weight,
    v_proj.weight])` (and the same for the biases). Every source key is either used or listed as
    ignored; an unknown key or a missing q/k/v part raises.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block, weight|bias) -> {q,k,v}

    def put(key: str, value: torch.Tensor, source: str) -> None:
        if key in out:
            raise ValueError(f"hf_clip_to_open_clip: '{source}' fills '{key}' a second time "
                             "(keys with and without the 'text_model.' prefix mixed?)")
        out[key] = value

    for source, value in state_dict.items():
        name = source[len("text_model."):] if source.startswith("text_model.") else source
        if _HF_IGNORED.fullmatch(name):
            continue
        m = _HF_QKV.fullmatch(name)
        if m:
            block, part, kind = m.groups()
            parts = qkv.setdefault((block, kind), {})
            if part in parts:
                raise ValueError(f"hf_clip_to_open_clip: '{source}' appears twice")
            parts[part] = value
            continue
        for pattern, target in _HF_RENAMES:
            if re.fullmatch(pattern, name):
                put(re.sub(pattern, target, name), value, source)
                break
        else:
            raise ValueError(f"hf_clip_to_open_clip: unexpected key '{source}': not a transformers "
                             "CLIPTextModel parameter (a vision or full CLIPModel checkpoint?)")

    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"hf_clip_to_open_clip: block {block} has only {sorted(parts)} of q/k/v "
                             f"{kind}; the state dict is incomplete")
        # nn.MultiheadAttention splits in_proj into q, k, v in this order.
        put(f"transformer.resblocks.{block}.attn.in_proj_{kind}",
            torch.cat([parts["q"], parts["k"], parts["v"]], dim=0), f"block {block} q/k/v")
    return out


def text_config_from_hf(hf_config, mode: str = "sd2") -> TextConfig:
    """A transformers CLIPTextConfig (object or its config.json dict) -> TextConfig.

    `mode` ("sd2" or "sd1") picks the padding, which the weights cannot tell; the activation is
    read from `hidden_act`. Missing keys take transformers' CLIPTextConfig defaults.
    """
    if mode not in ("sd2", "sd1"):
        raise ValueError(f"text_config_from_hf: mode must be 'sd2' or 'sd1', got {mode!r}")
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    width = d.get("hidden_size", 512)
    hidden = d.get("intermediate_size", 2048)
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"text_config_from_hf: hidden_act {act!r} is not a CLIP text activation "
                         "(expected 'gelu' or 'quick_gelu')")
    if d.get("layer_norm_eps", 1e-5) != 1e-5:
        raise ValueError(f"text_config_from_hf: layer_norm_eps {d['layer_norm_eps']} != 1e-5, "
                         "which is what both CLIP text towers (and this module) use")
    if hidden % width:
        raise ValueError(f"text_config_from_hf: intermediate_size {hidden} is not a multiple of "
                         f"hidden_size {width}")
    return TextConfig(
        vocab_size=d.get("vocab_size", 49408),
        context_length=d.get("max_position_embeddings", 77),
        width=width,
        heads=d.get("num_attention_heads", 8),
        layers=d.get("num_hidden_layers", 12),
        mlp_ratio=hidden / width,
        act=act,
        pad="zero" if mode == "sd2" else "eos",
    )


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
    with naming_errors(folder / "unet" / "config.json"):
        unet_cfg = unet_config_from_diffusers(unet_raw, folder / "unet" / "config.json", style)
    with naming_errors(folder / "vae" / "config.json"):
        vae_cfg = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"), folder / "vae" / "config.json")
    text_raw = _read_json(folder / "text_encoder" / "config.json")
    with naming_errors(folder / "text_encoder" / "config.json"):
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
    load_mapped(unet, *_apply_rules(weights, _IDENTITY), "U-Net", f, keep_init=is_style_param)
    weights, f = _component_weights(folder / "vae")
    load_mapped(vae, *_apply_rules(weights, _DIFFUSERS_VAE_RULES), "VAE", f)
    weights, f = _component_weights(folder / "text_encoder")
    with naming_errors(f):
        weights = hf_clip_to_open_clip(weights)  # q/k/v -> in_proj; transformers -> open_clip names
    load_mapped(text, *_apply_rules(weights, _IDENTITY), "text encoder", f)
    size = unet_raw.get("sample_size", 64)
    size = size[0] if isinstance(size, list) else size
    return StableDiffusion(unet, vae, text, NoiseSchedule(**schedule, prediction_type=prediction_type),
                           prediction_type, vae_cfg.scale_factor, size * 2 ** (len(vae_cfg.block_channels) - 1),
                           sampler, "diffusers folder", notes)


# ---------------------------------------------------------------------------------------------
# Original single files (ldm layout)
# ---------------------------------------------------------------------------------------------
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT_PREFIX, SD2_TEXT_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."


# Keys of original single files that SD inference does not use (anything else must map to a parameter).
_LDM_IGNORED = re.compile("|".join([
    # ldm's DDPM buffers: we recompute the schedule from its parameters (and check `betas` against it)
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)",
    r"model_ema\.(decay|num_updates)",                                 # EMA bookkeeping
    r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids",  # a saved arange (SD 1.x)
    r"cond_stage_model\.model\.(logit_scale|text_projection|attn_mask)",        # CLIP's pooled head (SD 2.x)
]))


# ---------------------------------------------------------------------------------------------
# Rules: ldm names -> ours (= diffusers')
# ---------------------------------------------------------------------------------------------
def _conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    """ldm's VAE attention uses 1x1 convs (C, C, 1, 1); ours (diffusers') are Linear (C, C)."""
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim > 2 else t


# Original (ldm) U-Net -> diffusers names. ldm numbers the down path as one flat list of "input_blocks"
# (block 0 = conv_in, then per level: layers_per_block x [resnet, transformer], then the downsampler) and
# the up path as "output_blocks" (per level: layers_per_block+1 x [resnet, transformer, upsampler]).
_UNET_RESNET_NAMES = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                      ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))


def _ldm_unet_rules(layers_per_block: int) -> list:
    n = layers_per_block + 1  # input blocks per level (resnets + downsampler); output blocks per level

    def down(kind):
        return lambda m: f"down_blocks.{(int(m[1]) - 1) // n}.{kind}.{(int(m[1]) - 1) % n}."

    def up(kind):
        return lambda m: f"up_blocks.{int(m[1]) // n}.{kind}.{int(m[1]) % n}."

    return [
        (r"time_embed\.0\.", "time_embedding.linear_1.", None),
        (r"time_embed\.2\.", "time_embedding.linear_2.", None),
        (r"input_blocks\.0\.0\.", "conv_in.", None),
        (r"input_blocks\.(\d+)\.0\.op\.", lambda m: f"down_blocks.{(int(m[1]) - 1) // n}.downsamplers.0.conv.", None),
        (r"input_blocks\.(\d+)\.0\.", down("resnets"), None),
        (r"input_blocks\.(\d+)\.1\.", down("attentions"), None),
        (r"middle_block\.0\.", "mid_block.resnets.0.", None),
        (r"middle_block\.1\.", "mid_block.attentions.0.", None),
        (r"middle_block\.2\.", "mid_block.resnets.1.", None),
        (r"output_blocks\.(\d+)\.0\.", up("resnets"), None),
        (r"output_blocks\.(\d+)\.[12]\.conv\.", lambda m: f"up_blocks.{int(m[1]) // n}.upsamplers.0.conv.", None),
        (r"output_blocks\.(\d+)\.1\.", up("attentions"), None),
        (r"out\.0\.", "conv_norm_out.", None),
        (r"out\.2\.", "conv_out.", None),
    ]  # transformer internals (norm, proj_in, transformer_blocks.*, proj_out) have the same names in both


def _ldm_vae_rules(levels: int) -> list:
    """Original (ldm) VAE -> diffusers names; the decoder's ldm "up" levels are numbered bottom-up."""
    attn = r"(encoder|decoder)\.mid\.attn_1\."

    def flip(m):
        return levels - 1 - int(m[1])

    return [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.", r"\1.\2.", None),
        (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", None),
        (r"(post_quant_conv|quant_conv)\.", r"\1.", None),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", None),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv.", None),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{flip(m)}.resnets.{m[2]}.", None),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.", lambda m: f"decoder.up_blocks.{flip(m)}.upsamplers.0.conv.", None),
        (r"(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0.", None),
        (r"(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1.", None),
        (attn + r"norm\.", r"\1.mid_block.attentions.0.group_norm.", None),
        (attn + r"(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2.", _conv1x1_to_linear),
        (attn + r"proj_out\.", r"\1.mid_block.attentions.0.to_out.0.", _conv1x1_to_linear),
    ]  # resnet internals: norm1, conv1, norm2, conv2 as in diffusers; nin_shortcut -> conv_shortcut


# ---------------------------------------------------------------------------------------------
# What is in a file, and sizes from shapes
# ---------------------------------------------------------------------------------------------
def _summary(keys) -> str:
    """'model.diffusion_model (686), first_stage_model (248), ...': the top two name levels and their counts."""
    counts: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2])
        counts[head] = counts.get(head, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    return ", ".join(f"{k} ({n})" for k, n in top) + (", ..." if len(counts) > 8 else "")


def detect_single_file(sd: dict, where) -> str:
    """'sd1' or 'sd2' for an ldm-layout SD file; anything else raises, saying what the file holds."""
    keys = list(sd)
    has = lambda pattern: any(re.match(pattern, k) for k in keys)  # noqa: E731
    found = f"found {len(keys)} tensors: {_summary(keys)}"
    refuse = [
        (r"conditioner\.embedders\.", "an SDXL checkpoint (two text encoders under conditioner.embedders.*)"),
        (r"model\.diffusion_model\.label_emb\.", "a class-conditioned U-Net (label_emb: SDXL, unCLIP or an upscaler)"),
        (r"(model\.diffusion_model\.)?joint_blocks\.|text_encoders\.", "an SD3 checkpoint (MMDiT joint_blocks)"),
        (r"(model\.diffusion_model\.)?double_blocks\.", "a Flux checkpoint"),
        (r"(add_embedding|down_blocks|encoder\.down_blocks|text_model|embeddings)\.",
         "a single diffusers / transformers component (pass the whole diffusers folder instead)"),
        (r"control_model\.|lora_|.*\.lora_", "a ControlNet or LoRA file (not a full model)"),
    ]
    for pattern, what in refuse:
        if has(pattern):
            raise CheckpointError(f"{where}: this looks like {what}; only Stable Diffusion 1.x / 2.x are supported "
                                  f"({found})")
    if not has(re.escape(UNET_PREFIX)):
        raise CheckpointError(f"{where}: no Stable Diffusion U-Net ('{UNET_PREFIX}*') in this file ({found})")
    if not has(re.escape(VAE_PREFIX)):
        raise CheckpointError(f"{where}: no VAE ('{VAE_PREFIX}*') in this file; a full SD checkpoint is needed "
                              f"({found})")
    _refuse_unet_variant(_shape(sd, UNET_PREFIX + "input_blocks.0.0.weight", where)[1], where)
    if has(re.escape(SD1_TEXT_PREFIX)):
        return "sd1"
    if has(re.escape(SD2_TEXT_PREFIX)):
        return "sd2"
    raise CheckpointError(f"{where}: no text encoder ('{SD1_TEXT_PREFIX}*' for SD 1.x or '{SD2_TEXT_PREFIX}*' "
                          f"for SD 2.x) in this file ({found})")


def _indices(keys, pattern: str) -> list[int]:
    """Sorted distinct integers captured by pattern's group 1 over the keys."""
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def _shape(sd: dict, key: str, where) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{where}: expected key '{key}' is missing; the file is incomplete or not SD 1.x / 2.x")
    return sd[key].shape


def unet_config_from_ldm(sd: dict, kind: str, heads, where, style: bool = False, upcast: bool = False) -> UNetConfig:
    """Sizes of an ldm U-Net (keys without 'model.diffusion_model.') read from its shapes.

    Heads cannot be read: `heads` (an int for every level, or a tuple) or the SD default, 8 per level for
    SD 1.x and 64-dim heads for SD 2.x. GroupNorm groups: 32.
    """
    n_input = len(_indices(sd, r"input_blocks\.(\d+)\."))
    ops = _indices(sd, r"input_blocks\.(\d+)\.0\.op\.weight")  # downsamplers close every level but the last
    L = ops[0] - 1 if ops else n_input - 1  # resnets per level
    levels = n_input // (L + 1) if L >= 0 else 0
    if levels < 1 or n_input != levels * (L + 1):
        raise CheckpointError(f"{where}: the U-Net's input_blocks ({n_input}, downsamplers at {ops}) do not form "
                              "SD's levels of resnets + downsampler")
    first = [1 + b * (L + 1) for b in range(levels)]  # the first input block of each level
    channels = tuple(_shape(sd, f"input_blocks.{i}.0.out_layers.3.weight", where)[0] for i in first)
    attention = tuple(f"input_blocks.{i}.1.proj_in.weight" in sd for i in first)
    if heads is None:
        heads = (8,) * levels if kind == "sd1" else tuple(max(1, c // 64) for c in channels)
    heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
    return UNetConfig(in_channels=_shape(sd, "input_blocks.0.0.weight", where)[1],
                      out_channels=_shape(sd, "out.2.weight", where)[0], block_channels=channels,
                      layers_per_block=L, attention_levels=attention, num_heads=heads,
                      context_dim=_shape(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", where)[1],
                      transformer_depth=len(_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\.")),
                      linear_projection=len(_shape(sd, "middle_block.1.proj_in.weight", where)) == 2,
                      norm_groups=32, style=style, upcast_attention=upcast)


def vae_config_from_ldm(sd: dict, where, scale_factor: float = 0.18215) -> VAEConfig:
    """Sizes of an ldm VAE (keys without 'first_stage_model.') read from its shapes; 32 groups."""
    levels = len(_indices(sd, r"encoder\.down\.(\d+)\."))
    return VAEConfig(in_channels=_shape(sd, "encoder.conv_in.weight", where)[1],
                     out_channels=_shape(sd, "decoder.conv_out.weight", where)[0],
                     latent_channels=_shape(sd, "post_quant_conv.weight", where)[0],
                     block_channels=tuple(_shape(sd, f"encoder.down.{i}.block.0.conv2.weight", where)[0]
                                          for i in range(levels)),
                     layers_per_block=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
                     norm_groups=32, scale_factor=scale_factor)


def text_config_from_ldm(sd: dict, kind: str, heads: int | None, where) -> TextConfig:
    """Sizes of the text tower (keys without the cond_stage_model prefix) read from its shapes, as the
    transformers config they amount to. SD 2.x builds one block less than the file has ("penultimate")."""
    if kind == "sd1":
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        width = _shape(sd, "embeddings.token_embedding.weight", where)
        context, blocks = _shape(sd, "embeddings.position_embedding.weight", where)[0], r"encoder\.layers\.(\d+)\."
        hidden = _shape(sd, "encoder.layers.0.mlp.fc1.weight", where)[0]
    else:
        width = _shape(sd, "token_embedding.weight", where)
        context, blocks = _shape(sd, "positional_embedding", where)[0], r"transformer\.resblocks\.(\d+)\."
        hidden = _shape(sd, "transformer.resblocks.0.mlp.c_fc.weight", where)[0]
    vocab, width = width
    layers = len(_indices(sd, blocks)) - (kind == "sd2")
    hf = dict(vocab_size=vocab, max_position_embeddings=context, hidden_size=width, intermediate_size=hidden,
              num_attention_heads=heads or max(1, width // 64), num_hidden_layers=layers,
              hidden_act="quick_gelu" if kind == "sd1" else "gelu")
    return text_config_from_hf(hf, mode=kind)


def _schedule_from_betas(sd: dict, where) -> dict:
    """SD's schedule; when the file stores ldm's `betas`, check they are that schedule (or one with its end points)."""
    betas = sd.get("betas")
    if betas is None:
        return dict(SD_SCHEDULE)
    tolerance = max(1e-4, 2 * torch.finfo(betas.dtype).eps)  # pruned fp16 files store fp16 betas
    betas = betas.double()
    candidates = [dict(SD_SCHEDULE), dict(SD_SCHEDULE, num_train_timesteps=len(betas),
                                         beta_start=round(float(betas[0]), 8), beta_end=round(float(betas[-1]), 8))]
    for cand in candidates:
        ours = NoiseSchedule(**cand).betas.double()
        if ours.shape == betas.shape and torch.allclose(ours, betas, rtol=tolerance, atol=1e-8):
            return cand
    raise CheckpointError(f"{where}: the stored 'betas' ({len(betas)} steps, {float(betas[0]):.6g} .. "
                          f"{float(betas[-1]):.6g}) are not a scaled_linear schedule; not an SD 1.x / 2.x file")


# ---------------------------------------------------------------------------------------------
# The single-file loader
# ---------------------------------------------------------------------------------------------
def from_ldm_state_dict(sd: dict, path="state dict", prediction_type: str | None = None, use_ema: bool = True,
                        style: bool = False, unet_heads=None, text_heads=None) -> StableDiffusion:
    """An original (ldm-layout) SD 1.x / 2.x state dict -> StableDiffusion; load_stable_diffusion's single-file
    path after reading the file. `path` only names the source in messages."""
    kind = detect_single_file(sd, path)
    text_prefix = SD1_TEXT_PREFIX if kind == "sd1" else SD2_TEXT_PREFIX
    listed = {k for k in sd if _LDM_IGNORED.fullmatch(k)}
    ignored, notes = set(listed), []

    # EMA: ldm keeps a copy of the U-Net under model_ema.<key without 'model.' and without dots>.
    ema = sorted(k for k in sd if k.startswith("model_ema.") and k not in ignored)
    unet_keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    source = {k: k for k in unet_keys}
    if ema and use_ema:
        twin = {k: "model_ema." + k[len("model."):].replace(".", "") for k in unet_keys}
        lacking = [k for k, e in twin.items() if e not in sd]
        if lacking:
            raise CheckpointError(f"{path}: has EMA weights (model_ema.*) but none for {len(lacking)} U-Net keys, "
                                  f"e.g. {lacking[:3]}; load with use_ema=False")
        source, ignored = twin, ignored | set(unet_keys)
        notes.append(f"U-Net: EMA weights ({len(twin)} model_ema.* tensors); the raw weights are ignored")
    elif ema:
        ignored |= set(ema)
        notes.append(f"U-Net: raw weights; {len(ema)} EMA tensors ignored (use_ema=False)")
    unet_sd = {k[len(UNET_PREFIX):]: sd[s] for k, s in source.items()}
    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX) and k not in ignored}
    text_sd = {k[len(text_prefix):]: v for k, v in sd.items() if k.startswith(text_prefix) and k not in ignored}
    used = set(source.values()) | {VAE_PREFIX + k for k in vae_sd} | {text_prefix + k for k in text_sd}
    stray = sorted(k for k in sd if k not in used and k not in ignored)
    if stray:
        raise CheckpointError(f"{path}: keys outside the U-Net, VAE and text encoder that are not on the ignore "
                              f"list:\n" + key_listing("unexpected keys", stray))

    # Sizes from shapes; what shapes cannot tell from arguments or the documented SD defaults.
    with naming_errors(path):
        text_cfg = text_config_from_ldm(text_sd, kind, text_heads, path)
    if prediction_type is None:
        prediction_type = "epsilon" if kind == "sd1" else "v_prediction"
        notes.append(f"prediction type: not stored in single files; {prediction_type} is the SD "
                     f"{'1.x' if kind == 'sd1' else '2.x (768-v)'} default; pass prediction_type= to change it")
    upcast = kind == "sd2" and prediction_type == "v_prediction"  # SD 2.x-v overflows fp16 attention otherwise
    with naming_errors(path):
        unet_cfg = unet_config_from_ldm(unet_sd, kind, unet_heads, path, style=style, upcast=upcast)
        vae_cfg = vae_config_from_ldm(vae_sd, path)
    _check_context(unet_cfg, text_cfg, path)
    schedule = _schedule_from_betas(sd, path)

    unet, vae, text = UNet(unet_cfg), VAE(vae_cfg), TextEncoder(text_cfg)
    load_mapped(unet, *_apply_rules(unet_sd, _ldm_unet_rules(unet_cfg.layers_per_block), _UNET_RESNET_NAMES),
                  f"U-Net ({UNET_PREFIX}*)", path, keep_init=is_style_param)
    mapped, unmatched = _apply_rules(vae_sd, _ldm_vae_rules(len(vae_cfg.block_channels)),
                                     (("nin_shortcut.", "conv_shortcut."),))
    load_mapped(vae, mapped, unmatched, f"VAE ({VAE_PREFIX}*)", path)
    if kind == "sd1":
        with naming_errors(path):
            text_sd = hf_clip_to_open_clip(text_sd)  # q/k/v -> in_proj; transformers -> open_clip names
    else:  # open_clip names already; SD 2.x runs the penultimate block, the last one is unused
        last = re.compile(rf"transformer\.resblocks\.{text_cfg.layers}\.")
        notes.append(f"text encoder: block {text_cfg.layers} of {text_cfg.layers + 1} ignored (SD 2.x uses the "
                     "penultimate layer)")
        text_sd = {k: v for k, v in text_sd.items() if not last.match(k)}
    load_mapped(text, *_apply_rules(text_sd, _IDENTITY), f"text encoder ({text_prefix}*)", path)
    notes.append(f"{len(listed)} keys on the ignore list (DDPM buffers, position_ids, CLIP heads, EMA bookkeeping)")
    version = "SD 1.x, OpenAI CLIP text" if kind == "sd1" else "SD 2.x, OpenCLIP text"
    return StableDiffusion(unet, vae, text, NoiseSchedule(**schedule, prediction_type=prediction_type),
                           prediction_type, vae_cfg.scale_factor, 768 if upcast else 512, dict(SD_SAMPLER),
                           f"single file ({version})", notes)


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
        model = load_sd_folder(path, prediction_type, style)
    elif (path / "config.json").is_file() and not (path / "unet").is_dir():
        raise CheckpointError(f"{path}: config.json is neither ours ({FORMAT!r}) nor a diffusers pipeline's; for a "
                              "diffusers model pass the pipeline folder that holds unet/, vae/, text_encoder/")
    else:
        model = _load_diffusers_folder(path, prediction_type, bool(style))
    for module in (model.unet, model.vae, model.text_encoder):
        module.to(dtype).eval()
    return model


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
