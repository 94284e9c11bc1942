"""The KL Style Encoder of CLUE (Park et al., arXiv 2511.10993): image latent + prompt -> Gaussian style tokens.

The paper's Style Encoder maps an image and its prompt to style embeddings that a second cross-attention layer of
the U-Net reads, with a KL term towards N(0, I) so that "unprompted" styles can be drawn at generation time. It does
not publish its layers; the architecture is this project's reading (DESIGN.md, "CLUE as this project implements it"):

    z0 (B,C,h,w) --conv stem, patch p--> patch tokens (B, ceil(h/p)*ceil(w/p), W) + 2-D sin/cos positions
    c  (B,77,D)  --LayerNorm, Linear--> text tokens (B, 77, W)
    memory = LayerNorm([patch tokens; text tokens])
    K learned queries (K, W) --`layers` x [self-attn, cross-attn to memory, GEGLU FF] (pre-norm)--> (B,K,W)
    LayerNorm -> two Linear heads -> mu, logvar  each (B, K, D), D the U-Net's context width (a text token's)

The encoder is the approximate posterior q(s | z0, c) = N(mu, diag sigma^2) of a conditional VAE (Kingma & Welling
2014) with the prior p(s) = N(0, I): `sample` is reparameterised (K&W Sec. 2.4), `kl` is K&W's closed form per
dimension (clue.py averages and weights it), `prior_mmd` compares a whole batch's styles (the aggregated posterior)
with the prior, which the per-image KL cannot do.

Initialisation: the logvar head is zero (sigma = 1); the mu head keeps PyTorch's default (|mu| ~ 0.6 per dimension),
so the diffusion loss sees a style signal from the first step. log sigma^2 is clamped as ldm clamps its VAE posterior.
Left out: attention masks for the padded prompt tokens (SD's U-Net attends to all 77, and so does this encoder).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from schedulers import randn_like
from unet import Attention, FeedForward, timestep_embedding

LOGVAR_MIN = -10.0  # sigma >= e^-5 ~ 0.007: far below the prior's 1, still no exact collapse
LOGVAR_MAX = 4.0    # sigma <= e^2 ~ 7.4: far above the prior's 1, no overflow in exp()


@dataclass
class StyleConfig:
    latent_channels: int = 4   # channels of z0 (the SD VAE's latent)
    context_dim: int = 1024    # D: width of the U-Net's context = width of a style token (SD 2.x 1024, SD 1.x 768)
    tokens: int = 4            # K style tokens; 0 = no style branch at all (the vanilla fine-tuning baseline)
    width: int = 512           # internal token width W (a multiple of 4 and of heads)
    layers: int = 4            # transformer layers of the K queries
    heads: int = 8             # attention heads (head width W / heads)
    patch_size: int = 2        # the conv stem turns each p x p patch of z0 into one token
    ff_mult: int = 4           # GEGLU feed-forward hidden width = ff_mult * W

    @classmethod
    def sd(cls, context_dim: int = 1024) -> "StyleConfig":
        """For Stable Diffusion (64x64 latents at 512 px -> 1024 patch tokens). ~24 M parameters at D=1024."""
        return cls(context_dim=context_dim)

    @classmethod
    def tiny(cls) -> "StyleConfig":
        """For the tiny demo preset (8x8x4 latents, context 64 -> 16 patch tokens). ~0.2 M parameters."""
        return cls(context_dim=64, width=64, layers=2, heads=4, patch_size=2)


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D positions for an h x w grid -> (h*w, dim): half the features encode the row, half the column,
    each with the transformer's sinusoids (unet.timestep_embedding). Works for any grid size."""
    rows = timestep_embedding(torch.arange(h, device=device), dim // 2)  # (h, dim/2)
    cols = timestep_embedding(torch.arange(w, device=device), dim // 2)  # (w, dim/2)
    grid = torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1)
    return grid.reshape(h * w, dim)  # (h,w,dim) -> (h*w,dim)


class StyleLayer(nn.Module):
    """Pre-norm transformer layer of the style queries: self-attention, cross-attention to the memory, GEGLU."""

    def __init__(self, width: int, heads: int, ff_mult: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn1 = Attention(width, heads=heads, head_dim=width // heads)
        self.attn2 = Attention(width, width, heads=heads, head_dim=width // heads)
        self.ff = FeedForward(width, mult=ff_mult)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = q + self.attn1(self.norm1(q))          # the K style tokens look at each other
        q = q + self.attn2(self.norm2(q), memory)  # ... and at the image patches and the prompt
        return q + self.ff(self.norm3(q))


class StyleEncoder(nn.Module):
    """q(s | z0, c): (clean scaled latent z0 (B,C,h,w), prompt context c (B,L,D)) -> (mu, logvar), each (B,K,D)."""

    def __init__(self, cfg: StyleConfig):
        super().__init__()
        if cfg.tokens < 1:
            raise ValueError(f"StyleConfig(tokens={cfg.tokens}): 0 tokens means no style branch; build no "
                             "StyleEncoder then (CLUE does this for --style-tokens 0)")
        if cfg.width % 4 or cfg.width % cfg.heads:
            raise ValueError(f"StyleConfig(width={cfg.width}) must be a multiple of 4 (2-D positions) and of heads")
        if cfg.patch_size < 1:
            raise ValueError(f"StyleConfig(patch_size={cfg.patch_size}) must be >= 1")
        self.cfg = cfg
        W = cfg.width
        self.stem = nn.Sequential(  # 3x3 conv for local features, then one token per p x p patch
            nn.Conv2d(cfg.latent_channels, W, 3, padding=1), nn.SiLU(),
            nn.Conv2d(W, W, cfg.patch_size, stride=cfg.patch_size))
        self.context_norm = nn.LayerNorm(cfg.context_dim)
        self.context_proj = nn.Linear(cfg.context_dim, W)
        self.memory_norm = nn.LayerNorm(W)
        self.queries = nn.Parameter(torch.randn(cfg.tokens, W) * 0.02)  # the K learned style queries
        self.layers = nn.ModuleList([StyleLayer(W, cfg.heads, cfg.ff_mult) for _ in range(cfg.layers)])
        self.norm_out = nn.LayerNorm(W)
        self.to_mu = nn.Linear(W, cfg.context_dim)
        self.to_logvar = nn.Linear(W, cfg.context_dim)
        nn.init.zeros_(self.to_logvar.weight)  # sigma = 1 at the start; the mu head keeps its init (docstring)
        nn.init.zeros_(self.to_logvar.bias)

    def forward(self, z0: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if z0.dim() != 4 or z0.shape[1] != cfg.latent_channels:
            raise ValueError(f"StyleEncoder: z0 must be (B,{cfg.latent_channels},h,w), got {tuple(z0.shape)}")
        if context.dim() != 3 or context.shape[-1] != cfg.context_dim or context.shape[0] != z0.shape[0]:
            raise ValueError(f"StyleEncoder: context must be (B={z0.shape[0]},L,{cfg.context_dim}), "
                             f"got {tuple(context.shape)}")
        p = cfg.patch_size
        z0 = F.pad(z0, (0, -z0.shape[3] % p, 0, -z0.shape[2] % p))  # pad right/bottom to a multiple of p
        x = self.stem(z0)                                            # (B,C,h,w) -> (B,W,h/p,w/p)
        gh, gw = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)                             # (B,W,gh,gw) -> (B,gh*gw,W)
        x = x + sincos_2d(gh, gw, cfg.width, x.device).to(x.dtype)
        text = self.context_proj(self.context_norm(context))        # (B,L,D) -> (B,L,W)
        memory = self.memory_norm(torch.cat([x, text], dim=1))      # (B, gh*gw + L, W)
        q = self.queries.to(x.dtype).expand(x.shape[0], -1, -1)      # (K,W) -> (B,K,W)
        for layer in self.layers:
            q = layer(q, memory)
        q = self.norm_out(q)
        return self.to_mu(q), self.to_logvar(q).clamp(LOGVAR_MIN, LOGVAR_MAX)  # (B,K,W) -> mu, logvar (B,K,D)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised draw s = mu + sigma * eps, eps ~ N(0, I), sigma = exp(logvar / 2) (K&W Sec. 2.4).
        eps is drawn from `generator` (schedulers.randn_like) unless given (clue.py draws it with randn_cpu)."""
        eps = randn_like(mu, generator) if eps is None else eps
        return mu + torch.exp(0.5 * logvar) * eps

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(0, 1)) per dimension, same shape as mu (B,K,D), in nats, at least fp32."""
        dtype = torch.promote_types(mu.dtype, torch.float32)
        mu, logvar = mu.to(dtype), logvar.to(dtype)
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)  # 1/2 (mu^2 + sigma^2 - 1 - log sigma^2), K&W App. B

    @staticmethod
    def prior_mmd(s: torch.Tensor) -> torch.Tensor:
        """MMD^2 between the batch's styles s (B,K,D) and the prior N(0, I), kernel k(x, y) = (1 + x.y)^2, per style
        dimension d = K*D. With M = E_q[s s^T] and m = E_q[s] (Gretton et al. 2012, eq. 3, p = N(0, I) analytically):
            E_qq k = 1 + 2|m|^2 + tr(M^2),   E_qp k = 1 + tr(M),   E_pp k = 1 + d
            MMD^2 = E_qq k - 2 E_qp k + E_pp k = ||M - I||_F^2 + 2 |m|^2
        E_qq is the U-statistic over pairs i != j of the batch (unbiased), so the term is 0 on average when the styles
        are drawn from N(0, I). Cost O(B^2 d): a B x B Gram matrix, never a d x d one."""
        x = s.flatten(1).to(torch.promote_types(s.dtype, torch.float32))  # (B,K,D) -> (B,d), at least fp32
        B, d = x.shape
        if B < 2:
            return x.new_zeros(())
        G = x @ x.T                                        # (B,B): s_i . s_j
        pairs = G.masked_fill(torch.eye(B, dtype=torch.bool, device=x.device), 0.0)  # the B(B-1) pairs i != j (a mask,
        n = B * (B - 1)                                    # not G[mask]: no output size to wait for on a GPU)
        second_moment = pairs.pow(2).sum() / n - 2 * G.diagonal().mean() + d  # ||M - I||_F^2
        return (second_moment + 2 * pairs.sum() / n) / d   # + 2 |m|^2, per dimension
