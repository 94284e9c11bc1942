"""The Stable Diffusion U-Net with a CLUE style cross-attention in every transformer block.

Implements the denoiser eps_theta(z_t, t, c) of Latent Diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.3: a time-conditional U-Net whose intermediate layers attend to the
text tokens c through cross-attention, softmax(Q K^T / sqrt(d)) V, Eq. 3-4) exactly as Stable Diffusion 1.x / 2.x
ship it, plus the one addition of CLUE (arXiv 2511.10993): a *second* cross-attention layer per transformer block
that attends to style tokens s (B, K, D) produced by the Style Encoder,

    h = h + style_scale * attn_style(norm_style(h), s)           (after the text cross-attention)

whose output projection starts at zero, so a converted SD model with the branch added computes bit-identical outputs.

Module names equal diffusers' `UNet2DConditionModel`, so its state dict loads unchanged and only the new
`norm_style` / `attn_style` parameters are left over. The pieces, bottom-up: timestep_embedding, ResnetBlock,
Downsample / Upsample, Attention, FeedForward (GEGLU), BasicTransformerBlock, Transformer2D, UNet. Left out (SD never
uses them): class/added conditioning, attention masks, dropout, ControlNet residuals, the SDXL / upscaler variants.
Initialisation is PyTorch's default, as diffusers' from-scratch init (ldm would also zero proj_out / conv2 / conv_out).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4                      # latent channels in (the VAE's latent_channels)
    out_channels: int = 4                     # predicted eps (or v) channels
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each resolution level
    layers_per_block: int = 2                 # resnets per down level (up levels have one more)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # which down levels carry transformers; up mirrored
    num_heads: tuple[int, ...] = (5, 10, 20, 20)   # heads per level (SD 2.x: 64-dim heads; SD 1.x: 8 everywhere)
    context_dim: int = 1024                   # text-token width D (also the style-token width)
    transformer_depth: int = 1                # BasicTransformerBlocks per Transformer2D
    linear_projection: bool = True            # SD 2.x Linear proj_in/out; SD 1.x 1x1 convs
    norm_groups: int = 32                     # GroupNorm groups everywhere
    resnet_eps: float = 1e-5                  # GroupNorm eps of resnets, conv_norm_out (transformers': 1e-6 always)
    style: bool = True                        # build the CLUE style cross-attention in every transformer block
    upcast_attention: bool = False            # compute attention softmax in fp32 (SD 2.1 768-v under fp16)
    gradient_checkpointing: bool = False      # recompute resnets/transformers in backward (training only)

    def __post_init__(self):
        self.block_channels = tuple(self.block_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        self.num_heads = tuple(self.num_heads)
        if not len(self.block_channels) == len(self.attention_levels) == len(self.num_heads):
            raise ValueError(f"UNetConfig: block_channels, attention_levels and num_heads need one entry per level; "
                             f"got {self.block_channels}, {self.attention_levels}, {self.num_heads}")
        for ch, heads in zip(self.block_channels, self.num_heads):
            if ch % heads or ch % self.norm_groups:
                raise ValueError(f"UNetConfig: level width {ch} must be divisible by its num_heads ({heads}) and by "
                                 f"norm_groups ({self.norm_groups})")

    @classmethod
    def sd15(cls, **kw):
        """SD 1.x (1.4, 1.5): context 768 (CLIP ViT-L/14), 8 heads everywhere, 1x1-conv projections."""
        return cls(**{**dict(num_heads=(8, 8, 8, 8), context_dim=768, linear_projection=False), **kw})

    @classmethod
    def sd21(cls, **kw):
        """SD 2.0 / 2.1 768-v: context 1024 (OpenCLIP ViT-H/14), 64-dim heads, linear projections, fp32 softmax."""
        return cls(**{**dict(upcast_attention=True), **kw})

    @classmethod
    def sd21_base(cls, **kw):
        """SD 2.0 / 2.1 base (512 px, epsilon): as sd21 without the attention upcast."""
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw):
        """Two levels, 64/128 wide, context 64: the demo and the tests (a few ms per forward on 8x8 latents)."""
        return cls(**{**dict(block_channels=(64, 128), layers_per_block=1, attention_levels=(True, True),
                             num_heads=(4, 4), context_dim=64, linear_projection=True), **kw})


def is_style_param(name: str) -> bool:
    """The parameters CLUE adds to every transformer block of the U-Net (absent from SD files)."""
    return ".norm_style." in name or ".attn_style." in name


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of the (possibly fractional) timesteps t (B,) -> (B, dim), [cos | sin] halves (SD:
    flip_sin_to_cos=True, frequency shift 0)."""
    half = dim // 2  # freq_i = max_period^(-i / (dim/2)), i = 0..dim/2-1
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                   # (B,) -> (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))                           # odd dim: one zero column


class TimeEmbedding(nn.Module):
    """MLP on the sinusoidal features: Linear, SiLU, Linear (diffusers' TimestepEmbedding)."""

    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """h = conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + W_t SiLU(temb)))); out = shortcut(x) + h. temb_dim=None builds
    the VAE's variant, without a time embedding."""

    def __init__(self, in_channels, out_channels, temb_dim=None, groups=32, eps=1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_channels) if temb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]   # (B,C) -> (B,C,1,1), same shift everywhere
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. asymmetric_pad=True is the VAE encoder's variant (ldm): pad only
    right and bottom by one, then convolve without padding."""

    def __init__(self, channels, asymmetric_pad=False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric_pad else x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to `size`, the matching skip's H, W when a latent side is odd), then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        resize = {"scale_factor": 2.0} if size is None else {"size": tuple(size)}
        return self.conv(F.interpolate(x, mode="nearest", **resize))


class Attention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(head_dim)) V (Vaswani et al. 2017; LDM Eq. 3): self-attention when
    context is None, else cross-attention from x (B, N, query_dim) to context (B, M, context_dim). upcast=True: q, k,
    v and the softmax in fp32 under fp16/bf16 (SD 2.1 768-v needs it). bias=True: q/k/v biases (the VAE's)."""

    def __init__(self, query_dim, context_dim=None, heads=8, head_dim=64, upcast=False, bias=False):
        super().__init__()
        self.heads, self.head_dim, self.upcast = heads, head_dim, upcast
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # diffusers' to_out.1 is a parameter-free dropout

    def forward(self, x, context=None):
        context = x if context is None else context
        B = x.shape[0]
        q, k, v = (proj(y).view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # (B,N,h*d) -> (B,h,N,d)
                   for proj, y in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        if self.upcast and q.dtype != torch.float32:
            with torch.autocast(q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, -1, self.heads * self.head_dim)     # (B,h,N,d) -> (B,N,h*d)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """One Linear to twice the width, split into (value, gate): value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP: dim -> mult*dim (gated) -> dim. net.1 stands where diffusers keeps its dropout, so the output
    layer stays at index 2 (ff.net.2) as in the released weights."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block on the H*W tokens: self-attention, text cross-attention, CLUE style
    cross-attention (when built), feed-forward; each added to the residual stream h."""

    def __init__(self, dim, heads, head_dim, context_dim, style=True, upcast=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, upcast)
        self.norm_style, self.attn_style = None, None
        if style:
            self.norm_style = nn.LayerNorm(dim)
            self.attn_style = Attention(dim, context_dim, heads, head_dim, upcast)
            nn.init.zeros_(self.attn_style.to_out[0].weight)     # starts as an exact identity (ldm's zero_module)
            nn.init.zeros_(self.attn_style.to_out[0].bias)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, h, context, style=None, style_scale=1.0):
        h = h + self.attn1(self.norm1(h))                        # self-attention over the H*W tokens
        h = h + self.attn2(self.norm2(h), context)               # text cross-attention
        if self.attn_style is not None and style is not None and (torch.is_tensor(style_scale) or style_scale != 0):
            h = h + style_scale * self.attn_style(self.norm_style(h), style)   # CLUE: style cross-attention
        return h + self.ff(self.norm3(h))


class Transformer2D(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, plus the input (LDM's SpatialTransformer)."""

    def __init__(self, channels, heads, context_dim, depth=1, linear_projection=True, groups=32, style=True,
                 upcast=False):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear_projection else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, style, upcast) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x, context, style=None, style_scale=1.0):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)           # (B,C,H,W) -> (B,HW,C)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, style, style_scale)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.view(B, H, W, C).permute(0, 3, 1, 2)                # (B,HW,C) -> (B,C,H,W), a strided view
        if not self.linear_projection:
            h = self.proj_out(h.contiguous())
        return x + h                                              # x first: the sum comes out contiguous NCHW


class UNet(nn.Module):
    """eps_theta(z_t, t, c, s): the SD U-Net; forward(x, t, context, style=None, style_scale=1.0) -> (B, out, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch0, n = cfg.block_channels[0], len(cfg.block_channels)
        temb_dim = 4 * ch0
        self.time_embedding = TimeEmbedding(ch0, temb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        def resnet(cin, cout):
            return ResnetBlock(cin, cout, temb_dim, cfg.norm_groups, cfg.resnet_eps)

        def transformer(ch, heads):
            return Transformer2D(ch, heads, cfg.context_dim, cfg.transformer_depth, cfg.linear_projection,
                                 cfg.norm_groups, cfg.style, cfg.upcast_attention)

        # Down levels: layers_per_block x (resnet [+ transformer]), then a stride-2 conv except at the last level.
        # skip_channels mirrors the `skips` stack of forward(): one entry per tensor the up path will concatenate.
        self.down_blocks = nn.ModuleList()
        ch, skip_channels = ch0, [ch0]
        for i, (out, attend, heads) in enumerate(zip(cfg.block_channels, cfg.attention_levels, cfg.num_heads)):
            level = nn.Module()
            level.resnets, level.attentions = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.layers_per_block):
                level.resnets.append(resnet(ch, out))
                if attend:
                    level.attentions.append(transformer(out, heads))
                ch = out
                skip_channels.append(ch)
            level.downsamplers = nn.ModuleList([Downsample(ch)] if i < n - 1 else [])
            skip_channels += [ch] * len(level.downsamplers)
            self.down_blocks.append(level)

        # Middle: resnet, transformer, resnet at the lowest resolution (always attends).
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList([resnet(ch, ch), resnet(ch, ch)])
        self.mid_block.attentions = nn.ModuleList([transformer(ch, cfg.num_heads[-1])])

        # Up levels, mirrored: layers_per_block + 1 resnets, each eating one skip; nearest x2 + conv except at the end.
        self.up_blocks = nn.ModuleList()
        levels = list(zip(cfg.block_channels, cfg.attention_levels, cfg.num_heads))[::-1]
        for i, (out, attend, heads) in enumerate(levels):
            level = nn.Module()
            level.resnets, level.attentions = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.layers_per_block + 1):
                level.resnets.append(resnet(ch + skip_channels.pop(), out))
                if attend:
                    level.attentions.append(transformer(out, heads))
                ch = out
            level.upsamplers = nn.ModuleList([Upsample(ch)] if i < n - 1 else [])
            self.up_blocks.append(level)

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch0, eps=cfg.resnet_eps)
        self.conv_out = nn.Conv2d(ch0, cfg.out_channels, 3, padding=1)

    def _run(self, module, *args):
        """Call a resnet or transformer; with gradient checkpointing (training only) recompute it in backward."""
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _check(self, x, t, context, style):
        if style is not None and not self.cfg.style:  # would be ignored silently
            raise ValueError("unet.py: style tokens given to a U-Net without the style branch (UNetConfig("
                             "style=False), e.g. plain SD weights): load with style=True or build CLUE")
        B = x.shape[0]
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"unet.py: x must be (B, {self.cfg.in_channels}, H, W) latents, got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(B) if t.ndim == 0 else t
        if t.shape != (B,):
            raise ValueError(f"unet.py: t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
        for name, tokens in (("context", context), ("style", style)):
            if tokens is not None and (tokens.ndim != 3 or tokens.shape[0] != B or tokens.shape[2] != self.cfg.context_dim):
                raise ValueError(f"unet.py: {name} must be (B={B}, tokens, context_dim={self.cfg.context_dim}), "
                                 f"got {tuple(tokens.shape)}")
        return t

    def forward(self, x, t, context, style=None, style_scale=1.0):
        """x: (B, in_channels, H, W) noisy latents z_t; t: timesteps, (B,) or a scalar; context: (B, L, D) text
        tokens; style: (B, K, D) style tokens or None (branch skipped); style_scale: float or a (B, 1, 1) tensor."""
        t = self._check(x, t, context, style)

        # 1. time embedding: sinusoidal features -> MLP, shared by every resnet
        emb = self.time_embedding(timestep_embedding(t, self.cfg.block_channels[0]).to(x.dtype))

        # 2. down: keep every intermediate map for the skip connections
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = self._run(resnet, h, emb)
                if len(level.attentions):
                    h = self._run(level.attentions[j], h, context, style, style_scale)
                skips.append(h)
            for down in level.downsamplers:
                h = down(h)
                skips.append(h)

        # 3. middle
        h = self._run(self.mid_block.resnets[0], h, emb)
        h = self._run(self.mid_block.attentions[0], h, context, style, style_scale)
        h = self._run(self.mid_block.resnets[1], h, emb)

        # 4. up: concatenate the matching skip (last in, first out) before each resnet
        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = torch.cat([h, skips.pop()], dim=1)            # (B,C,H,W) -> (B,C+C_skip,H,W)
                h = self._run(resnet, h, emb)
                if len(level.attentions):
                    h = self._run(level.attentions[j], h, context, style, style_scale)
            for up in level.upsamplers:
                h = up(h, size=skips[-1].shape[-2:])              # back to the skip's size (odd sides round up)

        # 5. out: GroupNorm, SiLU, conv to the predicted noise (or v)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
