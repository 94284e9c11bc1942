"""Stable Diffusion 1.x / 2.x weights in public formats -> our modules; `python convert.py SRC OUT_DIR` -> our format.

A diffusers folder (configs translated; our U-Net and VAE use its names), an original "ldm" single file (sizes from
shapes, the rest from arguments with SD's defaults) or our own folder (checkpoint.py; a Hugging Face repo id is fetched
first): a few regex rules rename each, the transforms named (CLIP's q/k/v -> in_proj, the ldm VAE's 1x1 convs ->
Linear), then checkpoint.py's audit. SDXL, SD3, Flux, inpainting, pix2pix, class-conditioned, LoRA and ControlNet
files are refused, saying so (our LoRA folders load on their base, any source)."""
from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from huggingface_hub import snapshot_download

import cli
from checkpoint import (FORMAT, IDENTITY, CheckpointError, apply_rules, as_clue, build_stable_diffusion,
                        config_from_dict, key_listing, load_sd_folder, naming_errors, read_json, read_state_dict,
                        save_clue, save_stable_diffusion)
from clue import StableDiffusion
from schedulers import PREDICTION_TYPES, SD_SAMPLER, SD_SCHEDULE, NoiseSchedule
from text_encoder import TextConfig
from unet import UNetConfig, is_style_param
from vae import VAEConfig


def _refuse_unet_variant(in_channels: int, where) -> None:
    if in_channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model", 7: "an x4 upscaler"}.get(in_channels)
        raise CheckpointError(f"{where}: the U-Net takes {in_channels} input channels ({kind or 'not SD'}); only "
                              "text-to-image SD 1.x / 2.x (4 latent channels) is supported")


# ---- transformers CLIPTextModel -> our (open_clip) names -------------------------------------------------------------
_HF = r"(?:text_model\.)?"  # transformers 4 (the SD 1.5 / 2.1 repositories) prefix the names, transformers 5 does not
_LAYER = _HF + r"encoder\.layers\.(\d+)\."
_HF_CLIP_RULES = [(pattern + "$", repl, None) for pattern, repl in [
    (_HF + r"embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (_HF + r"embeddings\.position_embedding\.weight", "positional_embedding"),  # Embedding -> Parameter, same (77, D)
    (_HF + r"final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    (_LAYER + r"layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
    (_LAYER + r"layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
    (_LAYER + r"self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (_LAYER + r"self_attn\.(q|k|v)_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\3:\2"),  # a part
    (_LAYER + r"mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (_LAYER + r"mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (_HF + r"(embeddings\.position_ids|text_projection\.weight)", ""),  # a saved arange; the pooled head: unused
]]


def hf_clip_to_open_clip(state_dict: dict) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict in our names; the one transform: nn.MultiheadAttention's in_proj =
    cat([q_proj, k_proj, v_proj]) (weights, biases). ValueError on an unknown key, one filled twice, a missing part."""
    mapped, unmatched = apply_rules(state_dict, _HF_CLIP_RULES)
    if unmatched:
        raise ValueError(f"hf_clip_to_open_clip: unexpected key '{unmatched[0]}': not a transformers CLIPTextModel "
                         "parameter (a vision or full CLIPModel checkpoint?)")
    out, qkv = {}, {}
    for source, name, t in mapped:
        name, _, part = name.partition(":")
        into = qkv.setdefault(name, {}) if part else out
        if (part or name) in into:
            raise ValueError(f"hf_clip_to_open_clip: '{source}' fills '{name}' a second time (keys with and without "
                             "the 'text_model.' prefix mixed?)")
        into[part or name] = t
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"hf_clip_to_open_clip: block {name.split('.')[2]} has only {sorted(parts)} of q/k/v "
                             f"({name}); the state dict is incomplete")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])  # nn.MultiheadAttention's order
    return out


def text_config_from_hf(hf_config, mode: str = "sd2") -> TextConfig:
    """A transformers CLIPTextConfig (or its config.json dict; missing keys take transformers' defaults) ->
    TextConfig. `mode` ("sd2": pad with 0, "sd1": with the end token) is what the weights cannot tell."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    width, hidden, act = d.get("hidden_size", 512), d.get("intermediate_size", 2048), d.get("hidden_act", "quick_gelu")
    if mode not in ("sd2", "sd1") or d.get("layer_norm_eps", 1e-5) != 1e-5 or hidden % width:  # (act: TextConfig)
        raise ValueError(f"text_config_from_hf: mode {mode!r} (must be 'sd2' or 'sd1'), layer_norm_eps "
                         f"{d.get('layer_norm_eps', 1e-5)} (both CLIP text towers: 1e-5), intermediate_size {hidden} "
                         f"(must be a multiple of hidden_size {width}): not a CLIP text tower this code builds")
    return TextConfig(vocab_size=d.get("vocab_size", 49408), context_length=d.get("max_position_embeddings", 77),
                      width=width, heads=d.get("num_attention_heads", 8), layers=d.get("num_hidden_layers", 12),
                      mlp_ratio=hidden / width, act=act, pad="zero" if mode == "sd2" else "eos")


def read_config(file: Path, translate) -> tuple:
    """(raw, translate(raw, file)) of a JSON config file, what the translation raises naming the file; the config
    dataclass it gives meets our format's type and range checks (config_from_dict)."""
    raw = read_json(file)
    with naming_errors(file):
        cfg = translate(raw, file)
    return raw, config_from_dict(type(cfg), asdict(cfg), str(file))


# ---- diffusers folders -----------------------------------------------------------------------------------------------
def check_fixed(cfg: dict, fixed: dict, where) -> None:
    """Refuse options of a public config set to other values than `fixed` {option: the one value we implement}."""
    def same(value, want):
        return all(same(v, want) for v in value) if isinstance(value, list) else value == want
    if odd := [f"{k}={cfg[k]!r} (we implement {v!r})" for k, v in fixed.items() if k in cfg and not same(cfg[k], v)]:
        raise CheckpointError(f"{where}: settings that SD 1.x / 2.x do not use and we do not implement: "
                              + "; ".join(odd))


# diffusers options and the one value SD 1.x / 2.x use (what our modules build); another value is refused.
_UNET_FIXED = dict(act_fn="silu", flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
                   mid_block_type="UNetMidBlock2DCrossAttn", resnet_time_scale_shift="default",
                   center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1, conv_in_kernel=3,
                   conv_out_kernel=3, attention_type="default", only_cross_attention=False,
                   dual_cross_attention=False, class_embed_type=None, num_class_embeds=None, encoder_hid_dim=None,
                   time_cond_proj_dim=None, time_embedding_dim=None, timestep_post_act=None, cross_attention_norm=None,
                   resnet_skip_time_act=False, resnet_out_scale_factor=1.0, class_embeddings_concat=False)
_VAE_FIXED = dict(act_fn="silu", shift_factor=None, latents_mean=None, latents_std=None, use_quant_conv=True,
                  use_post_quant_conv=True, mid_block_add_attention=True)


def _unet_config_from_diffusers(cfg: dict, where, style: bool) -> UNetConfig:
    if cfg.get("addition_embed_type") is not None:
        raise CheckpointError(f"{where}: addition_embed_type={cfg['addition_embed_type']!r}: an SDXL-style U-Net; "
                              "only SD 1.x / 2.x are supported")
    _refuse_unet_variant(cfg.get("in_channels", 4), where)
    check_fixed(cfg, _UNET_FIXED, where)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attention = [{"CrossAttnDownBlock2D": True, "DownBlock2D": False}.get(b) for b in down]
    if None in attention or up != [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attention)]:
        raise CheckpointError(f"{where}: block types {down} / {up} are not the mirrored CrossAttn/plain blocks of SD")
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]  # diffusers: "head_dim" means heads
    depth, context = cfg.get("transformer_layers_per_block", 1), cfg["cross_attention_dim"]
    depth = depth[0] if isinstance(depth, list) and len(set(depth)) == 1 else depth
    if not isinstance(depth, int) or not isinstance(context, int):
        raise CheckpointError(f"{where}: transformer_layers_per_block={depth!r}, cross_attention_dim={context!r}: "
                              "SD 1.x / 2.x use one depth and one context width at every level")
    return UNetConfig(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                      block_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
                      attention_levels=tuple(attention), context_dim=context, transformer_depth=depth,
                      num_heads=tuple(heads) if isinstance(heads, list) else (heads,) * len(down),
                      linear_projection=cfg.get("use_linear_projection") or False, style=style,
                      norm_groups=cfg.get("norm_num_groups", 32), resnet_eps=cfg.get("norm_eps", 1e-5),
                      upcast_attention=cfg.get("upcast_attention") or False)  # (null: False)


def _vae_config_from_diffusers(cfg: dict, where) -> VAEConfig:
    check_fixed(cfg, _VAE_FIXED, where)
    n, (down, up) = len(cfg["block_out_channels"]), (cfg.get("down_block_types"), cfg.get("up_block_types"))
    if down not in (None, ["DownEncoderBlock2D"] * n) or up not in (None, ["UpDecoderBlock2D"] * n):
        raise CheckpointError(f"{where}: block types {down} / {up} are not AutoencoderKL's DownEncoderBlock2D / "
                              "UpDecoderBlock2D")
    return VAEConfig(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                     latent_channels=cfg.get("latent_channels", 4), block_channels=tuple(cfg["block_out_channels"]),
                     layers_per_block=cfg.get("layers_per_block", 2), norm_groups=cfg.get("norm_num_groups", 32),
                     scale_factor=float(cfg.get("scaling_factor", 0.18215)))


def _text_mode(folder: Path, hf_config: dict) -> str:
    """"sd1" (pad with the end token) or "sd2" (pad with 0): the tokenizer's pad token says it; without a tokenizer/
    folder, the activation does (QuickGELU = OpenAI CLIP = SD 1)."""
    for f in (folder / "tokenizer" / "special_tokens_map.json", folder / "tokenizer" / "tokenizer_config.json"):
        pad = read_json(f).get("pad_token") if f.is_file() else None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is not None:
            return "sd1" if pad == "<|endoftext|>" else "sd2"
    return "sd1" if hf_config.get("hidden_act") == "quick_gelu" else "sd2"


def read_weights_folder(folder: Path) -> tuple[dict, Path]:
    """A diffusers / transformers component folder's weights -> (tensors, file): safetensors before .bin, full
    precision before fp16, shards (*.index.json) merged."""
    for name in (f"{stem}{variant}{ext}" for ext in (".safetensors", ".bin") for variant in ("", ".fp16")
                 for stem in ("diffusion_pytorch_model", "model", "pytorch_model")):
        if (folder / name).is_file():
            return read_state_dict(folder / name), folder / name
        if (index := folder / f"{name}.index.json").is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            return {k: v for s in shards for k, v in read_state_dict(folder / s).items()}, index
    raise FileNotFoundError(f"{folder}: no weights (diffusion_pytorch_model / model .safetensors or .bin); "
                            f"found {sorted(p.name for p in folder.iterdir())}")


_DIFFUSERS_VAE_RULES = [  # diffusers < 0.14 named the VAE's mid attention query, key, value, proj_attn
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value)\.",
     lambda m: f"{m[1]}.mid_block.attentions.0.to_{m[2][0]}.", None),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.proj_attn\.", r"\1.mid_block.attentions.0.to_out.0.", None),
] + IDENTITY


def _load_diffusers_folder(folder: Path, prediction_type, style: bool) -> StableDiffusion:
    if missing := [s for s in ("unet", "vae", "text_encoder", "scheduler") if not (folder / s).is_dir()]:
        raise FileNotFoundError(f"{folder}: a diffusers Stable Diffusion folder needs unet/, vae/, text_encoder/ and "
                                f"scheduler/; missing {', '.join(s + '/' for s in missing)} "
                                f"(found {sorted(p.name for p in folder.iterdir())})")
    unet_raw, unet_cfg = read_config(folder / "unet/config.json", lambda d, f: _unet_config_from_diffusers(d, f, style))
    vae_cfg = read_config(folder / "vae/config.json", _vae_config_from_diffusers)[1]
    text_cfg = read_config(folder / "text_encoder/config.json",
                           lambda d, f: text_config_from_hf(d, mode=_text_mode(folder, d)))[1]
    scheduler_file = folder / "scheduler/scheduler_config.json"
    sched = read_json(scheduler_file)
    if sched.get("trained_betas") is not None or sched.get("rescale_betas_zero_snr"):
        raise CheckpointError(f"{scheduler_file}: trained_betas / rescale_betas_zero_snr are not supported")
    notes = [f"text encoder: {text_cfg.act}, pad {text_cfg.pad}"]
    odd = {k: sched[k] for k, v in (("timestep_spacing", "leading"), ("clip_sample", False), ("thresholding", False))
           if sched.get(k, v) != v}
    if odd:  # inference settings of the diffusers scheduler that our DDIM (SD's settings) does not follow
        notes.append(f"scheduler: {odd} not followed (our DDIM: leading spacing, no clipping or thresholding)")
    with naming_errors(scheduler_file):
        schedule = NoiseSchedule(**{k: sched.get(k, v) for k, v in SD_SCHEDULE.items()},
                                 prediction_type=prediction_type or sched.get("prediction_type", "epsilon"))

    def weights():  # a generator: one component's tensors at a time, read after the modules are built
        tensors, f = read_weights_folder(folder / "unet")
        yield *apply_rules(tensors, IDENTITY), "U-Net", f, is_style_param
        tensors, f = read_weights_folder(folder / "vae")
        yield *apply_rules(tensors, _DIFFUSERS_VAE_RULES), "VAE", f
        tensors, f = read_weights_folder(folder / "text_encoder")
        with naming_errors(f):
            yield *apply_rules(hf_clip_to_open_clip(tensors), IDENTITY), "text encoder", f
    size = unet_raw.get("sample_size", 64)
    return build_stable_diffusion(
        (unet_cfg, vae_cfg, text_cfg), weights(), schedule, folder, scale_factor=vae_cfg.scale_factor,
        image_size=(size[0] if isinstance(size, list) else size) * vae_cfg.downsample_factor,
        sampler_config={k: sched.get(k, v) for k, v in SD_SAMPLER.items()}, source="diffusers folder", notes=notes)


# ---- original single files (ldm layout) ------------------------------------------------------------------------------
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT_PREFIX, SD2_TEXT_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
# Keys that SD inference does not use (anything else must map to a parameter).
_LDM_IGNORED = re.compile("|".join([  # ldm's DDPM buffers (the schedule is recomputed; `betas` checked against it)
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)",
    r"model_ema\.(decay|num_updates)",                                          # EMA bookkeeping
    r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids",  # a saved arange (SD 1.x)
    r"cond_stage_model\.model\.(logit_scale|text_projection|attn_mask)"]))      # CLIP's pooled head (SD 2.x)


# ldm numbers the U-Net's down path as one flat list of input_blocks (0 = conv_in, then per level L x [resnet,
# transformer] and a downsampler) and the up path as output_blocks (per level L+1 x [resnet, transformer, upsampler]).
_UNET_RESNET_NAMES = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                      ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))


def _ldm_unet_rules(layers_per_block: int) -> list:
    n = layers_per_block + 1  # input blocks per level (resnets + downsampler); output blocks per level
    down = lambda kind: lambda m: f"down_blocks.{(int(m[1]) - 1) // n}.{kind}.{(int(m[1]) - 1) % n}."  # noqa: E731
    up = lambda kind: lambda m: f"up_blocks.{int(m[1]) // n}.{kind}.{int(m[1]) % n}."  # noqa: E731
    return [(pattern, repl, None) for pattern, repl in [
        (r"time_embed\.0\.", "time_embedding.linear_1."), (r"time_embed\.2\.", "time_embedding.linear_2."),
        (r"input_blocks\.0\.0\.", "conv_in."),
        (r"input_blocks\.(\d+)\.0\.op\.", lambda m: f"down_blocks.{(int(m[1]) - 1) // n}.downsamplers.0.conv."),
        (r"input_blocks\.(\d+)\.0\.", down("resnets")), (r"input_blocks\.(\d+)\.1\.", down("attentions")),
        (r"middle_block\.0\.", "mid_block.resnets.0."), (r"middle_block\.1\.", "mid_block.attentions.0."),
        (r"middle_block\.2\.", "mid_block.resnets.1."), (r"output_blocks\.(\d+)\.0\.", up("resnets")),
        (r"output_blocks\.(\d+)\.[12]\.conv\.", lambda m: f"up_blocks.{int(m[1]) // n}.upsamplers.0.conv."),
        (r"output_blocks\.(\d+)\.1\.", up("attentions")), (r"out\.0\.", "conv_norm_out."), (r"out\.2\.", "conv_out."),
    ]]  # transformer internals (norm, proj_in, transformer_blocks.*, proj_out) have the same names in both


def _ldm_vae_rules(levels: int) -> list:
    """The decoder's ldm "up" levels are numbered bottom-up; resnets' nin_shortcut is conv_shortcut (a suffix)."""
    attn, flip = r"(encoder|decoder)\.mid\.attn_1\.", lambda m: levels - 1 - int(m[1])
    linear = lambda t: t.reshape(t.shape[0], t.shape[1]) if t.ndim > 2 else t  # noqa: E731  1x1 conv -> Linear
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
        (attn + r"(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2.", linear),
        (attn + r"proj_out\.", r"\1.mid_block.attentions.0.to_out.0.", linear)]


_REFUSED = [
    (r"conditioner\.embedders\.", "an SDXL checkpoint (two text encoders under conditioner.embedders.*)"),
    (r"model\.diffusion_model\.label_emb\.", "a class-conditioned U-Net (label_emb: SDXL, unCLIP or an upscaler)"),
    (r"(model\.diffusion_model\.)?joint_blocks\.|text_encoders\.", "an SD3 checkpoint (MMDiT joint_blocks)"),
    (r"(model\.diffusion_model\.)?double_blocks\.", "a Flux checkpoint"),
    (r"(add_embedding|down_blocks|encoder\.down_blocks|text_model|embeddings)\.",
     "a single diffusers / transformers component (pass the whole diffusers folder instead)"),
    (r"control_model\.|lora_|.*\.lora_", "a ControlNet or LoRA file (not a full model)"),
]


def _detect_single_file(sd: dict, where) -> str:
    """'sd1' or 'sd2' for an ldm-layout SD file; anything else raises, saying what the file holds."""
    top = Counter(".".join(k.split(".")[:2]) for k in sd).most_common(9)  # 'model.diffusion_model (686), ...'
    found = f"found {len(sd)} tensors: " + ", ".join(f"{k} ({n})" for k, n in top[:8]) + ", ..." * (len(top) > 8)
    has = lambda pattern: any(re.match(pattern, k) for k in sd)  # noqa: E731
    for pattern, what in _REFUSED:
        if has(pattern):
            raise CheckpointError(f"{where}: this looks like {what}; only Stable Diffusion 1.x / 2.x are supported "
                                  f"({found})")
    for prefix, part in ((UNET_PREFIX, "Stable Diffusion U-Net"), (VAE_PREFIX, "VAE")):
        if not has(re.escape(prefix)):
            raise CheckpointError(f"{where}: no {part} ('{prefix}*') in this file; a full SD checkpoint is needed "
                                  f"({found})")
    _refuse_unet_variant(_shape(sd, UNET_PREFIX + "input_blocks.0.0.weight", where)[1], where)
    for prefix, kind in ((SD1_TEXT_PREFIX, "sd1"), (SD2_TEXT_PREFIX, "sd2")):
        if has(re.escape(prefix)):
            return kind
    raise CheckpointError(f"{where}: no text encoder ('{SD1_TEXT_PREFIX}*' for SD 1.x or '{SD2_TEXT_PREFIX}*' "
                          f"for SD 2.x) in this file ({found})")


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def _shape(sd: dict, key: str, where) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{where}: expected key '{key}' is missing; the file is incomplete or not SD 1.x / 2.x")
    return sd[key].shape


def _configs_from_ldm(unet_sd: dict, vae_sd: dict, text_sd: dict, kind: str, heads, text_heads, where, style: bool,
                      upcast: bool) -> tuple[UNetConfig, VAEConfig, TextConfig]:
    """Sizes from shapes (each part without its prefix, the text tower in open_clip names). Not in the shapes: heads,
    `heads` (one count for every level, or a tuple) or SD's (SD 1.x 8 per level, SD 2.x 64-dim heads; CLIP text
    64-dim heads); GroupNorm groups, 32. SD 2.x's text tower is built one block shorter than the file's."""
    n_input = len(_indices(unet_sd, r"input_blocks\.(\d+)\."))
    ops = _indices(unet_sd, r"input_blocks\.(\d+)\.0\.op\.weight")  # downsamplers close every level but the last
    L = ops[0] - 1 if ops else n_input - 1  # resnets per level
    levels = n_input // (L + 1) if L >= 0 else 0
    if levels < 1 or n_input != levels * (L + 1):
        raise CheckpointError(f"{where}: the U-Net's input_blocks ({n_input}, downsamplers at {ops}) do not form "
                              "SD's levels of resnets + downsampler")
    first = [1 + b * (L + 1) for b in range(levels)]  # the first input block of each level
    channels = tuple(_shape(unet_sd, f"input_blocks.{i}.0.out_layers.3.weight", where)[0] for i in first)
    attention = tuple(f"input_blocks.{i}.1.proj_in.weight" in unet_sd for i in first)  # levels with transformers
    if heads is None:
        heads = (8,) * levels if kind == "sd1" else tuple(max(1, c // 64) for c in channels)
    unet = UNetConfig(in_channels=_shape(unet_sd, "input_blocks.0.0.weight", where)[1],
                      out_channels=_shape(unet_sd, "out.2.weight", where)[0], block_channels=channels,
                      layers_per_block=L, attention_levels=attention,
                      num_heads=(heads,) * levels if isinstance(heads, int) else tuple(heads),
                      context_dim=_shape(unet_sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", where)[1],
                      transformer_depth=len(_indices(unet_sd, r"middle_block\.1\.transformer_blocks\.(\d+)\.")),
                      linear_projection=len(_shape(unet_sd, "middle_block.1.proj_in.weight", where)) == 2,
                      norm_groups=32, style=style, upcast_attention=upcast)
    vae = VAEConfig(in_channels=_shape(vae_sd, "encoder.conv_in.weight", where)[1],
                    out_channels=_shape(vae_sd, "decoder.conv_out.weight", where)[0],
                    latent_channels=_shape(vae_sd, "post_quant_conv.weight", where)[0],
                    block_channels=tuple(_shape(vae_sd, f"encoder.down.{i}.block.0.conv2.weight", where)[0]
                                         for i in range(len(_indices(vae_sd, r"encoder\.down\.(\d+)\.")))),
                    layers_per_block=len(_indices(vae_sd, r"encoder\.down\.0\.block\.(\d+)\.")), norm_groups=32)
    vocab, width = _shape(text_sd, "token_embedding.weight", where)
    hidden = _shape(text_sd, "transformer.resblocks.0.mlp.c_fc.weight", where)[0]
    text = text_config_from_hf(dict(
        vocab_size=vocab, max_position_embeddings=_shape(text_sd, "positional_embedding", where)[0], hidden_size=width,
        intermediate_size=hidden, num_attention_heads=text_heads or max(1, width // 64),
        num_hidden_layers=len(_indices(text_sd, r"transformer\.resblocks\.(\d+)\.")) - (kind == "sd2"),
        hidden_act="quick_gelu" if kind == "sd1" else "gelu"), mode=kind)
    return unet, vae, text


def schedule_from_betas(sd: dict, where) -> dict:
    """SD's NoiseSchedule arguments; where a state dict stores ldm's `betas`, checked to be that schedule (or one with
    its end points)."""
    betas = sd.get("betas")
    if betas is None:
        return dict(SD_SCHEDULE)
    tolerance = max(1e-4, 2 * torch.finfo(betas.dtype).eps)  # pruned fp16 files store fp16 betas
    betas = betas.double()
    for cand in (dict(SD_SCHEDULE), dict(SD_SCHEDULE, num_train_timesteps=len(betas),
                                         beta_start=round(float(betas[0]), 8), beta_end=round(float(betas[-1]), 8))):
        with naming_errors(where):  # stored betas that are no schedule at all (<= 0, > 1) are named
            ours = NoiseSchedule(**cand).betas.double()
        if ours.shape == betas.shape and torch.allclose(ours, betas, rtol=tolerance, atol=1e-8):
            return cand
    raise CheckpointError(f"{where}: the stored 'betas' ({len(betas)} steps, {float(betas[0]):.6g} .. "
                          f"{float(betas[-1]):.6g}) are not a scaled_linear schedule; not an SD 1.x / 2.x file")


def from_ldm_state_dict(sd: dict, path="state dict", prediction_type: str | None = None, use_ema: bool = True,
                        style: bool = False, unet_heads=None, text_heads=None) -> StableDiffusion:
    """An original (ldm-layout) SD 1.x / 2.x state dict -> StableDiffusion; `path` names it in messages."""
    kind = _detect_single_file(sd, path)
    text_prefix = SD1_TEXT_PREFIX if kind == "sd1" else SD2_TEXT_PREFIX
    listed = {k for k in sd if _LDM_IGNORED.fullmatch(k)}
    ignored, notes = set(listed), []
    # EMA: ldm keeps a copy of the U-Net under model_ema.<key without 'model.' and without dots>.
    ema = sorted(k for k in sd if k.startswith("model_ema.") and k not in ignored)
    source = {k: k for k in sd if k.startswith(UNET_PREFIX)}
    if ema and use_ema:
        ignored |= set(source)
        source = {k: "model_ema." + k[len("model."):].replace(".", "") for k in source}
        if lacking := [k for k, e in source.items() if e not in sd]:
            raise CheckpointError(f"{path}: has EMA weights (model_ema.*) but none for {len(lacking)} U-Net keys, "
                                  f"e.g. {lacking[:3]}; load with use_ema=False")
        notes.append(f"U-Net: EMA weights ({len(source)} model_ema.* tensors); the raw weights are ignored")
    elif ema:
        ignored |= set(ema)
        notes.append(f"U-Net: raw weights; {len(ema)} EMA tensors ignored (use_ema=False)")
    unet_sd = {k[len(UNET_PREFIX):]: sd[s] for k, s in source.items()}
    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX) and k not in ignored}
    text_sd = {k[len(text_prefix):]: v for k, v in sd.items() if k.startswith(text_prefix) and k not in ignored}
    used = set(source.values()) | {VAE_PREFIX + k for k in vae_sd} | {text_prefix + k for k in text_sd}
    if stray := sorted(k for k in sd if k not in used and k not in ignored):
        raise CheckpointError(f"{path}: keys outside the U-Net, VAE and text encoder that are not on the ignore "
                              f"list:\n" + key_listing("unexpected keys", stray))
    if prediction_type is None:  # what shapes cannot tell: arguments, or the documented SD defaults
        prediction_type = "epsilon" if kind == "sd1" else "v_prediction"
        notes.append(f"prediction type: not stored in single files; {prediction_type} is the SD "
                     f"{'1.x' if kind == 'sd1' else '2.x (768-v)'} default; pass prediction_type= to change it")
    upcast = kind == "sd2" and prediction_type == "v_prediction"  # SD 2.x-v overflows fp16 attention otherwise
    with naming_errors(path):
        text_sd = hf_clip_to_open_clip(text_sd) if kind == "sd1" else text_sd  # q/k/v -> in_proj, open_clip names
        unet_cfg, vae_cfg, text_cfg = _configs_from_ldm(unet_sd, vae_sd, text_sd, kind, unet_heads, text_heads, path,
                                                        style, upcast)
    if kind == "sd2":  # SD 2.x runs the penultimate block; the last one is unused
        text_sd = {k: v for k, v in text_sd.items() if not k.startswith(f"transformer.resblocks.{text_cfg.layers}.")}
        notes.append(f"text encoder: block {text_cfg.layers} of {text_cfg.layers + 1} ignored (SD 2.x uses the "
                     "penultimate layer)")
    notes.append(f"{len(listed)} keys on the ignore list (DDPM buffers, position_ids, CLIP heads, EMA bookkeeping)")
    version = "SD 1.x, OpenAI CLIP text" if kind == "sd1" else "SD 2.x, OpenCLIP text"
    return build_stable_diffusion(
        (unet_cfg, vae_cfg, text_cfg),
        [(*apply_rules(unet_sd, _ldm_unet_rules(unet_cfg.layers_per_block), _UNET_RESNET_NAMES),
          f"U-Net ({UNET_PREFIX}*)", path, is_style_param),
         (*apply_rules(vae_sd, _ldm_vae_rules(len(vae_cfg.block_channels)), (("nin_shortcut.", "conv_shortcut."),)),
          f"VAE ({VAE_PREFIX}*)", path),
         (*apply_rules(text_sd, IDENTITY), f"text encoder ({text_prefix}*)", path)],
        NoiseSchedule(**schedule_from_betas(sd, path), prediction_type=prediction_type), path,
        scale_factor=vae_cfg.scale_factor, image_size=768 if upcast else 512, sampler_config=dict(SD_SAMPLER),
        source=f"single file ({version})", notes=notes)


# ---- any source; the command line ------------------------------------------------------------------------------------
HUB_FILES = ["*/config.json", "scheduler/scheduler_config.json", "tokenizer/*.json", "text_encoder/model.safetensors",
             "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]  # what SD needs


def load_stable_diffusion(path, prediction_type: str | None = None, use_ema: bool = True,
                          dtype: torch.dtype = torch.float32, style: bool | None = None, merge_lora: bool = True,
                          unet_heads: int | tuple | None = None, text_heads: int | None = None) -> StableDiffusion:
    """SD 1.x / 2.x from any source above (`owner/name`, no local path: a Hugging Face repo, its HUB_FILES fetched), on
    the CPU in eval mode. prediction_type overrides the source's (single files cannot store it: SD 1.x epsilon, SD 2.x
    v_prediction); use_ema: a single file's EMA U-Net or its raw one; style: the U-Net with the CLUE style branch (the
    source's, else zero-initialised), None = as stored (ours) or without (public weights); merge_lora: a LoRA folder's
    adapters merged (False: kept, to train on); unet_heads, text_heads: single files (default SD 1.x 8 per level, else
    64-dim heads)."""
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} or None, got {prediction_type!r}")
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", path.as_posix()):  # a Hugging Face repo id
        try:
            path = Path(snapshot_download(path.as_posix(), allow_patterns=HUB_FILES))
        except (OSError, ValueError) as e:  # offline (HF_HUB_OFFLINE=1), no network, no such repo, a malformed id
            raise FileNotFoundError(f"{path}: not a local path, and the Hugging Face repo could not be fetched ("
                                    f"{type(e).__name__}); on a machine online: hf download {path.as_posix()} "
                                    "--local-dir DIR, then pass that folder") from None
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a diffusers folder, a .safetensors / "
                                f".ckpt file or a folder written by convert.py)")
    if path.is_dir() and (unet_heads is not None or text_heads is not None or not use_ema):
        raise ValueError(f"{path}: use_ema=False, unet_heads, text_heads apply to single files only; folders carry "
                         "their configs and one U-Net")
    if path.is_file():
        model = from_ldm_state_dict(read_state_dict(path), path, prediction_type, use_ema, bool(style), unet_heads,
                                    text_heads)
    elif (path / "config.json").is_file() and read_json(path / "config.json").get("format") == FORMAT:
        model = load_sd_folder(path, prediction_type, style, load_stable_diffusion, merge_lora)  # LoRA: any base
    elif (path / "config.json").is_file() and not (path / "unet").is_dir():
        raise CheckpointError(f"{path}: config.json is neither ours ({FORMAT!r}) nor a diffusers pipeline's; for a "
                              "diffusers model pass the pipeline folder that holds unet/, vae/, text_encoder/")
    else:
        model = _load_diffusers_folder(path, prediction_type, bool(style))
    for module in (model.unet, model.vae, model.text_encoder):
        module.to(dtype).eval()
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Convert SD 1.x / 2.x weights (a diffusers folder, an original .safetensors / .ckpt file or a\n"
                    "folder of ours, CLUE checkpoints included) into ours: OUT_DIR/config.json + model.safetensors.",
        epilog="example:  python convert.py v2-1_768-ema-pruned.safetensors runs/sd21 --half\n"
               "          python convert.py ./stable-diffusion-v1-5 runs/sd15",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a diffusers folder (unet/, vae/, text_encoder/, scheduler/), a single file or ours")
    p.add_argument("out_dir", type=cli.output_folder,
                   help="folder to write (created; existing files are replaced atomically)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="override the prediction type; single files cannot store it: the default is epsilon for "
                        "SD 1.x and v_prediction for SD 2.x (use epsilon for the 512 px 2.x-base files)")
    p.add_argument("--no-ema", action="store_true",
                   help="single files with EMA weights: take the raw (non-EMA) U-Net weights instead")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the size)")
    a = p.parse_args(argv)
    if a.no_ema and not Path(a.src).is_file():
        p.error(f"--no-ema picks a single file's raw U-Net; {a.src} is not a file (folders hold one U-Net)")
    out, dtype = Path(a.out_dir), torch.float16 if a.half else None
    sd = load_stable_diffusion(a.src, prediction_type=a.prediction_type, use_ema=not a.no_ema)
    if "clue" in sd.extra_config:  # a CLUE checkpoint: rebuilt and checked as one, so that what is written loads
        save_clue(as_clue(sd, a.src), out, sd.extra_config.get("train"), dtype)
    else:
        save_stable_diffusion(sd, out, dtype=dtype)
    print(f"read      {a.src}: {sd.source}", *(f"          {note}" for note in sd.notes), sep="\n")
    for name, module in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder)):
        print(f"{name:<13} {sum(p.numel() for p in module.parameters()) / 1e6:9.2f} M parameters")
    print(f"prediction {sd.prediction_type}, scale factor {sd.scale_factor}, image size {sd.image_size}")
    print(f"wrote     {out / 'config.json'}, {out / 'model.safetensors'} ({'float16' if a.half else 'float32'})")


if __name__ == "__main__":
    cli.run(main, program="convert.py")
