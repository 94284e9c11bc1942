"""Original Stable Diffusion 1.x / 2.x single files (the CompVis / Stability "ldm" layout) -> our modules.

A single `.safetensors` / `.ckpt` file holds the whole model: `model.diffusion_model.*` (U-Net),
`first_stage_model.*` (VAE), `cond_stage_model.*` (text). SD 1.x keeps OpenAI CLIP ViT-L/14 in transformers
names (`cond_stage_model.transformer.*`), SD 2.x keeps OpenCLIP ViT-H/14 in open_clip names
(`cond_stage_model.model.*`) and runs its penultimate block. Every size is read from the tensor shapes except
what weights cannot tell, which the original ldm configs fix: attention heads (SD 1.x U-Net: 8 per level;
SD 2.x: 64-dim heads; both CLIP towers: 64-dim heads), GroupNorm groups (32) and the latent scale factor
(0.18215).
PREDICTION TYPE: weights do not say whether a file is epsilon or v-prediction. Default, as diffusers'
`from_single_file`: SD 1.x "epsilon", SD 2.x "v_prediction" (the 768 px SD 2.0 / 2.1 models; pass
prediction_type="epsilon" for the 512 px 2.x-base files). EMA weights (`model_ema.*`, stored under the U-Net key
with its dots removed) are used when present unless use_ema=False.

Our U-Net and VAE use diffusers' module names, so the rules below rename ldm's to diffusers'
(as diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` do) and the audit (audit.py)
checks the result. The tensor transforms: the 1x1-conv -> Linear squeeze of the VAE's mid-block attention
(ldm stores q, k, v, proj_out as convs) and, for SD 1.x, the q/k/v concatenation of the CLIP text attention
(`text_encoder.hf_clip_to_open_clip`).

Refused with a message that says what was found: SDXL, SD3 / Flux, inpainting (9 input channels) and
instruct-pix2pix (8), class-conditioned U-Nets (upscaler, unCLIP), ControlNet / LoRA files, single diffusers
components and files without a U-Net, VAE or text encoder. Left out: VAE-only files, ldm yaml configs.

Public: from_ldm_state_dict (what load_stable_diffusion in convert.py calls on a single file),
detect_single_file, unet_config_from_ldm, vae_config_from_ldm, text_config_from_ldm.
"""
from __future__ import annotations

import re

import torch

from audit import _IDENTITY, _apply_rules, _listing, _load_audited, is_style_param
from checkpoint import CheckpointError, _naming
from schedulers import NoiseSchedule
from stable_diffusion import SD_SAMPLER, SD_SCHEDULE, StableDiffusion, _check_context, _refuse_unet_variant
from text_encoder import TextConfig, TextEncoder, hf_clip_to_open_clip, text_config_from_hf
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

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
