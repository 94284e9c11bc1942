"""Statistics of the style latent over a dataset: the per-class aggregated posteriors that CLUE samples from
(StyleChoice("posterior")) and the diagnostics that tell whether the style is used and whether prior draws land on it.

CLUE (Park et al., arXiv 2511.10993) draws "unprompted" styles from the prior N(0, I). That only works if the
aggregated posterior q(s) = E_x q(s|x), the styles the U-Net saw in training, looks like N(0, I), which a per-image
KL cannot guarantee: this file measures it. CLUE.fit_style_posterior and CLUE.diagnostics call these functions and
keep the results with the model (checkpoint.py saves them).
"""
from __future__ import annotations

import torch

from schedulers import randn_cpu


@torch.no_grad()
def encode_dataset(model, loader, max_batches=None):
    """Yield (z0 from the VAE mean, prompts, class names, context, mu, logvar) per batch (mu, logvar None for a
    model without style encoder). Class names come from the dataset (through Subset wrappers), else the prompts."""
    dataset = getattr(loader, "dataset", None)
    while dataset is not None and not hasattr(dataset, "class_names"):  # through torch Subset wrappers
        dataset = getattr(dataset, "dataset", None)
    class_names = getattr(dataset, "class_names", None)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images, prompts, names = model.unpack(batch, class_names)
        names = names if names is not None else prompts  # no class names: the prompt names the class
        z0 = model.encode_images(images, sample=False)
        c = model.encode_prompts(prompts)
        mu, logvar = model.encode_style(z0, c) if model.style_encoder is not None else (None, None)
        yield z0, prompts, [str(n) for n in names], c, mu, logvar


@torch.no_grad()
def fit_class_posteriors(model, loader, max_batches: int | None = None, rank: int = 16) -> dict:
    """Per class, a Gaussian fitted to the encoder's output over the class's images (kept in the model and its
    checkpoint by CLUE.fit_style_posterior) for style='posterior', with every image's mu for 'posterior_sample'.

    The Gaussian is the class's aggregated posterior q(s | class) = mean_i N(mu_i, sigma_i^2), moment-matched:
    mean E[mu], covariance Cov(mu) + diag(E[sigma^2]) (the styles the U-Net saw in training for that class).
    Cov(mu) is kept low rank plus diagonal, as in factor analysis / probabilistic PCA (Tipping & Bishop 1999):
    its top `rank` principal directions exactly, the rest per dimension,
        Sigma = F^T F + diag(psi),  F (r, K*D) = sqrt(lambda_i) u_i^T,  psi = Var(mu) - diag(F^T F) + E[sigma^2].
    A diagonal fit alone (F = 0) misses that a style lives along a few directions that are not the coordinate
    axes: its draws are narrower than the data along them and spread noise across the rest.
    Stored per class: "mean" (K,D), "var" = Var(mu) (K,D), "factors" F (r,K,D), "psi" (K,D), "mus" (N,K,D)."""
    if model.style_encoder is None:
        raise ValueError("a model without style encoder has no style posterior")
    mus, sigma2s, prompt_of = {}, {}, {}
    for _, prompts, names, _, mu, logvar in encode_dataset(model, loader, max_batches):
        for name, prompt, m, lv in zip(names, prompts, mu.float().cpu(), logvar.float().cpu()):
            mus.setdefault(name, []).append(m)
            sigma2s.setdefault(name, []).append(lv.exp())
            prompt_of.setdefault(name, prompt)
    posteriors = {}
    for name in sorted(mus):
        m = torch.stack(mus[name])                                # (N,K,D)
        X = (m - m.mean(0)).flatten(1).double()                   # (N,K*D), centred
        _, S, Vh = torch.linalg.svd(X, full_matrices=False)       # X = U S Vh: Cov = Vh^T diag(S^2/N) Vh
        r = min(rank, max(len(m) - 1, 0))
        F_ = (S[:r, None] / len(m) ** 0.5) * Vh[:r]               # (r,K*D): sqrt(lambda_i) u_i
        var = m.var(0, unbiased=False)
        rest = (var.flatten().double() - F_.pow(2).sum(0)).clamp(min=0).view_as(var)  # Var(mu) off the F
        psi = rest.float() + torch.stack(sigma2s[name]).mean(0)
        posteriors[name] = {"prompt": prompt_of[name], "mean": m.mean(0), "var": var,
                            "factors": F_.float().view(r, *m.shape[1:]), "psi": psi, "mus": m}
    return posteriors


def posterior_draw(p: dict, tau: float, generator=None) -> torch.Tensor:
    """One style from a class's fitted Gaussian p: mean + tau * (F^T e_1 + sqrt(psi) * e_2), e ~ N(0, I) drawn
    from a CPU generator (the same numbers on every device)."""
    F_ = p["factors"]
    e1 = randn_cpu((len(F_),), generator, "cpu")
    e2 = randn_cpu(p["mean"].shape, generator, "cpu")
    return p["mean"] + tau * (torch.einsum("r,rkd->kd", e1, F_) + p["psi"].sqrt() * e2)


def aggregate_stats(X: torch.Tensor, sigma2: torch.Tensor, kl: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The style latent over N images from their mu X (N,d), mean sigma^2 (d,) and mean KL (K,D) -> (entries, m,
    Sigma). kl_per_dim: mean over data and dimensions of KL(q(s|x) || N(0,1)). active_units: dimensions j with
    Var_x(E[s_j|x]) > 0.01 (Burda et al. 2016). The aggregated posterior q(s) = E_x q(s|x), moment-matched to
    N(m, Sigma) with m = E_x mu and Sigma = Cov_x(mu) + diag(E_x sigma^2), compared with the prior N(0, I):
      agg_kl_per_dim       KL(N(m, Sigma) || N(0, I)) / d with the FULL covariance; 0 iff m = 0 and
                           Sigma = I. Sigma has full rank even for fewer images than dimensions (the sigma^2
                           term): it is the moment-matched Gaussian of the mixture over exactly these images
      agg_kl_diag_per_dim  the same with only the diagonal of Sigma: blind to styles along a few directions off the axes
      agg_top_eigenvalues  the 5 largest eigenvalues of Sigma: N(0, I) has 1 in every direction; >> 1 means
                           prior draws at tau = 1 explore only part of the styles (about tau ~ sqrt(eigenvalue))
      agg_mmd_per_dim      ||E[s s^T] - I||_F^2 + 2 |E s|^2 over d, exact on these images (the training term)"""
    d, m = X.shape[1], X.mean(0)
    cov_mu = torch.cov(X.T, correction=0).view(d, d)                        # Cov_x(mu), (d,d)
    Sigma = cov_mu + torch.diag(sigma2)
    v = Sigma.diagonal()
    M = Sigma + torch.outer(m, m)                                           # E[s s^T] of the mixture
    eig = torch.linalg.eigvalsh(Sigma)
    return dict(style_dims=d, kl_per_dim=kl.mean().item(), active_units=int((cov_mu.diagonal() > 0.01).sum().item()),
                agg_kl_per_dim=(0.5 * (eig.sum() + m @ m - d - eig.log().sum()) / d).item(),
                agg_kl_diag_per_dim=(0.5 * (v + m ** 2 - 1 - v.log())).mean().item(),
                agg_top_eigenvalues=[round(x, 3) for x in eig.flip(0)[:5].tolist()],
                agg_mmd_per_dim=(((M - torch.eye(d, dtype=M.dtype)).pow(2).sum() + 2 * m @ m) / d).item()), m, Sigma


@torch.no_grad()
def diagnostics(model, loader, max_batches: int | None = None, seed: int = 0) -> dict:
    """Style-latent health on (held-out) data; returns a flat dict (None where not applicable): the entries of
    aggregate_stats, and loss_{encoder,prior,aggregate,none}: held-out denoising MSE with s = mu, s ~ N(0, I),
    s ~ aggregated posterior (the class Gaussian of fit_style_posterior, else N(m, Sigma)) and no style, same t and
    noise."""
    was_training = model.training
    model.eval()
    # pass 1: the encoder over the data (cheap: no U-Net)
    cache, mus, kl_sum, var_sum = [], [], 0.0, 0.0
    for z0, _, names, c, mu, logvar in encode_dataset(model, loader, max_batches):
        cache.append((z0, c, names, mu))  # the prompts' context is reused in pass 2, not encoded again
        if mu is not None:
            mus.append(mu.double().flatten(1).cpu())                        # (B,K,D) -> (B,d)
            kl_sum = kl_sum + model.style_encoder.kl(mu, logvar).double().sum(0)
            var_sum = var_sum + logvar.double().exp().flatten(1).sum(0).cpu()
    n = sum(len(z0) for z0, *_ in cache)
    out = {"n_images": n, "style_dims": None, "kl_per_dim": None, "active_units": None, "agg_kl_per_dim": None,
           "agg_kl_diag_per_dim": None, "agg_top_eigenvalues": None, "agg_mmd_per_dim": None,
           "loss_encoder": None, "loss_prior": None, "loss_aggregate": None}
    if model.style_encoder is not None:
        stats, m, Sigma = aggregate_stats(torch.cat(mus), var_sum / n, kl_sum / n)
        out.update(stats)
        agg_chol = torch.linalg.cholesky(Sigma).float()                     # for draws from N(m, Sigma)
    # pass 2: held-out denoising loss, four kinds of style, identical t and eps
    gen = torch.Generator().manual_seed(seed)
    sums = {"none": 0.0, "encoder": 0.0, "prior": 0.0, "aggregate": 0.0}
    for z0, c, names, mu in cache:
        B, dev = len(z0), model.device
        t = torch.randint(0, model.schedule.num_train_timesteps, (B,), generator=gen).to(dev)
        eps = randn_cpu(z0.shape, gen, dev)
        z_t, target = model.schedule.q_sample(z0, t, eps), model.schedule.target(z0, eps, t)
        styles = {"none": None}
        if mu is not None:
            styles["encoder"] = mu
            styles["prior"] = randn_cpu(mu.shape, gen, dev)
            if all(k in model.style_posterior for k in names):
                agg = torch.stack([posterior_draw(model.style_posterior[k], 1.0, gen) for k in names])
            else:
                agg = m.float() + randn_cpu((B, len(m)), gen, "cpu") @ agg_chol.T
            styles["aggregate"] = agg.view_as(mu).to(dev)
        for k, s in styles.items():
            pred = model.unet(z_t, t, c, style=s).float()
            sums[k] += (pred - target).pow(2).flatten(1).mean(1).sum().item()
    for k, total in sums.items():
        if k == "none" or model.style_encoder is not None:
            out[f"loss_{k}"] = total / n
    model.train(was_training)
    return out
