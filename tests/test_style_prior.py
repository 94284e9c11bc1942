"""The aggregated posterior vs the prior: the MMD training term (StyleEncoder.prior_mmd), the full-covariance
diagnostics (CLUE.diagnostics) and the low-rank-plus-diagonal class posteriors (CLUE.fit_style_posterior).

The quantities are checked against independent computations: a generic kernel MMD with explicit prior draws,
torch.distributions' Gaussian KL on numpy's covariance, and the sample covariance."""
import math

import pytest
import torch
from torch.utils.data import DataLoader

from clue import StyleChoice
from data import ClassFolderDataset
from style_encoder import StyleEncoder
from test_clue import PROMPT, make_image_folder, small_clue

prior_mmd = StyleEncoder.prior_mmd


def kernel_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Textbook unbiased MMD^2 (Gretton et al. 2012, eq. 3) with k(a, b) = (1 + a.b)^2, x ~ q and y ~ p."""
    k = lambda a, b: (1 + a @ b.T) ** 2
    kxx, kyy = k(x, x), k(y, y)
    off = lambda m: (m.sum() - m.diagonal().sum()) / (len(m) * (len(m) - 1))
    return off(kxx) + off(kyy) - 2 * k(x, y).mean()


def test_prior_mmd_is_the_kernel_mmd_to_the_standard_normal():
    g = torch.Generator().manual_seed(0)
    d = 12  # K=3 tokens of D=4
    shift, scale = torch.randn(d, generator=g) * 0.5, torch.rand(d, generator=g) * 2
    draws = [(shift + scale * torch.randn(64, d, generator=g)).double() for _ in range(200)]
    ours = torch.stack([prior_mmd(x.view(64, 3, 4).double()) for x in draws])
    # the same quantity with explicit draws from N(0, I): many, so that its own noise is small
    ref = torch.stack([kernel_mmd(x, torch.randn(2000, d, generator=g, dtype=torch.float64)) for x in draws]) / d
    # and in closed form: ||M - I||_F^2 + 2 |m|^2 with M = diag(scale^2) + shift shift^T, m = shift
    M = torch.diag(scale.double() ** 2) + torch.outer(shift, shift).double()
    exact = ((M - torch.eye(d, dtype=torch.float64)).pow(2).sum() + 2 * shift.double() @ shift.double()) / d
    se = ours.std() / math.sqrt(len(ours))
    print(f"prior_mmd mean {ours.mean():.4f} +- {se:.4f}, kernel MMD {ref.mean():.4f}, closed form {exact:.4f}")
    assert abs(ours.mean() - exact) < 4 * se and abs(ref.mean() - exact) < 4 * ref.std() / math.sqrt(len(ref))
    # unbiased at the prior itself (mean 0, not the ~d^2/B bias of a plug-in estimate)
    at_prior = torch.stack([prior_mmd(torch.randn(32, 3, 4, generator=g)) for _ in range(400)])
    assert abs(at_prior.mean()) < 4 * at_prior.std() / math.sqrt(len(at_prior))


def test_prior_mmd_pulls_styles_to_the_prior_moments():
    """Minimising the term alone turns a style distribution three times too wide along one direction and
    shifted into one with E[s s^T] ~ I: the behaviour the training term exists for."""
    torch.manual_seed(0)
    d = 16
    A = torch.eye(d).requires_grad_()
    A.data[0] *= 3.0
    b = torch.full((d,), 0.5, requires_grad=True)
    opt = torch.optim.Adam([A, b], lr=0.02)
    for _ in range(600):
        s = (torch.randn(64, d) @ A.T + b).view(64, 4, 4)
        loss = prior_mmd(s)
        opt.zero_grad()
        loss.backward()
        opt.step()
    M = A.detach() @ A.detach().T + torch.outer(b.detach(), b.detach())  # E[s s^T]
    print("eigenvalues of E[ss^T] after:", [round(x, 2) for x in torch.linalg.eigvalsh(M).tolist()])
    assert (M - torch.eye(d)).abs().max() < 0.2 and b.detach().abs().max() < 0.15
    assert prior_mmd(torch.zeros(1, 4, 4)) == 0  # a batch of one has no pairs: no estimate, no gradient


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_image_folder(str(tmp_path_factory.mktemp("bars")), per_class=12)
    return DataLoader(ClassFolderDataset(root, PROMPT, size=32), batch_size=8, shuffle=False)


def anisotropic_encoder(model, d_tokens, spread=3.0, sigma=0.3):
    """Replace the style encoder's output by a known distribution: mu spread `spread` x wider than the prior
    along one direction that is NOT a coordinate axis, sigma small everywhere (the failure mode)."""
    K, D = d_tokens
    u = torch.ones(K * D) / math.sqrt(K * D)  # a diagonal direction: every coordinate gets 1/d of it
    g = torch.Generator().manual_seed(1)

    def encode_style(z0, c):
        B = len(z0)
        a = torch.randn(B, 1, generator=g) * spread
        mu = (a * u + 0.05 * torch.randn(B, K * D, generator=g)).view(B, K, D)
        return mu, torch.full_like(mu, 2 * math.log(sigma))
    model.encode_style = encode_style
    return u


def test_diagnostics_see_a_spread_off_the_axes(folder):
    model = small_clue()
    K, D = model.style_encoder.cfg.tokens, model.style_encoder.cfg.context_dim
    anisotropic_encoder(model, (K, D), sigma=1.0)  # sigma = 1, as in the unused dimensions of a trained model
    # what the model reports ...
    diag = model.diagnostics(folder)
    # ... against an independent computation on the same mu (the encoder above is deterministic per call order)
    import numpy as np
    anisotropic_encoder(model, (K, D), sigma=1.0)
    mus = torch.cat([model.encode_style(torch.zeros(len(b["image"]), 1), None)[0].flatten(1)
                     for b in folder]).double()
    d = K * D
    Sigma = torch.from_numpy(np.cov(mus.numpy(), rowvar=False, bias=True)) + torch.eye(d, dtype=torch.float64)
    q = torch.distributions.MultivariateNormal(mus.mean(0), covariance_matrix=Sigma)
    p = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64),
                                               covariance_matrix=torch.eye(d, dtype=torch.float64))
    ref = torch.distributions.kl_divergence(q, p).item() / d
    print({k: diag[k] for k in ("agg_kl_per_dim", "agg_kl_diag_per_dim", "agg_top_eigenvalues", "agg_mmd_per_dim")},
          f"reference KL/dim {ref:.5f}")
    assert diag["agg_kl_per_dim"] == pytest.approx(ref, rel=1e-6)
    top = diag["agg_top_eigenvalues"]
    assert 4.0 < top[0] < 25.0 and top[1] < 1.1  # one direction ~ 1 + spread^2, the rest ~ sigma^2 = 1
    # the diagonal view spreads that one direction over all d axes and nearly misses it (the demo's blind spot)
    assert diag["agg_kl_diag_per_dim"] < 0.2 * diag["agg_kl_per_dim"]
    M = mus.T @ mus / len(mus)  # + I (sigma^2 = 1) - I: the second moment of the mixture minus the prior's
    m = mus.mean(0)
    assert diag["agg_mmd_per_dim"] == pytest.approx(((M ** 2).sum() + 2 * m @ m).item() / d, rel=1e-6)


def test_class_posterior_keeps_the_style_direction(folder):
    model = small_clue()
    K, D = model.style_encoder.cfg.tokens, model.style_encoder.cfg.context_dim
    u = anisotropic_encoder(model, (K, D))
    post = model.fit_style_posterior(folder, rank=16)
    for name, p in post.items():
        X = p["mus"].flatten(1).double()
        cov = torch.cov(X.T, correction=0)
        F_ = p["factors"].flatten(1).double()
        model_cov = F_.T @ F_ + torch.diag(p["psi"].flatten().double())
        # 12 images: rank 16 >= N - 1 keeps every principal direction, so the fit IS the sample covariance of mu,
        # plus E[sigma^2] = 0.3^2 on the diagonal (the aggregated posterior, not only its means)
        cov = cov + 0.09 * torch.eye(len(cov), dtype=cov.dtype)
        print(name, "max |model cov - (Cov(mu) + E sigma^2)|", (model_cov - cov).abs().max().item())
        assert torch.allclose(model_cov, cov, atol=1e-5)
        assert torch.allclose(model_cov.diagonal().float(), p["var"].flatten() + 0.09, atol=1e-5)
    # draws along the style direction are as wide as the data's; a diagonal Gaussian's would be ~10x narrower
    name = "vertical bars"
    s = model.make_style(StyleChoice("posterior", classes=[name] * 4000), 4000, torch.Generator().manual_seed(0))
    along = (s.flatten(1) @ u).var().item()
    data_along = (post[name]["mus"].flatten(1) @ u).var(unbiased=False).item()
    diag_along = (post[name]["var"].flatten() * u ** 2).sum().item()
    print(f"variance along the style direction: data {data_along:.3f}, posterior draws {along:.3f}, "
          f"a diagonal fit {diag_along:.3f}")
    assert along == pytest.approx(data_along + 0.09, rel=0.1) and diag_along < 0.2 * data_along
    # low rank: only the top principal direction kept, the rest goes to the diagonal, variance per axis kept
    post = model.fit_style_posterior(folder, rank=1)
    p = post[name]
    assert p["factors"].shape == (1, K, D)
    F_ = p["factors"].flatten(1)
    assert torch.allclose((F_ ** 2).sum(0) + p["psi"].flatten(), p["var"].flatten() + 0.09, atol=1e-5)


def test_loss_adds_the_mmd_term_on_the_sampled_styles(folder):
    """CLUE.loss = (the loss without it) + lambda * MMD^2 of the batch's reparameterised styles, same draws."""
    batch = next(iter(folder))
    plain = small_clue(kl_mode="capacity", gamma=0.2, capacity=0.1)
    with_mmd = small_clue(kl_mode="capacity", gamma=0.2, capacity=0.1, mmd_weight=0.5)
    seen = {}
    original = with_mmd.unet.forward

    def spy(z, t, context, style=None, style_scale=1.0):
        seen["style"] = style
        return original(z, t, context, style=style, style_scale=style_scale)
    with_mmd.unet.forward = spy
    a, logs_a = plain.loss(batch, step=500, generator=torch.Generator().manual_seed(3))
    b, logs_b = with_mmd.loss(batch, step=500, generator=torch.Generator().manual_seed(3))
    assert "mmd" not in logs_a and logs_b["mmd"] == pytest.approx(prior_mmd(seen["style"]).item(), rel=1e-6)
    assert b.item() == pytest.approx(a.item() + 0.5 * logs_b["mmd"].item(), rel=1e-6)  # logs are tensors
    b.backward()  # the term reaches the style encoder
    assert with_mmd.style_encoder.to_mu.weight.grad.abs().sum() > 0


def test_checkpoint_without_the_low_rank_posterior_asks_for_a_refit(folder, tmp_path):
    """A checkpoint whose style posterior lacks tensors (e.g. written before factors/psi existed) is refused
    with the missing keys and what to do, not loaded half-way."""
    from safetensors.torch import load_file, save_file

    from checkpoint import CheckpointError, load_clue, save_clue
    model = small_clue()
    model.fit_style_posterior(folder)
    save_clue(model, tmp_path / "ckpt")
    back = load_clue(tmp_path / "ckpt")
    for name, p in model.style_posterior.items():
        assert all(torch.equal(back.style_posterior[name][k], p[k]) for k in ("mean", "var", "factors", "psi", "mus"))
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith((".factors", ".psi"))},
              tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"style_posterior\.0\.factors.*fit_style_posterior"):
        load_clue(tmp_path / "ckpt")
