"""Load public Stable Diffusion 1.x / 2.x weights into our modules; read and write our own format.

Three sources, one result (`StableDiffusion`: unet, vae, text_encoder, schedule, prediction_type, ...):

  1. a diffusers folder: unet/, vae/, text_encoder/, scheduler/ (+ tokenizer/), each with a config JSON
     and weights (`*.safetensors`, or `*.bin` read with torch.load(weights_only=True)). Our U-Net and
     VAE use diffusers' module names, so their weights load unrenamed; the configs are translated
     (diffusers' `attention_head_dim` is a number of HEADS; an int means the same count at every level).
  2. an original single file (`.safetensors` / `.ckpt`) in the CompVis / Stability "ldm" layout:
     `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE), `cond_stage_model.*` (text).
     SD 1.x keeps OpenAI CLIP ViT-L/14 in transformers names (`cond_stage_model.transformer.*`),
     SD 2.x keeps OpenCLIP ViT-H/14 in open_clip names (`cond_stage_model.model.*`). Every size is read
     from the tensor shapes except what weights cannot tell, which the original ldm configs fix:
     attention heads (SD 1.x U-Net: 8 per level; SD 2.x: 64-dim heads; both CLIP towers: 64-dim heads),
     GroupNorm groups (32) and the latent scale factor (0.18215).
     PREDICTION TYPE: weights do not say whether a file is epsilon or v-prediction. Default, as diffusers'
     `from_single_file`: SD 1.x "epsilon", SD 2.x "v_prediction" (the 768 px SD 2.0 / 2.1 models; pass
     prediction_type="epsilon" for the 512 px 2.x-base files). EMA weights (`model_ema.*`, stored under
     the U-Net key with its dots removed) are used when present unless use_ema=False.
  3. our own folder: config.json {"format": "clue-pytorch", ...} + model.safetensors with `unet.*`,
     `vae.*`, `text_encoder.*` (and, in a CLUE checkpoint, `style_encoder.*`) tensors.

A conversion is a short list of renaming RULES plus an AUDIT (STYLE.md, point 7): every parameter of
ours is filled exactly once (the new CLUE style parameters excepted: they keep their initialisation
unless the source has them), every source key is used or on an explicit ignore list, every shape is
checked; anything else raises `CheckpointError` listing the offending keys. The only tensor transforms
are the q/k/v concatenation of the CLIP text attention (`text_encoder.hf_clip_to_open_clip`) and the
1x1-conv -> Linear squeeze of the VAE's mid-block attention (ldm stores q, k, v, proj_out as convs).

Refused with a message that says what was found: SDXL, SD3 / Flux / other architectures, inpainting
(9 input channels) and instruct-pix2pix (8), class-conditioned U-Nets (upscaler, unCLIP), and files
that are not checkpoints. Left out: LoRA / ControlNet files, VAE-only files, ldm yaml configs.

Exported: load_stable_diffusion, StableDiffusion, save_stable_diffusion, from_ldm_state_dict, the
config translators (unet_config_from_diffusers, ...), read_state_dict, read_checkpoint_dir,
atomic_write_json, atomic_write_safetensors, CheckpointError. CLI: `python convert.py SRC OUT_DIR`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from schedulers import NoiseSchedule
from text_encoder import TextConfig, TextEncoder, hf_clip_to_open_clip, text_config_from_hf
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

FORMAT, FORMAT_VERSION = "clue-pytorch", 1
PREDICTION_TYPES = ("epsilon", "v_prediction")
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_SAMPLER = dict(steps_offset=1, set_alpha_to_one=False)  # DDIM settings of every SD 1.x / 2.x release


class CheckpointError(ValueError):
    """A weights file or folder that cannot be loaded; the message names the file and the keys."""


# ---------------------------------------------------------------------------------------------
# Atomic writers and our own format
# ---------------------------------------------------------------------------------------------
def _atomic_replace(path: Path, write) -> None:
    """write(tmp_path) into a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_json(path, obj) -> None:
    """Write obj as indented JSON to path; a crash leaves either the old file or the complete new one."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a dict of tensors as safetensors, atomically. Shared storage is cloned (safetensors refuses it)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    _atomic_replace(Path(path), lambda tmp: save_file(out, tmp, metadata=metadata))


def read_checkpoint_dir(path) -> tuple[dict, dict]:
    """Our format: a folder with config.json ({"format": "clue-pytorch"}) and model.safetensors -> (config, tensors)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected config.json + model.safetensors)")
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a {FORMAT} folder holds config.json and model.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    found = config.get("format") if isinstance(config, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{config_file}: 'format' is {found!r}, expected {FORMAT!r}; not a folder written by "
                              "convert.py / train.py")
    if config.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: format version {config['version']} is newer than this code "
                              f"({FORMAT_VERSION}); update the code")
    return config, read_state_dict(weights_file)


def config_from_dict(cls, d: dict, where: str):
    """Rebuild a config dataclass from its JSON dict (lists back to tuples); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} fields {unknown}")
    with _naming(where):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------
# Reading weight files
# ---------------------------------------------------------------------------------------------
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A .safetensors file or a torch pickle (.ckpt/.bin, weights_only=True) -> {name: tensor}.

    A top-level "state_dict" entry (Lightning / ldm checkpoints) is unwrapped; non-tensor entries
    (step counters) are dropped. Unreadable files raise CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(2)
    as_torch = path.suffix != ".safetensors" and (magic in (b"PK", b"\x80\x02") or path.suffix in _TORCH_SUFFIXES)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True) if as_torch else load_file(path)
    except Exception as e:  # the libraries raise a zoo of types (SafetensorError, UnpicklingError, RuntimeError...)
        kind = "a torch pickle (torch.load, weights_only=True)" if as_torch else "safetensors"
        raise CheckpointError(f"{path}: cannot be read as {kind}: {type(e).__name__}: {e}. The file is truncated, "
                              f"corrupt or not a weights file; download it again") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------
# Rules and the audit
# ---------------------------------------------------------------------------------------------
def _conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    """ldm's VAE attention uses 1x1 convs (C, C, 1, 1); ours (diffusers') are Linear (C, C)."""
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim > 2 else t


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


def is_style_param(name: str) -> bool:
    """The parameters CLUE adds to every transformer block of the U-Net (absent from SD files)."""
    return ".norm_style." in name or ".attn_style." in name


@contextlib.contextmanager
def _naming(where):
    """Re-raise a ValueError from a config class or a mapping function as a CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _listing(title: str, items: list, limit: int = 12) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "".join(f"    {x}\n" for x in items[:limit]) + more


def _load_audited(module: torch.nn.Module, mapped: list, unused: list, what: str, source,
                  keep_init=lambda name: False) -> None:
    """The audit: load `mapped` [(source key, our key, tensor)] into `module`, or raise listing every problem.

    Fails on a parameter of ours filled twice or not at all (unless keep_init(name)), a mapped key that
    is no parameter of ours, a shape mismatch, or source keys neither used nor ignored (`unused`).
    """
    own = module.state_dict()
    filled, origin, twice, unknown, shapes, bad = {}, {}, [], [], [], set()
    for src, dst, t in mapped:
        if dst in filled:
            twice.append(f"{dst} <- {origin[dst]} and {src}")
        elif dst not in own:
            unknown.append(f"{src} -> {dst}")
        elif t.shape != own[dst].shape:
            shapes.append(f"{src}: {tuple(t.shape)} in the source, {tuple(own[dst].shape)} in our model")
            bad.add(dst)
        else:
            filled[dst], origin[dst] = t, src
    missing = [k for k in own if k not in filled and k not in bad and not keep_init(k)]
    if twice or unknown or shapes or missing or unused:
        raise CheckpointError(
            f"{source}: the {what} weights do not match our {type(module).__name__} built from the config:\n"
            + (_listing("shape mismatches", shapes) if shapes else "")
            + (_listing("parameters of ours with no source key", missing) if missing else "")
            + (_listing("source keys with no parameter of ours", unknown + unused) if unknown or unused else "")
            + (_listing("parameters filled twice", twice) if twice else "")
            + "  The weights and the config disagree, or this is not a Stable Diffusion 1.x / 2.x checkpoint.")
    module.load_state_dict(filled, strict=False)



def load_audited(module: torch.nn.Module, state_dict: dict, what: str, source, keep_init=lambda name: False) -> None:
    """The audit for a state dict already in our names (our own format, the style encoder of a CLUE checkpoint)."""
    _load_audited(module, *_apply_rules(state_dict, _IDENTITY), what, source, keep_init)

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


_IDENTITY = [(r"", "", None)]
# Diffusers folders written before diffusers 0.14 (some SD 1.x / 2.x uploads) name the VAE's mid attention
# query / key / value / proj_attn (already Linear); diffusers renames them on load, so do we.
_DIFFUSERS_VAE_RULES = [
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value)\.",
     lambda m: f"{m[1]}.mid_block.attentions.0.to_{m[2][0]}.", None),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.proj_attn\.", r"\1.mid_block.attentions.0.to_out.0.", None),
] + _IDENTITY

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


def _refuse_unet_variant(in_channels: int, where: str) -> None:
    if in_channels != 4:
        kinds = {9: "an inpainting model", 8: "an instruct-pix2pix model", 7: "an x4 upscaler"}
        kind = kinds.get(in_channels, "not SD")
        raise CheckpointError(f"{where}: the U-Net takes {in_channels} input channels ({kind}); only text-to-image "
                              "SD 1.x / 2.x (4 latent channels) is supported")


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


# ---------------------------------------------------------------------------------------------
# Original single files: what is in them, and sizes from shapes
# ---------------------------------------------------------------------------------------------
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT_PREFIX, SD2_TEXT_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."


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
# The loaded model and the three loaders
# ---------------------------------------------------------------------------------------------
@dataclass
class StableDiffusion:
    unet: UNet
    vae: VAE
    text_encoder: TextEncoder
    schedule: NoiseSchedule         # betas / alpha_bar of training, with the prediction type
    prediction_type: str            # "epsilon" or "v_prediction": what the U-Net outputs
    scale_factor: float             # latents fed to the U-Net are vae.encode(x) * scale_factor (SD: 0.18215)
    image_size: int = 512           # native resolution in pixels (512: SD 1.x / 2.x-base; 768: SD 2.x-v)
    sampler_config: dict = field(default_factory=lambda: dict(SD_SAMPLER))  # DDIM steps_offset, set_alpha_to_one
    source: str = ""                # what was read: "diffusers folder", "single file (SD 2.x, ...)", ...
    notes: list = field(default_factory=list)           # conversion report: ignored keys, defaults taken
    extra_config: dict = field(default_factory=dict)    # our format: config entries beyond SD (style, clue, ...)
    extra_tensors: dict = field(default_factory=dict)   # our format: tensors beyond SD (style_encoder.*, ...)

    @property
    def unet_config(self) -> UNetConfig:
        return self.unet.cfg

    @property
    def vae_config(self) -> VAEConfig:
        return self.vae.cfg

    @property
    def text_config(self) -> TextConfig:
        return self.text_encoder.cfg


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


def _check_context(unet_cfg: UNetConfig, text_cfg: TextConfig, where) -> None:
    if unet_cfg.context_dim != text_cfg.width:
        raise CheckpointError(f"{where}: the U-Net attends to {unet_cfg.context_dim}-wide text tokens but the text "
                              f"encoder is {text_cfg.width} wide; the parts do not belong together")


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
                              f"list:\n" + _listing("unexpected keys", stray))

    # Sizes from shapes; what shapes cannot tell from arguments or the documented SD defaults.
    with _naming(path):
        text_cfg = text_config_from_ldm(text_sd, kind, text_heads, path)
    if prediction_type is None:
        prediction_type = "epsilon" if kind == "sd1" else "v_prediction"
        notes.append(f"prediction type: not stored in single files; {prediction_type} is the SD "
                     f"{'1.x' if kind == 'sd1' else '2.x (768-v)'} default; pass prediction_type= to change it")
    upcast = kind == "sd2" and prediction_type == "v_prediction"  # SD 2.x-v overflows fp16 attention otherwise
    with _naming(path):
        unet_cfg = unet_config_from_ldm(unet_sd, kind, unet_heads, path, style=style, upcast=upcast)
        vae_cfg = vae_config_from_ldm(vae_sd, path)
    _check_context(unet_cfg, text_cfg, path)
    schedule = _schedule_from_betas(sd, path)

    unet, vae, text = UNet(unet_cfg), VAE(vae_cfg), TextEncoder(text_cfg)
    _load_audited(unet, *_apply_rules(unet_sd, _ldm_unet_rules(unet_cfg.layers_per_block), _UNET_RESNET_NAMES),
                  f"U-Net ({UNET_PREFIX}*)", path, keep_init=is_style_param)
    mapped, unmatched = _apply_rules(vae_sd, _ldm_vae_rules(len(vae_cfg.block_channels)),
                                     (("nin_shortcut.", "conv_shortcut."),))
    _load_audited(vae, mapped, unmatched, f"VAE ({VAE_PREFIX}*)", path)
    if kind == "sd1":
        with _naming(path):
            text_sd = hf_clip_to_open_clip(text_sd)  # q/k/v -> in_proj; transformers -> open_clip names
    else:  # open_clip names already; SD 2.x runs the penultimate block, the last one is unused
        last = re.compile(rf"transformer\.resblocks\.{text_cfg.layers}\.")
        notes.append(f"text encoder: block {text_cfg.layers} of {text_cfg.layers + 1} ignored (SD 2.x uses the "
                     "penultimate layer)")
        text_sd = {k: v for k, v in text_sd.items() if not last.match(k)}
    _load_audited(text, *_apply_rules(text_sd, _IDENTITY), f"text encoder ({text_prefix}*)", path)
    notes.append(f"{len(listed)} keys on the ignore list (DDPM buffers, position_ids, CLIP heads, EMA bookkeeping)")
    version = "SD 1.x, OpenAI CLIP text" if kind == "sd1" else "SD 2.x, OpenCLIP text"
    return StableDiffusion(unet, vae, text, NoiseSchedule(**schedule, prediction_type=prediction_type),
                           prediction_type, vae_cfg.scale_factor, 768 if upcast else 512, dict(SD_SAMPLER),
                           f"single file ({version})", notes)


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
