"""Renaming rules and the audit: how every loader puts a state dict into one of our modules.

STYLE.md, point 7: a conversion is a short list of renaming RULES plus an AUDIT. A rule is
(regex, replacement, transform): the first rule whose regex matches the start of a source key rewrites that
prefix, and `transform` (or None) changes the tensor. `_apply_rules` renames a whole state dict; `_load_audited`
then loads the result, or raises CheckpointError listing every offending key, unless every parameter of ours is
filled exactly once (the new CLUE style parameters, `is_style_param`, may keep their initialisation), every
source key is used or on an explicit ignore list, and every shape matches. `load_audited` is the same audit for
a state dict already in our names (our own format, the style encoder of a CLUE checkpoint).

The rules live with the layout they describe: convert_ldm.py (original single files) and convert.py (diffusers
folders, whose names are ours but for the VAE attention of old uploads).
"""
from __future__ import annotations

import re

import torch

from checkpoint import CheckpointError

_IDENTITY = [(r"", "", None)]


def _apply_rules(source: dict, rules, suffix_renames=()) -> tuple[list, list]:
    """Rename every key by the first rule whose regex matches its start.

    A rule is (regex, replacement, transform): `replacement` rewrites the matched prefix (a template with
    \\1 or a function of the match), `transform` (or None) changes the tensor. `suffix_renames` are
    (old, new) substrings replaced afterwards. Returns ([(source key, our key, tensor)], [unmatched keys]).
    """
    mapped, unmatched = [], []
    for key, t in source.items():
        for pattern, repl, transform in rules:
            m = re.match(pattern, key)
            if m:
                new = (repl(m) if callable(repl) else m.expand(repl)) + key[m.end():]
                for old, rep in suffix_renames:
                    new = new.replace(old, rep)
                mapped.append((key, new, transform(t) if transform else t))
                break
        else:
            unmatched.append(key)
    return mapped, unmatched


def is_style_param(name: str) -> bool:
    """The parameters CLUE adds to every transformer block of the U-Net (absent from SD files)."""
    return ".norm_style." in name or ".attn_style." in name


def _listing(title: str, items: list, limit: int = 12) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "".join(f"    {x}\n" for x in items[:limit]) + more


def _load_audited(module: torch.nn.Module, mapped: list, unused: list, what: str, source,
                  keep_init=lambda name: False) -> None:
    """The audit: load `mapped` [(source key, our key, tensor)] into `module`, or raise listing every problem.

    Fails on a parameter of ours filled twice or not at all (unless keep_init(name)), a mapped key that
    is no parameter of ours, a shape mismatch, or source keys neither used nor ignored (`unused`).
    """
    own = module.state_dict()
    filled, origin, twice, unknown, shapes, bad = {}, {}, [], [], [], set()
    for src, dst, t in mapped:
        if dst in filled:
            twice.append(f"{dst} <- {origin[dst]} and {src}")
        elif dst not in own:
            unknown.append(f"{src} -> {dst}")
        elif t.shape != own[dst].shape:
            shapes.append(f"{src}: {tuple(t.shape)} in the source, {tuple(own[dst].shape)} in our model")
            bad.add(dst)
        else:
            filled[dst], origin[dst] = t, src
    missing = [k for k in own if k not in filled and k not in bad and not keep_init(k)]
    if twice or unknown or shapes or missing or unused:
        raise CheckpointError(
            f"{source}: the {what} weights do not match our {type(module).__name__} built from the config:\n"
            + (_listing("shape mismatches", shapes) if shapes else "")
            + (_listing("parameters of ours with no source key", missing) if missing else "")
            + (_listing("source keys with no parameter of ours", unknown + unused) if unknown or unused else "")
            + (_listing("parameters filled twice", twice) if twice else "")
            + "  The weights and the config disagree, or this is not a Stable Diffusion 1.x / 2.x checkpoint.")
    module.load_state_dict(filled, strict=False)


def load_audited(module: torch.nn.Module, state_dict: dict, what: str, source, keep_init=lambda name: False) -> None:
    """The audit for a state dict already in our names (our own format, the style encoder of a CLUE checkpoint)."""
    _load_audited(module, *_apply_rules(state_dict, _IDENTITY), what, source, keep_init)
