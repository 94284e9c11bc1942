"""Labelled image folders -> (image, fixed-format prompt) examples, and the built-in `digits` demo dataset.

The CLUE paper (arXiv 2511.10993) fine-tunes Stable Diffusion on a *small* labelled medical dataset, every prompt
in one fixed format, "an otoscopic image of {diagnosis}". This file gives that setting for any folder:

    my_data/                       ClassFolderDataset("my_data", "an otoscopic image of {class}")
        acute_otitis_media/*.png   -> class "acute otitis media", label 0
        normal/*.jpg               -> class "normal", label 1

Items are dicts: `image` (3,H,W) float32 in [-1, 1] (what the VAE encoder takes), `prompt`, `label`, `path`;
torch's default collate batches them (image -> (B,3,H,W), prompt -> list).

Decisions, so that nothing happens silently:
- Classes and files are sorted (the same labels and order on every machine); files are found recursively in
  each class folder (list_images, eval.py's lister too); names starting with "." are ignored.
- Every file is decoded once when a dataset is built (a cut-off JPEG passes Pillow's cheap verify(), not a
  decode), the answers cached by (path, size, mtime_ns) under cache_root(): a second build only stats the files.
  Unreadable files are skipped with one warning line each and a count (logger "data"); a folder that cannot be
  used raises DataError saying what to do.
- Colour: everything becomes RGB; transparent pixels are composited on WHITE (as a viewer shows them); 16-bit
  images ("I;16", "I") are scaled by 1/65535 (Pillow's convert() clips at 255); float images ("F") are taken
  to be in [0, 1]; EXIF orientation is applied.
- Geometry: the shorter side is resized to `size` (bicubic, antialiased), then a centre (or random) crop.
  Horizontal flips are off by default (they change the meaning of digits and of left/right anatomy).

The demo dataset `digits` is scikit-learn's handwritten digits (1,797 real 8x8 scans by 43 writers, shipped inside
the package, so it works offline): `materialize_digits()` writes it once as a class folder at 32x32 with a seeded
stratified train/test split (`split.json`); `resolve_data("digits")` is what `--data digits` calls.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger("data")

DEFAULT_PROMPT = "an otoscopic image of {class}"  # the paper's fixed prompt format
DIGITS_PROMPT = "a handwritten digit {class}"      # the demo dataset's prompt format
DIGITS_SIZE = 32                                  # demo images are 32x32 -> 8x8x4 latents with the tiny VAE
DIGITS_FORMAT_VERSION = 1                         # bump when the way digits are written changes
DIGITS_ARGS = ("digits", "digits:train", "digits:test")  # --data values that mean the demo dataset
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A data folder or image the user gave that cannot be used; the message names it and says what to do."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB (see the module docstring for the rules)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (or float) grayscale: scale to 8 bit ourselves; Image.convert("L") would clip at 255.
        full_scale = 1.0 if img.mode == "F" else 65535.0
        a = np.clip(np.asarray(img, dtype=np.float64) / full_scale, 0.0, 1.0)
        img = Image.fromarray(np.round(a * 255.0).astype(np.uint8), mode="L")
    if img.mode == "P":  # palette: keep its transparency, if any, as an alpha channel
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def load_image(path: str | os.PathLike, size: int, random_crop: bool = False, flip: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Read one image file -> (3, size, size) float32 tensor in [-1, 1]: the shorter side resized to `size`
    (bicubic), a size x size crop (centre, or random), a horizontal flip with probability 1/2 when `flip`.
    Randomness comes from torch's generator (DataLoader workers, which torch seeds, get different crops)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if random_crop:
        left = int(torch.randint(0, new_w - size + 1, (1,), generator=generator))
        top = int(torch.randint(0, new_h - size + 1, (1,), generator=generator))
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    if flip and float(torch.rand((), generator=generator)) < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return x.permute(2, 0, 1).float() / 127.5 - 1.0  # (H,W,3) uint8 -> (3,H,W) in [-1, 1]


def list_images(folder: str | os.PathLike, extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS) -> list[Path]:
    """Every file under `folder` with one of `extensions` (None: every file), recursively, in sorted order; names
    starting with "." (files and folders) are skipped."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))  # prune hidden folders, fix walk order
        found += [Path(dirpath) / n for n in sorted(filenames)
                  if not n.startswith(".") and (extensions is None or n.lower().endswith(extensions))]
    return found


def decode_problem(path: str | os.PathLike) -> str | None:
    """None if Pillow decodes every pixel of `path`, else a short reason."""
    try:
        with Image.open(path) as img:
            img.load()
    except UnidentifiedImageError:
        return "not an image format Pillow can read"
    except Exception as e:  # broken files raise many types (OSError, SyntaxError, ValueError...)
        return f"{type(e).__name__}: {e}".strip()
    return None


def checked_files(root: Path, files: list[Path], cache_dir=None) -> list[str | None]:
    """decode_problem of every file, each decoded once: the answers are kept in a JSON file under
    cache_root(cache_dir)/image_checks, one per root folder, keyed by relative path, size and mtime_ns."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    cache = cache_root(cache_dir) / "image_checks" / f"{key}.json"
    try:
        known = json.loads(cache.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):  # no cache yet, or an unreadable one: decode everything
        known = {}
    entries = {}
    for path in files:
        stat, rel = path.stat(), path.relative_to(root).as_posix()
        old = known.get(rel) if isinstance(known, dict) else None
        fresh = isinstance(old, list) and len(old) == 3 and old[:2] == [stat.st_size, stat.st_mtime_ns]
        entries[rel] = old if fresh else [stat.st_size, stat.st_mtime_ns, decode_problem(path)]
    if entries != known:
        try:  # written beside, then renamed: a concurrent reader (another torchrun rank) sees a whole file
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"root": str(root.resolve()), "files": entries}))
            os.replace(tmp, cache)
        except OSError as e:
            log.warning(f"cannot write the image-check cache {cache} ({e}); the images are decoded again next time")
    return [entry[2] for entry in entries.values()]


class ClassFolderDataset(Dataset):
    """A folder with one subfolder per class -> dict(image, prompt, label, path) items.

    root: each subfolder is a class, named like the folder with "_" -> " ". prompt_template: a fixed-format prompt
    with a "{class}" placeholder. size: images are size x size. random_crop, flip: augmentations (off).
    limit_per_class: keep at most this many images per class, a subset seeded by `seed` (the paper's limited-data
    regime). cache_dir: where the decode checks are cached (default cache_root()).
    Attributes: class_names, class_counts, prompts (one per class, in label order), samples (list of
    (path, label)), labels, skipped (list of (path, reason)).
    """

    def __init__(self, root: str | os.PathLike, prompt_template: str = DEFAULT_PROMPT, size: int = 512,
                 random_crop: bool = False, flip: bool = False, limit_per_class: int | None = None,
                 seed: int = 0, cache_dir: str | os.PathLike | None = None):
        self.root = Path(root).expanduser()
        if "{class}" not in prompt_template:
            raise DataError(f"prompt template {prompt_template!r} has no '{{class}}' placeholder; "
                            "write e.g. 'an otoscopic image of {class}'")
        if size < 1 or (limit_per_class is not None and limit_per_class < 1):
            raise DataError(f"size ({size}) and limit_per_class ({limit_per_class}) must be >= 1 (or None)")
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist or is not a folder")
        self.prompt_template, self.size, self.random_crop, self.flip = prompt_template, size, random_crop, flip

        entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        class_dirs = [p for p in entries if p.is_dir()]
        loose = [p for p in entries if p.is_file()]
        if not class_dirs:
            raise DataError(f"{self.root} has no class subfolders ({len(loose)} files directly inside it); "
                            f"put the images in one subfolder per class, e.g. {self.root}/normal/0001.png")
        if loose:
            log.warning(f"ignoring {len(loose)} files directly in {self.root} (not in a class subfolder)")

        self.class_names = [d.name.replace("_", " ") for d in class_dirs]
        if len(set(self.class_names)) < len(self.class_names):
            raise DataError(f"{self.root}: class folders {[d.name for d in class_dirs]} give the same class name "
                            "twice ('_' reads as a space); rename or merge them")
        self.prompts = [prompt_template.replace("{class}", name) for name in self.class_names]
        files = [list_images(d, extensions=None) for d in class_dirs]
        reasons = iter(checked_files(self.root, [p for fs in files for p in fs], cache_dir))
        self.samples, self.skipped, self.class_counts = [], [], []
        for label, (d, paths) in enumerate(zip(class_dirs, files)):
            checked = list(zip(paths, reasons))  # (path, None or why it is unreadable)
            for path, reason in (c for c in checked if c[1] is not None):
                self.skipped.append((str(path), reason))
                log.warning(f"skipping {path}: {reason}")
            good = [path for path, reason in checked if reason is None]
            if not good:
                raise DataError(f"class folder {d} contains no readable images; add images to it or remove it")
            if limit_per_class is not None and len(good) > limit_per_class:
                # a seeded subset, independent of the other classes; sorted again for a stable order
                rng = random.Random(f"{seed}/{d.name}")
                good = sorted(rng.sample(good, limit_per_class))
            self.samples += [(str(p), label) for p in good]
            self.class_counts.append(len(good))
        if self.skipped:
            log.warning(f"skipped {len(self.skipped)} of {sum(map(len, files))} files under {self.root} "
                        "that are not readable images")
        self.labels = [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        image = load_image(path, self.size, self.random_crop, self.flip)
        return {"image": image, "prompt": self.prompts[label], "label": label, "path": path}


# -- Images out, and the cache folder ----------------------------------------------------------------------------------
def to_pil(image: torch.Tensor) -> Image.Image:
    """(3,H,W) in [0,1] -> 8-bit RGB, rounding as diffusers' numpy_to_pil does (x * 255, round)."""
    a = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).numpy())


def make_grid(images: torch.Tensor, ncol: int, pad: int = 2, zoom: int = 1, row_labels: list[str] | None = None,
              col_labels: list[str] | None = None) -> Image.Image:
    """(N,3,H,W) in [0,1] -> one image, ncol per row, white padding; `zoom` enlarges it (nearest: no smoothing),
    labels go left of the rows and above the columns."""
    n, _, h, w = images.shape
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + h, x:x + w] = np.asarray(to_pil(images[i]))
    grid = Image.fromarray(canvas)
    grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST) if zoom > 1 else grid
    if not (row_labels or col_labels):
        return grid
    left, top = 8 + 7 * max(map(len, row_labels)) if row_labels else 0, 16 if col_labels else 0
    labelled = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    labelled.paste(grid, (left, top))
    draw = ImageDraw.Draw(labelled)
    for j, label in enumerate(col_labels or ()):
        draw.text((left + 2 + j * (grid.width - 2) / ncol, 2), label, fill="black")
    for r, label in enumerate(row_labels or ()):
        draw.text((4, top + 2 + (r + 0.4) * (grid.height - 2) / nrow), label, fill="black")
    return labelled


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $CLUE_CACHE, else ~/.cache/clue."""
    if cache_dir is None:
        cache_dir = os.environ.get("CLUE_CACHE") or Path.home() / ".cache" / "clue"
    return Path(cache_dir).expanduser()


# -- The built-in demo dataset: scikit-learn's handwritten digits ----------------------------------------------------
def _digits_split(target: np.ndarray, seed: int, test_fraction: float) -> np.ndarray:
    """Stratified split: in each class, a seeded permutation; the first round(test_fraction * n) go to test.
    -> boolean mask, True = test."""
    rng, is_test = np.random.default_rng(seed), np.zeros(len(target), dtype=bool)
    for c in np.unique(target):  # sorted classes, so the rng is consumed in a fixed order
        idx = np.flatnonzero(target == c)
        is_test[rng.permutation(idx)[:int(round(test_fraction * len(idx)))]] = True
    return is_test


def _digit_image(pixels_0_16: np.ndarray) -> Image.Image:
    """One 8x8 load_digits scan (0 = paper, 16 = ink) -> 32x32 grayscale image, DARK ink on WHITE paper (as
    scikit-learn displays them, cmap gray_r); bilinear upsampling (no overshoot, so no ringing at the strokes)."""
    ink = np.round(255.0 - pixels_0_16 * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(ink, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR)


def _digits_is_current(folder: Path, seed: int, test_fraction: float) -> bool:
    try:
        meta = json.loads((folder / "split.json").read_text())
    except (OSError, ValueError):
        return False
    return ((meta.get("format_version"), meta.get("seed"), meta.get("test_fraction"))
            == (DIGITS_FORMAT_VERSION, seed, test_fraction)
            and all((folder / f).is_file() for split in ("train", "test") for f in meta["files"][split]))


def materialize_digits(cache_dir: str | os.PathLike | None = None, seed: int = 0,
                       test_fraction: float = 0.2) -> Path:
    """Write scikit-learn's digits once as `<cache>/digits/{train,test}/<class>/<index>.png` + split.json and
    return `<cache>/digits`. <index> is the image's row in `load_digits()`; the split is stratified
    (_digits_split). Idempotent: nothing is written when split.json has the same seed, fraction and format version
    and all its files are there. Safe against concurrent callers (torchrun ranks): the folder is built under a
    temporary name and renamed into place."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = cache_root(cache_dir)
    folder = root / "digits"
    if _digits_is_current(folder, seed, test_fraction):
        return folder

    from sklearn.datasets import load_digits  # lazy: a heavy import (1.5 s) that only the demo needs

    digits = load_digits()
    images, target = digits.images, digits.target  # (1797, 8, 8) floats in 0..16, (1797,) ints
    is_test = _digits_split(target, seed, test_fraction)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root))
    try:
        files: dict[str, list[str]] = {"train": [], "test": []}
        for i in range(len(target)):
            split = "test" if is_test[i] else "train"
            rel = f"{split}/{target[i]}/{i:04d}.png"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _digit_image(images[i]).save(tmp / rel)
            files[split].append(rel)
        classes = [str(c) for c in sorted(set(target.tolist()))]
        meta = {"dataset": "sklearn.datasets.load_digits", "format_version": DIGITS_FORMAT_VERSION,
                "n_images": int(len(target)), "seed": seed, "test_fraction": test_fraction, "stratified": True,
                "size": DIGITS_SIZE, "appearance": "dark ink on white, 8x8 -> 32x32 bilinear, 8-bit grayscale PNG",
                "prompt_template": DIGITS_PROMPT,
                "counts": {split: {c: int(((target == int(c)) & (is_test == (split == "test"))).sum())
                                   for c in classes} for split in ("train", "test")},
                "files": files}
        (tmp / "split.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():  # stale (other seed, older format, files missing): replace it
            log.warning(f"rebuilding {folder} (its split.json does not match seed={seed}, "
                        f"test_fraction={test_fraction}, format {DIGITS_FORMAT_VERSION})")
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _digits_is_current(folder, seed, test_fraction):  # not a concurrent writer's copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_data(arg: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A `--data` argument -> a class folder: "digits" or "digits:train" -> the materialised demo train folder,
    "digits:test" -> its test folder; anything else must be an existing folder ("./digits" for a local one)."""
    s = str(arg)
    if s in DIGITS_ARGS:
        split = "test" if s.endswith(":test") else "train"
        return materialize_digits(cache_dir) / split
    path = Path(s).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--data {s}: no such folder; pass a folder with one subfolder of images "
                                "per class, or 'digits' / 'digits:test' for the built-in demo dataset")
    return path


def default_prompt_template(arg: str | os.PathLike) -> str:
    """The prompt template that goes with a `--data` argument: the digits one for the demo, else the paper's."""
    return DIGITS_PROMPT if str(arg) in DIGITS_ARGS else DEFAULT_PROMPT
