"""The CLUE paper's evaluation protocol on image folders: FID, k-NN precision / recall, density / coverage,
memorisation, and the F1 of classifiers trained on synthetic data (arXiv 2511.10993; ../shared/DESIGN.md,
"Evaluation protocol").
- FID (Heusel et al. 2017, Sec. 4): d^2 = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) on Inception-v3
  pool3 features (inception.py, pytorch-fid's network and weights) or a domain classifier's (classifier.py).
- Improved precision and recall (Kynkaanniemi et al. 2019, Sec. 2): the real manifold is the union of balls around
  every real feature, radius the distance to its k-th nearest real neighbour (k=3); precision = share of generated
  samples inside it, recall = share of real samples inside the generated manifold. Density and coverage (Naeem et
  al. 2020, Sec. 3, k=5): density = 1/(kM) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))], coverage = share of real
  balls that hold at least one generated sample.
- Memorisation: share of generated images whose nearest training image is closer to them than that training
  image's own nearest training neighbour (a near copy).
- Downstream utility: classifier.run_classify (the same classifier on real / synthetic / both; macro F1).
Conventions (README, "Evaluate"): "inside a ball" is a strict `<` (as the prdc package); ties cannot flip a
k-th-neighbour radius (a value, not an index); covariances are unbiased (N-1).
Left out: Inception Score, KID, the 64/192/768-d Inception blocks, multi-GPU.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import warnings
from dataclasses import replace

import numpy as np
import scipy.linalg
import torch
from PIL import Image, ImageOps
from sklearn.metrics.pairwise import euclidean_distances
from tqdm.auto import tqdm

import classifier as clf
from checkpoint import CheckpointError, atomic_write_json, read_features, write_checkpoint
from cli import (UsageError, comma_list, non_negative_int, output_folder, positive_float, positive_int, run,
                 torch_device)
from data import DIGITS_ARGS, IMAGE_EXTENSIONS, DataError, cache_root, list_images, load_image, resolve_data, to_rgb
from inception import FID_WEIGHTS_NAME, load_fid_inception

CHUNK = 2048  # rows of a distance matrix computed at once (memory: CHUNK x N float64)


# -- 1. Image folders -> features (batched, cached per folder) ---------------------------------------------------------
class FeatureNet:
    """What extract_features needs: name, dim, identity (part of the cache key), load(path) -> (3,H,W), and the
    network on a batch -> (B, dim) float64."""

    @torch.no_grad()
    def __call__(self, batch):
        return self.net(batch.to(self.device)).double().cpu()


class InceptionFeatures(FeatureNet):
    """pool3 of the FID Inception-v3: images at their own size in [0, 1]; the network resizes to 299."""
    name, dim = "inception", 2048

    def __init__(self, weights, device="cpu"):
        self.net, self.device, stat = load_fid_inception(weights).to(device), device, os.stat(weights)
        self.identity = {"net": "fid-inception-v3", "preprocess": "own size, [0,1], bilinear to 299 in the net",
                         "weights": os.path.abspath(weights), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def load(self, path):
        with Image.open(path) as img:
            img = to_rgb(ImageOps.exif_transpose(img))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (H,W,3) -> (3,H,W)


class ClassifierFeatures(FeatureNet):
    """Penultimate features of an eval.py classifier: images resized and cropped as data.load_image."""
    name = "classifier"

    def __init__(self, path, device="cpu"):
        model, config = clf.load_classifier(path, device)
        self.net, self.device, self.size, self.dim = model.features, device, model.cfg.image_size, model.cfg.feature_dim
        weights = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in model.state_dict().values()))
        self.identity = {"net": "classifier", "preprocess": "data.load_image", "checkpoint": os.path.abspath(path),
                         "weights_sha256": weights.hexdigest(), "config": config["classifier"]}

    def load(self, path):
        return load_image(path, self.size)


def extract_features(folder, extractor, cache_dir=None, batch_size=50, progress=True):
    """Features of every readable image under `folder` -> (array (N, D) float64, list of N paths).

    Unreadable files are skipped with a warning. With `cache_dir`, results are cached there under a
    hash of the extractor's identity and of every file's relative path, size and modification time,
    so a changed, added or removed file, or another network, means a fresh extraction."""
    files = [str(f) for f in list_images(folder)]
    if not files:
        raise DataError(f"{folder} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
    stats = [os.stat(f) for f in files]
    listing = [(os.path.relpath(f, folder), s.st_size, s.st_mtime_ns) for f, s in zip(files, stats)]
    key = hashlib.sha256(json.dumps({"extractor": extractor.identity, "files": listing},
                                    sort_keys=True).encode()).hexdigest()[:32]
    cached = os.path.join(cache_dir, f"{extractor.name}-{key}") if cache_dir else None
    if cached and os.path.isdir(cached):
        try:
            features, names = read_features(cached)
            print(f"features of {folder}: {len(names)} images, from the cache {cached}", file=sys.stderr)
            return features.numpy(), [os.path.join(folder, r) for r in names]
        except (CheckpointError, FileNotFoundError) as e:  # a broken cache entry: extract again
            warnings.warn(f"ignoring a broken feature cache entry, extracting again: {e}")  # (e names it)

    def readable():  # (path, image tensor) of every file the extractor can read
        for path in tqdm(files, desc=f"{extractor.name} features of {folder}", disable=not progress):
            try:
                yield path, extractor.load(path)
            except Exception as e:  # corrupt / truncated / not really an image
                warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")

    feats, kept = [], []  # a batch holds up to batch_size images of one size (Inception keeps each image's own)
    for _, same_size in itertools.groupby(readable(), key=lambda item: item[1].shape):
        while batch := list(itertools.islice(same_size, batch_size)):
            feats.append(extractor(torch.stack([x for _, x in batch])))
            kept += [path for path, _ in batch]
    if not kept:
        raise DataError(f"none of the {len(files)} image files under {folder} could be read")
    features = torch.cat(feats)
    if cached:
        write_checkpoint(cached, "features", {"files": [os.path.relpath(p, folder) for p in kept],
                                              "extractor": extractor.identity}, {"features": features})
    return features.numpy(), kept


# -- 2. Metrics on feature arrays (N, D) -------------------------------------------------------------------------------
def _as_features(x, what, min_rows=1):
    """Features as a float64 (N, D) array; DataError when the images cannot give the metric (too few, NaN)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what} features must be a 2-D array (N images, D dims), got shape {x.shape}")
    if len(x) < min_rows:
        raise DataError(f"{what}: need at least {min_rows} images, got {len(x)}")
    if not np.isfinite(x).all():
        raise DataError(f"{what} features contain NaN or inf")
    return x


def _as_pair(a, b, min_a, min_b, names=("real", "fake")):
    """Two feature sets of one extractor: _as_features of each, and the same D."""
    a, b = _as_features(a, names[0], min_a), _as_features(b, names[1], min_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {names[0]} has {a.shape[1]}, {names[1]} has {b.shape[1]}; "
                         "both sets must come from the same feature extractor")
    return a, b


def nearest_neighbour_radii(x, k):
    """Distance from each row of x to its k-th nearest OTHER row (Kynkaanniemi's NND_k)."""
    x = _as_features(x, "radius", min_rows=k + 1)
    radii = np.empty(len(x))
    for i in range(0, len(x), CHUNK):
        d = euclidean_distances(x[i:i + CHUNK], x)
        d[np.arange(len(d)), np.arange(i, i + len(d))] = np.inf  # exclude the point itself
        radii[i:i + CHUNK] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return radii


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; both sets must come from the same feature extractor")
    with warnings.catch_warnings():  # a singular product is handled below
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # the product is (numerically) singular: regularise both covariances with eps * I
        print(f"frechet_distance: singular covariance product; adding {eps} to the diagonals", file=sys.stderr)
        covmean = scipy.linalg.sqrtm((sigma1 + eps * np.eye(len(mu1))) @ (sigma2 + eps * np.eye(len(mu1))))
    if np.iscomplexobj(covmean):
        # sqrt of a product of two PSD matrices has real eigenvalues; round-off can add a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DataError(f"frechet_distance: the matrix square root has a significant imaginary part "
                            f"(max {np.abs(covmean.imag).max():.3g}); the covariances are probably not "
                            "positive semi-definite or far too few images were used")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(real, fake):
    """FID of two (N, D) feature sets: means and unbiased (N-1) covariances into frechet_distance."""
    real, fake = _as_pair(real, fake, 2, 2)
    return frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))


def _inside_any_ball(points, centres, radii):
    """For every point: is it strictly inside at least one ball (centre_i, radius_i)? And in how many?"""
    inside, count = np.zeros(len(points), bool), np.zeros(len(points), np.int64)
    for i in range(0, len(points), CHUNK):
        hits = euclidean_distances(points[i:i + CHUNK], centres) < radii[None, :]
        inside[i:i + CHUNK], count[i:i + CHUNK] = hits.any(1), hits.sum(1)
    return inside, count


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-th-neighbour balls."""
    real, fake = _as_pair(real, fake, k + 1, k + 1)
    precision = _inside_any_ball(fake, real, nearest_neighbour_radii(real, k))[0].mean()
    recall = _inside_any_ball(real, fake, nearest_neighbour_radii(fake, k))[0].mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real, fake, k=5):
    """Density and coverage (Naeem et al. 2020): balls around the REAL samples only."""
    real, fake = _as_pair(real, fake, k + 1, 1)
    radii = nearest_neighbour_radii(real, k)
    _, count = _inside_any_ball(fake, real, radii)
    covered = np.zeros(len(real), bool)
    for i in range(0, len(real), CHUNK):  # nearest generated sample of every real one
        covered[i:i + CHUNK] = euclidean_distances(real[i:i + CHUNK], fake).min(1) < radii[i:i + CHUNK]
    return {"density": float(count.sum() / (k * len(fake))), "coverage": float(covered.mean())}


def memorisation(train, fake, fake_names=None, train_names=None, top=20):
    """Share of generated samples closer to their nearest training sample j than j's own nearest
    training neighbour is (d(g, t_j) < NND_1(t_j)), with the closest such pairs."""
    train, fake = _as_pair(train, fake, 2, 1, ("train", "fake"))
    radii = nearest_neighbour_radii(train, 1)
    nearest, dist = np.empty(len(fake), np.int64), np.empty(len(fake))
    for i in range(0, len(fake), CHUNK):
        d = euclidean_distances(fake[i:i + CHUNK], train)
        nearest[i:i + CHUNK] = d.argmin(1)
        dist[i:i + CHUNK] = d[np.arange(len(d)), nearest[i:i + CHUNK]]
    ratio = np.divide(dist, radii[nearest], out=np.full(len(fake), np.inf), where=radii[nearest] > 0)
    copies = np.flatnonzero(dist < radii[nearest])
    pairs = [{"fake": fake_names[g] if fake_names else int(g),
              "train": train_names[nearest[g]] if train_names else int(nearest[g]),
              "distance": float(dist[g]), "ratio": float(ratio[g])}
             for g in copies[np.argsort(ratio[copies])][:top]]
    return {"memorised_fraction": float(len(copies) / len(fake)), "n_memorised": int(len(copies)),
            "median_ratio": float(np.median(ratio)), "closest_pairs": pairs}


# -- 3. Reports of the classifier protocol (classifier.run_classify) ---------------------------------------------------
def _pm(summary):
    return f"{summary['mean']:.4f} ± {summary['std']:.4f}" if summary else "-"


def classify_table(results):
    """Markdown: macro F1 per arm (test, external), then the per-class test F1."""
    ext, names = results["folders"]["external"] is not None, results["class_names"]
    arms = ["| training data | scale | images | test macro F1 |" + (" external macro F1 |" if ext else ""),
            "|---|---|---|---|" + ("---|" if ext else "")]
    per_class = ["", "Per-class test F1 (mean over seeds):", "", "| training data | " + " | ".join(names) + " |",
                 "|---|" + "---|" * len(names)]
    for a in results["arms"]:
        scale = "-" if a["scale_percent"] is None else f"{a['scale_percent']} %"
        arms.append(f"| {a['arm']} | {scale} | {a['n_images']} | {_pm(a['test'])} |"
                    + (f" {_pm(a['external'])} |" if ext else ""))
        per_class.append(f"| {a['arm']}{'' if a['scale_percent'] is None else ' ' + scale} | "
                         + " | ".join(f"{v:.3f}" for v in a["test"]["per_class_f1_mean"]) + " |")
    return "\n".join(arms + per_class)


def plot_f1(results, path):
    """F1 against synthetic scale (synthetic only), with the real and real+synthetic arms as lines."""
    import matplotlib  # lazy: a heavy import (~1 s) that only this plot needs
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    syn = [a for a in results["arms"] if a["arm"] == "synthetic"]
    scales = [a["scale_percent"] for a in syn]
    for name, color in zip(["test"] + (["external"] if results["folders"]["external"] else []), ["C0", "C1"]):
        ax.errorbar(scales, [a[name]["mean"] for a in syn], yerr=[a[name]["std"] for a in syn], color=color,
                    marker="o", capsize=3, label=f"synthetic only ({name})")
        for a in (a for a in results["arms"] if a["arm"] != "synthetic"):
            ax.axhline(a[name]["mean"], color=color, ls="--" if a["arm"] == "real" else ":",
                       label=f"{a['arm']} ({name})")
    ax.set(xscale="log", xlabel="synthetic images, % of the real count per class", ylabel="macro F1")
    ax.set_xticks(scales, [f"{s} %" for s in scales])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- 4. Command line ---------------------------------------------------------------------------------------------------
def _folder(arg):
    """A folder argument; 'digits' / 'digits:test' name the built-in demo data (data.py)."""
    return str(resolve_data(arg)) if arg in DIGITS_ARGS else arg


def _classifier_setup(args):
    """The --preset's ClassifierConfig and TrainRecipe with the flags given on top."""
    make_cfg, make_recipe = clf.PRESETS[args.preset]
    given = lambda names: {k: getattr(args, k) for k in names if getattr(args, k) is not None}  # noqa: E731
    return make_cfg(**given(("width", "depth", "image_size"))), make_recipe(**given(("steps", "batch_size", "lr")))


def cmd_metrics(args):
    if args.classifier and args.features == "inception":  # the classifier would be left unused
        raise UsageError("--classifier DIR gives classifier features: add --features classifier (default: inception)")
    if args.features == "inception":
        extractor = InceptionFeatures(args.inception_weights, args.device)
    elif not args.classifier:
        raise UsageError("--features classifier needs --classifier DIR (a folder written by `eval.py "
                         "train-classifier` or `eval.py classify`)")
    else:
        extractor = ClassifierFeatures(args.classifier, args.device)
    cache = None if args.no_cache else (args.cache_dir or os.path.join(cache_root(), "eval_features"))
    get = lambda d: extract_features(_folder(d), extractor, cache, args.batch_size, not args.quiet)  # noqa: E731
    (real, _), (fake, fake_files) = get(args.real), get(args.fake)
    res = {"features": extractor.name, "feature_net": extractor.identity, "feature_dim": extractor.dim,
           "real": args.real, "fake": args.fake, "n_real": len(real), "n_fake": len(fake),
           "fid": fid_from_features(real, fake), "k_precision_recall": args.k_pr,
           **precision_recall(real, fake, args.k_pr), "k_density_coverage": args.k_dc,
           **density_coverage(real, fake, args.k_dc)}
    if min(len(real), len(fake)) <= extractor.dim:
        res["note"] = (f"fewer images than feature dimensions ({extractor.dim}): the covariances are singular "
                       "and FID is biased upwards; compare FIDs only at equal image counts")
    rows = [("features", f"{extractor.name} ({extractor.dim}-d)"), ("real / fake images", f"{len(real)} / {len(fake)}"),
            ("FID", f"{res['fid']:.3f}")] + [(f"{m} (k={k})", f"{res[m]:.4f}") for m, k in [
                ("precision", args.k_pr), ("recall", args.k_pr), ("density", args.k_dc), ("coverage", args.k_dc)]]
    if args.train:
        train, train_files = get(args.train)
        rel = lambda files, root: [os.path.relpath(f, root) for f in files]  # noqa: E731
        res["train"], res["n_train"] = args.train, len(train)
        res["memorisation"] = memorisation(train, fake, rel(fake_files, _folder(args.fake)),
                                           rel(train_files, _folder(args.train)))
        rows.append(("memorised (closer than the nearest training neighbour)",
                     f"{res['memorisation']['memorised_fraction']:.4f}"))
    print("| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows))
    if "note" in res:
        print(f"\nnote: {res['note']}")
    out = os.path.join(args.out or args.fake, "metrics.json")
    atomic_write_json(out, res)
    print(f"\nwrote {out}", file=sys.stderr)
    return res


def cmd_classify(args):
    cfg, recipe = _classifier_setup(args)
    protocol = clf.Protocol(_folder(args.train), args.synthetic, _folder(args.test),
                            _folder(args.external) if args.external else None, args.scales, args.combined,
                            args.seeds, args.seed, real=not args.no_real)
    results = clf.run_classify(protocol, cfg, recipe, args.device, not args.quiet, args.out)
    print(classify_table(results))
    atomic_write_json(os.path.join(args.out, "classify.json"), results)
    plot_f1(results, os.path.join(args.out, "classify_f1.png"))
    print(f"\nwrote {args.out}/classify.json, classify_f1.png, classifier_real/", file=sys.stderr)
    return results


def cmd_train_classifier(args):
    cfg, recipe = _classifier_setup(args)
    x, y, names = clf.load_labelled(_folder(args.train), cfg.image_size, progress=not args.quiet)
    cfg = replace(cfg, num_classes=len(names), class_names=names)
    model = clf.train_classifier(x, y, cfg, recipe, args.seed, args.device, not args.quiet)
    extra = {"trained_on": os.path.abspath(_folder(args.train)), "seed": args.seed}
    if args.test:
        tx, ty, _ = clf.load_labelled(_folder(args.test), cfg.image_size, names, not args.quiet)
        extra["test"] = clf.evaluate(model, tx, ty, len(names), args.device)
        print(f"test macro F1 {extra['test']['macro_f1']:.4f}, accuracy {extra['test']['accuracy']:.4f}")
    clf.save_classifier(args.out, model, recipe, extra)
    print(f"wrote the classifier to {args.out}", file=sys.stderr)
    return extra


EXAMPLES = f"""examples:
  python eval.py train-classifier --train digits --test digits:test --out runs/digits_clf
  python eval.py metrics --real digits:test --fake runs/samples --train digits \\
      --features classifier --classifier runs/digits_clf
  python eval.py metrics --real REAL_DIR --fake FAKE_DIR --inception-weights {FID_WEIGHTS_NAME}
  python eval.py classify --train digits --synthetic runs/samples --test digits:test \\
      --scales 100,200,500,1000 --combined --seeds 3 --preset digits32 --out runs/classify
(--real/--fake/--train/--test/--external accept 'digits' and 'digits:test', the built-in demo data)"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, help):
        q = sub.add_parser(name, help=help, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        q.set_defaults(func=func)
        return q

    def common(q, classifier=True):
        if classifier:
            q.add_argument("--preset", choices=sorted(clf.PRESETS), default="digits32",
                           help="network and recipe: digits32 (small ResNet, 32 px) or photo224 (ResNet-18, 224 px)")
            q.add_argument("--width", type=positive_int, help="channels of the first stage (preset's by default)")
            q.add_argument("--depth", type=positive_int, help="residual blocks per stage (preset's by default)")
            q.add_argument("--image-size", type=positive_int, help="input size in pixels (preset's by default)")
            q.add_argument("--steps", type=positive_int, help="optimisation steps per run (preset's by default)")
            q.add_argument("--train-batch-size", dest="batch_size", type=positive_int, help="images per step")
            q.add_argument("--lr", type=positive_float, help="peak SGD learning rate (preset's by default)")
            q.add_argument("--seed", type=non_negative_int, default=0, help="(first) seed: init, batches, draws")
        q.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device")
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    m = command("metrics", cmd_metrics, "FID, precision/recall, density/coverage (and memorisation) of two folders")
    m.add_argument("--real", required=True, help="held-out real images (flat folder or DIR/<class>/...)")
    m.add_argument("--fake", required=True, help="generated images (flat folder or DIR/<class>/...)")
    m.add_argument("--train", help="training images: also report the memorisation score")
    m.add_argument("--features", choices=["inception", "classifier"], default="inception",
                   help="Inception-v3 pool3 (needs --inception-weights) or a classifier's penultimate layer")
    m.add_argument("--inception-weights", default=FID_WEIGHTS_NAME,
                   help=f"pytorch-fid's weight file (default: ./{FID_WEIGHTS_NAME}); nothing is downloaded")
    m.add_argument("--classifier", help="classifier folder (eval.py train-classifier) for --features classifier")
    m.add_argument("--k-pr", type=positive_int, default=3, help="k of precision/recall (default 3, Kynkaanniemi)")
    m.add_argument("--k-dc", type=positive_int, default=5, help="k of density/coverage (default 5, Naeem et al.)")
    m.add_argument("--batch-size", type=positive_int, default=50, help="images per feature-extraction batch")
    m.add_argument("--cache-dir", help="feature cache (default: $CLUE_CACHE or ~/.cache/clue, /eval_features)")
    m.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    m.add_argument("--out", type=output_folder, help="folder for metrics.json (default: the --fake folder)")
    common(m, classifier=False)

    c = command("classify", cmd_classify, "F1 of the same classifier trained on real / synthetic / both")
    c.add_argument("--train", required=True, help="real training images, DIR/<class>/... (or 'digits')")
    c.add_argument("--synthetic", required=True, help="generated images, DIR/<class>/... with the same class names")
    c.add_argument("--test", required=True, help="real test images, DIR/<class>/... (or 'digits:test')")
    c.add_argument("--external", help="a second (external) real test set, DIR/<class>/...")
    c.add_argument("--scales", type=comma_list(positive_int), default=[100, 200, 500, 1000],
                   help="synthetic-only arms, in %% of the real count per class (default 100,200,500,1000)")
    c.add_argument("--combined", action="store_true", help="also train on real + an equal amount (100 %%) of synthetic")
    c.add_argument("--no-real", action="store_true", help="skip the real-only arm (a sweep trains it once elsewhere)")
    c.add_argument("--seeds", type=positive_int, default=3, help="training runs per arm (mean and std reported)")
    c.add_argument("--out", type=output_folder, default="runs/classify",
                   help="folder for classify.json, classify_f1.png, classifier_real/")
    common(c)

    t = command("train-classifier", cmd_train_classifier, "train one classifier on real data (a feature net)")
    t.add_argument("--train", required=True, help="real training images, DIR/<class>/... (or 'digits')")
    t.add_argument("--test", help="real test images: report macro F1 and store it with the classifier")
    t.add_argument("--out", type=output_folder, required=True, help="classifier folder to write")
    common(t)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run(main, program="eval.py")
