"""Test and benchmark helpers: diffusers keyword arguments that build the same networks as our configs."""
from unet import UNetConfig
from vae import VAEConfig


def unet_to_diffusers(cfg: UNetConfig) -> dict:
    """The keyword arguments of diffusers' UNet2DConditionModel that build the same network (for parity tests and
    the benchmark; the style branch has no diffusers counterpart). Note diffusers' `attention_head_dim` holds
    what is really the number of heads (diffusers issue 2011)."""
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
        block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.num_heads, cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth, use_linear_projection=cfg.linear_projection,
        norm_num_groups=cfg.norm_groups, norm_eps=cfg.resnet_eps, upcast_attention=cfg.upcast_attention)


def vae_to_diffusers(cfg: VAEConfig) -> dict:
    """The keyword arguments of diffusers' AutoencoderKL that build the same network (parity tests)."""
    n = len(cfg.block_channels)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scale_factor)
