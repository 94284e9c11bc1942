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
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT, FORMAT_VERSION = "clue-pytorch", 1


class CheckpointError(ValueError):
    """A weights file or folder that cannot be loaded; the message names the file and the keys."""


@contextlib.contextmanager
def _naming(where):
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


def read_checkpoint_dir(path) -> tuple[dict, dict]:
    """Our format: a folder with config.json ({"format": "clue-pytorch"}) and model.safetensors -> (config, tensors)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected config.json + model.safetensors)")
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a {FORMAT} folder holds config.json and model.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    found = config.get("format") if isinstance(config, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{config_file}: 'format' is {found!r}, expected {FORMAT!r}; not a folder written by "
                              "convert.py / train.py")
    if config.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: format version {config['version']} is newer than this code "
                              f"({FORMAT_VERSION}); update the code")
    return config, read_state_dict(weights_file)


def config_from_dict(cls, d: dict, where: str):
    """Rebuild a config dataclass from its JSON dict (lists back to tuples); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} fields {unknown}")
    with _naming(where):
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
