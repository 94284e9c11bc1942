"""A small ResNet image classifier, its training recipe, macro F1, and the downstream-utility protocol.

Two jobs in the CLUE paper's evaluation (arXiv 2511.10993; ../shared/DESIGN.md, "Evaluation protocol"):
downstream utility (the SAME network and recipe trained on real, synthetic or real + synthetic images, scored by
macro F1 on real test sets: run_classify) and domain features (its penultimate layer replaces Inception-v3 pool3
for FID / precision / recall when no Inception weights exist offline).

Network: a ResNet of basic blocks (He et al. 2016, Sec. 3-4), `stages` stages of `depth` blocks, widths
width * 2^i, each stage after the first halving the resolution; stem "cifar" (3x3 conv, Sec. 4.2) or "imagenet"
(7x7/2 conv + 3x3/2 max pool, Table 1: photo224 is ResNet-18). The last BatchNorm of every block starts at zero
(Goyal et al. 2017, Sec. 5.1): every block starts as the identity. Recipe: SGD with Nesterov momentum, linear
warm-up then cosine decay (Loshchilov & Hutter 2017), weight decay, pad-and-crop augmentation, optional flips, and
a FIXED number of steps, so every arm gets the same compute whatever its data size. Inputs: (B,3,S,S) in [-1, 1].
Left out: mixed precision, data-loader workers (images are held in memory as uint8), learning-rate search.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from checkpoint import config_from_dict, load_mapped, read_checkpoint, write_checkpoint
from data import ClassFolderDataset, DataError, load_image


@dataclass
class ClassifierConfig:
    num_classes: int = 10            # outputs of the last linear layer
    image_size: int = 32             # images are resized (shorter side) and centre-cropped to this
    width: int = 16                  # channels of the first stage; stage i has width * 2**i
    depth: int = 1                   # residual blocks per stage
    stages: int = 3                  # number of stages; each after the first halves the resolution
    stem: str = "cifar"              # "cifar": 3x3 conv, stride 1; "imagenet": 7x7/2 conv + 3x3/2 max pool
    class_names: list = field(default_factory=list)  # label i is class_names[i] (folder names)

    def __post_init__(self):
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")

    @classmethod
    def digits32(cls, **kw):  # 32 px digits: 78 k parameters, 64-d features
        return cls(**{"image_size": 32, "width": 16, "depth": 1, "stages": 3, "stem": "cifar", **kw})

    @classmethod
    def photo224(cls, **kw):  # 224 px photographs: ResNet-18 (11 M parameters, 512-d features)
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


@dataclass
class Protocol:
    """What `eval.py classify` compares: the folders (DIR/<class>/... each) and the arms."""
    train: str                            # real training images
    synthetic: str                        # generated images, with the training set's class folders
    test: str                             # real test images
    external: str | None = None           # a second (external) real test set
    scales: tuple = (100, 200, 500, 1000)  # synthetic-only arms, % of the real count per class
    combined: bool = False                # also real + synthetic at 100 %
    seeds: int = 3                        # training runs per arm, seeds seed, seed + 1, ...
    seed: int = 0
    real: bool = True                     # the real-only arm (a sweep over many synthetic sets needs it once)


class BasicBlock(nn.Module):
    """x -> relu(x' + F(x)), F = conv3x3-BN-ReLU-conv3x3-BN; x' = x or a strided 1x1 projection."""

    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        nn.init.zeros_(self.bn2.weight)  # the block starts as the identity
        self.shortcut = nn.Identity() if stride == 1 and in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        kernel, stride, pool = (3, 1, []) if cfg.stem == "cifar" else (7, 2, [nn.MaxPool2d(3, stride=2, padding=1)])
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.width, kernel, stride=stride, padding=kernel // 2, bias=False),
                                  nn.BatchNorm2d(cfg.width), nn.ReLU(), *pool)
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


# -- Training and evaluation. Images are uint8 tensors (N,3,S,S); see to_uint8 / from_uint8. ---------------------------
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
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * ((step - warmup) / max(1, recipe.steps - warmup))))


def train_classifier(images, labels, cfg: ClassifierConfig, recipe: TrainRecipe, seed=0, device="cpu",
                     progress=True, desc="train"):
    """Train a fresh ResNet on uint8 images (N,3,S,S) and integer labels (N,) in [0, num_classes); returns it in
    eval mode. `seed` fixes the initialisation, the batch order and the augmentation."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    torch.manual_seed(seed)
    model = ResNet(cfg).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=True,
                          weight_decay=recipe.weight_decay)
    batch, order = min(recipe.batch_size, len(images)), torch.empty(0, dtype=torch.long)
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
def predict(model, images, batch_size=256, device="cpu"):
    """uint8 images (N,3,S,S) -> predicted labels (N,) as a numpy array."""
    model.eval()
    outs = [model(from_uint8(images[i:i + batch_size]).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)]
    return (torch.cat(outs) if outs else torch.empty(0)).argmax(1).numpy()


def confusion_matrix(y_true, y_pred, num_classes):
    """cm[i, j] = number of images of class i predicted as class j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def f1_from_confusion(cm):
    """Per-class F1 (van Rijsbergen) = 2TP / (2TP + FP + FN) (0 where the class is neither present nor predicted),
    and macro F1, their mean over the classes present in the test set (an external set may lack some)."""
    tp = np.diag(cm).astype(np.float64)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return per_class, float(per_class[cm.sum(1) > 0].mean())  # mean over the classes present


def evaluate(model, images, labels, num_classes, device="cpu"):
    """-> dict(macro_f1, accuracy, per_class_f1, confusion) on one test set."""
    cm = confusion_matrix(labels, predict(model, images, device=device), num_classes)
    per_class, macro = f1_from_confusion(cm)
    return {"macro_f1": macro, "accuracy": float(np.trace(cm) / max(1, cm.sum())),
            "per_class_f1": per_class.tolist(), "confusion": cm.tolist()}


# -- Checkpoint: checkpoint.py's one format, kind "classifier" ---------------------------------------------------------
def save_classifier(path, model: ResNet, recipe: TrainRecipe | None = None, extra: dict | None = None):
    config = {"classifier": asdict(model.cfg), "recipe": asdict(recipe) if recipe is not None else None,
              **(extra or {})}
    write_checkpoint(path, "classifier", config, model.state_dict())


def load_classifier(path, device="cpu"):
    """A folder written by save_classifier (or its model.safetensors) -> (ResNet in eval mode, config dict)."""
    path = str(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise FileNotFoundError(f"classifier checkpoint {path!r} not found: expected a folder written by "
                                "`python eval.py train-classifier` or `eval.py classify` (its classifier_real/)")
    config, tensors = read_checkpoint(path, "classifier")
    where = os.path.join(path, "config.json")
    cfg = config_from_dict(ClassifierConfig, config.get("classifier"), f"{where} [classifier]")
    model = ResNet(cfg)
    load_mapped(model, [(k, k, t) for k, t in tensors.items()], [], "classifier",
                os.path.join(path, "model.safetensors"))
    return model.to(device).eval().requires_grad_(False), config


# -- The downstream-utility protocol: real / synthetic at several scales / real + synthetic ----------------------------
def load_labelled(folder, image_size, class_names=None, progress=True):
    """A class folder (data.ClassFolderDataset rules) -> (uint8 images (N,3,S,S), labels (N,), class names). With
    `class_names` (the training set's), labels follow that list; an unknown class is an error, a missing one not."""
    ds = ClassFolderDataset(folder, size=image_size)
    names = list(class_names) if class_names is not None else list(ds.class_names)
    if len(names) < 2:  # one class: every prediction right, a macro F1 of 1 that measures nothing
        raise DataError(f"{folder} has one class ({names[0]!r}); a classifier needs two or more class folders")
    unknown = [c for c in ds.class_names if c not in names]
    if unknown:
        raise DataError(f"{folder} has classes {unknown} that the training folder does not have "
                        f"(training classes: {names}); class folder names must match")
    images = [to_uint8(load_image(path, image_size))
              for path, _ in tqdm(ds.samples, desc=f"load {folder}", disable=not progress, leave=False)]
    return torch.stack(images), np.array([names.index(ds.class_names[label]) for label in ds.labels]), names


def synthetic_per_class(real_labels, num_classes, scale):
    """Synthetic images to draw per class: `scale` % of that class's real count, rounded (as sample.py --scale)."""
    return [int(round(scale / 100 * np.sum(real_labels == c))) for c in range(num_classes)]


def check_enough_synthetic(real_labels, synth_labels, class_names, scale):
    """A clear error, before any training, when a class has fewer synthetic images than `scale` needs."""
    have = np.bincount(synth_labels, minlength=len(class_names))
    need = synthetic_per_class(real_labels, len(class_names), scale)
    short = [f"  class {name!r}: {have[c]} synthetic images; {scale} % of {int(np.sum(real_labels == c))} "
             f"real ones needs {need[c]}" for c, name in enumerate(class_names) if have[c] < need[c]]
    if short:
        raise DataError(f"too few synthetic images for scale {scale} %:\n" + "\n".join(short)
                        + "\ngenerate more images for these classes or lower --scales")


def summarise(runs):
    """Per-seed evaluate() dicts -> mean and spread (sample std over seeds, ddof=1; 0 for one seed)."""
    f1 = np.array([r["macro_f1"] for r in runs])
    return {"macro_f1": f1.tolist(), "mean": float(f1.mean()), "std": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
            "accuracy_mean": float(np.mean([r["accuracy"] for r in runs])),
            "per_class_f1_mean": np.mean([r["per_class_f1"] for r in runs], 0).tolist(),
            "confusion_sum": np.sum([r["confusion"] for r in runs], 0).tolist()}


def run_classify(p: Protocol, cfg: ClassifierConfig | None = None, recipe: TrainRecipe | None = None, device="cpu",
                 progress=True, save_dir=None):
    """Train the same classifier on every arm, `p.seeds` times: (a) real (if `p.real`); (b) synthetic only at each
    scale; (c) with `p.combined`, real + synthetic at 100 %. Synthetic draws are class-balanced (per class, a share of
    that class's real count) and nested: one seeded permutation per class and seed, the first n of it.
    -> results dict (JSON-ready). With `save_dir`, the first seed's real-data classifier is saved in
    save_dir/classifier_real."""
    cfg, recipe = cfg or ClassifierConfig.digits32(), recipe or TrainRecipe.digits32()
    real_x, real_y, names = load_labelled(p.train, cfg.image_size, progress=progress)
    synth_x, synth_y, _ = load_labelled(p.synthetic, cfg.image_size, names, progress)
    arms = [("real", None)] * p.real + [("synthetic", s) for s in p.scales] + [("real+synthetic", 100)] * p.combined
    check_enough_synthetic(real_y, synth_y, names, max([s for _, s in arms if s is not None], default=0))
    tests = {name: load_labelled(folder, cfg.image_size, names, progress)  # the real test set(s)
             for name, folder in (("test", p.test), ("external", p.external)) if folder}
    cfg = replace(cfg, num_classes=len(names), class_names=names)
    runs = {arm: [] for arm in arms}
    for s in range(p.seed, p.seed + p.seeds):
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
            runs[(kind, scale)].append({"seed": s, "n_images": int(len(x)), **{
                name: evaluate(model, tx, ty, len(names), device) for name, (tx, ty, _) in tests.items()}})
            if save_dir and kind == "real" and s == p.seed:  # the real-data classifier doubles as a feature net
                save_classifier(os.path.join(save_dir, "classifier_real"), model, recipe,
                                {"trained_on": os.path.abspath(str(p.train)), "seed": s})
    arms_out = [{"arm": kind, "scale_percent": scale, "n_images": rs[0]["n_images"], "runs": rs,
                 **{name: summarise([r[name] for r in rs]) for name in tests}} for (kind, scale), rs in runs.items()]
    return {"class_names": names, "classifier": asdict(cfg), "recipe": asdict(recipe),
            "n_real": int(len(real_x)), "real_per_class": np.bincount(real_y, minlength=len(names)).tolist(),
            "folders": {"train": str(p.train), "synthetic": str(p.synthetic), "test": str(p.test),
                        "external": str(p.external) if p.external else None},
            "seeds": list(range(p.seed, p.seed + p.seeds)), "arms": arms_out}
