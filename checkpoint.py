"""Our one checkpoint format, reading weight and config files of any origin, and the audit every loader ends with.

A checkpoint is a folder: model.safetensors (tensors named `<part>.<name>`: unet.*, vae.*, style_encoder.*, ...) and
config.json ({"format": "clue-pytorch", "version": 1, "kind": ..., a section per config dataclass, ...}), for CLUE,
SD, the tiny VAE, training state and the classifier alike (`kind` says which); a LoRA fine-tune's holds what trained,
in lora.safetensors, and names the base. Files are replaced atomically, the JSON last: a folder that has it is
complete. Reading validates once, here: sections, field types, every tensor (the audit, STYLE.md point 7); anything
broken raises CheckpointError naming the file and the key."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import typing
from dataclasses import MISSING, asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clue import CLUE, POSTERIOR_TENSORS, CLUEConfig, StableDiffusion
from lora import LoRAConfig, add_lora, lora_settings, lora_trains, merge_lora
from schedulers import SD_SAMPLER, SD_SCHEDULE, NoiseSchedule, sd_image_size
from style_encoder import StyleConfig, StyleEncoder
from text_encoder import TextConfig, TextEncoder
from unet import UNet, UNetConfig, is_style_param
from vae import VAE, VAEConfig

FORMAT, FORMAT_VERSION, LORA_FILE = "clue-pytorch", 1, "lora.safetensors"  # LORA_FILE: a LoRA folder's tensors
OLD_FORMATS = {"clue-classifier": "a classifier written by an older eval.py: retrain it (python eval.py "
               'train-classifier --train DIR --out FOLDER) or in its config.json replace "format": "clue-classifier" '
               'by "format": "clue-pytorch", "kind": "classifier" (nothing else changed)'}  # formats before the one


class CheckpointError(ValueError):
    """A weights or config file that cannot be loaded; the message names the file and the key."""


@contextlib.contextmanager
def naming_errors(where):
    """Re-raise what a config's or a mapping's own checks raise (and the TypeError a value of the wrong JSON type meets
    in a public file's translation, the allocation failure of sizes too large to build) as a CheckpointError naming
    the file."""
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e}") from e
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: {e}") from e
    except TypeError as e:
        raise CheckpointError(f"{where}: a value of the wrong type ({e})") from e
    except RuntimeError as e:  # torch's allocators: "... tried to allocate N bytes"
        if "allocate" not in str(e):
            raise
        raise CheckpointError(f"{where}: the model it describes needs more memory than there is, sizes edited by "
                              f"hand? ({str(e).splitlines()[0]})") from e


# ---- writing: atomic files, our format -------------------------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    """write(tmp) into a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder: a reader
    sees the old file or the new one, never half of one (PNGs too: give their writer the format, tmp has no suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.umask(umask := os.umask(0))  # reading the umask means setting it: set it back at once
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
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Shared storage is cloned (safetensors refuses it)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    atomic_write(Path(path), lambda tmp: save_file(out, tmp, metadata=metadata))


def write_folder_atomically(final: Path, fill) -> None:
    """fill(tmp) writes a whole folder under a temporary name; it is then renamed to `final` (atomic)."""
    tmp, old = final.parent / f".tmp-{final.name}", final.parent / f".old-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(folder, kind: str, config: dict, tensors: dict, json_name: str = "config.json",
                     tensors_name: str = "model.safetensors") -> None:
    """folder/tensors_name, then folder/json_name = {"format", "version", "kind", **config}. `kind` says what reads
    it back: "clue", "stable_diffusion", "vae" (the tiny VAE phase), "classifier", "training_state"."""
    atomic_write_safetensors(Path(folder) / tensors_name, tensors, metadata={"format": FORMAT, "kind": kind})
    atomic_write_json(Path(folder) / json_name, {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, **config})


# ---- reading: files, our format, config dataclasses with their field types checked -----------------------------------
def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(obj).__name__}")
    return obj


def read_checkpoint(folder, kind: str | tuple | None = None, json_name: str = "config.json",
                    tensors_name: str = "model.safetensors") -> tuple[dict, dict]:
    """What write_checkpoint wrote -> (config, tensors). `kind` (a name or a tuple of names) is what the caller
    expects; folders written before "kind" existed (format version 1) pass."""
    config_file, weights_file = Path(folder) / json_name, Path(folder) / tensors_name
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a {FORMAT} folder holds {json_name} and {tensors_name}")
    config = read_json(config_file)
    version, found, kinds = config.get("version", 0), config.get("kind"), (kind,) if isinstance(kind, str) else kind
    fmt = config.get("format", FORMAT if json_name == "training_state.json" else None)  # the first train.py wrote none
    if fmt != FORMAT:
        advice = OLD_FORMATS.get(fmt) if isinstance(fmt, str) else None  # any JSON value may stand there
        raise CheckpointError(f"{config_file}: 'format' is {fmt!r}, expected {FORMAT!r}; "
                              + (advice or "not a folder written by this project"))
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: format version {version!r} is not one this code reads "
                              f"(<= {FORMAT_VERSION}); update the code")
    if kinds and found is not None and found not in kinds:
        raise CheckpointError(f"{config_file}: holds a {found!r} checkpoint, expected {' or '.join(map(repr, kinds))}")
    return config, read_state_dict(weights_file)


_STATE = {"step": int, "world_size": int, "optimizer": dict, "lr_schedule": dict, "grad_scaler": dict | None,
          "ema_updates": int | None, "data_position": dict, "rng": list[dict], "args": dict}
_POSITION = {"epoch": int, "batches_taken": int, "batch_size": int}
_GROUP = {"params": list[int], "lr": float, "betas": list[float], "eps": float, "weight_decay": float}  # AdamW's
_LR_SCHEDULE = {"base_lrs": list[float], "last_epoch": int, "lr_lambdas": list}  # LambdaLR's
_SCALER = {"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int}  # GradScaler's


def read_training_state(folder, json_name: str, tensors_name: str) -> tuple[dict, dict]:
    """read_checkpoint of a training state (kind "training_state"): every key train.py's resume reads there, of its
    type and range, and the tensors that fit them (training_state_problems)."""
    config, tensors = read_checkpoint(folder, "training_state", json_name, tensors_name)
    config_file = Path(folder) / json_name

    def check(d: dict, hints: dict, where: str) -> None:
        if lacking := [k for k in hints if k not in d]:
            raise CheckpointError(f"{where}: missing {lacking}; not a training state train.py wrote")
        _fields({k: d[k] for k in hints}, hints, where, "training state")

    check(config, _STATE, config_file)  # (each check makes the objects the next one opens dicts)
    check(config["data_position"], _POSITION, f"{config_file} data_position")
    check(config["optimizer"], {"param_groups": list[dict]}, f"{config_file} optimizer")
    for i, group in enumerate(config["optimizer"]["param_groups"]):
        check(group, _GROUP, f"{config_file} optimizer param_groups[{i}]")
    check(config["lr_schedule"], _LR_SCHEDULE, f"{config_file} lr_schedule")
    if config["grad_scaler"]:
        check(config["grad_scaler"], _SCALER, f"{config_file} grad_scaler")
    for r, meta in enumerate(config["rng"]):
        check(meta, {"numpy": list, "python": list}, f"{config_file} rng[{r}]")
    _check_ranges({**{k: config[k] for k in ("step", "world_size", "ema_updates")},
                   **{k: config["data_position"][k] for k in _POSITION}}, config_file, "training state")
    if len(config["rng"]) != config["world_size"]:
        raise CheckpointError(f"{config_file}: {len(config['rng'])} RNG states, {config['world_size']} processes")
    if re.fullmatch(r"step_\d+", name := Path(folder).name) and int(name[5:]) != config["step"]:
        raise CheckpointError(f"{config_file}: step {config['step']} in the folder of step {int(name[5:])}")
    if problems := training_state_problems(config, tensors):
        raise CheckpointError(f"{Path(folder) / tensors_name}: {', '.join(problems[:4])}{' ...' * (len(problems) > 4)}"
                              f" do not fit {json_name} or each other; not the training state train.py wrote")
    return config, tensors


def training_state_problems(config: dict, tensors: dict) -> list[str]:
    """The tensors of a training state against each other and its JSON: per trained parameter n, param.n, its AdamW
    moments optim.n.exp_avg / exp_avg_sq (n's shape) and step count optim.n.step (one number), ema.n (n's shape)
    while EMA runs, all real numbers; the param groups hold each parameter once; per process r, rng.r.torch (bytes),
    rng.r.numpy (624 words), rng.r.python (625) and their JSON."""
    def shape(key):
        return tensors[key].shape if key in tensors else None
    params = {k[len("param."):]: t for k, t in tensors.items() if k.startswith("param.")}
    trained = [k for k in tensors if k.split(".")[0] in ("param", "optim", "ema")]
    problems = [k for k in trained if not tensors[k].is_floating_point()]
    for n in {k[len("optim."):].rpartition(".")[0] for k in tensors if k.startswith("optim.")}:
        adamw = [shape(f"optim.{n}.{k}") for k in ("exp_avg", "exp_avg_sq", "step")]
        if n not in params or adamw != [params[n].shape, params[n].shape, torch.Size([])]:
            problems.append(f"optim.{n}.*")
    if config["ema_updates"] is not None:
        problems += [f"ema.{n}" for n, p in params.items() if shape(f"ema.{n}") != p.shape]
    if sorted(i for g in config["optimizer"]["param_groups"] for i in g["params"]) != list(range(len(params))):
        problems.append(f"the param groups' indices (for {len(params)} parameters)")
    for r, meta in enumerate(config["rng"]):
        for k, dtype, size in (("torch", torch.uint8, None), ("numpy", torch.int64, 624), ("python", torch.int64, 625)):
            t = tensors.get(f"rng.{r}.{k}")
            if t is None or t.dtype != dtype or t.ndim != 1 or len(t) != (size or len(t)):
                problems.append(f"rng.{r}.{k}")
        if meta["numpy"][:1] != ["MT19937"] or len(meta["numpy"]) != 4 or len(meta["python"]) != 2:
            problems.append(f"rng[{r}] in the JSON")
    return problems


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object"}


def _checked(value, hint, where: str):
    """A JSON value as a field of type `hint`: int, float, bool, str, dict, tuple[X, ...] / list[X], X | None."""
    args, origin = typing.get_args(hint), typing.get_origin(hint) or hint
    if type(None) in args:
        return None if value is None else _checked(value, next(a for a in args if a is not type(None)), where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"{where}: expected a list, got {value!r}")
        return origin(_checked(v, args[0], f"{where}[{i}]") if args else v for i, v in enumerate(value))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not {int: number and isinstance(value, int), float: number, bool: isinstance(value, bool),
            str: isinstance(value, str), dict: isinstance(value, dict)}.get(origin, True):
        raise CheckpointError(f"{where}: expected {_TYPE_NAMES[origin]}, got {value!r}")
    return value


def _fields(d, hints: dict, where: str, what: str) -> dict:
    """A JSON object whose keys are all in `hints` {name: type}, each value of its type."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object ({what} fields), got {d!r}")
    if unknown := sorted(set(d) - set(hints)):
        raise CheckpointError(f"{where}: unknown {what} fields {unknown}")
    return {k: _checked(v, hints[k], f"{where} {k}") for k, v in d.items()}


_AT_LEAST_ZERO = {"beta", "beta_warmup_steps", "gamma", "capacity", "capacity_ramp_steps", "mmd_weight",
                  "step", "ema_updates", "epoch", "batches_taken"}  # (the last: a training state's counters)
_FRACTIONS = {"text_dropout", "style_dropout"}  # probabilities


def _check_ranges(kw: dict, where: str, what: str) -> None:
    """Refuse the numbers (and lists) of `kw` that no model is built, trained or sampled with: probabilities outside
    [0, 1], negative loss weights or step counts, sizes, eps or scales <= 0, empty lists, NaN / infinity."""
    def bad(name, v):
        if isinstance(v, (list, tuple)):
            return not v or any(bad(name, x) for x in v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        low_ok = v >= 0 if name in _AT_LEAST_ZERO | _FRACTIONS else v > 0
        return not (math.isfinite(v) and low_ok and (v <= 1 or name not in _FRACTIONS))
    if wrong := [f"{k}={json.dumps(v)}" for k, v in kw.items() if bad(k, v)]:  # as the file writes it
        raise CheckpointError(f"{where}: {what} fields {wrong} out of range (sizes, eps and scales > 0, loss weights "
                              "and steps >= 0, dropouts in [0, 1], lists not empty)")


def config_from_dict(cls, d, where: str):
    """A config dataclass back from its JSON object, each field's type and range checked; fields left out take
    defaults."""
    kw, fields = _fields(d, typing.get_type_hints(cls), where, cls.__name__), dataclasses.fields(cls)
    if missing := [f.name for f in fields if f.default is f.default_factory is MISSING and f.name not in kw]:
        raise CheckpointError(f"{where}: {cls.__name__} fields {missing} are missing")
    _check_ranges(kw, where, cls.__name__)
    with naming_errors(where):
        return cls(**kw)


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A .safetensors file or a torch pickle (.ckpt/.bin, read with weights_only=True) -> {name: tensor}; a top-level
    "state_dict" (Lightning / ldm) is unwrapped, non-tensor entries (step counters) dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(2)
    as_torch = path.suffix != ".safetensors" and (magic in (b"PK", b"\x80\x02")  # zip or legacy pickle
                                                  or path.suffix in (".ckpt", ".pt", ".pth", ".bin"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True) if as_torch else load_file(path)
    except Exception as e:  # the libraries raise a zoo of types (SafetensorError, UnpicklingError, RuntimeError...)
        unpickling = isinstance(e, pickle.UnpicklingError)  # torch's text then advises weights_only=False: not ours to
        if code := unpickling and re.search(r"GLOBAL (\S+)", str(e)):  # give; a class or function the pickle names
            raise CheckpointError(f"{path}: holds pickled Python objects beyond tensors ({code[1]}); nothing in it was "
                                  "run. This project reads pickles with torch.load(weights_only=True) only, with no "
                                  "option to run their code: convert it to safetensors with a tool you trust") from None
        kind = "a torch pickle (torch.load, weights_only=True)" if as_torch else "safetensors"
        raise CheckpointError(f"{path}: cannot be read as {kind}: "
                              f"{'not a pickle of tensors' if unpickling else f'{type(e).__name__}: {e}'}. The file is "
                              "truncated, corrupt or not a weights file; download it again") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# ---- renaming rules and the audit ------------------------------------------------------------------------------------
IDENTITY = [(r"", "", None)]  # the rules for tensors already in our names


def apply_rules(source: dict, rules, suffix_renames=()) -> tuple[list, list]:
    """Rename each key by the first rule (regex, replacement, transform) matching its start: the replacement (a
    template or a function of the match) rewrites the matched prefix, `transform` (or None) the tensor; then the
    (old, new) `suffix_renames`. A rule renaming to "" ignores the key. -> ([(key, our key, tensor)], [unmatched])."""
    mapped, unmatched = [], []
    for key, t in source.items():
        for pattern, repl, transform in rules:
            if m := re.match(pattern, key):
                new = (repl(m) if callable(repl) else m.expand(repl)) + key[m.end():]
                for old, rep in suffix_renames:
                    new = new.replace(old, rep)
                if new:
                    mapped.append((key, new, transform(t) if transform else t))
                break
        else:
            unmatched.append(key)
    return mapped, unmatched


def key_listing(title: str, items: list, limit: int = 12) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "".join(f"    {x}\n" for x in items[:limit]) + more


def _shape_dtype(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def load_mapped(module: torch.nn.Module, mapped: list, unused: list, what: str, source,
                keep_init=lambda name: False) -> None:
    """Load `mapped` [(source key, our key, tensor)] into `module`, or raise listing every problem: a parameter of
    ours filled twice or not at all (unless keep_init(name)), a key that is no parameter of ours, a shape mismatch or
    integers / booleans / complex numbers where ours are real (or the reverse), source keys neither used nor ignored
    (`unused`). Any floating-point dtype is taken (fp16, bf16 files): it is cast to ours."""
    own = module.state_dict()
    filled, origin, twice, unknown, shapes, bad = {}, {}, [], [], [], set()
    for src, dst, t in mapped:
        if dst in filled:
            twice.append(f"{dst} <- {origin[dst]} and {src}")
        elif dst not in own:
            unknown.append(f"{src} -> {dst}")
        elif t.shape != own[dst].shape or t.is_floating_point() != own[dst].is_floating_point() or t.is_complex():
            shapes.append(f"{src}: {_shape_dtype(t)} in the source, {_shape_dtype(own[dst])} in our model")
            bad.add(dst)
        else:
            filled[dst], origin[dst] = t, src
    missing = [k for k in own if k not in filled and k not in bad and not keep_init(k)]
    if twice or unknown or shapes or missing or unused:
        raise CheckpointError(
            f"{source}: the {what} weights do not match our {type(module).__name__} built from the config:\n"
            + (key_listing("shape or dtype mismatches", shapes) if shapes else "")
            + (key_listing("parameters of ours with no source key", missing) if missing else "")
            + (key_listing("source keys with no parameter of ours", unknown + unused) if unknown or unused else "")
            + (key_listing("parameters filled twice", twice) if twice else "")
            + "  The weights and the config disagree, or the file holds another model (another kind, size or version).")
    module.load_state_dict(filled, strict=False)


def build_stable_diffusion(cfgs: tuple, weights, schedule: NoiseSchedule, where, **fields) -> StableDiffusion:
    """U-Net, VAE and text encoder built from `cfgs` (in this order: the RNG draws of their initialisation), each
    filled through the audit from `weights`, per module (mapped, unused, what, source file, keep_init) (a list or
    a generator that reads each part only when its module is built). `fields` from any file meet our format's checks."""
    top = _top_level(fields, ("scale_factor", "image_size"), where)
    sampler = _fields(fields["sampler_config"], _SAMPLER, f"{where} [sampler]", "sampler")
    offset = sampler.get("steps_offset", SD_SAMPLER["steps_offset"])  # (a partial sampler section: SD's default)
    if not 0 <= offset < schedule.num_train_timesteps:
        raise CheckpointError(f"{where} [sampler]: steps_offset {offset} must lie in [0, "
                              f"{schedule.num_train_timesteps - 1}] (the timesteps of the schedule)")
    if top["image_size"] % cfgs[1].downsample_factor:
        raise CheckpointError(f"{where}: image_size {top['image_size']} is not a multiple of the VAE's downsampling "
                              f"factor {cfgs[1].downsample_factor}")
    if cfgs[0].context_dim != cfgs[2].width:
        raise CheckpointError(f"{where}: the U-Net attends to {cfgs[0].context_dim}-wide text tokens but the text "
                              f"encoder is {cfgs[2].width} wide; the parts do not belong together")
    with naming_errors(where):
        modules = UNet(cfgs[0]), VAE(cfgs[1]), TextEncoder(cfgs[2])
    for module, args in zip(modules, weights):
        load_mapped(module, *args)
    return StableDiffusion(*modules, schedule, schedule.prediction_type, **fields)


# ---- Stable Diffusion and CLUE in our format -------------------------------------------------------------------------
_TOP = {"prediction_type": str | None, "scale_factor": float, "image_size": int | None, "source": str}
_SCHEDULE = {**{k: type(v) for k, v in SD_SCHEDULE.items()}, "prediction_type": str}
_SAMPLER = {k: type(v) for k, v in SD_SAMPLER.items()}
_POSTERIOR = {"classes": tuple[str, ...], "prompts": tuple[str, ...], "counts": tuple[int, ...]}
_SD_KEYS = {"format", "version", "kind", "unet", "vae", "text", "schedule", "sampler", "lora", *_TOP}  # the rest: extra


def _top_level(config: dict, keys, where) -> dict:
    """The top-level values `keys` of a config (those it has), each of its _TOP type and in range."""
    top = _fields({k: config[k] for k in keys if k in config}, _TOP, where, "top-level")
    _check_ranges(top, where, "top-level")
    return top


def load_sd_folder(folder, prediction_type: str | None = None, style: bool | None = None, load_base=None,
                   merge: bool = True) -> StableDiffusion:
    """Our folder -> StableDiffusion, what is beyond SD in extra_config / extra_tensors. `style`: None = the U-Net as
    stored; True adds the zero-initialised style branch where it has none; False leaves it out. A LoRA folder is its
    base, load_base(lora.base, prediction_type, style=...) (convert.load_stable_diffusion: any source), with the
    trained tensors put in through the audit (every adapter and style layer) and, with `merge`, the adapters merged."""
    folder = Path(folder)
    lora_folder = (where := folder / "config.json").is_file() and "lora" in read_json(where)  # (JSON written last)
    weights = folder / (LORA_FILE if lora_folder else "model.safetensors")
    config, tensors = read_checkpoint(folder, ("stable_diffusion", "clue"), tensors_name=weights.name)
    if lacking := [k for k in ("unet", "vae", "text", "schedule") if k not in config]:
        raise CheckpointError(f"{where}: missing the {', '.join(lacking)} section(s)")
    stored, vae_cfg, text_cfg = (config_from_dict(cls, config[k], f"{where} [{k}]")
                                 for cls, k in ((UNetConfig, "unet"), (VAEConfig, "vae"), (TextConfig, "text")))
    unet_cfg = stored if style is None else dataclasses.replace(stored, style=style)
    schedule = _fields(config["schedule"], _SCHEDULE, f"{where} [schedule]", "schedule")
    top = _top_level(config, _TOP, where)  # (checked here too: an image_size of 0 would fall back to the clue one)
    sampler = _fields(config.get("sampler") or SD_SAMPLER, _SAMPLER, f"{where} [sampler]", "sampler")
    if None not in (types := (top.get("prediction_type"), schedule.get("prediction_type"))) and len(set(types)) > 1:
        raise CheckpointError(f"{where}: prediction_type {types[0]!r} but [schedule] prediction_type {types[1]!r}; "
                              "the model was trained with one of them: make them agree")
    prediction_type = prediction_type or top.get("prediction_type") or schedule.get("prediction_type") or "epsilon"
    with naming_errors(where):
        schedule = NoiseSchedule(**{**schedule, "prediction_type": prediction_type})
    clue_size = config["clue"].get("image_size") if isinstance(config.get("clue"), dict) else None  # as_clue checks
    image_size = top.get("image_size") or (clue_size if type(clue_size) is int else None)
    parts: dict[str, dict] = {}  # {"unet": {name: tensor}, "vae": ..., "style_encoder": ...}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        parts.setdefault(head, {})[rest] = v
    unet_sd, notes = parts.pop("unet", {}), []
    if not unet_cfg.style and (dropped := [k for k in unet_sd if is_style_param(k)]):  # a CLUE checkpoint as plain SD
        unet_sd = {k: v for k, v in unet_sd.items() if not is_style_param(k)}
        notes.append(f"U-Net: {len(dropped)} style-branch tensors left out (style=False)")
    # Style layers the config says are stored must be in the file; only a branch added here keeps its zero init.
    keep = is_style_param if unet_cfg.style and not stored.style else (lambda name: False)
    vae_sd, text_sd = parts.pop("vae", {}), parts.pop("text_encoder", {})
    extra = dict(extra_config={k: v for k, v in config.items() if k not in _SD_KEYS},
                 extra_tensors={f"{head}.{k}": v for head, part in parts.items() for k, v in part.items()})
    if lora_folder:  # the base's modules, the adapters and style layers put in (LoRA Eq. 3)
        if load_base is None:
            raise CheckpointError(f"{folder}: a LoRA folder: load it with convert.load_stable_diffusion (its base too)")
        lora = config_from_dict(LoRAConfig, config.get("lora"), f"{where} [lora]")
        try:
            sd = load_base(lora.base, prediction_type, style=unet_cfg.style)
        except (FileNotFoundError, CheckpointError) as e:  # the user named this folder, not its base: say so
            raise CheckpointError(f"{where} [lora] base: the weights this LoRA adapts do not load: {e}; put them "
                                  "back, or give their new place as \"base\" in this file") from e
        add_lora(sd.unet, lora.rank, lora.alpha)
        load_mapped(sd.unet, *apply_rules(unet_sd, IDENTITY), "LoRA (unet.*)", weights,
                    lambda name: not lora_trains(name) or keep(name))  # the base's weights, a style branch added here
        if merge:
            merge_lora(sd.unet)  # W + (alpha / r) B A: plain Linear layers again
        return dataclasses.replace(sd, **extra)
    return build_stable_diffusion(
        (unet_cfg, vae_cfg, text_cfg),
        [(*apply_rules(unet_sd, IDENTITY), "U-Net (unet.*)", weights, keep),
         (*apply_rules(vae_sd, IDENTITY), "VAE (vae.*)", weights),
         (*apply_rules(text_sd, IDENTITY), "text encoder (text_encoder.*)", weights)],
        schedule, where, scale_factor=float(top.get("scale_factor", vae_cfg.scale_factor)),
        image_size=int(image_size or sd_image_size(prediction_type)),
        sampler_config=dict(sampler), source=f"{FORMAT} folder", notes=notes, **extra)


def save_stable_diffusion(sd: StableDiffusion, out_dir, dtype: torch.dtype | None = None,
                          extra_config: dict | None = None, extra_tensors: dict | None = None, base: str | None = None):
    """Our format, kind "clue" when the config has a clue section; `dtype` casts floating-point tensors. Adapters on
    the U-Net make a LoRA folder: what trained in LORA_FILE, "lora": {base (the weights adapted), rank, alpha}."""
    lora = lora_settings(sd.unet)  # {"rank", "alpha"}, or None without adapters
    parts = (("unet", sd.unet),) if lora else (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder))
    tensors = {f"{prefix}.{k}": v for prefix, module in parts for k, v in module.state_dict().items()
               if not lora or lora_trains(k)}
    tensors.update({**sd.extra_tensors, **(extra_tensors or {})})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config = {"unet": asdict(sd.unet.cfg), "vae": asdict(sd.vae.cfg), "text": asdict(sd.text_encoder.cfg),
              "schedule": sd.schedule.to_dict(), "prediction_type": sd.prediction_type, "scale_factor": sd.scale_factor,
              "image_size": sd.image_size, "sampler": sd.sampler_config, "source": sd.source, **sd.extra_config,
              **(extra_config or {})}
    if lora:  # a local base is recorded as an absolute path, a Hugging Face repo id as it is
        config["lora"] = asdict(LoRAConfig(str(Path(base).resolve()) if base and Path(base).exists() else base, **lora))
    write_checkpoint(out_dir, "clue" if "clue" in config else "stable_diffusion", config, tensors,
                     tensors_name=LORA_FILE if lora else "model.safetensors")


def save_clue(model: CLUE, path, extra: dict | None = None, dtype: torch.dtype | None = None, base: str | None = None):
    """save_stable_diffusion with the CLUE parts: `style_encoder.*` and `style_posterior.<i>.<POSTERIOR_TENSORS>`
    tensors; "style", "clue", "style_posterior" (classes, prompts, counts), "diagnostics", "train" (`extra`). `base`:
    the weights a LoRA fine-tune adapts (needed with adapters on the U-Net)."""
    tensors = {f"style_encoder.{k}": v for k, v in (model.style_encoder.state_dict().items()
                                                    if model.style_encoder is not None else ())}
    classes = list(model.style_posterior)
    for i, name in enumerate(classes):
        tensors.update({f"style_posterior.{i}.{k}": model.style_posterior[name][k] for k in POSTERIOR_TENSORS})
    config = {"style": asdict(model.style_encoder.cfg) if model.style_encoder is not None else None,
              "clue": asdict(model.cfg),
              "style_posterior": {"classes": classes, "prompts": [model.style_posterior[c]["prompt"] for c in classes],
                                  "counts": [len(model.style_posterior[c]["mus"]) for c in classes]},
              "diagnostics": model.last_diagnostics, "train": extra}
    save_stable_diffusion(model.as_stable_diffusion(), path, dtype, config, tensors, base)


_REFIT = "refit it: model.fit_style_posterior(loader), then save_clue(model, path)"
_NOT_CLUE = ("not a CLUE checkpoint (no 'clue' section in config.json); for plain SD weights use "
             "convert.load_stable_diffusion and CLUE.from_stable_diffusion")


def as_clue(sd: StableDiffusion, folder) -> CLUE:
    """The CLUE model of checkpoint `folder`, validated, from load_sd_folder's `sd` (the CLUE parts: sd.extra_*)."""
    extra, tensors = sd.extra_config, sd.extra_tensors
    config_file, weights = Path(folder) / "config.json", Path(folder) / "model.safetensors"
    if "clue" not in extra:
        raise CheckpointError(f"{folder}: {_NOT_CLUE}")
    clue_cfg = config_from_dict(CLUEConfig, extra["clue"], f"{config_file} [clue]")
    if clue_cfg.image_size % sd.vae.cfg.downsample_factor:
        raise CheckpointError(f"{config_file} [clue]: image_size {clue_cfg.image_size} is not a multiple of the VAE's "
                              f"downsampling factor {sd.vae.cfg.downsample_factor}")
    train = _checked(extra.get("train"), dict | None, f"{config_file} [train]")
    _checked((train or {}).get("prompt_template"), str | None, f"{config_file} [train] prompt_template")
    if sd.unet.cfg.style != (extra.get("style") is not None):
        raise CheckpointError(f"{config_file}: unet.style is {sd.unet.cfg.style} but the style section is "
                              f"{'missing' if sd.unet.cfg.style else 'there'}: the checkpoint is inconsistent")
    style_encoder = None
    if sd.unet.cfg.style:
        with naming_errors(f"{config_file} [style]"):
            style_encoder = StyleEncoder(config_from_dict(StyleConfig, extra["style"], f"{config_file} [style]"))
        load_mapped(style_encoder, [(k, k[len("style_encoder."):], t) for k, t in tensors.items()
                                    if k.startswith("style_encoder.")], [], "style encoder (style_encoder.*)", weights)
    with naming_errors(config_file):
        model = CLUE(sd.vae, sd.text_encoder, sd.unet, style_encoder, sd.schedule, clue_cfg, sd.sampler_config)
        model.kl_weight(0)  # refuses a kl_mode training would stop at
    model.style_posterior = read_style_posterior(extra.get("style_posterior") or {}, tensors, style_encoder,
                                                 config_file, weights)
    model.train_config = train
    model.last_diagnostics = _checked(extra.get("diagnostics"), dict | None, f"{config_file} [diagnostics]")
    return model


def read_style_posterior(section: dict, tensors: dict, style_encoder, config_file, weights) -> dict:
    """save_clue's style posterior -> {class: {"prompt", *POSTERIOR_TENSORS}}, each class's tensors checked against
    the style encoder's (K, D) styles: mean, var, psi (K, D); factors (r, K, D); mus (N, K, D), N its count; finite,
    the variances var and psi >= 0."""
    post = _fields(section, _POSTERIOR, f"{config_file} [style_posterior]", "posterior")
    classes, prompts = post.get("classes", ()), post.get("prompts", ())
    counts = post.get("counts", [None] * len(classes))
    if not len(classes) == len(prompts) == len(counts):
        raise CheckpointError(f"{config_file} [style_posterior]: {len(classes)} classes, {len(prompts)} prompts, "
                              f"{len(counts)} counts")
    kd = (style_encoder.cfg.tokens, style_encoder.cfg.context_dim) if style_encoder is not None else None
    posterior = {}
    for i, name in enumerate(classes):
        keys = [f"style_posterior.{i}.{k}" for k in POSTERIOR_TENSORS]
        if lacking := [k for k in keys if k not in tensors]:
            raise CheckpointError(f"{weights}: the style posterior of class {name!r} lacks tensors {lacking}; {_REFIT}")
        p = {k: tensors[key] for k, key in zip(POSTERIOR_TENSORS, keys)}
        wrong = [k for k, t in p.items() if kd is None or t.shape[-2:] != kd or not t.is_floating_point()
                 or t.ndim != (3 if k in ("factors", "mus") else 2) or not t.isfinite().all()
                 or (k in ("var", "psi") and (t < 0).any())]  # (variances)
        if wrong or counts[i] not in (None, len(p["mus"])):
            raise CheckpointError(f"{weights}: the style posterior of class {name!r} has "
                                  f"{ {k: _shape_dtype(t) for k, t in p.items()} } for {counts[i]} images (wrong: "
                                  f"{wrong}); the model's styles (K, D): {kd or 'none (no style encoder)'}, finite "
                                  f"real numbers, var and psi >= 0; {_REFIT}")
        posterior[name] = {"prompt": prompts[i], **{k: t.float() for k, t in p.items()}}
    return posterior


def load_clue(path, device="cpu") -> CLUE:
    """A CLUE checkpoint folder (save_clue) -> CLUE on `device` in eval mode."""
    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"{path}: {_NOT_CLUE}")
    return as_clue(load_sd_folder(path), path).to(device).eval()


def read_features(folder) -> tuple[torch.Tensor, list[str]]:
    """eval.py's feature cache (kind "features": "files" relative paths, tensor "features" (N, D)) -> (features,
    files), checked to fit each other."""
    config, tensors = read_checkpoint(folder, "features")
    files = _checked(config.get("files"), list[str], f"{folder} config.json files")
    if (f := tensors.get("features")) is None or f.ndim != 2 or len(f) != len(files) or not f.is_floating_point():
        raise CheckpointError(f"{folder}: features {None if f is None else _shape_dtype(f)} for {len(files)} files")
    return f, files


def save_vae(vae: VAE, folder, info: dict) -> None:
    """The tiny VAE phase's folder (kind "vae"): its config, scale factor and `info` (steps, seconds, L1), vae.*."""
    write_checkpoint(folder, "vae", {"vae": asdict(vae.cfg), "scale_factor": vae.cfg.scale_factor, "train": info},
                     {f"vae.{k}": v for k, v in vae.state_dict().items()})


def load_vae(path) -> VAE:
    """The VAE of any folder of ours: the tiny VAE phase's vae/ (kind "vae"), a CLUE checkpoint, a converted SD."""
    config, tensors = read_checkpoint(path)
    if not isinstance(config.get("vae"), dict):
        raise CheckpointError(f"{path}: holds no VAE (no 'vae' section in config.json); give the vae/ folder of a "
                              "tiny run, a CLUE checkpoint or a converted SD folder")
    with naming_errors(f"{path} [vae]"):
        vae = VAE(config_from_dict(VAEConfig, config["vae"], f"{path} [vae]"))
    load_mapped(vae, [(k, k[4:], v) for k, v in tensors.items() if k.startswith("vae.")], [], "VAE (vae.*)", path)
    top = _top_level(config, ("scale_factor",), path)
    vae.cfg.scale_factor = float(top.get("scale_factor", vae.cfg.scale_factor))
    return vae
