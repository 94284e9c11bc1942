"""data.py: class folders -> (image, prompt) items; bad data handled loudly; the digits demo dataset."""
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import (DIGITS_PROMPT, ClassFolderDataset, cache_root, default_prompt_template, load_image,
                  materialize_digits, resolve_data)


def _save(img: Image.Image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def folder(tmp_path):
    """Two classes, every pixel format the loader must convert, plus files it must skip."""
    root = tmp_path / "imgs"
    a, b = root / "acute_otitis_media", root / "normal"
    _save(Image.new("RGB", (24, 16), (255, 0, 0)), a / "rgb.png")          # wide: centre-cropped
    _save(Image.new("L", (16, 16), 0), a / "gray.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 2] = 255                                                      # blue ...
    rgba[:, :8, 3] = 255                                                    # ... opaque on the left half only
    _save(Image.fromarray(rgba, "RGBA"), a / "rgba.png")
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)                        # index 1 = green
    _save(pal, b / "palette.png")
    _save(Image.fromarray(np.full((16, 16), 32768, np.uint16)), b / "deep16.png")  # I;16, half scale
    _save(Image.new("RGB", (16, 16), (0, 0, 255)), b / "sub" / "nested.jpg")       # found recursively
    (b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))        # corrupt PNG
    good = (a / "rgb.png").read_bytes()
    (a / "truncated.png").write_bytes(good[: len(good) // 2])                       # cut-off PNG
    (b / "notes.txt").write_text("not an image")
    (b / ".DS_Store").write_bytes(b"\0\0\0")                                         # hidden: ignored silently
    return root


def test_folder_loads_every_format(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = ClassFolderDataset(folder, size=16)
    assert ds.class_names == ["acute otitis media", "normal"]
    assert ds.prompts == ["an otoscopic image of acute otitis media", "an otoscopic image of normal"]
    assert ds.class_counts == [3, 3] and len(ds) == 6
    assert ds.labels == [0, 0, 0, 1, 1, 1]
    items = {item["path"].split("/")[-1]: item for item in (ds[i] for i in range(len(ds)))}
    assert sorted(items) == ["deep16.png", "gray.png", "nested.jpg", "palette.png", "rgb.png", "rgba.png"]
    for name, item in items.items():
        x = item["image"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32, name
        assert x.min() >= -1 and x.max() <= 1, name
        assert item["prompt"] == ds.prompts[item["label"]]
    expect = {  # mean RGB in [-1, 1]
        "rgb.png": (1, -1, -1), "gray.png": (-1, -1, -1), "palette.png": (-1, 1, -1),
        "deep16.png": (128 / 127.5 - 1,) * 3,  # 32768/65535 -> 128: scaled, not clipped to white
    }
    for name, rgb in expect.items():
        err = (items[name]["image"].mean((1, 2)) - torch.tensor(rgb)).abs().max().item()
        print(f"{name}: max abs err of mean colour {err:.2e}")
        assert err < 1e-6, name
    rgba = items["rgba.png"]["image"]
    assert torch.equal(rgba[:, :, :8], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 16, 8))
    assert torch.equal(rgba[:, :, 8:], torch.ones(3, 16, 8))  # transparent -> white
    # one warning line per bad file, naming it, then the count; the hidden file is not mentioned
    lines = [r.getMessage() for r in caplog.records]
    for bad in ("broken.png", "truncated.png", "notes.txt"):
        assert sum(bad in line for line in lines) == 1, lines
    assert any("skipped 3 of 9 files" in line for line in lines), lines
    assert not any(".DS_Store" in line for line in lines)
    assert sorted(p.split("/")[-1] for p, _ in ds.skipped) == ["broken.png", "notes.txt", "truncated.png"]


def test_default_collate_batches(folder):
    loader = torch.utils.data.DataLoader(ClassFolderDataset(folder, size=8), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 8, 8)
    assert isinstance(batch["prompt"], list) and len(batch["prompt"]) == 4
    assert batch["label"].dtype == torch.int64


def test_crop_and_flip(tmp_path):
    # 16 wide x 32 tall: top half red, bottom half blue; left column white (to see flips)
    a = np.zeros((32, 16, 3), np.uint8)
    a[:16, :, 0] = 255
    a[16:, :, 2] = 255
    a[:, 0] = 255
    path = tmp_path / "c" / "x.png"
    _save(Image.fromarray(a), path)
    src = torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(load_image(path, 16), src[:, 8:24])  # centre crop, no resize needed
    g = torch.Generator().manual_seed(0)
    tops = set()
    for _ in range(40):
        x = load_image(path, 16, random_crop=True, generator=g)
        top = int((x[0, :, 1] > 0).sum().item())  # red rows visible = 16 - offset
        assert torch.equal(x, src[:, 16 - top:32 - top])
        tops.add(top)
    assert len(tops) > 5
    flips = [bool(load_image(path, 16, flip=True, generator=g)[1, 0, -1] > 0) for _ in range(40)]
    assert 5 < sum(flips) < 35  # white column moved to the right about half the time
    assert not any(bool(load_image(path, 16)[1, 0, -1] > 0) for _ in range(5))
    # resize: shorter side to 8 (bicubic), then centre crop
    assert load_image(path, 8).shape == (3, 8, 8)


def test_limit_per_class_is_seeded(tmp_path):
    for c in ("a", "b"):
        for i in range(10):
            _save(Image.new("L", (4, 4), i * 20), tmp_path / c / f"{i}.png")
    full = ClassFolderDataset(tmp_path, size=4)
    s0 = ClassFolderDataset(tmp_path, size=4, limit_per_class=3, seed=0)
    s0b = ClassFolderDataset(tmp_path, size=4, limit_per_class=3, seed=0)
    s1 = ClassFolderDataset(tmp_path, size=4, limit_per_class=3, seed=1)
    assert full.class_counts == [10, 10] and s0.class_counts == [3, 3]
    assert s0.samples == s0b.samples and s0.samples != s1.samples
    assert set(s0.samples) <= set(full.samples)
    assert ClassFolderDataset(tmp_path, size=4, limit_per_class=50).samples == full.samples


def test_bad_folders_give_clear_errors(tmp_path):
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        ClassFolderDataset(tmp_path / "empty_root")
    flat = tmp_path / "flat"
    _save(Image.new("RGB", (4, 4)), flat / "a.png")
    with pytest.raises(ValueError, match="one subfolder per class"):
        ClassFolderDataset(flat)
    root = tmp_path / "root"
    _save(Image.new("RGB", (4, 4)), root / "ok" / "a.png")
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class contains no readable images"):
        ClassFolderDataset(root)
    junk = tmp_path / "junk"
    (junk / "cls").mkdir(parents=True)
    (junk / "cls" / "x.txt").write_text("text")
    with pytest.raises(ValueError, match="cls contains no readable images"):
        ClassFolderDataset(junk)
    _save(Image.new("RGB", (4, 4)), tmp_path / "dup" / "a_b" / "x.png")
    _save(Image.new("RGB", (4, 4)), tmp_path / "dup" / "a b" / "x.png")
    with pytest.raises(ValueError, match="same class name twice"):
        ClassFolderDataset(tmp_path / "dup")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClassFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="placeholder"):
        ClassFolderDataset(root, prompt_template="an image")
    with pytest.raises(FileNotFoundError, match="digits"):
        resolve_data(tmp_path / "missing")


def _tree_hash(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_digits_materialisation(tmp_path):
    from sklearn.datasets import load_digits
    digits = load_digits()
    folder = materialize_digits(tmp_path / "cache")
    meta = json.loads((folder / "split.json").read_text())
    n_train = sum(meta["counts"]["train"].values())
    n_test = sum(meta["counts"]["test"].values())
    assert n_train + n_test == 1797 and len(meta["files"]["train"]) == n_train
    assert meta["seed"] == 0
    for c in range(10):  # stratified 80/20
        n_c = int((digits.target == c).sum())
        assert meta["counts"]["test"][str(c)] == round(0.2 * n_c)
        assert meta["counts"]["train"][str(c)] + meta["counts"]["test"][str(c)] == n_c
        assert len(list((folder / "test" / str(c)).glob("*.png"))) == meta["counts"]["test"][str(c)]
    train_idx = {int(f.split("/")[-1][:4]) for f in meta["files"]["train"]}
    test_idx = {int(f.split("/")[-1][:4]) for f in meta["files"]["test"]}
    assert not train_idx & test_idx and len(train_idx | test_idx) == 1797
    # each file is its load_digits row: dark ink on white, 32x32 grayscale
    worst = 1.0
    for rel in meta["files"]["test"][:50]:
        img = Image.open(folder / rel)
        assert img.mode == "L" and img.size == (32, 32)
        a = np.asarray(img, np.float64).reshape(8, 4, 8, 4).mean((1, 3))  # back to 8x8 by block means
        i = int(rel.split("/")[-1][:4])
        assert rel.split("/")[1] == str(digits.target[i])
        worst = min(worst, np.corrcoef(a.ravel(), -digits.images[i].ravel())[0, 1])
    print(f"digits: lowest correlation of 4x4 block means with the inverted 8x8 scan {worst:.3f}")
    assert worst > 0.9
    # idempotent: nothing rewritten
    stamp = (folder / "split.json").stat().st_mtime_ns
    first = _tree_hash(folder)
    assert materialize_digits(tmp_path / "cache") == folder
    assert (folder / "split.json").stat().st_mtime_ns == stamp
    # deterministic: a second cache gets the same bytes
    assert _tree_hash(materialize_digits(tmp_path / "other")) == first
    # a stale cache (other seed recorded) is rebuilt
    meta["seed"] = 7
    (folder / "split.json").write_text(json.dumps(meta))
    materialize_digits(tmp_path / "cache")
    assert _tree_hash(folder) == first
    # --data digits
    assert resolve_data("digits", tmp_path / "cache") == folder / "train"
    assert resolve_data("digits:test", tmp_path / "cache") == folder / "test"
    assert default_prompt_template("digits") == DIGITS_PROMPT
    ds = ClassFolderDataset(folder / "train", DIGITS_PROMPT, size=32, limit_per_class=50)
    assert ds.class_names == [str(c) for c in range(10)] and ds.class_counts == [50] * 10
    item = ds[0]
    assert item["prompt"] == "a handwritten digit 0" and item["image"].shape == (3, 32, 32)
    assert item["image"].mean() > 0  # mostly white paper


def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CLUE_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "clue"
    monkeypatch.setenv("CLUE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_truncated_jpeg_is_skipped_and_the_check_is_cached(tmp_path, caplog, monkeypatch):
    """Pillow's cheap verify() reads only a JPEG's header: a cut-off JPEG passes it and used to fail at step 0 of
    training. Every image is decoded once when the dataset is built: the cut one is skipped with the usual
    warning; the answers are cached by (path, size, mtime_ns), so a second build decodes nothing."""
    import data
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    _save(Image.fromarray(noise), tmp_path / "d" / "c" / "ok.jpg")
    raw = (tmp_path / "d" / "c" / "ok.jpg").read_bytes()
    (tmp_path / "d" / "c" / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    with Image.open(tmp_path / "d" / "c" / "cut.jpg") as img:
        img.verify()  # the cheap check passes
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = ClassFolderDataset(tmp_path / "d", size=32, cache_dir=cache)
    assert len(ds) == 1 and ds.samples[0][0].endswith("ok.jpg") and ds.skipped[0][0].endswith("cut.jpg")
    assert any("skipping" in r.getMessage() and "cut.jpg" in r.getMessage() for r in caplog.records)
    assert ds[0]["image"].shape == (3, 32, 32)
    assert len(list((cache / "image_checks").glob("*.json"))) == 1

    def no_decoding(path):
        raise AssertionError(f"decoded {path} again")
    monkeypatch.setattr(data, "decode_problem", no_decoding)
    again = ClassFolderDataset(tmp_path / "d", size=32, cache_dir=cache)  # from the cache: no decode
    assert again.samples == ds.samples and again.skipped == ds.skipped
    # a changed file (size, mtime) is decoded again
    (tmp_path / "d" / "c" / "cut.jpg").write_bytes(raw)
    with pytest.raises(AssertionError, match="cut.jpg again"):
        ClassFolderDataset(tmp_path / "d", size=32, cache_dir=cache)
    monkeypatch.undo()
    assert len(ClassFolderDataset(tmp_path / "d", size=32, cache_dir=cache)) == 2


def test_user_errors_are_data_errors(tmp_path):
    from data import DataError
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        ClassFolderDataset(tmp_path / "empty")
    _save(Image.new("RGB", (4, 4)), tmp_path / "r" / "c" / "a.png")
    with pytest.raises(DataError, match="limit_per_class"):
        ClassFolderDataset(tmp_path / "r", limit_per_class=0)
