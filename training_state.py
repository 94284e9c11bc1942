"""What makes a training run resumable and reproducible: the state a checkpoint holds and the code that writes
and restores it. Used by train.py (phase 2) and train_vae.py (phase 1 of --preset tiny).

A checkpoint is a folder `checkpoints/step_NNNNNN/` written under a temporary name and renamed into place
(write_folder_atomically: a crash leaves the previous checkpoints intact): `config.json` + `model.safetensors`
(CLUE.save: the EMA weights, loadable by sample.py) and `training_state.safetensors` + `training_state.json`
(raw weights, AdamW moments flattened to one tensor per parameter and moment, EMA, LR-schedule and GradScaler
state, the torch / numpy / python RNG states of every rank, the data-loader position). No pickle anywhere.
load_training_state restores all of it, so on CPU N + N steps give bit-identical weights to 2N uninterrupted
steps; rng_preserved lets samples and diagnostics run in between without moving the training random streams.

Here, in order: the processes of a torchrun launch (rank, world size, barrier, all-reduce); the learning-rate
schedule (linear warm-up, then cosine, Loshchilov & Hutter 2017, or constant) and the EMA of the weights; the RNG
states; the data position (ResumableSampler, BatchStream); checkpoint folders and their rotation; AdamW state
<-> named tensors; save_checkpoint / load_training_state; a parameter checksum (DDP replicas must agree).

Left out: data-loader worker RNG restoration (with --num-workers > 0 the order of images still resumes exactly,
random crops/flips do not).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from checkpoint import atomic_write_json, atomic_write_safetensors, config_from_dict, read_checkpoint_dir, save_clue
from data import make_grid
from vae import VAE, VAEConfig


# ------------------------------------------------------------------------------------ processes (torchrun)
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


# ------------------------------------------------------------------------------------ data position
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


# ------------------------------------------------------------------------------------ checkpoint folders
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


# ------------------------------------------------------------------------------------ training state
class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf: training stops, nothing of that state is written."""


def save_checkpoint(path: Path, clue, trainable, opt, sched, scaler, ema, stream, step, args, info, rank, world,
                    device):
    """Collective (every rank hands over its RNG state); rank 0 writes the folder atomically."""
    states = [get_rng_state(device)]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, get_rng_state(device))
    if rank != 0:
        return

    def fill(tmp: Path):
        with ema.applied(trainable) if ema else nullcontext():
            save_clue(clue, tmp, extra=info)  # config.json + model.safetensors: what sample.py loads
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
    """Restore everything save_checkpoint wrote (the model itself came from load_clue); returns the step."""
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


def param_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ the run's log files
def append_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(output: Path):
    """loss_curve.png: VAE reconstruction (phase 1), diffusion loss, KL per style dimension and (with
    --mmd-weight) the MMD of the batch styles to N(0, I), against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vae, log = read_jsonl(output / "vae_log.jsonl"), [r for r in read_jsonl(output / "log.jsonl") if "mse" in r]
    panels = [p for p in (("VAE (phase 1)", vae, ("loss", "l1", "l2")), ("diffusion", log, ("loss", "mse")),
                          ("style KL", log, ("kl", "capacity")), ("style MMD to N(0, I)", log, ("mmd",)))
              if p[1] and any(p[2][0] in r for r in p[1])]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, rows, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts and (k != "capacity" or any(v for _, v in pts)):  # no capacity line in beta mode
                ax.plot(*zip(*pts), label=k)
            if k == "mmd" and len(pts) > 10:  # the first steps (a random encoder, MMD ~ 20) would flatten the rest
                later = [v for _, v in pts[len(pts) // 10:]]
                ax.set_ylim(min(later) - 0.1 * abs(min(later)), 1.2 * max(later))
        ax.set(title=title, xlabel="step", yscale="linear" if title.startswith("style") else "log")
        ax.set_ylabel({"style KL": "nats / dimension", "style MMD to N(0, I)": "per dimension"}.get(title, "loss"))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = output / ".loss_curve.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, output / "loss_curve.png")


# ------------------------------------------------------------------------------------ phase 1: the tiny VAE
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
    config, tensors = read_checkpoint_dir(path)
    if "vae" not in config:
        raise SystemExit(f"train.py: --vae {path}: config.json has no 'vae' entry")
    vae = VAE(config_from_dict(VAEConfig, config["vae"], "vae"))
    vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    vae.cfg.scale_factor = float(config.get("scale_factor", vae.cfg.scale_factor))
    return vae
