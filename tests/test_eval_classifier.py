"""classifier.py and the eval.py command line: F1 against scikit-learn, a classifier that learns a
separable toy folder in seconds, the classify protocol end to end, the metrics command on image
folders with classifier features (self-FID, cache, odd and corrupt files), and clear errors."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score

import classifier as clf
import cli
import eval as ev
from checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(image_size=16, width=8, depth=1, stages=2)
CLASSES = ["left", "right", "top"]


def _toy_image(rng, label, size=16):
    """Class = which half of the image is bright (left / right / top), plus noise."""
    x = rng.uniform(0, 90, (size, size, 3))
    h = size // 2
    region = [np.s_[:, :h], np.s_[:, h:], np.s_[:h, :]][label]
    x[region] += 140
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def make_toy_folder(root, per_class, seed, classes=True):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        folder = os.path.join(root, name) if classes else root
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            _toy_image(rng, c).save(os.path.join(folder, f"{name}_{i:03d}.png"))
    return str(root)


def test_f1_and_confusion_equal_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)          # class 4 never occurs in the test set ...
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 5, 200))  # ... but is predicted
    cm = clf.confusion_matrix(y_true, y_pred, 5)
    per_class, macro = clf.f1_from_confusion(cm)
    ref_macro = f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro")
    ref_per = f1_score(y_true, y_pred, labels=list(range(5)), average=None, zero_division=0)
    err = max(abs(macro - ref_macro), np.abs(per_class - ref_per).max())
    print(f"macro F1 {macro:.6f} vs sklearn {ref_macro:.6f}; max abs err {err:.2e}")
    assert err < 1e-12
    assert (cm == sk_confusion(y_true, y_pred, labels=list(range(5)))).all()


def test_classifier_learns_separable_toy_folder_in_seconds(tmp_path):
    train = make_toy_folder(tmp_path / "train", 20, seed=0)
    test = make_toy_folder(tmp_path / "test", 10, seed=1)
    x, y, names = clf.load_labelled(train, 16, progress=False)
    tx, ty, _ = clf.load_labelled(test, 16, names, progress=False)
    assert names == CLASSES and x.shape == (60, 3, 16, 16) and x.dtype == torch.uint8
    cfg = clf.ClassifierConfig(num_classes=3, class_names=names, **TINY)
    t0 = time.time()
    model = clf.train_classifier(x, y, cfg, clf.TrainRecipe(steps=60, batch_size=30), seed=0, progress=False)
    seconds = time.time() - t0
    res = clf.evaluate(model, tx, ty, 3)
    pred = clf.predict(model, tx)
    print(f"toy folder: accuracy {res['accuracy']:.3f}, macro F1 {res['macro_f1']:.3f} after 60 steps "
          f"({seconds:.1f} s)")
    assert res["accuracy"] >= 0.9
    assert abs(res["macro_f1"] - f1_score(ty, pred, average="macro")) < 1e-12
    # a checkpoint gives the same network back
    clf.save_classifier(str(tmp_path / "ckpt"), model, clf.TrainRecipe())
    loaded, config = clf.load_classifier(str(tmp_path / "ckpt" / "model.safetensors"))
    assert config["classifier"]["class_names"] == CLASSES
    with torch.no_grad():
        a, b = model.features(clf.from_uint8(tx)), loaded.features(clf.from_uint8(tx))
    assert torch.equal(a, b) and a.shape == (30, cfg.feature_dim)


def test_training_is_seeded():
    x = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    y = np.arange(20) % 3
    cfg = clf.ClassifierConfig(num_classes=3, **TINY)
    runs = [clf.train_classifier(x, y, cfg, clf.TrainRecipe(steps=3, batch_size=8), seed=s, progress=False)
            for s in (1, 1, 2)]
    w = [r.fc.weight.detach() for r in runs]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_classify_command_end_to_end(tmp_path, capsys):
    train = make_toy_folder(tmp_path / "train", 6, seed=0)
    synthetic = make_toy_folder(tmp_path / "synthetic", 12, seed=2)
    test = make_toy_folder(tmp_path / "test", 5, seed=1)
    external = make_toy_folder(tmp_path / "external", 4, seed=3)
    out = str(tmp_path / "out")
    tiny = ["--image-size", "16", "--width", "8", "--depth", "1", "--steps", "8", "--train-batch-size", "16",
            "--quiet"]
    results = ev.main(["classify", "--train", train, "--synthetic", synthetic, "--test", test, "--external",
                       external, "--scales", "100,200", "--combined", "--seeds", "2", "--out", out] + tiny)
    table = capsys.readouterr().out
    print(table)
    assert "| synthetic | 200 % | 36 |" in table and "external macro F1" in table
    saved = json.load(open(os.path.join(out, "classify.json")))
    arms = [(a["arm"], a["scale_percent"], a["n_images"]) for a in saved["arms"]]
    assert arms == [("real", None, 18), ("synthetic", 100, 18), ("synthetic", 200, 36), ("real+synthetic", 100, 36)]
    for a in saved["arms"]:
        f1s = a["test"]["macro_f1"]
        assert len(f1s) == 2 and abs(a["test"]["mean"] - np.mean(f1s)) < 1e-12
        assert abs(a["test"]["std"] - np.std(f1s, ddof=1)) < 1e-12
        assert np.sum(a["external"]["confusion_sum"]) == 2 * 12 and len(a["test"]["per_class_f1_mean"]) == 3
    assert results["seeds"] == [0, 1]
    with open(os.path.join(out, "classify_f1.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(out, "classifier_real", "model.safetensors"))
    # --no-real: the real-only arm is left out and the others are the same classifiers (each seeded by itself)
    no_real = ev.main(["classify", "--train", train, "--synthetic", synthetic, "--test", test, "--external",
                       external, "--scales", "100,200", "--combined", "--seeds", "2", "--no-real",
                       "--out", str(tmp_path / "no_real")] + tiny)
    assert [a["arm"] for a in no_real["arms"]] == ["synthetic", "synthetic", "real+synthetic"]
    assert [a["test"]["macro_f1"] for a in no_real["arms"]] == [a["test"]["macro_f1"] for a in saved["arms"][1:]]
    assert not os.path.exists(tmp_path / "no_real" / "classifier_real")
    # too few synthetic images for a scale: a clear error before any training
    with pytest.raises(ValueError, match=r"class 'left': 12 synthetic images; 1000 % of 6 real ones needs 60"):
        ev.main(["classify", "--train", train, "--synthetic", synthetic, "--test", test, "--scales", "1000",
                 "--seeds", "1", "--out", out] + tiny)


def test_metrics_command_with_classifier_features(tmp_path, capsys):
    real = make_toy_folder(tmp_path / "real", 10, seed=0, classes=False)       # a flat folder
    fake = make_toy_folder(tmp_path / "fake", 8, seed=4)                       # class subfolders
    # odd files that must still work: grayscale and RGBA images, a corrupt file, a non-image file
    Image.fromarray(np.full((16, 16), 200, np.uint8), "L").save(os.path.join(fake, "left", "gray.png"))
    Image.fromarray(np.full((16, 16, 4), 120, np.uint8), "RGBA").save(os.path.join(fake, "top", "rgba.png"))
    with open(os.path.join(fake, "top", "broken.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    with open(os.path.join(fake, "notes.txt"), "w") as f:
        f.write("ignored")
    train = make_toy_folder(tmp_path / "train", 10, seed=5)
    ckpt = str(tmp_path / "clf")
    ev.main(["train-classifier", "--train", train, "--out", ckpt, "--image-size", "16", "--width", "8",
             "--depth", "1", "--steps", "20", "--train-batch-size", "16", "--quiet"])
    cache = str(tmp_path / "cache")
    args = ["metrics", "--real", real, "--fake", fake, "--train", train, "--features", "classifier",
            "--classifier", ckpt, "--cache-dir", cache, "--out", str(tmp_path / "res"), "--quiet"]
    with pytest.warns(UserWarning, match="broken.png"):
        res = ev.main(args)
    captured = capsys.readouterr()
    print(captured.out)
    assert res["n_real"] == 30 and res["n_fake"] == 26 and res["n_train"] == 30 and res["feature_dim"] == 32
    assert "| FID |" in captured.out and "memorised" in captured.out
    saved = json.load(open(tmp_path / "res" / "metrics.json"))
    assert saved["fid"] == res["fid"] and 0 <= saved["memorisation"]["memorised_fraction"] <= 1
    # second run: every folder's features come from the cache, and give the same numbers
    res2 = ev.main(args)
    assert capsys.readouterr().err.count("from the cache") == 3 and res2["fid"] == res["fid"]
    # broken cache entries ("files" not a list; fewer names than features) are extracted again, with a warning
    for entry, files in zip(sorted(os.listdir(cache)), (5, ["one.png"])):
        config_file = os.path.join(cache, entry, "config.json")
        config = json.load(open(config_file))
        json.dump({**config, "files": files}, open(config_file, "w"))
    with pytest.warns(UserWarning, match="ignoring a broken feature cache entry") as seen:
        assert ev.main(args)["fid"] == res["fid"]
    said = " ".join(str(w.message) for w in seen)
    assert "config.json files: expected a list, got 5" in said and re.search(r"features \(\d+, 32\) float\d+ for 1 "
                                                                            r"files", said), said
    assert capsys.readouterr().err.count("from the cache") == 1
    # a folder against itself: FID ~ 0, precision = recall = coverage = 1, everything "memorised"
    self_res = ev.main(["metrics", "--real", real, "--fake", real, "--train", real, "--features", "classifier",
                        "--classifier", ckpt, "--no-cache", "--out", str(tmp_path / "self"), "--quiet"])
    print(f"FID of a folder with itself: {self_res['fid']:.2e}")
    assert abs(self_res["fid"]) < 1e-4
    assert self_res["precision"] == self_res["recall"] == self_res["coverage"] == 1.0
    assert self_res["memorisation"]["memorised_fraction"] == 1.0


def test_bad_inputs_give_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="contains no image files"):
        ev.extract_features(str(empty), extractor=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.extract_features(str(tmp_path / "missing"), extractor=None)
    folder = make_toy_folder(tmp_path / "few", 1, seed=0, classes=False)  # 3 images
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases"):
        ev.main(["metrics", "--real", folder, "--fake", folder, "--inception-weights",
                 str(tmp_path / "pt_inception.pth"), "--quiet"])
    with pytest.raises(FileNotFoundError, match="classifier checkpoint"):
        ev.main(["metrics", "--real", folder, "--fake", folder, "--features", "classifier", "--classifier",
                 str(tmp_path / "nothing"), "--quiet"])
    with pytest.raises(SystemExit):
        ev.main(["classify", "--help"])


def _one_line_error(capsys, argv, program="eval.py", main=ev.main):
    """Run a program's main through cli.run as its __main__ does: exit code 2 and a message, no traceback."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv, program)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flag,value", [("--k-pr", "0"), ("--k-dc", "-1"), ("--batch-size", "0"),
                                        ("--steps", "0"), ("--seeds", "0"), ("--lr", "nan"), ("--lr", "-0.1"),
                                        ("--scales", "100,-5"), ("--scales", ","), ("--seed", "-1"),
                                        ("--width", "0"), ("--image-size", "x"), ("--device", "cuda:99")])
def test_bad_numeric_flags_are_refused_at_parse_time(tmp_path, capsys, flag, value):
    command = "metrics" if flag in ("--k-pr", "--k-dc", "--batch-size") else "classify"
    argv = [command, "--real", "r", "--fake", "f"] if command == "metrics" else \
        ["classify", "--train", "a", "--synthetic", "b", "--test", "c"]
    err = _one_line_error(capsys, argv + [flag, value])
    assert flag in err and "error" in err


def test_bad_inputs_end_in_one_line(tmp_path, capsys):
    folder = make_toy_folder(tmp_path / "few", 2, seed=0, classes=False)  # 6 images
    # --features classifier without --classifier: a usage error
    err = _one_line_error(capsys, ["metrics", "--real", folder, "--fake", folder, "--features", "classifier"])
    assert "--classifier DIR" in err
    # --classifier without --features classifier: refused (it used to compute Inception features, unasked)
    err = _one_line_error(capsys, ["metrics", "--real", folder, "--fake", folder, "--classifier", "x"])
    assert "add --features classifier" in err
    # a classifier folder whose config.json is broken: the file is named
    ckpt = tmp_path / "clf"
    ev.main(["train-classifier", "--train", make_toy_folder(tmp_path / "t", 2, seed=1), "--out", str(ckpt),
             "--image-size", "16", "--width", "8", "--steps", "1", "--quiet"])
    (ckpt / "config.json").write_text("{not json")
    err = _one_line_error(capsys, ["metrics", "--real", folder, "--fake", folder, "--features", "classifier",
                                   "--classifier", str(ckpt), "--quiet"])
    assert "config.json" in err and "not valid JSON" in err
    # a missing Inception weights file: where to get it
    err = _one_line_error(capsys, ["metrics", "--real", folder, "--fake", folder, "--inception-weights",
                                   str(tmp_path / "missing.pth")])
    assert "pytorch-fid/releases" in err and "missing.pth" in err
    # too few images for k: a data error saying how many are needed
    ev.main(["train-classifier", "--train", make_toy_folder(tmp_path / "t", 2, seed=1), "--out", str(ckpt),
             "--image-size", "16", "--width", "8", "--steps", "1", "--quiet"])
    err = _one_line_error(capsys, ["metrics", "--real", folder, "--fake", folder, "--features", "classifier",
                                   "--classifier", str(ckpt), "--k-pr", "6", "--no-cache", "--quiet"])
    assert "need at least 7 images, got 6" in err
    # a training folder of one class: refused (its macro F1 of 1 would measure nothing), nothing written
    one = tmp_path / "one"
    make_toy_folder(tmp_path / "t3", 2, seed=2)
    os.makedirs(one)
    os.rename(tmp_path / "t3" / "left", one / "left")
    err = _one_line_error(capsys, ["train-classifier", "--train", str(one), "--out", str(tmp_path / "c1"), "--quiet"])
    assert "has one class ('left')" in err and not (tmp_path / "c1" / "config.json").exists()
    # the real entry point: `python eval.py ...` in a fresh interpreter
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "classify", "--train", folder,
                           "--synthetic", folder, "--test", folder, "--seeds", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--seeds" in proc.stderr


def test_old_classifier_folder_says_how_to_convert(tmp_path):
    """A classifier folder written before checkpoint.py's one format ("format": "clue-classifier") is refused
    with what to do; the conversion the message describes makes it load."""
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    cfg = clf.ClassifierConfig(num_classes=3, class_names=CLASSES, **TINY)
    model = clf.train_classifier(x, np.arange(6) % 3, cfg, clf.TrainRecipe(steps=1, batch_size=6), progress=False)
    clf.save_classifier(tmp_path / "old", model, clf.TrainRecipe())
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    old = {"format": "clue-classifier", **{k: v for k, v in config.items() if k not in ("format", "kind")}}
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="older eval.py(.|\n)*train-classifier"):
        clf.load_classifier(tmp_path / "old")
    old["format"], old["kind"] = "clue-pytorch", "classifier"  # the edit the message asks for
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    loaded, _ = clf.load_classifier(tmp_path / "old")
    assert torch.equal(loaded.fc.weight, model.fc.weight)
