"""The Stable Diffusion autoencoder (AutoencoderKL): image x <-> latent z, 8x smaller per side.

Implements the first stage of Latent Diffusion (Rombach et al. 2022, Sec. 3.1 and App. G): an encoder E gives a
diagonal Gaussian posterior q(z|x) = N(mu, sigma^2) with "KL-reg." (a small KL(q(z|x) || N(0, I)) term during its
training), a decoder D maps z back to pixels. The diffusion model works on z * scale_factor (0.18215 for SD 1.x/2.x,
chosen so the scaled latents have about unit variance); this module returns and takes UNSCALED z, as diffusers.

Module names equal diffusers' `AutoencoderKL`, so its state dict loads unchanged. The blocks are unet.py's (ResnetBlock
without a time embedding, the padded Downsample of ldm, Attention). Left out: the autoencoder's training losses (LPIPS,
patch discriminator), tiling/slicing for large images.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from schedulers import randn_like
from unet import Attention, Downsample, ResnetBlock, Upsample


@dataclass
class VAEConfig:
    in_channels: int = 3                      # image channels (RGB)
    out_channels: int = 3                     # reconstructed image channels
    latent_channels: int = 4                  # channels of z
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # widths per level; H/W halve len-1 times (x8 for SD)
    layers_per_block: int = 2                 # resnets per encoder level (decoder levels have one more)
    norm_groups: int = 32                     # GroupNorm groups (eps 1e-6 everywhere, as ldm)
    scale_factor: float = 0.18215             # multiply z by this before the U-Net (SD 1.x and 2.x)

    def __post_init__(self):
        self.block_channels = tuple(self.block_channels)
        if bad := [c for c in self.block_channels if c % self.norm_groups]:
            raise ValueError(f"VAEConfig: widths {bad} are not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along a side: H and W halve at every level but the last (SD: 8)."""
        return 2 ** (len(self.block_channels) - 1)

    @classmethod
    def sd(cls, **kw):
        """The SD 1.x / 2.x autoencoder (83.7M parameters, downsampling x8)."""
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw):
        """Three levels 32/64/64, one resnet each (downsampling x4: 32 px digits -> 8x8x4 latents)."""
        return cls(**{**dict(block_channels=(32, 64, 64), layers_per_block=1), **kw})


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)), per element. logvar is clamped to [-30, 20] as in ldm."""

    def __init__(self, mean, logvar):
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """z = mean + std * eps, eps ~ N(0, I) drawn with `generator` (schedulers.randn_like)."""
        return self.mean + self.std * randn_like(self.mean, generator)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) = 1/2 sum(mean^2 + var - 1 - logvar), summed over all but the batch dimension -> (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=list(range(1, self.mean.ndim)))


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the H*W pixels with a GroupNorm in front and a residual (ldm AttnBlock)."""

    def __init__(self, channels, groups):
        super().__init__(channels, None, heads=1, head_dim=channels, upcast=True, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x):
        B, C, H, W = x.shape
        h = super().forward(self.group_norm(x).view(B, C, H * W).transpose(1, 2))  # (B,C,H,W) -> (B,HW,C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)          # (B,HW,C) -> (B,C,H,W)


class MidBlock(nn.Module):
    """resnet, self-attention, resnet at the lowest resolution."""

    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.block_channels[0], len(cfg.block_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, out in enumerate(cfg.block_channels):
            level = nn.Module()
            level.resnets = nn.ModuleList()
            for _ in range(cfg.layers_per_block):
                level.resnets.append(ResnetBlock(ch, out, None, cfg.norm_groups, 1e-6))
                ch = out
            level.downsamplers = nn.ModuleList([Downsample(ch, asymmetric_pad=True)] if i < n - 1 else [])
            self.down_blocks.append(level)
        self.mid_block = MidBlock(ch, cfg.norm_groups)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down_blocks:
            for layer in (*level.resnets, *level.downsamplers):  # the downsampler: (B,C,H,W) -> (B,C,H/2,W/2)
                h = layer(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))  # -> (B, 2*latent, h, w) moments


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.block_channels[-1], len(cfg.block_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid_block = MidBlock(ch, cfg.norm_groups)
        self.up_blocks = nn.ModuleList()
        for i, out in enumerate(reversed(cfg.block_channels)):
            level = nn.Module()
            level.resnets = nn.ModuleList()
            for _ in range(cfg.layers_per_block + 1):
                level.resnets.append(ResnetBlock(ch, out, None, cfg.norm_groups, 1e-6))
                ch = out
            level.upsamplers = nn.ModuleList([Upsample(ch)] if i < n - 1 else [])
            self.up_blocks.append(level)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            for layer in (*level.resnets, *level.upsamplers):    # the upsampler: (B,C,H,W) -> (B,C,2H,2W)
                h = layer(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAE(nn.Module):
    """encode(x in [-1, 1], NCHW) -> DiagonalGaussian over unscaled z; decode(unscaled z) -> image."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x) -> DiagonalGaussian:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"vae.py: encode expects images (B, {self.cfg.in_channels}, H, W) in [-1, 1], "
                             f"got {tuple(x.shape)}")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z):
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"vae.py: decode expects unscaled latents (B, {self.cfg.latent_channels}, h, w), "
                             f"got {tuple(z.shape)} (did you pass an image, or forget to divide by scale_factor?)")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample=False, generator=None):
        """Reconstruction D(z) with z the posterior mean (or a sample when sample=True)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample else posterior.mode())
