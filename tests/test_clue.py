"""clue.py: zero-init parity with plain SD (weights written by diffusers), style controls, training loss,
condition dropout, diagnostics, save/load. Tiny models on the CPU; the training-based tests share one model
trained for a few dozen steps on a synthetic class folder (module fixture)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clue import CLUE, CLUEConfig, Sampling, StyleChoice, slerp
from checkpoint import CheckpointError, load_clue, save_clue, save_stable_diffusion
from convert import load_stable_diffusion
from data import ClassFolderDataset
from reference import clip_tokenizer_offline
from style_encoder import StyleConfig
from unet import UNetConfig

SMALL_UNET = UNetConfig.tiny(block_channels=(32, 64), num_heads=(2, 4))  # cheaper than the demo's (64, 128)
PROMPT = "a picture of {class}"


# ------------------------------------------------------------------------------------------ helpers (also
# imported by test_sample.py)
def build_tiny_sd_pipeline(folder, text_mode="sd2", prediction_type="epsilon", seed=0):
    """A tiny random diffusers StableDiffusionPipeline (DDIM scheduler as in SD), written with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    sd2 = text_mode == "sd2"
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2,
        norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256,
                                        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                        hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=0 if sd2 else 49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                              timestep_spacing="leading")
    tokenizer = clip_tokenizer_offline(os.path.join(str(folder), "_vocab"), "zero" if sd2 else "eos")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(folder))
    return pipe


def make_image_folder(root, per_class=4, size=32):
    """Two classes of 32 px images: horizontal / vertical stripes whose period and ink level vary (a 'style')."""
    rng = np.random.default_rng(0)
    for name in ("horizontal_bars", "vertical_bars"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            period, ink = 4 + 2 * (i % 3), rng.uniform(0, 120)
            stripes = (np.arange(size) // (period // 2)) % 2 == 0
            a = np.where(stripes[:, None] if name.startswith("h") else stripes[None, :], ink, 255.0)
            a = np.broadcast_to(a, (size, size)).astype(np.uint8)
            Image.fromarray(a, mode="L").save(os.path.join(root, name, f"{i:03d}.png"))
    return root


def small_clue(style=True, **clue_kw) -> CLUE:
    torch.manual_seed(0)
    return CLUE.from_config(unet=SMALL_UNET, style=StyleConfig.tiny() if style else None,
                            clue=CLUEConfig.tiny(**clue_kw))


def fixed_loss(model, batch, seed=123, n=3):
    """The training loss averaged over n fixed draws of t / noise / dropout (comparable before and after)."""
    with torch.no_grad():
        return sum(model.loss(batch, step=10 ** 6, generator=torch.Generator().manual_seed(seed + i))[1]["loss"]
                   for i in range(n)) / n


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_image_folder(str(tmp_path_factory.mktemp("bars")))
    ds = ClassFolderDataset(root, PROMPT, size=32)
    return ds, DataLoader(ds, batch_size=8, shuffle=False)


@pytest.fixture(scope="module")
def trained(data):
    """A small CLUE trained 20 steps (U-Net + style encoder, the style parameters at a higher learning rate so
    that the branch matters after so few steps; VAE and text encoder frozen, as train.py does)."""
    ds, loader = data
    model = small_clue(beta=1e-3, text_dropout=0.1, style_dropout=0.1)
    batch = next(iter(loader))
    model.vae.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    style = [p for n, p in model.named_parameters() if p.requires_grad and "style" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "style" not in n]
    opt = torch.optim.AdamW([{"params": rest}, {"params": style, "lr": 1e-2}], lr=2e-3, weight_decay=0.0)
    before = fixed_loss(model, batch)
    torch.manual_seed(1)
    model.train()
    for step in range(20):
        loss, logs = model.loss(batch, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = fixed_loss(model, batch)
    # back to requires_grad everywhere, as CLUE.load returns a model: torch's MultiheadAttention (the text
    # tower) computes ~1e-6 differently when its in_proj_weight does not require grad, even under no_grad
    model.requires_grad_(True)
    return model, batch, before, after


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd2")
    pipe = build_tiny_sd_pipeline(folder)
    return folder, pipe


# ------------------------------------------------------------------------------------------ SD parity
def test_clue_on_converted_sd_is_bit_identical_before_training(sd_dir):
    folder, pipe = sd_dir
    sd = load_stable_diffusion(folder)
    vanilla = CLUE.from_stable_diffusion(sd, None)
    clue = CLUE.from_stable_diffusion(load_stable_diffusion(folder), StyleConfig.tiny(), CLUEConfig(image_size=16))
    assert clue.cfg.prediction_type == "epsilon" and clue.cfg.scale_factor == pipe.vae.config.scaling_factor
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        c = clue.encode_prompts(["a red square", "a blue circle"])
        s = torch.randn(2, 4, 64, generator=g) * 3
        plain, with_style, base = clue.unet(x, t, c), clue.unet(x, t, c, style=s), vanilla.unet(x, t, c)
        ref = pipe.unet(x, t, encoder_hidden_states=c).sample
    err = (plain - ref).abs().max().item()
    print(f"CLUE U-Net (style branch added, zero-init) vs diffusers U-Net: max abs err {err:.2e}")
    assert err < 1e-4
    assert torch.equal(plain, with_style) and torch.equal(plain, base)  # bit-identical
    sampling = Sampling(steps=4, height=16, width=16, negative_prompt="blurry")
    img_style = clue.generate(["a red square"], sampling, StyleChoice("prior", tau=1.0), seed=3, progress=False)
    img_plain = vanilla.generate(["a red square"], sampling, seed=3, progress=False)
    assert torch.equal(img_style, img_plain)


def test_vanilla_baseline_has_no_style_parameters(sd_dir):
    for model in (small_clue(style=False),
                  CLUE.from_config(unet=SMALL_UNET, style=StyleConfig(context_dim=64, tokens=0)),
                  CLUE.from_stable_diffusion(load_stable_diffusion(sd_dir[0], style=True), None)):
        names = [n for n, _ in model.named_parameters()]
        assert model.style_encoder is None and not model.unet.cfg.style
        assert not [n for n in names if "style" in n]
        with pytest.raises(ValueError, match="no style branch"):
            model.make_style(StyleChoice("prior"), 1)


# ------------------------------------------------------------------------------------------ training
def test_loss_goes_down(trained):
    _, _, before, after = trained
    print(f"training loss on fixed draws: {before:.4f} -> {after:.4f} after 20 steps")
    assert after < 0.8 * before


def test_kl_modes_and_schedules(data):
    _, loader = data
    batch = next(iter(loader))
    model = small_clue(kl_mode="beta", beta=0.5, beta_warmup_steps=100)
    assert model.kl_weight(0) == (0.0, 0.0) and model.kl_weight(50) == (0.25, 0.0)
    assert model.kl_weight(100) == (0.5, 0.0) and model.kl_weight(10 ** 6) == (0.5, 0.0)
    with torch.no_grad():  # a non-trivial posterior, so that the KL term is visible
        model.style_encoder.to_logvar.bias.fill_(-1.0)
    _, logs = model.loss(batch, step=60, generator=torch.Generator().manual_seed(0))
    assert logs["kl"] > 0.1
    assert math.isclose(logs["loss"], logs["mse"] + 0.3 * logs["kl"], rel_tol=1e-5)
    model.cfg = CLUEConfig.tiny(kl_mode="capacity", gamma=2.0, capacity=0.4, capacity_ramp_steps=200)
    assert model.kl_weight(100) == (2.0, 0.2) and model.kl_weight(400) == (2.0, 0.4)
    _, logs = model.loss(batch, step=100, generator=torch.Generator().manual_seed(0))
    assert math.isclose(logs["loss"], logs["mse"] + 2.0 * abs(logs["kl"] - 0.2), rel_tol=1e-5)
    model.cfg = CLUEConfig.tiny(kl_mode="nonsense")
    with pytest.raises(ValueError, match="kl_mode"):
        model.loss(batch)


def test_min_snr_weighting(data):
    _, loader = data
    batch = next(iter(loader))
    model = small_clue()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    with torch.no_grad():
        plain = model.loss(batch, generator=g())[1]["mse"]
        model.cfg.min_snr_gamma = 1e9  # min(SNR, gamma) / SNR = 1 for epsilon-prediction: no change
        huge = model.loss(batch, generator=g())[1]["mse"]
        model.cfg.min_snr_gamma = 5.0
        weighted = model.loss(batch, generator=g())[1]["mse"]
    print(f"min-SNR: mse {plain:.4f}, gamma=1e9 {huge:.4f}, gamma=5 {weighted:.4f}")
    assert math.isclose(plain, huge, rel_tol=1e-6) and weighted < plain  # weights <= 1, < 1 at low noise


def _capture_unet(model):
    """Record the U-Net's inputs and output of every call."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({"args": args, "kwargs": kwargs, "out": output})

    handle = model.unet.register_forward_hook(hook, with_kwargs=True)
    return calls, handle


def test_text_and_style_dropout(trained):
    model, batch, _, _ = trained
    prompts = list(batch["prompt"])
    with torch.no_grad():
        real, empty = model.encode_prompts(prompts), model.encode_prompts([""])
    cfg0 = model.cfg
    calls, handle = _capture_unet(model)
    try:
        with torch.no_grad():
            for p_text, p_style in ((1.0, 1.0), (0.0, 0.0), (0.0, 0.5)):
                model.cfg = CLUEConfig.tiny(text_dropout=p_text, style_dropout=p_style)
                calls.clear()
                model.loss(batch, generator=torch.Generator().manual_seed(7))
                (call,) = calls
                x, t, context = call["args"]
                scale = call["kwargs"]["style_scale"].flatten()
                assert torch.equal(context, empty.expand_as(real) if p_text == 1 else real)
                if p_style in (0.0, 1.0):
                    assert torch.equal(scale, torch.full_like(scale, 1 - p_style))
                # a skipped style must equal style=None for those samples, exactly
                none = model.unet(x, t, context)
                kept = scale > 0
                assert torch.equal(call["out"][~kept], none[~kept])
                if kept.any():
                    diff = (call["out"][kept] - none[kept]).abs().max().item()
                    print(f"text p={p_text} style p={p_style}: kept {int(kept.sum())}/{len(kept)}, "
                          f"style changes the output by {diff:.2e}")
                    assert diff > 1e-4
                if p_style == 0.5:
                    assert 0 < kept.sum() < len(kept)
    finally:
        handle.remove()
        model.cfg = cfg0


# ------------------------------------------------------------------------------------------ generation
def test_temperature_zero_and_style_draws(trained):
    model, _, _, _ = trained
    prompts, kw = ["a picture of vertical bars"] * 2, dict(sampling=Sampling(steps=5), seed=11, progress=False)
    a = model.generate(prompts, style=StyleChoice("prior", tau=0.0, seed=1), **kw)
    b = model.generate(prompts, style=StyleChoice("prior", tau=0.0, seed=2), **kw)
    zeros = model.generate(prompts, style=StyleChoice(torch.zeros(4, 64)), **kw)
    assert torch.equal(a, b) and torch.equal(a, zeros)
    c = model.generate(prompts, style=StyleChoice("prior", tau=1.0, seed=1), **kw)
    d = model.generate(prompts, style=StyleChoice("prior", tau=1.0, seed=2), **kw)
    diff = (c - d).abs().max().item()
    print(f"two prior style draws (same noise): images differ by max {diff:.3f}")
    assert diff > 5e-2


def test_reference_style_is_the_encoder_mu(trained, data):
    model, batch, _, _ = trained
    ref, prompt = batch["image"][:1], [batch["prompt"][0]]
    with torch.no_grad():
        mu, _ = model.style_encoder(model.encode_images(ref, sample=False), model.encode_prompts(prompt))
    s = model.make_style(StyleChoice("reference", reference=ref, reference_prompts=prompt), 3)
    assert s.shape == (3, 4, 64) and torch.equal(s, mu.expand(3, -1, -1))
    kw = dict(sampling=Sampling(steps=3), seed=0, progress=False)
    assert torch.equal(model.generate(prompt, style=StyleChoice("reference", reference=ref), **kw),
                       model.generate(prompt, style=StyleChoice(mu), **kw))


def test_guidance_is_one_batched_unet_call_per_step(trained):
    model, _, _, _ = trained
    calls, handle = _capture_unet(model)
    try:
        model.generate(["a", "b", "c"], Sampling(steps=4, guidance=7.5), StyleChoice("prior"), progress=False)
        assert len(calls) == 4 and all(c["args"][0].shape[0] == 6 for c in calls)
        style = calls[0]["kwargs"]["style"]
        assert torch.equal(style[:3], style[3:])  # the same style in the unconditional and the text half
        calls.clear()
        model.generate(["a", "b", "c"], Sampling(steps=4, guidance=1.0), progress=False)
        assert len(calls) == 4 and all(c["args"][0].shape[0] == 3 for c in calls)
    finally:
        handle.remove()


def test_slerp():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    u = torch.zeros(1, 2, 2)
    u[0, 0, 0] = 2.0
    v = torch.zeros(1, 2, 2)
    v[0, 1, 1] = 2.0
    mid = slerp(u, v, 0.5)  # orthogonal, equal norms: the midpoint keeps the norm (lerp would give sqrt(2))
    assert torch.allclose(mid.norm(), torch.tensor(2.0)) and torch.allclose(mid[0, 0, 0], mid[0, 1, 1])
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)  # parallel: no division by zero


# ------------------------------------------------------------------------------------------ statistics
def test_style_posterior(trained, data):
    model, _, _, _ = trained
    ds, loader = data
    post = model.fit_style_posterior(loader)
    assert sorted(post) == ["horizontal bars", "vertical bars"]
    for name, p in post.items():
        assert p["mus"].shape == (4, 4, 64) and p["prompt"] == PROMPT.replace("{class}", name)
        assert torch.allclose(p["mean"], p["mus"].mean(0)) and torch.allclose(p["var"], p["mus"].var(0, False))
    s = model.make_style(StyleChoice("posterior_sample", classes=["vertical bars"] * 3), 3,
                         torch.Generator().manual_seed(0))
    for row in s:  # each is the mu of one training image of that class
        assert any(torch.equal(row, m) for m in post["vertical bars"]["mus"])
    s0 = model.make_style(StyleChoice("posterior", tau=0.0, classes=["horizontal bars"] * 2), 2)
    assert torch.equal(s0[0], post["horizontal bars"]["mean"])
    with pytest.raises(ValueError, match="known"):
        model.make_style(StyleChoice("posterior", classes=["nope"]), 1)


def test_diagnostics(trained, data):
    model, _, _, _ = trained
    _, loader = data
    d = model.diagnostics(loader)
    for k in ("kl_per_dim", "active_units", "agg_kl_per_dim", "loss_encoder", "loss_prior", "loss_aggregate",
              "loss_none"):
        assert d[k] is not None and math.isfinite(d[k]), k
    assert d["n_images"] == 8 and d["style_dims"] == 4 * 64 and 0 <= d["active_units"] <= 256
    print("diagnostics:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()})
    assert d == model.diagnostics(loader)  # deterministic: fixed noise and timesteps
    v = small_clue(style=False).diagnostics(loader)
    assert math.isfinite(v["loss_none"]) and v["kl_per_dim"] is None and v["loss_prior"] is None


# ------------------------------------------------------------------------------------------ save / load
def test_save_load_same_generation(trained, data, tmp_path):
    model, _, _, _ = trained
    _, loader = data
    model.fit_style_posterior(loader)
    model.diagnostics(loader)
    save_clue(model, tmp_path / "ckpt", extra={"prompt_template": PROMPT})
    back = load_clue(tmp_path / "ckpt")
    assert back.train_config == {"prompt_template": PROMPT} and back.last_diagnostics == model.last_diagnostics
    assert sorted(back.style_posterior) == sorted(model.style_posterior)
    for name in model.style_posterior:
        for k in ("mean", "var", "mus"):
            assert torch.equal(back.style_posterior[name][k], model.style_posterior[name][k])
    for source in ("prior", "posterior", "posterior_sample"):
        kw = dict(sampling=Sampling(steps=4), style=StyleChoice(source, classes=["vertical bars", "horizontal bars"]),
                  seed=5, progress=False)
        a = model.generate(["a picture of vertical bars", "a picture of horizontal bars"], **kw)
        b = back.generate(["a picture of vertical bars", "a picture of horizontal bars"], **kw)
        assert torch.equal(a, b), source
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["format"] == "clue-pytorch" and cfg["style"]["tokens"] == 4 and cfg["diagnostics"]["loss_none"] > 0


def test_load_refuses_wrong_checkpoints(trained, sd_dir, tmp_path):
    model, _, _, _ = trained
    with pytest.raises(CheckpointError, match="not a CLUE checkpoint"):  # a plain SD folder in our format
        save_stable_diffusion(load_stable_diffusion(sd_dir[0]), tmp_path / "sd")
        load_clue(tmp_path / "sd")
    with pytest.raises(CheckpointError, match="not a CLUE checkpoint"):  # a diffusers folder
        load_clue(sd_dir[0])
    save_clue(model, tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["style"]["width"] = 32  # the config of a different style encoder than the weights
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="style_encoder"):
        load_clue(tmp_path / "ok")
    cfg["style"]["width"], cfg["unet"]["block_channels"] = 64, [64, 128]  # a different U-Net than the weights
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_clue(tmp_path / "ok")
