"""Style guidance and CADS condition noise (clue.py, sample.py) against references written here from the papers.

Style guidance (clue.py's docstring): eps(c_neg, 0) + w (eps(c, 0) - eps(c_neg, 0)) + w_s (eps(c, s) - eps(c, 0)),
checked against a loop of separate U-Net calls (style=None for "no style"); w_s = 1 is the two-part form of
before, bit for bit; w_s = 0 is generation without style. CADS (Sadat et al. 2024, Sec. 3.1): the annealed noisy
context against the equations written out again, and where in the schedule it acts. The model is a small random
CLUE whose style branch is switched on by random output projections (they are zero-initialised), so that the
style changes the prediction and the tests can see it."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from checkpoint import save_clue
from clue import CLUE, CLUEConfig, Sampling, StyleChoice, condition_annealing
from schedulers import DDIMSampler
from style_encoder import StyleConfig
from test_clue import PROMPT, SMALL_UNET, make_image_folder
from test_sample import one_line_error

PROMPTS = ["a picture of vertical bars", "a picture of horizontal bars"]


def styled_clue(seed=0) -> CLUE:
    torch.manual_seed(seed)
    model = CLUE.from_config(unet=SMALL_UNET, style=StyleConfig.tiny(), clue=CLUEConfig.tiny())
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "attn_style.to_out" in name:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return styled_clue()


def start(model, n=2, seed=5):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def capture(model):
    calls = []
    handle = model.unet.register_forward_hook(lambda m, a, kw, out: calls.append((a, kw)), with_kwargs=True)
    return calls, handle


@torch.no_grad()
def reference_ddim(model, x, steps, pred_fn):
    """DDIM with pred_fn(x, t) -> the guided prediction, one U-Net call per term."""
    sampler = DDIMSampler(model.schedule, **model.sampler_config)
    for t in sampler.set_timesteps(steps).tolist():
        x = sampler.step(pred_fn(x, torch.full((len(x),), t)), t, x)
    return x


# ------------------------------------------------------------------------------------------ style guidance
@pytest.mark.parametrize("w,w_s", [(3.0, 0.0), (3.0, 2.5), (1.0, 2.0), (2.0, -1.0)])
def test_style_guidance_is_the_composed_formula(model, w, w_s):
    s = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c, c_neg = model.encode_prompts(PROMPTS), model.encode_prompts(["", ""])

    def pred(x, t):
        e_c, e_cs = model.unet(x, t, c), model.unet(x, t, c, style=s)
        e_neg = model.unet(x, t, c_neg) if w > 1 else e_c  # guidance <= 1: the text branch only
        return e_neg + w * (e_c - e_neg) + w_s * (e_cs - e_c)

    ref = reference_ddim(model, start(model), 4, pred)
    got = model.generate(PROMPTS, Sampling(steps=4, guidance=w, style_guidance=w_s), StyleChoice(s),
                         latents=start(model), output="latent", progress=False)
    err = (got - ref).abs().max().item()
    tol = 1e-5 * max(1.0, ref.abs().max().item())  # float32 rounding, relative to the latents' scale (w = 3 widens it)
    print(f"w={w:g}, w_s={w_s:g}: generate vs separate U-Net calls, max |diff| {err:.2e} (tolerance {tol:.2e})")
    assert err < tol


def test_style_guidance_one_is_the_two_part_form_bit_for_bit(model):
    s = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2))
    kw = dict(latents=start(model), output="latent", progress=False)
    default = model.generate(PROMPTS, Sampling(steps=4, guidance=3.0), StyleChoice(s), **kw)
    one = model.generate(PROMPTS, Sampling(steps=4, guidance=3.0, style_guidance=1.0, condition_noise=0.0),
                         StyleChoice(s), **kw)
    assert torch.equal(default, one)
    with torch.no_grad():  # ... and that form is eps(c_neg, s) + w (eps(c, s) - eps(c_neg, s)): the style in both
        c, c_neg = model.encode_prompts(PROMPTS), model.encode_prompts(["", ""])

    def pred(x, t):
        e_neg, e_c = model.unet(x, t, c_neg, style=s), model.unet(x, t, c, style=s)
        return e_neg + 3.0 * (e_c - e_neg)
    assert torch.allclose(default, reference_ddim(model, start(model), 4, pred), atol=1e-5)


def test_style_guidance_zero_is_generation_without_style(model):
    kw = dict(latents=start(model), progress=False)
    plain = model.generate(PROMPTS, Sampling(steps=4, guidance=3.0), None, **kw)
    zero = model.generate(PROMPTS, Sampling(steps=4, guidance=3.0, style_guidance=0.0),
                          StyleChoice("prior", seed=3), **kw)
    styled = model.generate(PROMPTS, Sampling(steps=4, guidance=3.0), StyleChoice("prior", seed=3), **kw)
    err, effect = (zero - plain).abs().max().item(), (styled - plain).abs().max().item()
    print(f"w_s=0 vs no style: max |diff| {err:.2e} (equal: {torch.equal(zero, plain)}); the style's own effect "
          f"{effect:.3f}")
    assert err < 1e-5 and effect > 1e-2


def test_one_batched_unet_call_per_step_with_three_parts(model):
    calls, handle = capture(model)
    try:
        for sampling, style, parts in [(Sampling(steps=3, guidance=3.0, style_guidance=2.0), StyleChoice(), 3),
                                       (Sampling(steps=3, guidance=1.0, style_guidance=2.0), StyleChoice(), 2),
                                       (Sampling(steps=3, guidance=3.0, style_guidance=1.0), StyleChoice(), 2),
                                       (Sampling(steps=3, guidance=3.0, style_guidance=2.0), None, 2)]:
            calls.clear()
            model.generate(PROMPTS, sampling, style, seed=0, progress=False)
            assert len(calls) == 3 and all(a[0].shape[0] == 2 * parts for a, _ in calls)
            scale = calls[0][1]["style_scale"]
            if parts == 3 or (parts == 2 and sampling.guidance == 1.0):  # only the last part keeps the style
                assert torch.equal(scale.flatten(), torch.tensor([0.0] * (2 * parts - 2) + [1.0, 1.0]))
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------ CADS
def cads_reference(c, t, s, tau1, tau2, psi, noise):
    """Sadat et al. 2024, Sec. 3.1, written out: the piecewise-linear schedule, the noisy condition, the rescale."""
    if t <= tau1:
        gamma = 1.0
    elif t >= tau2:
        gamma = 0.0
    else:
        gamma = (tau2 - t) / (tau2 - tau1)
    y = gamma ** 0.5 * c + s * (1 - gamma) ** 0.5 * noise
    out = []
    for yi, ci in zip(y, c):  # per image: the clean condition's mean and std
        out.append(psi * ((yi - yi.mean()) / yi.std() * ci.std() + ci.mean()) + (1 - psi) * yi)
    return torch.stack(out)


@pytest.mark.parametrize("t", [0.95, 0.9, 0.8, 0.61])
@pytest.mark.parametrize("psi", [0.0, 0.5, 1.0])
def test_condition_annealing_matches_the_paper(t, psi):
    c = torch.randn(3, 77, 16, generator=torch.Generator().manual_seed(0)) * 0.7 + 0.2
    sp = Sampling(condition_noise=0.25, cads_psi=psi)
    got = condition_annealing(c, t, sp, torch.Generator().manual_seed(9))
    noise = torch.randn(c.shape, generator=torch.Generator().manual_seed(9))
    ref = cads_reference(c, t, 0.25, sp.cads_tau1, sp.cads_tau2, psi, noise)
    assert got.shape == c.shape and torch.allclose(got, ref, atol=1e-5)
    if psi == 1.0:  # fully rescaled: each image keeps the clean condition's mean and std
        assert torch.allclose(got.mean((1, 2)), c.mean((1, 2)), atol=1e-5)
        assert torch.allclose(got.std((1, 2)), c.std((1, 2)), atol=1e-5)


def test_condition_annealing_is_seeded_and_acts_early_only():
    c = torch.randn(2, 77, 16)
    sp = Sampling(condition_noise=0.1)
    a, b = (condition_annealing(c, 0.95, sp, torch.Generator().manual_seed(1)) for _ in range(2))
    other = condition_annealing(c, 0.95, sp, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, other)
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    for t in (0.6, 0.3, 0.0):  # t <= tau1: the clean context itself, no draw
        assert condition_annealing(c, t, sp, gen) is c
    assert torch.equal(gen.get_state(), state)
    assert condition_annealing(c, 0.95, Sampling(condition_noise=0.0), gen) is c  # s = 0: off


def test_cads_in_generate(model):
    kw = dict(seed=4, progress=False)
    off = model.generate(PROMPTS, Sampling(steps=10, guidance=3.0), StyleChoice(), **kw)
    assert torch.equal(off, model.generate(PROMPTS, Sampling(steps=10, guidance=3.0, condition_noise=0.0),
                                           StyleChoice(), **kw))
    on = Sampling(steps=10, guidance=3.0, condition_noise=0.25)
    calls, handle = capture(model)
    try:
        a = model.generate(PROMPTS, on, StyleChoice(), **kw)
    finally:
        handle.remove()
    assert torch.equal(a, model.generate(PROMPTS, on, StyleChoice(), **kw))  # reproducible with the seed
    assert (a - off).abs().max() > 1e-2
    with torch.no_grad():
        c, c_neg = model.encode_prompts(PROMPTS), model.encode_prompts(["", ""])
    contexts = [args[2] for args, _ in calls]  # timesteps 901, 801, ..., 1: t / 1000 from 0.9 down
    assert all(torch.equal(ctx[:2], c_neg) for ctx in contexts)  # the unconditional half stays clean
    assert not torch.allclose(contexts[0][2:], c, atol=1e-3)      # early: the text context is noisy
    assert all(torch.equal(ctx[2:], c) for ctx in contexts[4:])   # t <= tau1 = 0.6: the clean context


# ------------------------------------------------------------------------------------------ sample.py
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance_cli")
    save_clue(styled_clue(), root / "ckpt", extra={"prompt_template": PROMPT})
    make_image_folder(str(root / "data"), per_class=2)
    return root


def _pixels(folder):
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32))
                        for p in sorted(folder.glob("*.png"))])


def test_cli_style_guidance_and_condition_noise(ckpt):
    base = ["--model", str(ckpt / "ckpt"), "--prompt", PROMPTS[0], "--num-images", "2", "--steps", "3",
            "--guidance", "3"]
    sample.main(base + ["--style", "none", "--out", str(ckpt / "none")])
    sample.main(base + ["--style-guidance", "0", "--out", str(ckpt / "ws0")])
    sample.main(base + ["--out", str(ckpt / "ws1")])
    rec = sample.main(base + ["--style-guidance", "2.5", "--condition-noise", "0.2", "--cads-tau1", "0.3",
                              "--out", str(ckpt / "both")])
    none, ws0, ws1, both = (_pixels(ckpt / k / "images") for k in ("none", "ws0", "ws1", "both"))
    assert (ws0 - none).abs().max() <= 1 and (ws1 - none).abs().max() > 1 and (both - ws1).abs().max() > 1
    settings = json.loads((ckpt / "both" / "run.json").read_text())["settings"]
    assert settings["style_guidance"] == 2.5 and settings["condition_noise"] == 0.2
    assert rec["settings"]["cads"] == {"cads_tau1": 0.3, "cads_tau2": 0.9, "cads_psi": 1.0}


@pytest.mark.parametrize("flag,value", [("--style-guidance", "nan"), ("--style-guidance", "inf"),
                                        ("--condition-noise", "-0.1"), ("--condition-noise", "nan"),
                                        ("--cads-tau1", "1.5"), ("--cads-tau2", "-1"), ("--cads-psi", "2")])
def test_bad_flags_are_refused_at_parse_time(capsys, flag, value):
    assert f"argument {flag}" in one_line_error(capsys, ["--model", "unused", "--prompt", "x", flag, value])


def test_contradictions_end_in_one_line(ckpt, capsys, tmp_path):
    base = ["--model", str(ckpt / "ckpt"), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "o")]
    assert "--cads-tau1 0.9 must be below --cads-tau2 0.5" in one_line_error(
        capsys, base + ["--condition-noise", "0.1", "--cads-tau1", "0.9", "--cads-tau2", "0.5"])
    assert "give --condition-noise" in one_line_error(capsys, base + ["--cads-psi", "0.5"])
    assert "--style-guidance 2" in one_line_error(capsys, base + ["--style", "none", "--style-guidance", "2"])
    assert os.path.isdir(ckpt / "ckpt")
