"""train.py: train CLUE (or the vanilla baseline) on a folder of labelled images.

CLUE (Park et al., arXiv 2511.10993) fine-tunes Stable Diffusion with a KL-regularised Style Encoder
whose tokens feed a second cross-attention layer; the objective itself is `CLUE.loss` in clue.py
(diffusion MSE + beta * KL or gamma * |KL - C|). This file is the training PROGRAM around it:

  from a public SD checkpoint  (--model PATH): VAE and text encoder frozen, U-Net + style encoder trained;
  from scratch (--preset tiny): phase 1 trains the tiny VAE (L1 + L2 reconstruction + a small KL, as the
      LDM autoencoders without their GAN/LPIPS terms; Rombach et al. 2022, Sec. 3.1) and sets its latent
      scale factor to 1/std of the latents (how SD's 0.18215 was chosen); phase 2 trains the U-Net and the
      style encoder. The text encoder stays frozen here too, at its random initialisation, unless
      --train-text-encoder: with fixed-format prompts it only has to tell a few class names apart, which
      random features already do (training it costs ~15 % more per CPU step).

Optimisation: AdamW (Loshchilov & Hutter 2019), linear warm-up then cosine or constant learning rate,
gradient clipping, gradient accumulation, an EMA of the weights (used for samples, diagnostics and the
saved model), autocast on GPU (GradScaler for fp16). Multi-GPU: `torchrun` sets RANK / WORLD_SIZE /
LOCAL_RANK; DistributedDataParallel averages gradients (nccl on GPU, gloo on CPU); rank 0 writes every file.

A checkpoint is a folder `checkpoints/step_NNNNNN/` written under a temporary name and renamed into place
(a crash leaves the previous checkpoints intact): `config.json` + `model.safetensors` (CLUE.save: the
EMA weights, loadable by sample.py) and `training_state.safetensors` + `training_state.json` (raw weights,
AdamW moments flattened to one tensor per parameter and moment, EMA, LR-schedule and GradScaler state,
the torch / numpy / python RNG states of every rank, the data-loader position). No pickle anywhere.
`--resume` restores all of it, so on CPU N + N steps give bit-identical weights to 2N uninterrupted steps.

Left out: LoRA, prior preservation, multi-node launch helpers, data-loader worker RNG restoration
(with --num-workers > 0 the order of images still resumes exactly, random crops/flips do not).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

EXAMPLES = """examples:
  # the demo (what demo.sh runs): a tiny CLUE on scikit-learn's digits, from scratch, on a CPU
  python train.py --data digits --preset tiny --output runs/demo
  # CLUE on your own class folders, fine-tuning Stable Diffusion 2.1-base (any format convert.py reads)
  python train.py --data ear_images/ --model stable-diffusion-2-1-base --prompt "an otoscopic image of {class}" \\
      --resolution 512 --batch-size 4 --grad-accum 4 --lr 1e-5 --mixed-precision bf16 \\
      --gradient-checkpointing --steps 10000 --output runs/ear_clue
  # the vanilla fine-tuning baseline: the same run without the style branch
  python train.py --data ear_images/ --model stable-diffusion-2-1-base --style-tokens 0 --output runs/ear_vanilla
  # few-shot regime: 20 images per class, reuse the VAE of an earlier tiny run
  python train.py --data digits --preset tiny --limit-per-class 20 --vae runs/demo/vae --output runs/few
  # continue an interrupted run exactly where its last checkpoint left it (same arguments + --resume)
  python train.py --data digits --preset tiny --output runs/demo --resume latest
  # two GPUs (or two CPU processes talking gloo)
  torchrun --nproc_per_node 2 train.py --data digits --preset tiny --output runs/ddp
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="folder with one subfolder of images per class, or 'digits'")
    g.add_argument("--prompt", default=None, help="prompt template with {class} (default: 'a handwritten digit "
                   "{class}' for digits, else 'an otoscopic image of {class}')")
    g.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: 32 tiny, 512 SD)")
    g.add_argument("--limit-per-class", type=int, default=None, help="keep N images per class (seeded; few-shot)")
    g.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    g.add_argument("--flip", action="store_true", help="random horizontal flips (off: they change digits)")
    g.add_argument("--val-data", default=None, help="held-out class folder for the diagnostics (default: "
                   "digits:test for digits, else the training images)")
    g.add_argument("--num-workers", type=int, default=0, help="data-loader processes (0: exact resume)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="Stable Diffusion weights to fine-tune (diffusers folder, "
                   ".safetensors/.ckpt, or our folder)")
    g.add_argument("--preset", choices=("tiny",), default=None, help="train a tiny model from scratch instead")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="for single SD files (see convert.py) and for --preset tiny (default v_prediction)")
    g.add_argument("--vae", default=None, help="tiny preset: reuse this trained VAE folder instead of phase 1")
    g.add_argument("--style-tokens", type=int, default=4, help="K style tokens; 0 = vanilla baseline (default 4)")
    g.add_argument("--style-width", type=int, default=None, help="style encoder width (default: its preset)")
    g.add_argument("--style-layers", type=int, default=None, help="style encoder layers (default: its preset)")
    g.add_argument("--unet-channels", default=None, help="tiny preset: U-Net widths, e.g. 64,128")
    g.add_argument("--freeze-unet", action="store_true", help="train only the style encoder + style attention")
    g.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder")
    g = p.add_argument_group("objective (CLUEConfig)")
    g.add_argument("--kl-mode", choices=("beta", "capacity"), default="capacity",
                   help="beta * KL, or gamma * |KL - C| (default capacity)")
    g.add_argument("--beta", type=float, default=1e-2, help="weight of the KL per dimension in beta mode")
    g.add_argument("--beta-warmup-steps", type=int, default=0, help="beta ramps up over these steps")
    g.add_argument("--gamma", type=float, default=0.05, help="weight of |KL - C| in capacity mode")
    g.add_argument("--capacity", type=float, default=0.05, help="target KL C, nats per style dimension")
    g.add_argument("--capacity-ramp-steps", type=int, default=None, help="C ramps up over these (default steps/2)")
    g.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR loss weighting (5.0 is common)")
    g.add_argument("--text-dropout", type=float, default=0.1, help="p(prompt -> '') for guidance")
    g.add_argument("--style-dropout", type=float, default=0.1, help="p(style branch skipped)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2000 tiny, 10000 SD)")
    g.add_argument("--batch-size", type=int, default=None, help="images per process and micro-batch (default: "
                   "32 tiny, 4 SD)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 tiny, 1e-5 SD)")
    g.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear LR warm-up steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine ends at lr * this")
    g.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW decoupled weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights (0: off)")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="autocast on GPU")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute U-Net blocks in backward")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g = p.add_argument_group("tiny VAE (phase 1 of --preset tiny)")
    g.add_argument("--vae-steps", type=int, default=400, help="VAE optimizer steps (default 400)")
    g.add_argument("--vae-lr", type=float, default=2e-3)
    g.add_argument("--vae-batch-size", type=int, default=32)
    g.add_argument("--vae-kl-weight", type=float, default=1e-4, help="KL weight (per latent element)")
    g = p.add_argument_group("outputs")
    g.add_argument("--output", default="runs/clue", help="run folder (default runs/clue)")
    g.add_argument("--log-every", type=int, default=10, help="log line every N steps")
    g.add_argument("--sample-every", type=int, default=500, help="sample grid every N steps (0: end only)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps (0: end only)")
    g.add_argument("--checkpoints-total-limit", type=int, default=3, help="keep the newest N checkpoints")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint folder, or 'latest' in --output")
    g.add_argument("--grid-taus", default="0,1,1,2,2,3,3,3",
                   help="grid columns: style temperature tau of each prior draw s ~ N(0, tau^2 I) (fixed seeds; "
                        "vanilla: columns are noise seeds)")
    g.add_argument("--grid-steps", type=int, default=25, help="DDIM steps of the grid")
    g.add_argument("--guidance", type=float, default=3.0, help="text guidance scale of the grid")
    g.add_argument("--diag-images", type=int, default=400, help="held-out images for the diagnostics")
    g.add_argument("--dump-param-checksum", action="store_true",
                   help="testing: every rank writes a checksum of its parameters (replicas must agree)")
    a = p.parse_args(argv)
    if (a.model is None) == (a.preset is None):
        p.error("give exactly one of --model PATH (fine-tune SD) or --preset tiny (from scratch)")
    if a.vae and not a.preset:
        p.error("--vae is for --preset tiny (a fine-tune takes the VAE from --model)")
    if a.prompt is not None and "{class}" not in a.prompt:
        p.error(f"--prompt {a.prompt!r} needs a {{class}} placeholder")
    if a.freeze_unet and a.style_tokens == 0:
        p.error("--freeze-unet with --style-tokens 0 leaves nothing to train")
    a.grid_taus = [float(x) for x in a.grid_taus.split(",")]
    for name, tiny, sd in (("resolution", 32, 512), ("steps", 2000, 10000), ("batch_size", 32, 4), ("lr", 1e-3, 1e-5)):
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.preset else sd)
    if min(a.steps, a.batch_size, a.grad_accum) < 1 or a.style_tokens < 0:
        p.error("--steps, --batch-size, --grad-accum must be >= 1 and --style-tokens >= 0")
    if a.capacity_ramp_steps is None:
        a.capacity_ramp_steps = a.steps // 2
    return a


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf: training stops, nothing of that state is written."""


# ------------------------------------------------------------------------------------ distributed
def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment variables; one process without them."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------ schedules, EMA
def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at an optimizer step: linear warm-up, then constant or half a cosine
    from 1 down to min_ratio (Loshchilov & Hutter 2017, SGDR without restarts)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of parameters: shadow <- decay * shadow + (1 - decay) * param, with the
    warm-up decay min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the random init."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {n: p.detach().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in named_params.items():
            self.shadow[n].lerp_(p.detach(), 1 - d)

    @contextmanager
    def applied(self, named_params: dict[str, torch.Tensor]):
        """Temporarily put the averaged weights into the model (samples, diagnostics, saving)."""
        backup = {n: p.detach().clone() for n, p in named_params.items()}
        with torch.no_grad():
            for n, p in named_params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named_params.items():
                    p.copy_(backup[n])


# ------------------------------------------------------------------------------------ RNG state
def get_rng_state(device) -> tuple[dict, dict]:
    """(tensors, json) of the torch (+CUDA), numpy and python generators of this process."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_keys.astype(np.int64)),
               "python": torch.tensor(py_internal, dtype=torch.int64)}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    return tensors, {"numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
                     "python": [py_version, py_gauss]}


def set_rng_state(tensors: dict, meta: dict, device) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"], device)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((meta["python"][0], tuple(tensors["python"].tolist()), meta["python"][1]))


@contextmanager
def rng_preserved(device):
    """Run side work (sample grids, diagnostics) without moving the training random streams."""
    state = get_rng_state(device)
    try:
        yield
    finally:
        set_rng_state(*state, device)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ data
class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (a permutation seeded by seed + epoch, every rank its own shard) that can
    start part-way into an epoch: the resumed run sees exactly the images the interrupted one would have."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip: int):
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


class BatchStream:
    """Endless batches over epochs; (epoch, batches taken in this epoch) is the position a checkpoint stores."""

    def __init__(self, dataset, batch_size, rank, world, seed, num_workers):
        self.sampler = ResumableSampler(dataset, world, rank, seed)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
        self.batch_size, self.epoch, self.taken, self.it = batch_size, 0, 0, None
        if len(self.sampler) // batch_size == 0:
            raise SystemExit(f"train.py: {len(dataset)} images give no full batch of {batch_size} per process "
                             f"({world} process(es)); lower --batch-size")

    def __next__(self):
        while True:
            if self.it is None:
                self.sampler.set_position(self.epoch, self.taken * self.batch_size)
                self.it = iter(self.loader)
            try:
                batch = next(self.it)
                self.taken += 1
                return batch
            except StopIteration:
                self.epoch, self.taken, self.it = self.epoch + 1, 0, None


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_dataset(data_arg, template, args, limit=None):
    from data import ClassFolderDataset, resolve_data
    try:
        return ClassFolderDataset(resolve_data(data_arg), template, args.resolution, args.random_crop, args.flip,
                                  limit_per_class=limit, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: --data {data_arg}: {e}") from None


# ------------------------------------------------------------------------------------ checkpoints
def write_folder_atomically(final: Path, fill) -> None:
    """fill(tmp) writes a whole folder under a temporary name; it is then renamed to `final` (atomic)."""
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    old = final.parent / f".old-{final.name}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output: Path) -> list[Path]:
    found = [d for d in (output / "checkpoints").glob("step_*")
             if d.name[5:].isdigit() and (d / "training_state.json").is_file()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def flatten_optimizer(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """AdamW state -> ({"optim.<param name>.<exp_avg|exp_avg_sq|step>": tensor}, JSON param groups)."""
    sd = opt.state_dict()
    tensors = {f"optim.{names[i]}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def unflatten_optimizer(opt, names: list[str], tensors: dict, meta: dict):
    state = {}
    for i, n in enumerate(names):
        moments = {k[len(f"optim.{n}."):]: v for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
        if moments:
            state[i] = moments
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------ log and plots
def append_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(output: Path):
    """loss_curve.png: VAE reconstruction (phase 1), diffusion loss, KL per style dimension vs step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vae, log = read_jsonl(output / "vae_log.jsonl"), [r for r in read_jsonl(output / "log.jsonl") if "mse" in r]
    panels = [p for p in (("VAE (phase 1)", vae, ("loss", "l1", "l2")), ("diffusion", log, ("loss", "mse")),
                          ("style KL", log, ("kl", "capacity"))) if p[1] and any(p[2][0] in r for r in p[1])]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, rows, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts and (k != "capacity" or any(v for _, v in pts)):  # no capacity line in beta mode
                ax.plot(*zip(*pts), label=k)
        ax.set(title=title, xlabel="step", yscale="log" if title != "style KL" else "linear")
        ax.set_ylabel("nats / dimension" if title == "style KL" else "loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = output / ".loss_curve.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, output / "loss_curve.png")


# ------------------------------------------------------------------------------------ phase 1: tiny VAE
class VAEObjective(nn.Module):
    """Phase 1 loss, means per element: |x - D(z)| + (x - D(z))^2 + kl_weight * KL(q(z|x) || N(0, I)),
    z ~ q(z|x): the LDM autoencoder objective (Rombach et al. 2022, Sec. 3.1) without LPIPS and GAN terms."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x):
        posterior = self.vae.encode(x)
        error = self.vae.decode(posterior.sample()) - x
        l1, l2 = error.abs().mean(), error.pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # (B,) sums -> nats per latent element
        return l1 + l2 + self.kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def train_vae(args, dataset, rank, world, device, output: Path):
    """Train the tiny VAE, set scale_factor = 1/std(latents), save it to output/vae; returns the VAE."""
    from convert import atomic_write_json, atomic_write_safetensors
    from sample import make_grid
    from vae import VAE, VAEConfig
    seed_everything(args.seed)
    vae = VAE(VAEConfig.tiny()).to(device)
    seed_everything(args.seed + rank)
    objective = VAEObjective(vae, args.vae_kl_weight)
    net = DDP(objective) if world > 1 else objective
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    warmup = max(1, min(50, args.vae_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, args.vae_steps, "cosine", 0.05))
    stream = BatchStream(dataset, args.vae_batch_size, rank, world, args.seed, args.num_workers)
    (output / "vae_log.jsonl").unlink(missing_ok=True)
    t0, bar = time.time(), tqdm(range(args.vae_steps), desc="phase 1: VAE", disable=rank != 0)
    for step in bar:
        loss, logs = net(next(stream)["image"].to(device))
        if not math.isfinite(all_reduce_sum([loss.item()], device)[0]):
            raise TrainingDiverged(f"VAE step {step}: loss {loss.item()} ({logs}); lower --vae-lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(l1=f"{logs['l1']:.4f}", kl=f"{logs['kl']:.2f}")
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.vae_steps):
            append_jsonl(output / "vae_log.jsonl", {"step": step + 1, "loss": loss.item(), **logs,
                                                    "seconds": round(time.time() - t0, 2)})
    vae.eval()
    with torch.no_grad():  # SD's 0.18215 is 1/std of its latents; ours is measured the same way
        picks = torch.linspace(0, len(dataset) - 1, min(512, len(dataset))).long().tolist()  # every class
        images = torch.stack([dataset[i]["image"] for i in picks]).to(device)
        z = torch.cat([vae.encode(images[i:i + 64]).mean for i in range(0, len(images), 64)])
        vae.cfg.scale_factor = float(1.0 / z.float().std())
        recon = torch.cat([vae(images[i:i + 64]) for i in range(0, len(images), 64)])
        l1 = (recon - images).abs().mean().item()
    if rank == 0:
        info = {"steps": args.vae_steps, "seconds": round(time.time() - t0, 1), "recon_l1": l1,
                "scale_factor": vae.cfg.scale_factor}

        def fill(tmp):
            atomic_write_safetensors(tmp / "model.safetensors", {f"vae.{k}": v for k, v in vae.state_dict().items()})
            atomic_write_json(tmp / "config.json", {"format": "clue-pytorch", "version": 1, "vae": asdict(vae.cfg),
                                                    "scale_factor": vae.cfg.scale_factor, "train": info})
        write_folder_atomically(output / "vae", fill)
        pairs = torch.cat([images[::32][:16], recon[::32][:16]]).clamp(-1, 1) / 2 + 0.5
        make_grid(pairs.cpu(), 16).save(output / "vae_recon.png")  # top: data, bottom: reconstructions
        print(f"phase 1: VAE trained in {info['seconds']} s, held-in L1 {l1:.4f}, scale_factor "
              f"{vae.cfg.scale_factor:.4f} -> {output / 'vae'}")
    barrier()
    return vae


def load_vae(path):
    """The VAE of a folder in our format (train.py's vae/, a CLUE checkpoint or a converted SD folder)."""
    from convert import config_from_dict, read_checkpoint_dir
    from vae import VAE, VAEConfig
    config, tensors = read_checkpoint_dir(path)
    if "vae" not in config:
        raise SystemExit(f"train.py: --vae {path}: config.json has no 'vae' entry")
    vae = VAE(config_from_dict(VAEConfig, config["vae"], "vae"))
    vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    vae.cfg.scale_factor = float(config.get("scale_factor", vae.cfg.scale_factor))
    return vae


# ------------------------------------------------------------------------------------ model
def build_model(args, dataset, rank, world, device, output: Path):
    """A fresh CLUE: on converted SD weights (--model) or the tiny preset (phase 1 VAE + random rest)."""
    from clue import CLUE, CLUEConfig
    from style_encoder import StyleConfig
    objective = dict(kl_mode=args.kl_mode, beta=args.beta, beta_warmup_steps=args.beta_warmup_steps,
                     gamma=args.gamma, capacity=args.capacity, capacity_ramp_steps=args.capacity_ramp_steps,
                     min_snr_gamma=args.min_snr_gamma, text_dropout=args.text_dropout,
                     style_dropout=args.style_dropout, image_size=args.resolution)
    sizes = {k: v for k, v in (("width", args.style_width), ("layers", args.style_layers)) if v}

    def style(base):
        return replace(base, tokens=args.style_tokens, **sizes) if args.style_tokens > 0 else None
    if args.model:
        from convert import load_stable_diffusion
        sd = load_stable_diffusion(args.model, prediction_type=args.prediction_type)
        base = replace(StyleConfig.sd(sd.unet.cfg.context_dim), latent_channels=sd.unet.cfg.in_channels)
        seed_everything(args.seed)
        return CLUE.from_stable_diffusion(sd, style(base), CLUEConfig(**objective))
    from text_encoder import TextConfig
    from unet import UNetConfig
    vae = load_vae(args.vae) if args.vae else train_vae(args, dataset, rank, world, device, output)
    unet = UNetConfig.tiny()
    if args.unet_channels:
        widths = tuple(int(c) for c in args.unet_channels.split(","))
        unet = UNetConfig.tiny(block_channels=widths, attention_levels=(True,) * len(widths),
                               num_heads=(4,) * len(widths))
    seed_everything(args.seed)
    # v-prediction by default (as SD 2.1, the paper's base): at high noise the v target is nearly -x0, exactly
    # what a style describes; on digits the encoder's style then lowers the held-out loss ~30 % (eps: ~7 %)
    objective.update(scale_factor=vae.cfg.scale_factor, prediction_type=args.prediction_type or "v_prediction")
    clue = CLUE.from_config(unet=unet, vae=vae.cfg, text=TextConfig.tiny(), style=style(StyleConfig.tiny()),
                            clue=CLUEConfig.tiny(**objective))
    clue.vae.load_state_dict(vae.state_dict())
    return clue


def select_trainable(clue, args) -> dict[str, nn.Parameter]:
    """VAE frozen; text encoder frozen unless --train-text-encoder; U-Net trained unless --freeze-unet (then
    only its style layers); the style encoder always."""
    from convert import is_style_param
    for name, p in clue.named_parameters():
        part = name.split(".")[0]
        train = {"vae": False, "text_encoder": args.train_text_encoder,
                 "unet": not args.freeze_unet or is_style_param(name)}.get(part, True)
        p.requires_grad_(train)
    return {n: p for n, p in clue.named_parameters() if p.requires_grad}


class LossModule(nn.Module):
    """DDP synchronises gradients of what runs through forward(): route CLUE.loss through it."""

    def __init__(self, clue):
        super().__init__()
        self.clue = clue

    def forward(self, batch, step):
        return self.clue.loss(batch, step)


# ------------------------------------------------------------------------------------ samples
@torch.no_grad()
def sample_grid(clue, prompts: list[str], names: list[str], args, path: Path, source: str = "prior"):
    """Rows: classes; the same initial noise in every cell, so a row shows what the style alone changes.
    source "prior": columns are prior draws at --grid-taus, the same draw down a column (CLUE's unprompted
    embeddings); "posterior_sample": each cell the mu of a random training image of its class (the aggregated
    posterior). Vanilla (no style branch): columns are noise seeds."""
    from PIL import Image, ImageDraw
    from sample import make_grid
    f = 2 ** (len(clue.vae.cfg.block_channels) - 1)
    rows, cols, C, h = len(prompts), len(args.grid_taus), clue.unet.cfg.in_channels, args.resolution // f
    gen = torch.Generator().manual_seed(args.seed)
    style = None
    if clue.style_encoder is None:
        latents = torch.randn((cols, C, h, h), generator=gen).repeat(rows, 1, 1, 1)
    else:
        latents = torch.randn((1, C, h, h), generator=gen).expand(rows * cols, -1, -1, -1)
        K, D = clue.style_encoder.cfg.tokens, clue.style_encoder.cfg.context_dim
        draws = torch.randn((cols, K, D), generator=gen) * torch.tensor(args.grid_taus)[:, None, None]
        style = draws.repeat(rows, 1, 1)  # cell (row r, column j) is index r * cols + j
        if source == "posterior_sample":
            style = clue.make_style(source, rows * cols, classes=[n for n in names for _ in range(cols)],
                                    generator=gen)
    images = clue.generate([p for p in prompts for _ in range(cols)], steps=args.grid_steps, guidance=args.guidance,
                           latents=latents, style=style, progress=False)
    grid = make_grid(images.float().cpu(), cols)
    zoom = max(1, 96 // args.resolution)  # 32 px digits are shown 3x larger (nearest: no smoothing)
    grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)
    margin_left, margin_top = 8 + 7 * max(len(n) for n in names), 16  # labels: class names, temperatures
    canvas = Image.new("RGB", (grid.width + margin_left, grid.height + margin_top), "white")
    canvas.paste(grid, (margin_left, margin_top))
    draw, cell = ImageDraw.Draw(canvas), (grid.width - 2) / cols
    for j, tau in enumerate(args.grid_taus):
        label = f"seed {j}" if clue.style_encoder is None else f"tau {tau:g}" if source == "prior" else f"image {j}"
        draw.text((margin_left + 2 + j * cell, 2), label, fill="black")
    for r, name in enumerate(names):
        draw.text((4, margin_top + 2 + (r + 0.4) * (grid.height - 2) / rows), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path.with_suffix(".tmp.png"))
    os.replace(path.with_suffix(".tmp.png"), path)


def style_spread(clue) -> list[float] | None:
    """Top eigenvalues of Cov_x(mu) over the training images (from the fitted posterior). N(0, I) has 1 in
    every direction; values >> 1 mean the style lives in a few directions wider than the prior, which prior
    draws under-explore (a per-dimension diagnostic cannot see this)."""
    if not clue.style_posterior:
        return None
    mus = torch.cat([p["mus"].flatten(1) for p in clue.style_posterior.values()]).double()  # (N, K*D)
    return [round(v, 3) for v in torch.linalg.eigvalsh(torch.cov(mus.T)).flip(0)[:5].tolist()]


def param_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ training state
def save_checkpoint(path: Path, clue, trainable, opt, sched, scaler, ema, stream, step, args, info, rank, world,
                    device):
    """Collective (every rank hands over its RNG state); rank 0 writes the folder atomically."""
    from convert import atomic_write_json, atomic_write_safetensors
    states = [get_rng_state(device)]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, get_rng_state(device))
    if rank != 0:
        return

    def fill(tmp: Path):
        with ema.applied(trainable) if ema else nullcontext():
            clue.save(tmp, extra=info)  # config.json + model.safetensors: what sample.py loads
        tensors = {f"param.{n}": p for n, p in trainable.items()}
        opt_tensors, opt_meta = flatten_optimizer(opt, list(trainable))
        tensors.update(opt_tensors)
        tensors.update({f"ema.{n}": t for n, t in ema.shadow.items()} if ema else {})
        for r, (rng_tensors, _) in enumerate(states):
            tensors.update({f"rng.{r}.{k}": v.cpu() for k, v in rng_tensors.items()})
        atomic_write_safetensors(tmp / "training_state.safetensors", tensors)
        atomic_write_json(tmp / "training_state.json", {  # written last: marks a complete checkpoint
            "step": step, "world_size": world, "optimizer": opt_meta, "lr_schedule": sched.state_dict(),
            "grad_scaler": scaler.state_dict() or None, "ema_updates": ema.updates if ema else None,
            "data_position": {"epoch": stream.epoch, "batches_taken": stream.taken, "batch_size": args.batch_size},
            "rng": [meta for _, meta in states], "diagnostics": clue.last_diagnostics, "args": vars(args)})
    write_folder_atomically(path, fill)
    for old in list_checkpoints(path.parent.parent)[:-args.checkpoints_total_limit or None]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(ckpt: Path, trainable, opt, sched, scaler, ema, stream, args, rank, world, device) -> int:
    """Restore everything save_checkpoint wrote (the model itself came from CLUE.load); returns the step."""
    from safetensors.torch import load_file
    meta = json.loads((ckpt / "training_state.json").read_text())
    tensors = load_file(str(ckpt / "training_state.safetensors"))
    missing = [n for n in trainable if f"param.{n}" not in tensors]
    if missing:
        raise SystemExit(f"train.py: {ckpt} holds no training state for {len(missing)} trainable parameters "
                         f"({missing[:3]}...): resume with the flags it was trained with (--freeze-unet, "
                         "--train-text-encoder, --style-tokens)")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(tensors[f"param.{n}"])
    unflatten_optimizer(opt, list(trainable), tensors, meta["optimizer"])
    sched.load_state_dict(meta["lr_schedule"])
    if meta["grad_scaler"]:
        scaler.load_state_dict(meta["grad_scaler"])
    if ema is not None and meta["ema_updates"] is not None:
        ema.shadow = {n: tensors[f"ema.{n}"].to(device) for n in trainable}
        ema.updates = meta["ema_updates"]
    stream.epoch, stream.taken = meta["data_position"]["epoch"], meta["data_position"]["batches_taken"]
    changed = {k: (v, getattr(args, k, None)) for k, v in meta["args"].items()
               if k not in ("resume", "steps", "output", "checkpoint_every", "sample_every", "log_every",
                            "checkpoints_total_limit", "dump_param_checksum") and getattr(args, k, None) != v}
    if changed and rank == 0:
        print(f"warning: resuming with other settings than {ckpt} was trained with (saved, now): {changed}")
    if meta["world_size"] == world:
        set_rng_state({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{rank}.")},
                      meta["rng"][rank], device)
    else:
        if rank == 0:
            print(f"warning: {ckpt} was written by {meta['world_size']} processes, this run has {world}: "
                  "data order and noise draws differ from an uninterrupted run")
        seed_everything(args.seed + rank + meta["step"])
    return meta["step"]


def mean_logs(logs: list[dict]) -> dict:
    keys = [k for k, v in logs[0].items() if isinstance(v, (int, float))]
    return {k: sum(d[k] for d in logs) / len(logs) for k in keys}


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device) -> dict:
    from clue import CLUE
    from data import default_prompt_template
    if args.mixed_precision != "no" and device.type != "cuda":
        raise SystemExit("train.py: --mixed-precision bf16/fp16 is for GPUs; on the CPU use --mixed-precision no")
    t_start, output = time.time(), Path(args.output)
    if rank == 0:
        (output / "checkpoints").mkdir(parents=True, exist_ok=True)
        for junk in (output / "checkpoints").glob(".*-step_*"):  # leftovers of a crash while writing
            shutil.rmtree(junk, ignore_errors=True)
    barrier()
    template = args.prompt or default_prompt_template(args.data)
    dataset = build_dataset(args.data, template, args, args.limit_per_class)
    if rank == 0:
        print(f"data: {len(dataset)} images in {dataset.num_classes} classes {dataset.class_counts}, prompts like "
              f"{dataset.prompts[0]!r}" + (f"; {len(dataset.skipped)} unreadable files skipped" if dataset.skipped
                                           else ""))
    resume = None
    if args.resume:
        found = list_checkpoints(output) if args.resume == "latest" else [Path(args.resume)]
        if not found and rank == 0:
            print(f"--resume latest: no checkpoint in {output / 'checkpoints'}, starting a new run")
        resume = found[-1] if found else None
        if resume is not None and not (resume / "training_state.json").is_file():
            raise SystemExit(f"train.py: --resume {resume}: not a checkpoint folder (no training_state.json)")

    # 1. the model: fresh (phase 1 VAE for the tiny preset) or from the checkpoint
    t0 = time.time()
    clue = CLUE.load(resume) if resume else build_model(args, dataset, rank, world, device, output)
    t_build = time.time() - t0
    clue.to(device)
    clue.unet.cfg.gradient_checkpointing = args.gradient_checkpointing  # read by UNet.forward
    trainable = select_trainable(clue, args)
    net = LossModule(clue)
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(trainable.values(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.warmup_steps, args.steps, args.lr_schedule, args.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=args.mixed_precision == "fp16")
    ema = EMA(trainable, args.ema_decay) if args.ema_decay > 0 else None
    stream = BatchStream(dataset, args.batch_size, rank, world, args.seed, args.num_workers)
    log_file = output / "log.jsonl"
    if resume:
        step = load_training_state(resume, trainable, opt, sched, scaler, ema, stream, args, rank, world, device)
        if rank == 0:  # drop log lines written after that checkpoint by the interrupted run
            kept = [r for r in read_jsonl(log_file) if r.get("step", 0) <= step]
            log_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
            print(f"resumed from {resume} at step {step}")
    else:
        step = 0
        if rank == 0:
            log_file.unlink(missing_ok=True)
        seed_everything(args.seed + rank)  # every rank its own noise; the weights are identical (DDP)
    n_train = sum(p.numel() for p in trainable.values())
    if rank == 0:
        print(f"model: {sum(p.numel() for p in clue.parameters()) / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M "
              f"trained; style tokens {args.style_tokens}; {world} process(es) on {device}")
    val_loader = None
    if rank == 0:
        val_arg = args.val_data or ("digits:test" if args.data in ("digits", "digits:train") else None)
        val_set = build_dataset(val_arg, template, args) if val_arg else dataset
        val_loader = DataLoader(val_set, batch_size=min(64, len(val_set)), shuffle=False)
    info = {"prompt_template": template, "class_names": dataset.class_names, "data": str(args.data),
            "limit_per_class": args.limit_per_class, "resolution": args.resolution, "args": vars(args)}

    def side_work(checkpoint: bool, grid: Path | None, final: bool = False):
        """Samples, diagnostics, checkpoint: with the EMA weights, without touching the training RNG."""
        if rank == 0:
            with rng_preserved(device), ema.applied(trainable) if ema else nullcontext():
                if final and clue.style_encoder is not None:
                    fit_loader = DataLoader(dataset, batch_size=64, shuffle=False)
                    clue.fit_style_posterior(fit_loader)  # the aggregated posterior, per class
                if checkpoint:
                    diag = clue.diagnostics(val_loader, max_batches=math.ceil(args.diag_images / val_loader.batch_size),
                                            seed=args.seed)
                    append_jsonl(log_file, {"step": step, "event": "diagnostics", **diag})
                    print("\n" + f"step {step} diagnostics: " + ", ".join(
                        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in diag.items()))
                if grid is not None:
                    sample_grid(clue, dataset.prompts, dataset.class_names, args, grid)
                if final and clue.style_encoder is not None:
                    sample_grid(clue, dataset.prompts, dataset.class_names, args,
                                output / "samples_posterior.png", source="posterior_sample")
                plot_curves(output)
        if checkpoint:
            info["step"] = step
            save_checkpoint(output / "checkpoints" / f"step_{step:06d}", clue, trainable, opt, sched, scaler, ema,
                            stream, step, args, info, rank, world, device)
        barrier()

    # 2. the training loop
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    net.train()
    t_loop, window, start_step = time.time(), [], step
    bar = tqdm(total=args.steps, initial=step, desc="phase 2: CLUE", disable=rank != 0)
    while step < args.steps:
        micro_logs = []
        for micro in range(args.grad_accum):
            batch = to_device(next(stream), device)
            sync = world == 1 or micro == args.grad_accum - 1  # DDP all-reduces gradients on the last one only
            with nullcontext() if sync else net.no_sync():
                with autocast:
                    loss, logs = net(batch, step)
                bad = all_reduce_sum([float(not math.isfinite(loss.item()))], device)[0]
                if bad:
                    last = list_checkpoints(output)
                    raise TrainingDiverged(
                        f"step {step}: the loss is {loss.item()} on {int(bad)} process(es) (logs {logs}). Training "
                        f"stopped; nothing was written for this state. Last good checkpoint: "
                        f"{last[-1] if last else 'none'}. Try a lower --lr, --max-grad-norm 1, fp32/bf16 "
                        "instead of fp16, or check the data.")
                scaler.scale(loss / args.grad_accum).backward()
            micro_logs.append(logs)
        scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(trainable.values(), args.max_grad_norm or float("inf"))
        lr = opt.param_groups[0]["lr"]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if ema:
            ema.update(trainable)
        step += 1
        window.append({**mean_logs(micro_logs), "lr": lr, "grad_norm": grad_norm.item()})
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1]['loss']:.4f}", kl=f"{window[-1].get('kl', 0):.3f}")
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            append_jsonl(log_file, {"step": step, **mean_logs(window), "seconds": round(time.time() - t_loop, 2)})
            window = []
        if step < args.steps:
            checkpoint = args.checkpoint_every > 0 and step % args.checkpoint_every == 0
            grid = output / "samples" / f"step_{step:06d}.png" if args.sample_every > 0 and \
                step % args.sample_every == 0 else None
            if checkpoint or grid:
                side_work(checkpoint, grid)
    bar.close()
    t_train = time.time() - t_loop

    # 3. the end: aggregated posterior, diagnostics, the grid, the last checkpoint and the final model
    t0 = time.time()
    side_work(True, output / "samples.png", final=True)
    if rank == 0:
        with ema.applied(trainable) if ema else nullcontext():
            write_folder_atomically(output / "final", lambda tmp: clue.save(tmp, extra=info))
    if args.dump_param_checksum:  # every rank: replicas must hold the same weights
        sums = {"params": param_checksum(trainable), "ema": param_checksum(ema.shadow) if ema else None}
        (output / f"param_checksum.rank{rank}.json").write_text(json.dumps(sums))
    summary = {"steps": step, "steps_this_run": step - start_step, "world_size": world, "device": str(device),
               "seconds": {"vae_phase_and_model": round(t_build, 1), "train_loop": round(t_train, 1),
                           "final_posterior_diagnostics_grid_save": round(time.time() - t0, 1),
                           "total": round(time.time() - t_start, 1)},
               "trained_parameters": n_train, "diagnostics": clue.last_diagnostics,
               "style_mu_covariance_top_eigenvalues": style_spread(clue),
               "outputs": {"final_model": str(output / "final"), "grid": str(output / "samples.png"),
                           "loss_curve": str(output / "loss_curve.png"), "log": str(log_file)}}
    if rank == 0:
        from convert import atomic_write_json
        atomic_write_json(output / "summary.json", summary)
        print(json.dumps(summary, indent=1))
    barrier()
    return summary


if __name__ == "__main__":
    try:
        main()
    except TrainingDiverged as e:
        print(f"train.py: training diverged: {e}", file=sys.stderr)
        sys.exit(1)
