"""bench/external_digits.py: an external test set for the digits benchmark, from another source than the digits.

The CLUE paper (arXiv 2511.10993) also scores its classifiers on an external test set, images from another
institution. scikit-learn's digits have none, so this script makes one, reproducibly from a seed: the ten digits
'0'..'9' typeset in the TrueType fonts of this machine (the DejaVu family, else Pillow's built-in font), each
with a random affine (rotation, shear, width), stroke width and blur, then taken through the preprocessing that
made scikit-learn's digits (UCI "optdigits", Alpaydin & Kaynak 1998): a 32x32 bitmap of the glyph normalised to
the full height (aspect kept, centred), its 4x4 blocks counted into an 8x8 image of ink levels 0..16; written as
data.py writes the digits (dark ink on white, bilinear to 32 px). Same classes and look, another source (type,
not handwriting): a domain shift, as in the paper. It is a test set only: nothing is tuned on it.

Output: OUT/<digit>/<font>_<i>.png and OUT/manifest.json (seed, counts, the fonts with their SHA-256, every
image's draw, the Pillow version): the same seed, fonts and Pillow give the same files.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checkpoint import atomic_write_json  # noqa: E402
from cli import non_negative_int, positive_int, run  # noqa: E402
from data import DIGITS_SIZE  # noqa: E402

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CANVAS, FONT_SIZE = 256, 128   # glyphs are drawn large, then reduced as the optdigits bitmaps were
# The random draw per image: uniform ranges (degrees, shear factor, width factor, stroke px, blur radius px, at
# the 128 px font size). Chosen to look like handwriting at 8x8, once, before any model saw the set.
DRAW = {"rotation": (-12.0, 12.0), "shear": (-0.3, 0.3), "width": (0.55, 0.95), "stroke": (0, 5), "blur": (0.0, 3.0)}


def fonts() -> list[Path | None]:
    """The DejaVu TrueType files (the math font left out), sorted; [None] (Pillow's own font) without them."""
    found = sorted(p for p in FONT_DIR.glob("*.ttf") if "Math" not in p.name) if FONT_DIR.is_dir() else []
    return found or [None]


def draw_params(rng: np.random.Generator) -> dict:
    (r0, r1), (h0, h1), (w0, w1), (s0, s1), (b0, b1) = (DRAW[k] for k in ("rotation", "shear", "width", "stroke",
                                                                          "blur"))
    return {"rotation": float(rng.uniform(r0, r1)), "shear": float(rng.uniform(h0, h1)),
            "width": float(rng.uniform(w0, w1)), "stroke": int(rng.integers(s0, s1 + 1)),
            "blur": float(rng.uniform(b0, b1))}


def render(digit: str, font_path: Path | None, p: dict) -> np.ndarray:
    """One glyph -> an 8x8 array of ink counts 0..16 (the optdigits preprocessing)."""
    font = ImageFont.truetype(str(font_path), FONT_SIZE) if font_path else ImageFont.load_default(FONT_SIZE)
    img = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(img).text((CANVAS / 2, CANVAS / 2), digit, fill=255, font=font, anchor="mm",
                             stroke_width=p["stroke"], stroke_fill=255)
    # affine about the centre: output = R(rotation) Shear(shear) Scale(width, 1) input; PIL wants the inverse
    a = math.radians(p["rotation"])
    forward = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ \
        np.array([[1.0, p["shear"]], [0.0, 1.0]]) @ np.diag([p["width"], 1.0])
    inv, c = np.linalg.inv(forward), np.array([CANVAS / 2, CANVAS / 2])
    offset = c - inv @ c
    img = img.transform(img.size, Image.Transform.AFFINE, (*inv[0], offset[0], *inv[1], offset[1]),
                        resample=Image.Resampling.BILINEAR)
    if p["blur"] > 0:
        img = img.filter(ImageFilter.GaussianBlur(p["blur"]))
    img = img.point(lambda v: 255 if v >= 80 else 0)  # the scanned bitmap: ink or paper (blur thickens, never erases)
    x0, y0, x1, y1 = img.getbbox()
    glyph = img.crop((x0, y0, x1, y1))
    scale = 32 / max(y1 - y0, x1 - x0)  # the full height (or width, if wider), aspect kept
    w, h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    bitmap = Image.new("L", (32, 32), 0)
    bitmap.paste(glyph.resize((w, h), Image.Resampling.BOX), ((32 - w) // 2, (32 - h) // 2))
    on = np.asarray(bitmap) >= 128  # (32,32) bits -> (8,8) counts of "on" pixels per 4x4 block
    return on.reshape(8, 4, 8, 4).sum(axis=(1, 3))


def as_digits_image(counts: np.ndarray) -> Image.Image:
    """8x8 ink counts 0..16 -> data.py's digit image: dark ink on white, bilinear to DIGITS_SIZE px."""
    ink = np.round(255.0 - counts * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(ink, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR)


def make_external(out: Path, per_class: int, seed: int) -> dict:
    """Write per_class images of each digit into out/<digit>/, fonts in turn, and the manifest; return it."""
    rng, font_list = np.random.default_rng(seed), fonts()
    images = []
    for digit in "0123456789":
        (out / digit).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            font, p = font_list[i % len(font_list)], draw_params(rng)
            name = f"{digit}/{font.stem if font else 'pillow_default'}_{i:04d}.png"
            as_digits_image(render(digit, font, p)).save(out / name)
            images.append({"file": name, "font": font.name if font else None, **p})
    manifest = {"source": "TrueType fonts, optdigits preprocessing (bench/external_digits.py)", "seed": seed,
                "per_class": per_class, "counts": {d: per_class for d in "0123456789"},
                "fonts": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in font_list if f} or
                {"pillow_default": PIL.__version__}, "draw_ranges": DRAW, "canvas": CANVAS, "font_size": FONT_SIZE,
                "pillow": PIL.__version__, "images": images}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example:\n  python bench/external_digits.py --out runs/external_digits",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (<digit>/*.png, manifest.json)")
    p.add_argument("--per-class", type=positive_int, default=100, help="images per digit (default 100)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of every random draw (default 0)")
    a = p.parse_args(argv)
    manifest = make_external(Path(a.out), a.per_class, a.seed)
    print(f"wrote {10 * a.per_class} images in {len(manifest['fonts'])} font(s) to {a.out} (manifest.json)")
    return manifest


if __name__ == "__main__":
    run(main, program="external_digits.py")
