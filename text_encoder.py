"""The CLIP text tower that turns a prompt into Stable Diffusion's conditioning c: (B, 77, D).

Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.3)
conditions its U-Net on the *per-token* hidden states of a frozen CLIP text transformer (Radford et al. 2021), not
on CLIP's pooled text embedding. Two towers are in use:

  SD 1.x  OpenAI CLIP ViT-L/14 text tower: width 768, 12 heads, 12 blocks, QuickGELU (x * sigmoid(1.702 x)); all
          blocks run, then the final LayerNorm; prompts are padded to 77 tokens with the end token 49407.
  SD 2.x  OpenCLIP ViT-H/14 text tower: width 1024, 16 heads, 24 blocks, exact GELU. SD 2 takes the "penultimate"
          layer (ldm's FrozenOpenCLIPEmbedder(layer="penultimate")): we *build* only the first 23 blocks, then the
          final LayerNorm; a converter drops the 24th block's weights. Prompts are zero-padded.

Each block is pre-norm:  x = x + attn(ln_1(x), causal mask);  x = x + mlp(ln_2(x)),  mlp = c_proj(act(c_fc)).
The module is open_clip's `TextTransformer` (its parameter names) with our own forward, which returns all token
states: the SD pipelines' prompt embeddings, `CLIPTextModel(...).last_hidden_state` of the 12-layer (SD 1) or 23-layer
(SD 2) model. The tokenizer is open_clip's byte-level BPE (bundled: offline). Left out: CLIP's pooling and
`text_projection` (SD never uses them), the attention mask for padding (SD pipelines pass none: the causal mask keeps
real tokens blind to the padding after them), prompt weighting, prompts over 77 tokens (truncated, keeping the end
token, as the SD tokenizers do).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

SOT_TOKEN = 49406  # <start_of_text>
EOT_TOKEN = 49407  # <end_of_text>; also SD 1.x's padding token


@dataclass
class TextConfig:
    vocab_size: int = 49408     # CLIP BPE: 2x256 byte symbols (+/- '</w>') + 48894 merges + SOT, EOT
    context_length: int = 77    # tokens per prompt, start and end token included
    width: int = 1024           # D, the token width the U-Net's cross-attention sees
    heads: int = 16             # attention heads (64-dim heads in both CLIP towers)
    layers: int = 23            # blocks BUILT AND RUN (SD 2: the first 23 of ViT-H/14's 24)
    mlp_ratio: float = 4.0      # MLP hidden width = mlp_ratio * width
    act: str = "gelu"           # "gelu" (OpenCLIP, SD 2) or "quick_gelu" (OpenAI CLIP, SD 1)
    pad: str = "zero"           # padding token: "zero" (id 0, SD 2) or "eos" (id 49407, SD 1)

    def __post_init__(self):
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"TextConfig.act must be 'gelu' or 'quick_gelu', got {self.act!r}")
        if self.pad not in ("zero", "eos"):
            raise ValueError(f"TextConfig.pad must be 'zero' or 'eos', got {self.pad!r}")
        if self.width % self.heads:
            raise ValueError(f"TextConfig: width {self.width} is not divisible by heads {self.heads}")

    @classmethod
    def sd15(cls) -> "TextConfig":
        """OpenAI CLIP ViT-L/14 text tower, as SD 1.x uses it."""
        return cls(width=768, heads=12, layers=12, act="quick_gelu", pad="eos")

    @classmethod
    def sd21(cls) -> "TextConfig":
        """OpenCLIP ViT-H/14 text tower, first 23 of 24 blocks ("penultimate"), as SD 2.x uses it."""
        return cls(width=1024, heads=16, layers=23, act="gelu", pad="zero")

    @classmethod
    def tiny(cls, mode: str = "sd2") -> "TextConfig":
        """Tests and the CPU demo: width 64 (= UNetConfig.tiny().context_dim), 4 heads, 2 blocks."""
        act, pad = {"sd1": ("quick_gelu", "eos"), "sd2": ("gelu", "zero")}[mode]  # another mode: KeyError
        return cls(width=64, heads=4, layers=2, act=act, pad=pad)


@functools.lru_cache(maxsize=1)
def bpe_tokenizer() -> SimpleTokenizer:
    """open_clip's byte-level BPE, built once from its bundled bpe_simple_vocab_16e6.txt.gz."""
    return SimpleTokenizer()


def tokenize(prompts: str | list[str], context_length: int = 77, pad: str = "zero") -> torch.Tensor:
    """Prompts -> LongTensor (B, context_length): [SOT, BPE tokens..., EOT, pad, pad, ...], `pad` "zero" (SD 2) or
    "eos" (SD 1); a longer prompt is cut to context_length tokens, EOT kept last (as open_clip and the SD tokenizers).
    One known difference: diffusers' SD 2 tokenizer registers its pad token "!" as special, so every "!" in a prompt
    becomes id 0; open_clip (ldm, which trained SD 2) and we encode it as "!</w>" (id 256)."""
    if pad not in ("zero", "eos"):
        raise ValueError(f"tokenize: pad must be 'zero' or 'eos', got {pad!r}")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    bpe = bpe_tokenizer()
    pad_id = 0 if pad == "zero" else EOT_TOKEN
    tokens = torch.full((len(prompts), context_length), pad_id, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"tokenize: prompt {i} is a {type(prompt).__name__}, expected a str")
        ids = [SOT_TOKEN] + bpe.encode(prompt) + [EOT_TOKEN]
        if len(ids) > context_length:
            ids = ids[: context_length - 1] + [EOT_TOKEN]  # truncate, keep the end token
        tokens[i, : len(ids)] = torch.tensor(ids)
    return tokens


class TextEncoder(TextTransformer):
    """open_clip's TextTransformer, returning every token's final-LayerNorm state (SD's context)."""

    def __init__(self, cfg: TextConfig):
        # output_dim only sizes CLIP's text_projection, removed below (width keeps every open_clip version happy);
        # open_clip's LayerNorm is nn.LayerNorm (eps 1e-5, both CLIPs) with the result cast to the input dtype
        super().__init__(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                         heads=cfg.heads, layers=cfg.layers, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.width,
                         act_layer=QuickGELU if cfg.act == "quick_gelu" else nn.GELU, norm_layer=LayerNorm)
        self.text_projection = None  # pooled-embedding head: not part of SD
        self.cfg = cfg

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> (B, 77) token ids, padded as this tower's SD version expects."""
        return tokenize(prompts, self.cfg.context_length, self.cfg.pad).to(self.positional_embedding.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"TextEncoder: expected token ids of shape (B, L<={self.cfg.context_length}), got "
                             f"{tuple(tokens.shape)}; make them with TextEncoder.tokenize(prompts)")
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B,L) -> (B,L,D)
        # open_clip 2.24 runs its blocks sequence-first (L,B,D); newer versions batch-first.
        batch_first = getattr(self.transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)  # (B,L,D) -> (L,B,D)
        # Causal mask: token i attends to tokens <= i (additive -inf above the diagonal).
        x = self.transformer(x, attn_mask=self.attn_mask[:L, :L].to(x.dtype))
        if not batch_first:
            x = x.transpose(0, 1)  # (L,B,D) -> (B,L,D)
        return self.ln_final(x)
