"""Our checkpoint format on disk, and reading weight files of any origin.

A checkpoint of this project is a folder of two files:
  config.json        {"format": "clue-pytorch", "version": 1, "unet": {...}, "vae": {...}, ...}: each config
                     dataclass as a dict of its fields, plus the schedule and sampling settings
  model.safetensors  every tensor, named `<part>.<parameter>`: `unet.*`, `vae.*`, `text_encoder.*` and, in a
                     CLUE checkpoint, `style_encoder.*`
The writers replace a file atomically (a temporary file beside it, fsync, os.replace), so a crash leaves the old
file or the complete new one, never half of one; save_stable_diffusion (convert.py) writes config.json last, so a
folder that has it is complete.

Here: CheckpointError (what every loader raises for a bad file, naming the file and the keys),
atomic_write_json / atomic_write_safetensors, read_state_dict (a .safetensors file, or a torch pickle read with
weights_only=True), read_checkpoint_dir (our folder -> (config, tensors)) and config_from_dict (a config
dataclass back from its JSON dict). Building the modules and filling them is the callers' job: convert.py for
Stable Diffusion (through the audit in audit.py), clue.py for the style encoder; training_state.py,
train_vae.py, eval.py and classifier.py write their own folders with the same atomic writers.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import asdict
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clue import CLUE, POSTERIOR_TENSORS, CLUEConfig, StableDiffusion
from schedulers import SD_SAMPLER, NoiseSchedule
from style_encoder import StyleConfig, StyleEncoder
from text_encoder import TextConfig, TextEncoder
from unet import UNet, UNetConfig, is_style_param
from vae import VAE, VAEConfig

FORMAT, FORMAT_VERSION = "clue-pytorch", 1


class CheckpointError(ValueError):
    """A weights file or folder that cannot be loaded; the message names the file and the keys."""


@contextlib.contextmanager
def naming_errors(where):
    """Re-raise a ValueError from a config class or a mapping function as a CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Atomic writers and our own format
# ---------------------------------------------------------------------------------------------
def _atomic_replace(path: Path, write) -> None:
    """write(tmp_path) into a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_json(path, obj) -> None:
    """Write obj as indented JSON to path; a crash leaves either the old file or the complete new one."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a dict of tensors as safetensors, atomically. Shared storage is cloned (safetensors refuses it)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    _atomic_replace(Path(path), lambda tmp: save_file(out, tmp, metadata=metadata))


def write_checkpoint(folder, kind: str, config: dict, tensors: dict, json_name: str = "config.json",
                     tensors_name: str = "model.safetensors") -> None:
    """Our one format: folder/tensors_name (safetensors) then folder/json_name = {"format", "version", "kind",
    **config}, each written atomically; the JSON last, so a folder that has it is complete. `kind` says what
    reads it back: "clue" / "stable_diffusion" (sample.py), "vae" (the tiny VAE phase), "classifier" (eval.py),
    "training_state" (a resumable checkpoint's optimizer, RNG and data position)."""
    folder = Path(folder)
    atomic_write_safetensors(folder / tensors_name, tensors, metadata={"format": FORMAT, "kind": kind})
    atomic_write_json(folder / json_name, {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, **config})


def read_checkpoint(folder, kind: str | None = None, json_name: str = "config.json",
                    tensors_name: str = "model.safetensors") -> tuple[dict, dict]:
    """Read what write_checkpoint wrote -> (config, tensors), or raise CheckpointError naming the file. `kind`:
    what the caller expects; folders written before "kind" existed (format version 1) pass."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected {json_name} + {tensors_name})")
    config_file, weights_file = path / json_name, path / tensors_name
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a {FORMAT} folder holds {json_name} and {tensors_name}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    found = config.get("format") if isinstance(config, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{config_file}: 'format' is {found!r}, expected {FORMAT!r}; not a folder written by "
                              "convert.py / train.py")
    if not isinstance(config.get("version", 0), int) or config.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: format version {config.get('version')!r} is not one this code reads "
                              f"(<= {FORMAT_VERSION}); update the code")
    if kind is not None and config.get("kind", kind) != kind:
        raise CheckpointError(f"{config_file}: holds a {config['kind']!r} checkpoint, expected {kind!r}")
    return config, read_state_dict(weights_file)


def read_checkpoint_dir(path) -> tuple[dict, dict]:
    """Our model folder (config.json + model.safetensors) -> (config, tensors): read_checkpoint of any kind."""
    return read_checkpoint(path)


def config_from_dict(cls, d: dict, where: str):
    """Rebuild a config dataclass from its JSON dict (lists back to tuples); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} fields {unknown}")
    with naming_errors(where):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------
# Reading weight files
# ---------------------------------------------------------------------------------------------
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A .safetensors file or a torch pickle (.ckpt/.bin, weights_only=True) -> {name: tensor}.

    A top-level "state_dict" entry (Lightning / ldm checkpoints) is unwrapped; non-tensor entries
    (step counters) are dropped. Unreadable files raise CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(2)
    as_torch = path.suffix != ".safetensors" and (magic in (b"PK", b"\x80\x02") or path.suffix in _TORCH_SUFFIXES)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True) if as_torch else load_file(path)
    except Exception as e:  # the libraries raise a zoo of types (SafetensorError, UnpicklingError, RuntimeError...)
        kind = "a torch pickle (torch.load, weights_only=True)" if as_torch else "safetensors"
        raise CheckpointError(f"{path}: cannot be read as {kind}: {type(e).__name__}: {e}. The file is truncated, "
                              f"corrupt or not a weights file; download it again") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------
def key_listing(title: str, items: list, limit: int = 12) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "".join(f"    {x}\n" for x in items[:limit]) + more


def load_mapped(module: torch.nn.Module, mapped: list, unused: list, what: str, source,
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
            + (key_listing("shape mismatches", shapes) if shapes else "")
            + (key_listing("parameters of ours with no source key", missing) if missing else "")
            + (key_listing("source keys with no parameter of ours", unknown + unused) if unknown or unused else "")
            + (key_listing("parameters filled twice", twice) if twice else "")
            + "  The weights and the config disagree, or this is not a Stable Diffusion 1.x / 2.x checkpoint.")
    module.load_state_dict(filled, strict=False)


def load_audited(module: torch.nn.Module, state_dict: dict, what: str, source, keep_init=lambda name: False) -> None:
    """The audit for a state dict already in our names (our own format, the style encoder of a CLUE checkpoint)."""
    load_mapped(module, [(k, k, t) for k, t in state_dict.items()], [], what, source, keep_init)


# ---------------------------------------------------------------------------------------------
# Stable Diffusion and CLUE in our format
# ---------------------------------------------------------------------------------------------
def load_sd_folder(folder: Path, prediction_type, style) -> StableDiffusion:
    config, tensors = read_checkpoint_dir(folder)
    where = folder / "config.json"
    lacking = [k for k in ("unet", "vae", "text", "schedule") if not isinstance(config.get(k), dict)]
    if lacking:
        raise CheckpointError(f"{where}: missing the {', '.join(lacking)} section(s)")
    unet_cfg = config_from_dict(UNetConfig, config["unet"], f"{where} [unet]")
    if style is not None:
        unet_cfg = dataclasses.replace(unet_cfg, style=style)
    vae_cfg = config_from_dict(VAEConfig, config["vae"], f"{where} [vae]")
    text_cfg = config_from_dict(TextConfig, config["text"], f"{where} [text]")
    schedule = {k: v for k, v in config["schedule"].items() if k != "prediction_type"}
    prediction_type = (prediction_type or config.get("prediction_type") or config["schedule"].get("prediction_type")
                       or "epsilon")
    weights, notes = folder / "model.safetensors", []
    parts: dict[str, dict] = {}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        parts.setdefault(head, {})[rest] = v
    unet, vae, text = UNet(unet_cfg), VAE(vae_cfg), TextEncoder(text_cfg)
    unet_sd = parts.pop("unet", {})
    if not unet_cfg.style:  # a CLUE checkpoint loaded as plain SD: its style layers are left out
        dropped = [k for k in unet_sd if is_style_param(k)]
        unet_sd = {k: v for k, v in unet_sd.items() if not is_style_param(k)}
        if dropped:
            notes.append(f"U-Net: {len(dropped)} style-branch tensors left out (style=False)")
    load_audited(unet, unet_sd, "U-Net (unet.*)", weights, keep_init=is_style_param)
    load_audited(vae, parts.pop("vae", {}), "VAE (vae.*)", weights)
    load_audited(text, parts.pop("text_encoder", {}), "text encoder (text_encoder.*)",
                  weights)
    extra_tensors = {f"{head}.{k}": v for head, part in parts.items() for k, v in part.items()}
    known = {"format", "version", "unet", "vae", "text", "schedule", "prediction_type", "scale_factor",
             "image_size", "sampler", "source"}
    return StableDiffusion(unet, vae, text, NoiseSchedule(**schedule, prediction_type=prediction_type),
                           prediction_type, float(config.get("scale_factor", vae_cfg.scale_factor)),
                           int(config.get("image_size") or (config.get("clue") or {}).get("image_size")
                               or (768 if prediction_type == "v_prediction" else 512)),
                           dict(config.get("sampler") or SD_SAMPLER), f"{FORMAT} folder", notes,
                           {k: v for k, v in config.items() if k not in known}, extra_tensors)


def save_stable_diffusion(sd: StableDiffusion, out_dir, dtype: torch.dtype | None = None,
                          extra_config: dict | None = None, extra_tensors: dict | None = None) -> None:
    """Write our format: out_dir/model.safetensors (unet.*, vae.*, text_encoder.*, extra tensors) then
    out_dir/config.json, each atomically; `dtype` casts floating-point tensors (e.g. torch.float16)."""
    tensors = {}
    for prefix, module in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder)):
        tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    tensors.update({**sd.extra_tensors, **(extra_tensors or {})})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config = {"format": FORMAT, "version": FORMAT_VERSION, "unet": asdict(sd.unet.cfg), "vae": asdict(sd.vae.cfg),
              "text": asdict(sd.text_encoder.cfg), "schedule": sd.schedule.to_dict(),
              "prediction_type": sd.prediction_type, "scale_factor": sd.scale_factor, "image_size": sd.image_size,
              "sampler": sd.sampler_config, "source": sd.source, **sd.extra_config, **(extra_config or {})}
    out_dir = Path(out_dir)
    atomic_write_safetensors(out_dir / "model.safetensors", tensors, metadata={"format": FORMAT})
    atomic_write_json(out_dir / "config.json", config)  # written last: a folder with it is complete


def save_clue(model: CLUE, path, extra: dict | None = None) -> None:
    """Our format (convert.save_stable_diffusion: model.safetensors, then config.json, each atomic) with the
    CLUE parts added: `style_encoder.*` and `style_posterior.<i>.{mean,var,factors,psi,mus}` tensors; "style",
    "clue", "style_posterior" (class names, prompts, counts), "diagnostics" and "train" (`extra`, e.g. the
    training settings) in config.json."""
    tensors = {}
    if model.style_encoder is not None:
        tensors.update({f"style_encoder.{k}": v for k, v in model.style_encoder.state_dict().items()})
    classes = list(model.style_posterior)
    for i, name in enumerate(classes):
        for key in POSTERIOR_TENSORS:
            tensors[f"style_posterior.{i}.{key}"] = model.style_posterior[name][key]
    config = {
        "style": asdict(model.style_encoder.cfg) if model.style_encoder is not None else None,
        "clue": asdict(model.cfg),
        "style_posterior": {"classes": classes, "prompts": [model.style_posterior[c]["prompt"] for c in classes],
                            "counts": [len(model.style_posterior[c]["mus"]) for c in classes]},
        "diagnostics": model.last_diagnostics, "train": extra,
    }
    save_stable_diffusion(model.as_stable_diffusion(), path, extra_config=config, extra_tensors=tensors)


def load_clue(path, device="cpu") -> CLUE:
    """A CLUE checkpoint folder written by save(). Plain SD weights: convert.load_stable_diffusion +
    CLUE.from_stable_diffusion (sample.py's load_model does either)."""
    path = Path(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "clue" not in config:
        raise CheckpointError(f"{path}: not a CLUE checkpoint (no 'clue' section in {config_file}); for plain SD "
                              "weights use convert.load_stable_diffusion and CLUE.from_stable_diffusion")
    sd = load_sd_folder(path, None, None)  # U-Net, VAE, text encoder: audited by convert.py
    extra, tensors = sd.extra_config, dict(sd.extra_tensors)
    clue_cfg = config_from_dict(CLUEConfig, extra["clue"], f"{config_file} [clue]")
    style_cfg = config_from_dict(StyleConfig, extra["style"], f"{config_file} [style]") if extra["style"] else None
    if sd.unet.cfg.style != (style_cfg is not None):
        raise CheckpointError(f"{config_file}: unet.style={sd.unet.cfg.style} but style="
                              f"{'a StyleConfig' if style_cfg else None}: the checkpoint is inconsistent")
    if style_cfg is not None:  # the style layers must come from the file, not from their initialisation
        with safe_open(path / "model.safetensors", "pt") as f:
            stored = set(f.keys())
        absent = [f"unet.{k}" for k in sd.unet.state_dict() if is_style_param(k) and f"unet.{k}" not in stored]
        if absent:
            raise CheckpointError(f"{path}: the U-Net's style layers are missing from model.safetensors: "
                                  f"{absent[:6]}{' ...' if len(absent) > 6 else ''}")
    style_encoder = StyleEncoder(style_cfg) if style_cfg is not None else None
    if style_encoder is not None:
        style_sd = {k[len("style_encoder."):]: v for k, v in tensors.items() if k.startswith("style_encoder.")}
        load_audited(style_encoder, style_sd, "style encoder (style_encoder.*)", path)
    model = CLUE(sd.vae, sd.text_encoder, sd.unet, style_encoder, sd.schedule, clue_cfg, sd.sampler_config)
    post = extra.get("style_posterior") or {"classes": []}
    for i, name in enumerate(post["classes"]):
        keys = [f"style_posterior.{i}.{k}" for k in POSTERIOR_TENSORS]
        if any(k not in tensors for k in keys):
            raise CheckpointError(f"{path}: style posterior of class {name!r} lacks tensors "
                                  f"{[k for k in keys if k not in tensors]}; refit it: "
                                  "model.fit_style_posterior(loader), then model.save(path)")
        model.style_posterior[name] = {"prompt": post["prompts"][i],
                                       **{k: tensors[key].float() for k, key in zip(POSTERIOR_TENSORS, keys)}}
    model.last_diagnostics = extra.get("diagnostics")
    model.train_config = extra.get("train")
    return model.to(device).eval()
