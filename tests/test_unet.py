"""unet.py against diffusers' UNet2DConditionModel on the same weights, and the behaviour of the CLUE style branch.

fp32 on CPU, tiny configs (seconds each). Parity errors are printed (run with -s or -rA to see them).
"""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

import unet as unet_module
from reference import unet_to_diffusers
from unet import UNet, UNetConfig, timestep_embedding

# An SD 1.x-shaped and an SD 2.x-shaped network at reduced width.
SD1_TINY = UNetConfig(block_channels=(32, 64, 64), attention_levels=(True, True, False), num_heads=(8, 8, 8),
                      context_dim=40, linear_projection=False, norm_groups=8)
SD2_TINY = UNetConfig(block_channels=(32, 64, 64, 64), attention_levels=(True, True, True, False),
                      num_heads=(2, 4, 4, 4), context_dim=48, linear_projection=True, norm_groups=8,
                      transformer_depth=2, upcast_attention=True)


def reference_and_ours(cfg, seed=0):
    """A random diffusers U-Net and ours carrying its weights (style branch left at its zero init)."""
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**unet_to_diffusers(cfg)).eval()
    ours = UNet(cfg).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert unexpected == []
    assert all(".norm_style." in k or ".attn_style." in k for k in missing), missing
    n_blocks = sum(1 for name, _ in ours.named_modules() if name.endswith("transformer_blocks.0"))
    assert len(missing) == n_blocks * cfg.transformer_depth * (2 + 3 + 2)   # norm w,b; q,k,v; out w,b
    return ref, ours


@pytest.mark.parametrize("name,cfg,hw", [("sd1-shaped", SD1_TINY, (16, 24)), ("sd2-shaped", SD2_TINY, (16, 24)),
                                         ("sd2-shaped, odd sides", SD2_TINY, (20, 26))])
def test_parity_with_diffusers(name, cfg, hw):
    ref, ours = reference_and_ours(cfg)
    torch.manual_seed(1)
    x = torch.randn(3, 4, *hw)
    t = torch.tensor([0, 421, 999])
    context = torch.randn(3, 9, cfg.context_dim)
    with torch.no_grad():
        expected = ref(x, t, context).sample
        got = ours(x, t, context)
    err = (got - expected).abs().max().item()
    print(f"\nU-Net {name} {tuple(x.shape)} vs diffusers: max abs err {err:.2e} (output scale "
          f"{expected.abs().max().item():.2f})")
    assert got.shape == expected.shape
    assert err <= 1e-4


def test_scalar_and_float_timesteps():
    ref, ours = reference_and_ours(SD2_TINY)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, SD2_TINY.context_dim)
    with torch.no_grad():
        for t in (37, torch.tensor(37.5), torch.tensor([3.25, 800.0])):
            err = (ours(x, t, context) - ref(x, t, context).sample).abs().max().item()
            print(f"\nU-Net timestep {t!r}: max abs err {err:.2e}")
            assert err <= 1e-4


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (32, 320, 33):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.equal(timestep_embedding(t, dim), expected)


def test_presets_have_the_released_shapes():
    """sd15 / sd21 without the style branch have exactly diffusers' SD 1.5 / 2.1 parameter names and shapes."""
    with torch.device("meta"):
        for preset, n_params in ((UNetConfig.sd15, 859_520_964), (UNetConfig.sd21, 865_910_724),
                                 (UNetConfig.sd21_base, 865_910_724)):
            cfg = preset(style=False)
            ref, ours = UNet2DConditionModel(**unet_to_diffusers(cfg)), UNet(cfg)
            assert {k: v.shape for k, v in ours.state_dict().items()} == \
                   {k: v.shape for k, v in ref.state_dict().items()}
            assert sum(p.numel() for p in ours.parameters()) == n_params
        assert UNetConfig.sd21().upcast_attention and not UNetConfig.sd21_base().upcast_attention
        assert not UNetConfig.sd15().linear_projection and UNetConfig.sd15().context_dim == 768


def test_no_style_parameters_without_style():
    with torch.device("meta"):
        names = [n for n, _ in UNet(UNetConfig(style=False)).named_parameters()]
    assert names and not [n for n in names if "style" in n]
    cfg = UNetConfig.tiny(style=False)
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**unet_to_diffusers(cfg))
    UNet(cfg).load_state_dict(ref.state_dict(), strict=True)      # exactly diffusers' keys


def _inputs(cfg, B=2, hw=(8, 8), K=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, cfg.in_channels, *hw, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randn(B, 7, cfg.context_dim, generator=g), torch.randn(B, K, cfg.context_dim, generator=g))


def test_zero_initialised_style_branch_is_an_exact_identity():
    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    x, t, context, style = _inputs(cfg)
    with torch.no_grad():
        plain = model(x, t, context)
        for s in (style, 100 * style, torch.randn(2, 1, cfg.context_dim)):
            assert torch.equal(model(x, t, context, style=s), plain)
        assert torch.equal(model(x, t, context, style=style, style_scale=3.0), plain)


def test_style_branch_learns_and_scale_zero_skips_it():
    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    model = UNet(cfg)
    x, t, context, style = _inputs(cfg)
    branch = [p for n, p in model.named_parameters() if "_style." in n]
    opt = torch.optim.SGD(branch, lr=1.0)
    loss = (model(x, t, context, style=style) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        plain = model(x, t, context)
        a = model(x, t, context, style=style)
        b = model(x, t, context, style=torch.randn_like(style))
        assert torch.equal(model(x, t, context, style=style, style_scale=0.0), plain)
        # a per-sample scale (B, 1, 1), e.g. the style dropped for one half of a guidance batch
        mixed = model(x, t, context, style=style, style_scale=torch.tensor([0.0, 1.0]).view(2, 1, 1))
        torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(mixed[1], a[1], rtol=0, atol=1e-6)
    diff_none, diff_style = (a - plain).abs().max().item(), (a - b).abs().max().item()
    print(f"\nafter one step on the style branch: |out(s) - out(None)| {diff_none:.2e}, "
          f"|out(s1) - out(s2)| {diff_style:.2e}")
    assert diff_none > 1e-5 and diff_style > 1e-5


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    x, t, context, style = inputs
    loss = (model(x, t, context, style=style) - torch.ones_like(x)).pow(2).mean()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradients_reach_every_parameter_and_checkpointing_matches(monkeypatch):
    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    model = UNet(cfg).train()
    for n, p in model.named_parameters():         # a trained style branch: no zero weight blocks the gradient
        if "attn_style.to_out" in n:
            torch.nn.init.normal_(p, std=0.02)
    inputs = _inputs(cfg)
    grads = _grads(model, inputs)
    dead = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert not dead, f"no gradient for {dead}"

    ckpt = UNet(UNetConfig.tiny(gradient_checkpointing=True)).train()
    ckpt.load_state_dict(model.state_dict())
    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads_ckpt = _grads(ckpt, inputs)
    n_ckpt = len(calls)
    err = max((grads[n] - g).abs().max().item() for n, g in grads_ckpt.items())
    print(f"\ngradient checkpointing ({n_ckpt} checkpointed calls): max abs grad err {err:.2e}")
    assert n_ckpt == 2 * 1 * 2 + 3 + 2 * 2 * 2     # down: 2 levels x 1 x (resnet, attn); mid: 3; up: 2 x 2 x 2
    assert err <= 1e-6
    ckpt.eval()
    with torch.no_grad():
        ckpt(*inputs[:3])
    assert len(calls) == n_ckpt                     # inference never checkpoints


def test_bf16_autocast_on_cpu_and_upcast_attention():
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).eval()
    upcast = UNet(UNetConfig.tiny(upcast_attention=True)).eval()
    upcast.load_state_dict(model.state_dict())
    x, t, context, style = _inputs(UNetConfig.tiny())
    with torch.no_grad():
        fp32 = model(x, t, context, style=style)
        assert torch.equal(upcast(x, t, context, style=style), fp32)   # in fp32 the upcast changes nothing
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, t, context, style=style)
            bf16_upcast = upcast(x, t, context, style=style)
    scale = fp32.abs().max().item()
    for name, out in (("bf16 autocast", bf16), ("bf16 autocast + fp32 attention", bf16_upcast)):
        err = (out.float() - fp32).abs().max().item()
        print(f"\nU-Net tiny {name} vs fp32: max abs err {err:.2e} (output scale {scale:.2f})")
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert err <= 0.05 * scale


def test_bad_inputs_raise_clear_errors():
    cfg = UNetConfig.tiny()
    model = UNet(cfg)
    x, t, context, style = _inputs(cfg)
    with pytest.raises(ValueError, match="context_dim=64"):
        model(x, t, torch.randn(2, 7, 32))
    with pytest.raises(ValueError, match="style"):
        model(x, t, context, style=torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.tensor([1, 2, 3]), context)
    # style tokens for a U-Net without the style branch (e.g. plain SD weights) would be ignored: refused
    with pytest.raises(ValueError, match=r"without the style branch.*style=True or build CLUE"):
        UNet(UNetConfig.tiny(style=False))(x, t, context, style=style)
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(block_channels=(48, 96), attention_levels=(True, True), num_heads=(5, 5))
