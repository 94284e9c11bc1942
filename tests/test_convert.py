"""convert.py on diffusers folders, our own format (checkpoint.py's writers too), the CLI and bad inputs.

References: the folders are written by diffusers' and transformers' own `save_pretrained` from tiny
random SD 1-style and SD 2-style models, and those models compute the expected outputs.
Original single files (ldm layout) are tested in test_convert_single_file.py.
"""
import json
import os
import re
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import checkpoint
import cli
import convert
import unet
from checkpoint import CheckpointError, save_stable_diffusion
from convert import load_stable_diffusion

TOL = 1e-4
# Tiny configs in the two SD flavours (widths multiple of 32 for GroupNorm(32); head counts as SD's rules give:
# SD 1.x 8 heads per level, SD 2.x 64-dim heads, CLIP 64-dim heads).
SD1 = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
              use_linear_projection=False, transformer_layers_per_block=2, sample_size=8),
    vae=dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, scaling_factor=0.5),
    text=dict(hidden_size=64, intermediate_size=256, num_attention_heads=1, num_hidden_layers=2,
              hidden_act="quick_gelu"))
SD2 = dict(
    unet=dict(block_out_channels=(64, 128, 128), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
              attention_head_dim=[1, 2, 2], use_linear_projection=True, sample_size=8),
    vae=dict(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1),
    text=dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu"))
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                set_alpha_to_one=False)


def tiny_models(flavour: dict, seed: int = 0):
    """Random diffusers U-Net and VAE and transformers CLIP text model (eval mode)."""
    torch.manual_seed(seed)
    return (UNet2DConditionModel(**flavour["unet"]).eval(), AutoencoderKL(**flavour["vae"]).eval(),
            CLIPTextModel(CLIPTextConfig(**flavour["text"])).eval())


def write_diffusers_folder(root, models, scheduler, bin_weights=False):
    """What StableDiffusionPipeline.save_pretrained writes (minus the tokenizer and safety checker)."""
    unet, vae, text = models
    unet.save_pretrained(root / "unet", safe_serialization=not bin_weights)
    vae.save_pretrained(root / "vae", safe_serialization=not bin_weights)
    if bin_weights:  # the SD 1.5 / 2.1 repositories' pytorch_model.bin: transformers 4 names ('text_model.' prefix)
        text.config.save_pretrained(root / "text_encoder")
        torch.save({f"text_model.{k}": v for k, v in text.state_dict().items()},
                   root / "text_encoder" / "pytorch_model.bin")
        reloaded = CLIPTextModel.from_pretrained(root / "text_encoder")  # transformers itself reads it back
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), text.state_dict().values()))
    else:
        text.save_pretrained(root / "text_encoder")
    scheduler.save_pretrained(root / "scheduler")
    return root


def inputs(context_dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([3, 777]),
                context=torch.randn(2, 77, context_dim, generator=g),
                image=torch.rand(2, 3, 32, 32, generator=g) * 2 - 1)


@torch.no_grad()
def max_errors(sd, models) -> dict:
    """Our loaded modules against the reference models on the same inputs: max abs errors."""
    unet, vae, text = models
    d = inputs(unet.config.cross_attention_dim)
    tokens = sd.text_encoder.tokenize(["a photo of a cat", ""])
    z = vae.encode(d["image"]).latent_dist.mean
    return {
        "unet": (sd.unet(d["x"], d["t"], d["context"])
                 - unet(d["x"], d["t"], encoder_hidden_states=d["context"]).sample).abs().max().item(),
        "vae.encode": (sd.vae.encode(d["image"]).mean - z).abs().max().item(),
        "vae.decode": (sd.vae.decode(z) - vae.decode(z).sample).abs().max().item(),
        "text": (sd.text_encoder(tokens) - text(input_ids=tokens).last_hidden_state).abs().max().item(),
    }


def assert_matches(sd, models, label: str):
    errors = max_errors(sd, models)
    for name, err in errors.items():
        print(f"{label}: {name} max abs err {err:.2e}")
        assert err <= TOL, (label, name, err)


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    models = tiny_models(SD1)
    root = write_diffusers_folder(tmp_path_factory.mktemp("sd1"), models,
                                  PNDMScheduler(**SCHEDULE, skip_prk_steps=True), bin_weights=True)
    return root, models


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    models = tiny_models(SD2, seed=1)
    root = write_diffusers_folder(tmp_path_factory.mktemp("sd2"), models,
                                  DDIMScheduler(**SCHEDULE, clip_sample=False, prediction_type="v_prediction"))
    return root, models


# ------------------------------------------------------------------------------ diffusers folders
def test_sd1_folder_bin_weights(sd1_folder):
    root, models = sd1_folder
    assert (root / "unet" / "diffusion_pytorch_model.bin").is_file()
    sd = load_stable_diffusion(root)
    assert_matches(sd, models, "SD1 folder (.bin)")
    assert sd.prediction_type == "epsilon" and sd.scale_factor == 0.5
    assert sd.unet.cfg.num_heads == (8, 8) and not sd.unet.cfg.linear_projection and sd.unet.cfg.transformer_depth == 2
    assert sd.text_encoder.cfg.act == "quick_gelu" and sd.text_encoder.cfg.pad == "eos"
    assert sd.image_size == 8 * 2 and sd.sampler_config == dict(steps_offset=1, set_alpha_to_one=False)


def test_sd2_folder_safetensors(sd2_folder):
    root, models = sd2_folder
    sd = load_stable_diffusion(root)
    assert_matches(sd, models, "SD2 folder (.safetensors)")
    assert sd.prediction_type == "v_prediction" == sd.schedule.prediction_type and sd.scale_factor == 0.18215
    assert sd.unet.cfg.num_heads == (1, 2, 2) and sd.unet.cfg.attention_levels == (True, True, False)
    assert sd.text_encoder.cfg.act == "gelu" and sd.text_encoder.cfg.pad == "zero"
    ref = DDIMScheduler.from_pretrained(root / "scheduler")
    err = (sd.schedule.alpha_bar - ref.alphas_cumprod).abs().max().item()
    print(f"SD2 folder: alpha_bar max abs err {err:.2e}")
    assert err < 1e-6
    assert load_stable_diffusion(root, prediction_type="epsilon").prediction_type == "epsilon"  # argument overrides


def test_tokenizer_pad_token_decides_text_mode(sd2_folder, tmp_path):
    """SD 1 pads prompts with the end token, SD 2 with "!" (id 0): the tokenizer's pad token says which."""
    from transformers import CLIPTokenizer
    (tmp_path / "vocab.json").write_text(json.dumps({"!": 0, "a</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    for pad, mode in (("<|endoftext|>", "eos"), ("!", "zero")):
        folder = shutil.copytree(sd2_folder[0], tmp_path / f"pad{mode}")
        tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token=pad)
        tokenizer.save_pretrained(folder / "tokenizer")  # transformers writes the pad token into tokenizer_config
        assert load_stable_diffusion(folder).text_encoder.cfg.pad == mode


def test_legacy_vae_attention_names(sd2_folder, tmp_path):
    """Folders from diffusers < 0.14 name the VAE mid attention query/key/value/proj_attn; diffusers reads them."""
    root, models = sd2_folder
    old = shutil.copytree(root, tmp_path / "old")
    new_to_old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    weights = {}
    for k, v in models[1].state_dict().items():
        for new, o in new_to_old.items():
            k = k.replace(f"attentions.0.{new}", f"attentions.0.{o}")
        weights[k] = v
    checkpoint.atomic_write_safetensors(old / "vae" / "diffusion_pytorch_model.safetensors", weights)
    ref = AutoencoderKL.from_pretrained(old / "vae").eval()  # diffusers' own loader accepts the old names
    assert_matches(load_stable_diffusion(old), (models[0], ref, models[2]), "legacy VAE names")


# ------------------------------------------------------------------------------ our format, CLI, style
def test_round_trip_is_bit_identical(sd2_folder, tmp_path):
    sd = load_stable_diffusion(sd2_folder[0])
    save_stable_diffusion(sd, tmp_path / "ours")
    again = load_stable_diffusion(tmp_path / "ours")
    assert again.source == "clue-pytorch folder" and again.prediction_type == "v_prediction"
    assert (again.scale_factor, again.image_size, again.sampler_config) == (sd.scale_factor, sd.image_size,
                                                                            sd.sampler_config)
    d = inputs(64)
    tokens = sd.text_encoder.tokenize(["a red bird"])
    with torch.no_grad():
        pairs = [(m.unet(d["x"], d["t"], d["context"]), m.vae.decode(d["x"]), m.text_encoder(tokens))
                 for m in (sd, again)]
    assert all(torch.equal(a, b) for a, b in zip(*pairs))
    assert not [f for f in os.listdir(tmp_path / "ours") if f.startswith(".")]  # no temporary files left


def test_cli_half(sd1_folder, tmp_path, capsys):
    convert.main([str(sd1_folder[0]), str(tmp_path / "half"), "--half", "--prediction-type", "v_prediction"])
    out = capsys.readouterr().out
    print(out)
    assert "diffusers folder" in out and "M parameters" in out
    _, tensors = checkpoint.read_checkpoint(tmp_path / "half")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    sd = load_stable_diffusion(tmp_path / "half")
    assert sd.prediction_type == "v_prediction"
    ref = load_stable_diffusion(sd1_folder[0]).unet.state_dict()
    assert all(torch.equal(v, ref[k].half().float()) for k, v in sd.unet.state_dict().items())


def test_style_branch_kept_or_dropped(sd2_folder, tmp_path):
    """style=True adds the zero-initialised CLUE branch; our format keeps trained style weights; style=False
    drops them."""
    sd = load_stable_diffusion(sd2_folder[0], style=True)
    style_keys = [k for k in sd.unet.state_dict() if unet.is_style_param(k)]
    assert style_keys and all(".attn_style." in k or ".norm_style." in k for k in style_keys)
    d = inputs(64)
    s = torch.randn(2, 4, 64)
    with torch.no_grad():
        plain = sd.unet(d["x"], d["t"], d["context"])
        assert torch.equal(plain, sd.unet(d["x"], d["t"], d["context"], style=s))  # zero-init output projection
        for k, p in sd.unet.named_parameters():
            if unet.is_style_param(k):
                p.add_(0.01 * torch.randn_like(p))  # as if trained
    style_encoder = {"style_encoder.head.weight": torch.randn(3, 3)}
    save_stable_diffusion(sd, tmp_path / "clue", extra_config={"style": {"tokens": 4}}, extra_tensors=style_encoder)
    kept = load_stable_diffusion(tmp_path / "clue")
    assert kept.unet.cfg.style and kept.extra_config == {"style": {"tokens": 4}}
    assert torch.equal(kept.extra_tensors["style_encoder.head.weight"], style_encoder["style_encoder.head.weight"])
    assert all(torch.equal(v, sd.unet.state_dict()[k]) for k, v in kept.unet.state_dict().items())
    dropped = load_stable_diffusion(tmp_path / "clue", style=False)
    assert not dropped.unet.cfg.style and any("style-branch tensors left out" in n for n in dropped.notes)
    with torch.no_grad():
        assert torch.equal(dropped.unet(d["x"], d["t"], d["context"]), plain)


def test_atomic_writers(tmp_path):
    checkpoint.atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    checkpoint.atomic_write_json(tmp_path / "a.json", {"x": 3})  # replaces
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 3}
    w = torch.randn(4, 4)
    shared = {"a": w, "b": w, "c": w[2:], "d": w.t()}  # views of one storage: safetensors alone refuses them
    checkpoint.atomic_write_safetensors(tmp_path / "m.safetensors", shared)
    back = checkpoint.read_state_dict(tmp_path / "m.safetensors")
    assert all(torch.equal(back[k], v) for k, v in shared.items())
    assert sorted(os.listdir(tmp_path)) == ["a.json", "m.safetensors"]


# ------------------------------------------------------------------------------ bad inputs
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors: no such file or folder"):
        load_stable_diffusion(tmp_path / "nowhere.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(sd1_folder, tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    weights = checkpoint.read_state_dict(sd1_folder[0] / "unet" / "diffusion_pytorch_model.bin")
    if suffix == ".ckpt":
        torch.save({"state_dict": weights}, full)
    else:
        checkpoint.atomic_write_safetensors(full, weights)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"cut\{suffix}: cannot be read as .*truncated"):
        load_stable_diffusion(cut)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".weights"])
def test_random_bytes(tmp_path, suffix):
    f = tmp_path / f"noise{suffix}"
    f.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
                  .numpy().tobytes())
    with pytest.raises(CheckpointError, match=rf"noise\{suffix}: cannot be read as"):
        load_stable_diffusion(f)


def test_unknown_state_dict(tmp_path):
    f = tmp_path / "classifier.safetensors"
    checkpoint.atomic_write_safetensors(f, {"backbone.fc.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"classifier.safetensors: no Stable Diffusion U-Net .*"
                                              r"found 2 tensors: backbone.fc \(1\), head.bias \(1\)"):
        load_stable_diffusion(f)


def test_folder_missing_vae(sd1_folder, tmp_path):
    broken = shutil.copytree(sd1_folder[0], tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"broken: a diffusers Stable Diffusion folder needs .* missing vae/"):
        load_stable_diffusion(broken)


def test_shapes_disagree_with_config(sd1_folder, tmp_path):
    broken = shutil.copytree(sd1_folder[0], tmp_path / "broken")
    cfg_file = broken / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["out_channels"] = 3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_stable_diffusion(broken)
    msg = str(e.value)
    print(msg)
    assert "diffusion_pytorch_model.bin: the U-Net weights do not match" in msg
    assert "conv_out.weight: (4, 32, 3, 3) float32 in the source, (3, 32, 3, 3) float32 in our model" in msg
    assert "conv_out.bias: (4,) float32 in the source, (3,) float32 in our model" in msg


@pytest.mark.parametrize("file,key,value,says", [  # each used to be a traceback, or written and then unloadable
    ("unet/config.json", "layers_per_block", "x", r"unet/config.json layers_per_block: expected an integer, got 'x'"),
    ("unet/config.json", "norm_eps", 0, r"unet/config.json: UNetConfig fields \['resnet_eps=0'\] out of range"),
    ("unet/config.json", "use_linear_projection", "x", r"unet/config.json linear_projection: expected true or false"),
    ("unet/config.json", "sample_size", 0, r"broken: top-level fields \['image_size=0'\] out of range"),
    ("vae/config.json", "scaling_factor", -1, r"vae/config.json: VAEConfig fields \['scale_factor=-1.0'\]"),
    ("text_encoder/config.json", "hidden_size", "x", r"text_encoder/config.json: a value of the wrong type"),
    ("text_encoder/config.json", "num_hidden_layers", 0, r"text_encoder/config.json: TextConfig fields \['layers=0'\]"),
    ("scheduler/scheduler_config.json", "beta_end", "x", r"scheduler_config.json: a value of the wrong type"),
    ("scheduler/scheduler_config.json", "steps_offset", -1, r"broken \[sampler\]: steps_offset -1 must lie in")])
def test_bad_values_in_diffusers_configs_are_named(sd1_folder, tmp_path, capsys, file, key, value, says):
    """A diffusers folder's config values meet our format's type and range checks: convert.py refuses with one line
    naming the file, and writes nothing."""
    broken = shutil.copytree(sd1_folder[0], tmp_path / "broken")
    cfg = json.loads((broken / file).read_text())
    (broken / file).write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(SystemExit) as e:
        cli.run(convert.main, [str(broken), str(tmp_path / "out")], "convert.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and re.search(says, err), err
    assert not (tmp_path / "out" / "config.json").exists()


def tiny_sdxl_unet():
    """A tiny SDXL-shaped U-Net (text_time added conditioning), as diffusers builds it."""
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8)


def test_sdxl_folder_refused(tmp_path):
    torch.manual_seed(0)
    xl = tiny_sdxl_unet()
    xl.save_pretrained(tmp_path / "xl" / "unet")
    for sub in ("vae", "text_encoder", "scheduler"):
        (tmp_path / "xl" / sub).mkdir()
    with pytest.raises(CheckpointError, match="addition_embed_type='text_time': an SDXL-style U-Net"):
        load_stable_diffusion(tmp_path / "xl")
