"""A small ResNet image classifier, its training recipe, macro F1, and its checkpoint format.

Used by eval.py for two jobs of the CLUE paper's evaluation (arXiv 2511.10993; ../shared/DESIGN.md,
"Evaluation protocol"):
  1. downstream utility: the SAME network and recipe is trained on real, synthetic, or real +
     synthetic images, and scored by macro F1 on a real test set (and an external one);
  2. domain features: its penultimate layer (global average pool of the last stage) replaces
     Inception-v3 pool3 for FID / precision / recall when no Inception weights are available.

Network: a ResNet with basic blocks (He et al. 2016, "Deep residual learning", Sec. 3-4: two 3x3
convs + identity shortcut, 1x1 projection when the shape changes; pre-activation is not used).
`stages` stages of `depth` blocks, widths width * 2^i, every stage after the first halves the
resolution. Stem "cifar": one 3x3 conv (He et al. Sec. 4.2, CIFAR); stem "imagenet": 7x7/2 conv + 3x3/2
max pool (Table 1). photo224 with width 64, depth 2, 4 stages is ResNet-18. The last BatchNorm of
every block starts at zero (Goyal et al. 2017, Sec. 5.1) so that every block starts as the identity.
Recipe: SGD with Nesterov momentum, linear warm-up then cosine decay (Loshchilov & Hutter 2017),
weight decay, random-crop (pad + crop) augmentation, optional horizontal flips; a FIXED number of
optimisation steps, so that every arm of the protocol gets the same compute whatever its data size.
Inputs are images in [-1, 1] (data.load_image), (B,3,S,S).

F1 (van Rijsbergen): per class F1 = 2 TP / (2 TP + FP + FN) from the confusion matrix; macro F1 is
their unweighted mean over the classes present in the test set (an external set may lack classes).
`run_classify` (last section) is the protocol itself: arms, seeds, class-balanced synthetic draws.
Left out: mixed precision, data loaders with workers (images are held in memory as uint8),
learning-rate search.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from checkpoint import atomic_write_json, atomic_write_safetensors
from data import ClassFolderDataset, load_image

CHECKPOINT_FORMAT = "clue-classifier"


@dataclass
class ClassifierConfig:
    num_classes: int = 10            # outputs of the last linear layer
    image_size: int = 32             # images are resized (shorter side) and centre-cropped to this
    width: int = 16                  # channels of the first stage; stage i has width * 2**i
    depth: int = 1                   # residual blocks per stage
    stages: int = 3                  # number of stages; each after the first halves the resolution
    stem: str = "cifar"              # "cifar": 3x3 conv, stride 1; "imagenet": 7x7/2 conv + 3x3/2 max pool
    class_names: list = field(default_factory=list)  # label i is class_names[i] (folder names)

    @classmethod
    def digits32(cls, **kw):
        """32 px digits: 78 k parameters, 64-d features."""
        return cls(**{"image_size": 32, "width": 16, "depth": 1, "stages": 3, "stem": "cifar", **kw})

    @classmethod
    def photo224(cls, **kw):
        """224 px photographs: ResNet-18 (11 M parameters, 512-d features)."""
        return cls(**{"image_size": 224, "width": 64, "depth": 2, "stages": 4, "stem": "imagenet", **kw})

    @property
    def feature_dim(self):
        return self.width * 2 ** (self.stages - 1)


@dataclass
class TrainRecipe:
    steps: int = 300                 # optimisation steps (the same for every arm, whatever its size)
    batch_size: int = 64             # images per step (all of them if the set is smaller)
    lr: float = 0.1                  # peak learning rate of SGD
    momentum: float = 0.9            # Nesterov momentum
    weight_decay: float = 5e-4       # L2 on all parameters
    warmup_fraction: float = 0.05    # share of the steps with a linear learning-rate warm-up
    label_smoothing: float = 0.0     # cross-entropy label smoothing
    augment_pad: int = 2             # random crop after zero-padding by this many pixels (0: none)
    augment_flip: bool = False       # random horizontal flips (off: digits and anatomy have a side)

    @classmethod
    def digits32(cls, **kw):
        return cls(**{"steps": 300, "batch_size": 64, "lr": 0.2, "augment_pad": 2, "augment_flip": False, **kw})

    @classmethod
    def photo224(cls, **kw):
        return cls(**{"steps": 3000, "batch_size": 64, "lr": 0.05, "augment_pad": 16, "augment_flip": True, **kw})


PRESETS = {"digits32": (ClassifierConfig.digits32, TrainRecipe.digits32),
           "photo224": (ClassifierConfig.photo224, TrainRecipe.photo224)}


class BasicBlock(nn.Module):
    """x -> relu(x' + F(x)), F = conv3x3-BN-ReLU-conv3x3-BN; x' = x or a strided 1x1 projection."""

    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        nn.init.zeros_(self.bn2.weight)  # the block starts as the identity
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        if cfg.stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {cfg.stem!r}")
        self.cfg = cfg
        if cfg.stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, cfg.width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(cfg.width), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, cfg.width, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(cfg.width), nn.ReLU(),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        blocks, ch = [], cfg.width
        for i in range(cfg.stages):
            out_ch = cfg.width * 2 ** i
            for j in range(cfg.depth):
                blocks.append(BasicBlock(ch, out_ch, stride=2 if (i > 0 and j == 0) else 1))
                ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(ch, cfg.num_classes)

    def features(self, x):
        """Penultimate features: (B,3,S,S) in [-1, 1] -> (B, feature_dim)."""
        h = self.blocks(self.stem(x))
        return h.mean(dim=(2, 3))  # (B,C,h,w) -> (B,C)

    def forward(self, x):
        return self.fc(self.features(x))


# ----------------------------------------------------------------------------------------------------
# Training and evaluation. Images are uint8 tensors (N,3,S,S); see to_uint8 / from_uint8.
# ----------------------------------------------------------------------------------------------------

def to_uint8(x):
    """[-1, 1] float images (data.load_image) -> uint8 (exact for images that came from 8-bit files)."""
    return torch.from_numpy(np.rint((x.numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8))


def from_uint8(x):
    return x.float() / 127.5 - 1


def augment(x, pad, flip, generator):
    """Random crop after zero padding by `pad` pixels (the same shift for all channels), random flip."""
    if pad > 0:
        B, C, H, W = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator) + torch.arange(H)  # (B,H)
        cols = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator) + torch.arange(W)  # (B,W)
        x = padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]  # (B,C,H+2p,W+2p) -> (B,C,H,W)
    if flip:
        mask = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def learning_rate(step, recipe: TrainRecipe):
    """Linear warm-up to recipe.lr, then cosine decay to 0 at recipe.steps."""
    warmup = max(1, int(recipe.warmup_fraction * recipe.steps))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_classifier(images, labels, cfg: ClassifierConfig, recipe: TrainRecipe, seed=0, device="cpu",
                     progress=True, desc="train"):
    """Train a fresh ResNet on uint8 images (N,3,S,S) and integer labels (N,); returns it in eval mode.

    `seed` fixes the initialisation, the batch order and the augmentation."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images and at least one image, got {len(images)} images "
                         f"and {len(labels)} labels")
    if tuple(images.shape[1:]) != (3, cfg.image_size, cfg.image_size):
        raise ValueError(f"images have shape {tuple(images.shape[1:])}, the classifier expects "
                         f"(3, {cfg.image_size}, {cfg.image_size})")
    if int(labels.max()) >= cfg.num_classes or int(labels.min()) < 0:
        raise ValueError(f"labels must be in [0, {cfg.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    torch.manual_seed(seed)
    model = ResNet(cfg).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=True,
                          weight_decay=recipe.weight_decay)
    batch = min(recipe.batch_size, len(images))
    order = torch.empty(0, dtype=torch.long)
    for step in tqdm(range(recipe.steps), desc=desc, disable=not progress, leave=False):
        if len(order) < batch:  # a fresh permutation every epoch
            order = torch.cat([order, torch.randperm(len(images), generator=gen)])
        idx, order = order[:batch], order[batch:]
        x = augment(from_uint8(images[idx]), recipe.augment_pad, recipe.augment_flip, gen).to(device)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, recipe)
        loss = F.cross_entropy(model(x), labels[idx].to(device), label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def _batched(fn, images, batch_size, device):
    outs = [fn(from_uint8(images[i:i + batch_size]).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def predict(model, images, batch_size=256, device="cpu"):
    """uint8 images (N,3,S,S) -> predicted labels (N,) as a numpy array."""
    model.eval()
    return _batched(model, images, batch_size, device).argmax(1).numpy()


def penultimate_features(model, images, batch_size=256, device="cpu"):
    """uint8 images (N,3,S,S) -> (N, feature_dim) numpy array."""
    model.eval()
    return _batched(model.features, images, batch_size, device).numpy()


def confusion_matrix(y_true, y_pred, num_classes):
    """cm[i, j] = number of images of class i predicted as class j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def f1_from_confusion(cm):
    """Per-class F1 = 2TP / (2TP + FP + FN) (0 where the class is neither present nor predicted),
    and macro F1 over the classes present in the test set (rows with images)."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = cm.sum(1) > 0
    return per_class, float(per_class[present].mean())


def evaluate(model, images, labels, num_classes, device="cpu"):
    """-> dict(macro_f1, accuracy, per_class_f1, confusion) on one test set."""
    pred = predict(model, images, device=device)
    cm = confusion_matrix(labels, pred, num_classes)
    per_class, macro = f1_from_confusion(cm)
    return {"macro_f1": macro, "accuracy": float(np.trace(cm) / max(1, cm.sum())),
            "per_class_f1": per_class.tolist(), "confusion": cm.tolist()}


# ----------------------------------------------------------------------------------------------------
# Checkpoint: a folder with config.json + model.safetensors (the project's format, convert.py writes)
# ----------------------------------------------------------------------------------------------------

def save_classifier(path, model: ResNet, recipe: TrainRecipe | None = None, extra: dict | None = None):
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {"format": CHECKPOINT_FORMAT, "version": 1, "classifier": asdict(model.cfg),
              "recipe": asdict(recipe) if recipe is not None else None, **(extra or {})}
    atomic_write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    atomic_write_json(os.path.join(path, "config.json"), config)


def load_classifier(path, device="cpu"):
    """A folder written by save_classifier (or its model.safetensors) -> (ResNet in eval mode, config dict)."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        path = os.path.dirname(path) or "."
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"classifier checkpoint {path!r} not found: expected a folder with config.json and "
            "model.safetensors, written by `python eval.py train-classifier` or `eval.py classify` "
            "(its classifier_real/ folder)")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}/config.json has format {config.get('format')!r}, expected "
                         f"{CHECKPOINT_FORMAT!r}: this is not a classifier checkpoint from eval.py")
    known = {f.name for f in fields(ClassifierConfig)}
    cfg = ClassifierConfig(**{k: v for k, v in config["classifier"].items() if k in known})
    model = ResNet(cfg)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.to(device).eval().requires_grad_(False), config


# ----------------------------------------------------------------------------------------------------
# The downstream-utility protocol: real / synthetic at several scales / real + synthetic
# ----------------------------------------------------------------------------------------------------

def load_labelled(folder, image_size, class_names=None, progress=True):
    """A class folder (data.ClassFolderDataset rules) -> (uint8 images (N,3,S,S), labels (N,), class names).

    With `class_names` (the training set's), labels follow that list and an unknown class is an error;
    a class may be missing (an external test set need not have every class)."""
    ds = ClassFolderDataset(folder, size=image_size)
    names = list(class_names) if class_names is not None else list(ds.class_names)
    unknown = [c for c in ds.class_names if c not in names]
    if unknown:
        raise ValueError(f"{folder} has classes {unknown} that the training folder does not have "
                         f"(training classes: {names}); class folder names must match")
    images, labels = [], []
    for path, label in tqdm(ds.samples, desc=f"load {folder}", disable=not progress, leave=False):
        try:
            images.append(to_uint8(load_image(path, image_size)))
        except Exception as e:  # passed Pillow's verify() but does not decode
            warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
            continue
        labels.append(names.index(ds.class_names[label]))
    if not images:
        raise ValueError(f"no readable images in {folder}")
    return torch.stack(images), np.array(labels), names


def synthetic_per_class(real_labels, num_classes, scale):
    """Synthetic images to draw per class: `scale` % of that class's real count, rounded."""
    return [int(round(scale / 100 * np.sum(real_labels == c))) for c in range(num_classes)]  # as sample.py --scale


def check_enough_synthetic(real_labels, synth_labels, class_names, scale):
    """A clear error, before any training, when a class has fewer synthetic images than `scale` needs."""
    have = np.bincount(synth_labels, minlength=len(class_names))
    need = synthetic_per_class(real_labels, len(class_names), scale)
    short = [f"  class {name!r}: {have[c]} synthetic images; {scale} % of {int(np.sum(real_labels == c))} "
             f"real ones needs {need[c]}" for c, name in enumerate(class_names) if have[c] < need[c]]
    if short:
        raise ValueError(f"too few synthetic images for scale {scale} %:\n" + "\n".join(short)
                         + "\ngenerate more images for these classes or lower --scales")


def summarise(runs):
    """Per-seed evaluate() dicts -> mean and spread (sample std over seeds, ddof=1; 0 for one seed)."""
    f1 = np.array([r["macro_f1"] for r in runs])
    return {"macro_f1": f1.tolist(), "mean": float(f1.mean()),
            "std": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
            "accuracy_mean": float(np.mean([r["accuracy"] for r in runs])),
            "per_class_f1_mean": np.mean([r["per_class_f1"] for r in runs], 0).tolist(),
            "confusion_sum": np.sum([r["confusion"] for r in runs], 0).tolist()}


def run_classify(train_dir, synthetic_dir, test_dir, external_dir=None, scales=(100, 200, 500, 1000),
                 combined=False, seeds=3, seed=0, cfg=None, recipe=None, device="cpu", progress=True,
                 save_dir=None):
    """Train the same classifier on every arm, `seeds` times (seeds seed, seed+1, ...):
    (a) real; (b) synthetic only at each scale; (c) with `combined`, real + synthetic at 100 %.
    Synthetic draws are class-balanced (per class, a share of that class's real count) and nested:
    one seeded permutation per class and seed, the first n of it. -> results dict (JSON-ready).
    With `save_dir`, the first seed's real-data classifier is saved in save_dir/classifier_real."""
    cfg, recipe = cfg or ClassifierConfig.digits32(), recipe or TrainRecipe.digits32()
    real_x, real_y, names = load_labelled(train_dir, cfg.image_size, progress=progress)
    synth_x, synth_y, _ = load_labelled(synthetic_dir, cfg.image_size, names, progress)
    arms = [("real", None)] + [("synthetic", s) for s in scales] + ([("real+synthetic", 100)] if combined else [])
    check_enough_synthetic(real_y, synth_y, names, max(s for _, s in arms[1:]) if len(arms) > 1 else 0)
    tests = {"test": load_labelled(test_dir, cfg.image_size, names, progress)}
    if external_dir:
        tests["external"] = load_labelled(external_dir, cfg.image_size, names, progress)
    cfg = replace(cfg, num_classes=len(names), class_names=names)
    runs = {arm: [] for arm in arms}
    for s in range(seed, seed + seeds):
        rng = np.random.default_rng(s)
        perms = [rng.permutation(np.flatnonzero(synth_y == c)) for c in range(len(names))]
        for kind, scale in arms:
            x, y = ([real_x], [real_y]) if kind != "synthetic" else ([], [])
            if scale is not None:
                need = synthetic_per_class(real_y, len(names), scale)
                drawn = np.concatenate([perms[c][:need[c]] for c in range(len(names))])
                x, y = x + [synth_x[drawn]], y + [synth_y[drawn]]
            x, y = torch.cat(x), np.concatenate(y)
            model = train_classifier(x, y, cfg, recipe, seed=s, device=device, progress=progress,
                                     desc=f"seed {s}: {kind}" + (f" {scale}%" if scale else ""))
            result = {"seed": s, "n_images": int(len(x))}
            for name, (tx, ty, _) in tests.items():
                result[name] = evaluate(model, tx, ty, len(names), device)
            runs[(kind, scale)].append(result)
            if save_dir and kind == "real" and s == seed:  # the real-data classifier doubles as a feature net
                save_classifier(os.path.join(save_dir, "classifier_real"), model, recipe,
                                {"trained_on": os.path.abspath(str(train_dir)), "seed": s})
    arms_out = []
    for (kind, scale), rs in runs.items():
        arms_out.append({"arm": kind, "scale_percent": scale, "n_images": rs[0]["n_images"], "runs": rs,
                         **{name: summarise([r[name] for r in rs]) for name in tests}})
    return {"class_names": names, "classifier": asdict(cfg), "recipe": asdict(recipe),
            "n_real": int(len(real_x)), "real_per_class": np.bincount(real_y, minlength=len(names)).tolist(),
            "folders": {"train": str(train_dir), "synthetic": str(synthetic_dir), "test": str(test_dir),
                        "external": str(external_dir) if external_dir else None},
            "seeds": list(range(seed, seed + seeds)), "arms": arms_out}
