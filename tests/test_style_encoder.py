"""style_encoder.py: analytic KL against Monte Carlo and torch.distributions, sampling, shapes, gradients."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from style_encoder import StyleConfig, StyleEncoder


def _mu_logvar():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 1.5
    logvar = torch.empty(2, 3, 5, dtype=torch.float64).uniform_(-3, 1.5, generator=g)
    return mu, logvar


def test_kl_matches_torch_distributions_and_monte_carlo():
    mu, logvar = _mu_logvar()
    kl = StyleEncoder.kl(mu, logvar)
    assert kl.shape == mu.shape and kl.dtype == torch.float64
    q, p = Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    err = (kl - kl_divergence(q, p)).abs().max().item()
    print(f"analytic KL vs torch.distributions: max abs err {err:.2e}")
    assert err < 1e-12
    # Monte Carlo: KL = E_{s~q}[log q(s) - log p(s)], per dimension, with the estimate's standard error
    torch.manual_seed(0)
    s = StyleEncoder.sample(mu.expand(200_000, *mu.shape), logvar.expand(200_000, *mu.shape))
    terms = q.log_prob(s) - p.log_prob(s)                      # (N,2,3,5)
    mc, se = terms.mean(0), terms.std(0) / terms.shape[0] ** 0.5
    z = ((mc - kl) / se).abs().max().item()
    print(f"analytic KL vs Monte Carlo: max abs err {(mc - kl).abs().max().item():.2e}, max |z| {z:.2f}")
    assert z < 5.0
    assert StyleEncoder.kl(torch.zeros(3), torch.zeros(3)).abs().max() == 0  # the prior itself: KL 0
    assert StyleEncoder.kl(mu.half(), logvar.half()).dtype == torch.float32  # fp16 inputs: fp32 KL


def test_sample_has_mean_mu_and_std_sigma():
    mu, logvar = _mu_logvar()
    n = 100_000
    g = torch.Generator().manual_seed(1)
    s = StyleEncoder.sample(mu.expand(n, *mu.shape), logvar.expand(n, *mu.shape), generator=g)
    sigma = (0.5 * logvar).exp()
    z_mean = ((s.mean(0) - mu) / (sigma / n ** 0.5)).abs().max().item()
    z_std = ((s.std(0) - sigma) / (sigma / (2 * n) ** 0.5)).abs().max().item()  # SE of a Gaussian's std
    print(f"sample: max |z| of the mean {z_mean:.2f}, of the std {z_std:.2f}")
    assert z_mean < 5 and z_std < 5
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(StyleEncoder.sample(mu, logvar, g1), StyleEncoder.sample(mu, logvar, g2))


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (16, 12), (1, 1)])
def test_shapes_for_any_latent_size(hw):
    torch.manual_seed(0)
    cfg = StyleConfig.tiny()
    enc = StyleEncoder(cfg)
    mu, logvar = enc(torch.randn(3, 4, *hw), torch.randn(3, 77, cfg.context_dim))
    assert mu.shape == logvar.shape == (3, cfg.tokens, cfg.context_dim)
    assert torch.isfinite(mu).all() and torch.isfinite(logvar).all()


def test_sd_preset_shapes():
    torch.manual_seed(0)
    for cfg in (StyleConfig.sd(), StyleConfig.sd(context_dim=768)):
        enc = StyleEncoder(cfg)
        with torch.no_grad():
            mu, logvar = enc(torch.randn(1, 4, 64, 48), torch.randn(1, 77, cfg.context_dim))
        assert mu.shape == logvar.shape == (1, 4, cfg.context_dim)


def test_initial_encoder_has_unit_sigma_and_an_input_dependent_mu():
    """At initialisation sigma = 1 exactly and mu is of order 0.6 and differs between images: a style signal
    from step 0, at a moderate KL."""
    torch.manual_seed(0)
    cfg = StyleConfig.tiny()
    mu, logvar = StyleEncoder(cfg)(torch.randn(8, 4, 8, 8) * 3, torch.randn(8, 77, 64))
    kl = StyleEncoder.kl(mu, logvar).mean().item()
    spread = mu.std(0).mean().item()  # across images, per dimension
    print(f"initial encoder: rms mu {mu.pow(2).mean().sqrt():.3f}, spread across images {spread:.3f}, "
          f"max |logvar| {logvar.abs().max().item():.2e}, KL/dim {kl:.3f}")
    assert logvar.abs().max() == 0
    assert 0.2 < mu.pow(2).mean().sqrt() < 1.2 and spread > 0.05 and kl < 0.5


def test_gradients_flow_to_every_parameter_and_both_inputs():
    torch.manual_seed(0)
    cfg = StyleConfig.tiny()
    enc = StyleEncoder(cfg)
    z0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    c = torch.randn(2, 77, 64, requires_grad=True)
    mu, logvar = enc(z0, c)
    s = StyleEncoder.sample(mu, logvar, torch.Generator().manual_seed(0))
    target = torch.randn_like(s)
    ((s - target) ** 2).mean().backward()  # a loss through the reparameterised sample
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # including to_logvar (zero weights, non-zero gradient)
    assert z0.grad.abs().sum() > 0 and c.grad.abs().sum() > 0
    # the output depends on the image latent and on the prompt
    with torch.no_grad():
        base = enc(z0, c)[0]
        assert (enc(z0.flip(0), c)[0] - base).abs().max() > 0
        assert (enc(z0, c.flip(0))[0] - base).abs().max() > 0


def test_encoder_learns_to_carry_information():
    """mu can learn a property of z0 (its mean) in a few Adam steps: the path from the latent to mu works."""
    torch.manual_seed(0)
    enc = StyleEncoder(StyleConfig.tiny())
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    c = torch.zeros(16, 8, 64)  # a short prompt context keeps the test cheap
    losses = []
    for _ in range(40):
        z0 = torch.randn(16, 4, 8, 8) + torch.randn(16, 1, 1, 1)  # per-image offset to read out
        mu, _ = enc(z0, c)
        loss = (mu[:, 0, 0] - z0.mean((1, 2, 3))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"read-out of mean(z0): loss {losses[0]:.3f} -> {sum(losses[-5:]) / 5:.3f}")
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0]


def test_bad_config_and_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="no style branch"):
        StyleEncoder(StyleConfig(tokens=0))
    with pytest.raises(ValueError, match="multiple of 4"):
        StyleEncoder(StyleConfig(width=66, heads=3))
    enc = StyleEncoder(StyleConfig.tiny())
    with pytest.raises(ValueError, match="z0 must be"):
        enc(torch.randn(2, 3, 8, 8), torch.randn(2, 77, 64))
    with pytest.raises(ValueError, match="context must be"):
        enc(torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32))
