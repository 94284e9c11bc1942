"""convert.py on original single files (the CompVis / Stability "ldm" layout), SD 1.x and SD 2.x.

The files are made by turning tiny random diffusers / transformers / open_clip models into the ldm
layout with a small writer below, and the writer is CHECKED with diffusers' own single-file converters
(`diffusers.loaders.single_file_utils`): converting the file back must give the original diffusers
weights exactly. Only then is our loader run on the file and compared with those models.
"""
import re

import open_clip
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (DIFFUSERS_TO_LDM_MAPPING, convert_ldm_clip_checkpoint,
                                                 convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                 convert_open_clip_checkpoint, infer_diffusers_model_type)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from checkpoint import CheckpointError
from convert import load_stable_diffusion
from test_convert import SD1, SD2, assert_matches, tiny_models, tiny_sdxl_unet


# ------------------------------------------------------------------------------ diffusers -> ldm writer
def unet_to_ldm(unet: UNet2DConditionModel) -> dict:
    """diffusers U-Net state dict -> ldm names (model.diffusion_model.*), by index arithmetic."""
    L = unet.config.layers_per_block
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],  # diffusers' own table: diffusers name -> ldm name
             **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    fixed = {d.rsplit(".", 1)[0]: ldm.rsplit(".", 1)[0] for d, ldm in fixed.items()}
    state = unet.state_dict()
    out = {}
    for key, t in state.items():
        name, suffix = key.rsplit(".", 1)
        if name in fixed:
            new = fixed[name]
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"input_blocks.{1 + b * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
            new = f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name):
            new = f"middle_block.{1 if m[1] == 'attentions' else 2 * int(m[2])}.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"output_blocks.{b * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
            b = int(m[1])
            has_attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in state)
            new = f"output_blocks.{b * (L + 1) + L}.{2 if has_attention else 1}.conv"
        else:
            raise AssertionError(f"test writer: no ldm name for {key}")
        if "resnets" in name:
            for d, l in resnet:
                new = re.sub(rf"\.{d}$", f".{l}", new)
        out[f"model.diffusion_model.{new}.{suffix}"] = t.clone()
    return out


def vae_to_ldm(vae) -> dict:
    """diffusers AutoencoderKL state dict -> ldm names (first_stage_model.*); attention Linear -> 1x1 conv."""
    n = len(vae.config.block_out_channels)
    out = {}
    for key, t in vae.state_dict().items():
        new = key
        for pattern, repl in [
            (r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
            (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
            (r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block."),
            (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample."),
            (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
            (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
            (r"mid_block\.attentions\.0\.to_(q|k|v)\.", r"mid.attn_1.\1."),
            (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
            (r"conv_norm_out\.", "norm_out."), (r"conv_shortcut\.", "nin_shortcut.")]:
            new = re.sub(pattern, repl, new)
        if ".attn_1." in new and new.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]  # ldm's attention q/k/v/proj_out are 1x1 convs
        out[f"first_stage_model.{new}"] = t.clone()
    return out


def open_clip_text(width=64, heads=4, layers=3, seed=0):
    """An OpenCLIP model as ldm's FrozenOpenCLIPEmbedder keeps it: the CLIP without its vision tower."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim=32,
                                 vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                                 text_cfg=dict(context_length=77, vocab_size=49408, width=width, heads=heads,
                                               layers=layers))
    del model.visual
    return model.eval()


def ldm_buffers() -> dict:
    """The DDPM buffers ldm saves (LatentDiffusion.register_schedule), from diffusers' SD schedule."""
    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {"betas": s.betas.clone(), "alphas_cumprod": s.alphas_cumprod.clone(),
            "sqrt_alphas_cumprod": s.alphas_cumprod.sqrt(), "posterior_variance": s.betas.clone()}


def build_file(kind: str):
    """(ldm state dict, reference modules (raw U-Net, EMA U-Net, VAE, HF text model)) checked with diffusers."""
    flavour = SD1 if kind == "sd1" else SD2
    unet, vae, hf_text = tiny_models(flavour, seed=2)
    ema_unet = tiny_models(flavour, seed=3)[0]
    ckpt = {**unet_to_ldm(unet), **vae_to_ldm(vae), **ldm_buffers()}
    ckpt.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in unet_to_ldm(ema_unet).items()})
    ckpt.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)})
    if kind == "sd1":  # transformers CLIPTextModel under cond_stage_model.transformer (transformers-4 names)
        ckpt.update({f"cond_stage_model.transformer.text_model.{k}": v.clone()
                     for k, v in hf_text.state_dict().items()})
        ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:  # open_clip names; SD 2 runs all blocks but the last
        oc = open_clip_text(layers=3)
        ckpt.update({f"cond_stage_model.model.{k}": v.clone() for k, v in oc.state_dict().items()})
        hf_text = CLIPTextModel(CLIPTextConfig(**{**flavour["text"], "num_hidden_layers": 2})).eval()
        converted = convert_open_clip_checkpoint(hf_text, ckpt)  # diffusers' SD 2 text converter
        missing, unexpected = hf_text.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()},
                                                      strict=False)
        assert not missing and all(k.startswith("encoder.layers.2.") or k == "text_projection.weight"
                                   for k in unexpected), (missing, unexpected)
    # --- the check of the writer: diffusers' converters give back the original diffusers weights exactly
    for extract_ema, ref in ((False, unet), (True, ema_unet)):
        back = convert_ldm_unet_checkpoint(ckpt, dict(unet.config), extract_ema=extract_ema)
        assert back.keys() == ref.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    back = convert_ldm_vae_checkpoint(ckpt, dict(vae.config))
    assert back.keys() == vae.state_dict().keys() and all(torch.equal(back[k], v) for k, v in vae.state_dict().items())
    if kind == "sd1":
        back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
        back.pop("embeddings.position_ids")
        assert back.keys() == hf_text.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in hf_text.state_dict().items())
    return ckpt, (unet, ema_unet, vae, hf_text)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def ldm_file(request):
    return request.param, *build_file(request.param)


def write(ckpt: dict, path, ema: bool):
    if not ema:
        ckpt = {k: v for k, v in ckpt.items() if not k.startswith("model_ema.")}
    if path.suffix == ".ckpt":  # a Lightning checkpoint: the weights under "state_dict"
        torch.save({"state_dict": ckpt, "global_step": 1000, "epoch": 3}, path)
    else:
        save_file({k: v.contiguous() for k, v in ckpt.items()}, path)
    return path


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("suffix,ema", [(".safetensors", True), (".ckpt", False)])
def test_single_file_matches_diffusers(ldm_file, tmp_path, suffix, ema):
    kind, ckpt, (unet, ema_unet, vae, text) = ldm_file
    path = write(ckpt, tmp_path / f"{kind}{suffix}", ema)
    text_heads = None if kind == "sd1" else 4  # SD1 tiny text uses CLIP's 64-dim heads; SD2 tiny has 4 heads
    sd = load_stable_diffusion(path, text_heads=text_heads)
    print(kind, suffix, sd.source, *sd.notes, sep="\n  ")
    assert_matches(sd, (ema_unet if ema else unet, vae, text), f"{kind}{suffix} ema={ema}")
    expected = ("epsilon", 512, False) if kind == "sd1" else ("v_prediction", 768, True)
    assert (sd.prediction_type, sd.image_size, sd.unet.cfg.upcast_attention) == expected
    assert sd.scale_factor == 0.18215 and sd.schedule.to_dict()["beta_schedule"] == "scaled_linear"
    assert sd.text_encoder.cfg.layers == 2 and sd.text_encoder.cfg.pad == ("eos" if kind == "sd1" else "zero")
    if ema:  # the raw weights on request
        assert_matches(load_stable_diffusion(path, use_ema=False, text_heads=text_heads, prediction_type="epsilon"),
                       (unet, vae, text), f"{kind}{suffix} use_ema=False")


def test_fp16_file(ldm_file, tmp_path):
    """Pruned fp16 files (fp16 betas too) load into fp32 modules; the weights are the fp16-rounded originals."""
    kind, ckpt, (unet, *_) = ldm_file
    half = {k: v.half() if v.is_floating_point() else v for k, v in ckpt.items()}
    sd = load_stable_diffusion(write(half, tmp_path / "half.safetensors", ema=False),
                               text_heads=None if kind == "sd1" else 4)
    assert sd.schedule.to_dict()["beta_start"] == 0.00085
    ours = sd.unet.state_dict()
    assert all(torch.equal(ours[k], v.half().float()) for k, v in unet.state_dict().items())


def test_prediction_type_argument(ldm_file, tmp_path):
    kind, ckpt, _ = ldm_file
    path = write(ckpt, tmp_path / "m.safetensors", ema=False)
    heads = dict(text_heads=None if kind == "sd1" else 4)
    other = "v_prediction" if kind == "sd1" else "epsilon"
    sd = load_stable_diffusion(path, prediction_type=other, **heads)
    assert sd.prediction_type == other == sd.schedule.prediction_type
    assert sd.image_size == 512 and not sd.unet.cfg.upcast_attention


def test_wrong_head_count_is_caught_by_shapes(ldm_file, tmp_path):
    """Heads are not in the weights: a wrong count the widths cannot take is an error, not a silent misload."""
    kind, ckpt, _ = ldm_file
    path = write(ckpt, tmp_path / "m.safetensors", ema=False)
    with pytest.raises(CheckpointError, match=r"m.safetensors: UNetConfig: level width \d+ must be divisible by its "
                                              r"num_heads \(7\)"):
        load_stable_diffusion(path, unet_heads=7)


def test_unlisted_key_is_reported(ldm_file, tmp_path):
    kind, ckpt, _ = ldm_file
    path = write({**ckpt, "model.diffusion_model.extra_head.weight": torch.zeros(3)}, tmp_path / "m.safetensors", False)
    with pytest.raises(CheckpointError, match=r"(?s)U-Net .*source keys with no parameter of ours.*extra_head.weight"):
        load_stable_diffusion(path, text_heads=None if kind == "sd1" else 4)


@pytest.mark.parametrize("betas,message", [(torch.linspace(0.001, 0.02, 1000), "are not a scaled_linear schedule"),
                                           (torch.linspace(-0.1, 0.02, 1000), "0 < beta_start < beta_end < 1")])
def test_stored_betas_that_are_not_sd_schedule_are_named(ldm_file, tmp_path, betas, message):
    kind, ckpt, _ = ldm_file
    path = write({**ckpt, "betas": betas}, tmp_path / "m.safetensors", ema=False)
    with pytest.raises(CheckpointError, match=rf"m.safetensors: .*{message}"):
        load_stable_diffusion(path, text_heads=None if kind == "sd1" else 4)


def test_sdxl_file_refused(tmp_path):
    """An SDXL-shaped file (diffusers' SDXL U-Net in ldm names, CLIP-L and OpenCLIP under conditioner.embedders)."""
    torch.manual_seed(0)
    xl = tiny_sdxl_unet()
    _, vae, clip_l = tiny_models(SD1)
    ckpt = {**unet_to_ldm(xl), **vae_to_ldm(vae)}
    ckpt.update({f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in clip_l.state_dict().items()})
    ckpt.update({f"conditioner.embedders.1.model.{k}": v.clone()
                 for k, v in open_clip_text(width=32, heads=2, layers=10).state_dict().items()})
    assert infer_diffusers_model_type(ckpt) == "xl_base"  # diffusers agrees that this is SDXL
    path = write(ckpt, tmp_path / "sdxl.safetensors", ema=False)
    with pytest.raises(CheckpointError, match=r"sdxl.safetensors: this looks like an SDXL checkpoint .*"
                                              r"found \d+ tensors: .*conditioner.embedders"):
        load_stable_diffusion(path)


def test_inpainting_file_refused(tmp_path):
    torch.manual_seed(0)
    unet, vae, text = tiny_models(SD1)
    inpaint = UNet2DConditionModel(**{**SD1["unet"], "in_channels": 9})
    ckpt = {**unet_to_ldm(inpaint), **vae_to_ldm(vae),
            **{f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.state_dict().items()}}
    assert infer_diffusers_model_type(ckpt) == "inpainting"  # diffusers' verdict
    path = write(ckpt, tmp_path / "inpaint.ckpt", ema=False)
    with pytest.raises(CheckpointError, match=r"inpaint.ckpt: the U-Net takes 9 input channels "
                                              r"\(an inpainting model\)"):
        load_stable_diffusion(path)


# Released SD 1.5 / 2.1 (768-v) architectures as diffusers configures them (unet/config.json of the repositories).
REAL_UNET = {
    "sd1": dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
    "sd2": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                upcast_attention=True)}


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_full_size_layouts_on_meta_device(kind):
    """Full-size SD 1.5 / 2.1 files, tensors on the meta device (shapes, no memory): the shapes give our sd15() /
    sd21() presets, every key maps, and the parameter counts equal the reference models'."""
    from diffusers import AutoencoderKL

    import convert
    from text_encoder import TextConfig
    from unet import UNetConfig
    from vae import VAEConfig
    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_UNET[kind])  # diffusers' defaults are SD's 4 levels, 2 resnets each
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
        ckpt = {**unet_to_ldm(unet), **vae_to_ldm(vae)}
        if kind == "sd1":  # OpenAI CLIP ViT-L/14 text tower
            text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768))
            ckpt.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.state_dict().items()})
        else:  # OpenCLIP ViT-H/14 text tower (24 blocks); the reference is diffusers' 23-layer CLIPTextModel
            oc = open_clip_text(width=1024, heads=16, layers=24)
            ckpt.update({f"cond_stage_model.model.{k}": v for k, v in oc.state_dict().items()})
            text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                                num_hidden_layers=23, hidden_act="gelu", projection_dim=1024))
        back = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))  # the writer, checked at full size
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}
        sd = convert.from_ldm_state_dict(ckpt, f"meta {kind}")
    presets = (UNetConfig.sd15(style=False), TextConfig.sd15()) if kind == "sd1" else \
        (UNetConfig.sd21(style=False), TextConfig.sd21())
    assert (sd.unet.cfg, sd.vae.cfg, sd.text_encoder.cfg) == (presets[0], VAEConfig.sd(), presets[1])
    for name, ours, ref in (("unet", sd.unet, unet), ("vae", sd.vae, vae), ("text", sd.text_encoder, text)):
        n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
        print(f"{kind} {name}: {n_ours:,} parameters (reference {n_ref:,})")
        assert n_ours == n_ref
