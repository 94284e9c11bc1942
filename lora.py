"""Low-rank adapters (LoRA, Hu et al. 2021) on the U-Net's attention projections, for few-shot fine-tuning.

A frozen projection W (out, in) learns a low-rank change instead of a new matrix (LoRA, Eq. 3):
    y = W x + b + (alpha / r) * B A x          A: (r, in), B: (out, r), r << min(in, out)
A starts random and B at zero, so an adapted model starts bit-identical to its base. Only A and B train: at rank
r the 128 adapted layers of an SD 2.1 U-Net hold r * 0.21 M numbers instead of 866 M (bench/lora_memory.py).
Adapters go on to_q, to_k, to_v and to_out.0 of the self- and text-attention of every transformer block (`attn1`,
`attn2`), the modules diffusers/peft adapt; CLUE's own style attention (`attn_style`) is new and trains fully, so
it gets none. `merge_lora` folds B A into W (LoRA Sec. 4.1: W = W0 + B A, no inference latency) and gives back
plain nn.Linear layers: the merged U-Net is an ordinary one. Names match peft's (`lora_A.weight`, `lora_B.weight`
under the adapted projection) minus its `.default`. train.py --lora-rank uses them; checkpoint.py saves and loads
them (a LoRA folder: the trained tensors and the name of the base weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import is_style_param

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # in attn1 (self) and attn2 (text); attn_style trains fully


@dataclass
class LoRAConfig:
    base: str     # the weights the adapters apply to: a path or a Hugging Face repo id (what a LoRA folder records)
    rank: int     # r
    alpha: float  # the update is scaled by alpha / r

    def __post_init__(self):
        if not isinstance(self.base, str) or self.rank < 1 or not self.alpha > 0:
            raise ValueError(f"LoRA needs a base (the weights adapted), rank >= 1 and alpha > 0; got {self}")


class LoRALinear(nn.Module):
    """nn.Linear's weight and bias (shared with the base layer, frozen) plus the trainable low-rank pair A, B."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default initialisation
        nn.init.zeros_(self.lora_B.weight)                             # B = 0: starts as the base layer

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scaling * self.lora_B(self.lora_A(x))  # LoRA Eq. 3

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A."""
        out, inp = self.weight.shape
        linear = nn.Linear(inp, out, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scaling * self.lora_B.weight @ self.lora_A.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _projections(unet: nn.Module):
    """(container, attribute, name) of to_q / to_k / to_v / to_out.0 in every attn1 and attn2. The ModuleList
    to_out holds its layer under the attribute "0", so getattr / setattr reach all four the same way."""
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for key in ("to_q", "to_k", "to_v"):
                yield module, key, f"{name}.{key}"
            yield module.to_out, "0", f"{name}.to_out.0"


def add_lora(unet: nn.Module, rank: int, alpha: float) -> list[str]:
    """Wrap every target projection in a LoRALinear (in place); returns the adapted module names."""
    names = []
    for parent, key, name in _projections(unet):
        setattr(parent, key, LoRALinear(getattr(parent, key), rank, alpha))
        names.append(name)
    return names


def is_lora_param(name: str) -> bool:
    """An adapter tensor: `<module>.lora_A.weight` or `<module>.lora_B.weight`."""
    return ".lora_A." in name or ".lora_B." in name


def lora_trains(name: str) -> bool:
    """What trains in a LoRA fine-tune's U-Net: the adapters, and CLUE's style layers (new: no base weights to keep)."""
    return is_lora_param(name) or is_style_param(name)


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only."""
    return {k: v for k, v in unet.state_dict().items() if is_lora_param(k)}


def lora_settings(unet: nn.Module) -> dict | None:
    """{"rank", "alpha"} of the U-Net's adapters (add_lora gives them all the same), None without adapters."""
    settings = {(m.rank, m.alpha) for m in unet.modules() if isinstance(m, LoRALinear)}
    if len(settings) > 1:
        raise ValueError(f"adapters of several ranks / alphas {sorted(settings)}: one add_lora call per U-Net")
    return dict(zip(("rank", "alpha"), settings.pop())) if settings else None


def merge_lora(unet: nn.Module) -> int:
    """Fold every adapter into its base weight (in place); returns how many layers were merged."""
    adapted = [(parent, key) for parent, key, _ in _projections(unet) if isinstance(getattr(parent, key), LoRALinear)]
    for parent, key in adapted:
        setattr(parent, key, getattr(parent, key).merged())
    return len(adapted)
