"""Test and benchmark helpers: diffusers keyword arguments that build the same networks as our configs, and a
transformers CLIPTokenizer built offline from open_clip's bundled BPE file."""
import gzip
import json
import os

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


def clip_tokenizer_offline(folder, pad="zero"):
    """A transformers CLIPTokenizer built from open_clip's bundled BPE file (no hub access): the vocabulary is
    open_clip's (256 byte symbols, the same with '</w>', the merges, start and end token), as CLIP's vocab.json."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # SD 2's tokenizer pads with "!" (id 0), SD 1's with the end token
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         pad_token="!" if pad == "zero" else "<|endoftext|>", model_max_length=77)
