"""What makes a training run resumable and reproducible, and phase 1 of --preset tiny (the tiny VAE).

A checkpoint `checkpoints/step_NNNNNN/` is filled under a temporary name, then renamed (a crash leaves the older
ones intact). It holds the EMA model (save_clue: what sample.py loads) and, in checkpoint.py's one format (kind
"training_state"), raw weights, AdamW moments, EMA, LR schedule, GradScaler, every rank's torch / numpy / python
RNG states and the data position: N + N steps on CPU are bit-identical to 2N steps. Also here: torchrun processes,
the LR schedule (warm-up, then cosine, Loshchilov & Hutter 2017, or constant), the EMA, the data stream and its VAE
latent cache, divergence checks, the log files.
Left out: data-loader worker RNG (with --num-workers > 0 the image order resumes exactly, crops/flips do not).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from checkpoint import (CheckpointError, as_clue, atomic_write, read_training_state, save_clue, save_vae,
                        write_checkpoint, write_folder_atomically)
from cli import UsageError
from clue import CLUE
from convert import load_stable_diffusion
from data import make_grid
from vae import VAE, VAEConfig

STATE_FILES = {"json_name": "training_state.json", "tensors_name": "training_state.safetensors"}


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's environment (a process per GPU, LOCAL_RANK's), else one on --device."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


class Objective(nn.Module):
    """DDP synchronises the gradients of what runs through forward(): a model's loss function, as a module."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *inputs):
        return self.loss(self.model, *inputs)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at a step: linear warm-up, then constant or half a cosine from 1 to min_ratio."""
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
        torch._foreach_lerp_([self.shadow[n] for n in named_params], [p.detach() for p in named_params.values()], 1 - d)

    @contextmanager
    def applied(self, named_params: dict[str, torch.Tensor]):
        """Temporarily put the averaged weights into the model (samples, diagnostics, saving)."""
        backup = {n: p.detach().clone() for n, p in named_params.items()}
        copy_into(named_params, self.shadow)
        try:
            yield
        finally:
            copy_into(named_params, backup)


@torch.no_grad()
def copy_into(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]):
    for n, p in params.items():
        p.copy_(values[n])


def get_rng_state(device) -> tuple[dict, dict]:
    """(tensors, json) of the torch (+CUDA), numpy and python generators of this process."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_keys.astype(np.int64)),
               "python": torch.tensor(py_internal, dtype=torch.int64),
               **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
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


class BatchStream:
    """Endless batches, epoch after epoch of torch's DistributedSampler (a permutation seeded by seed + epoch, every
    rank its own shard). (epoch, batches taken in it) is the position a checkpoint stores: a resumed run starts
    there and sees exactly the images the interrupted one would have. pin_memory (CUDA): copies to the GPU overlap."""

    def __init__(self, dataset, batch_size, rank, world, seed, num_workers, pin_memory=False):
        self.sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
        if self.sampler.num_samples < batch_size:
            raise UsageError(f"{len(dataset)} images give no full batch of {batch_size} per process ({world} "
                             "process(es)); lower --batch-size (or --vae-batch-size)")
        self.dataset, self.batch_size, self.loader_kw = dataset, batch_size, dict(  # generator: the workers' seeds
            num_workers=num_workers, generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory)
        self.epoch, self.taken, self.it = 0, 0, None

    def __next__(self):
        while True:
            if self.it is None:
                self.sampler.set_epoch(self.epoch)
                order = list(self.sampler)[self.taken * self.batch_size:]
                self.it = iter(DataLoader(self.dataset, self.batch_size, sampler=order, drop_last=True,
                                          **self.loader_kw))
            batch = next(self.it, None)
            if batch is not None:
                self.taken += 1
                return batch
            self.epoch, self.taken, self.it = self.epoch + 1, 0, None  # the epoch is over


def cache_latents(dataset, vae: VAE, device, batch_size: int) -> list[dict]:
    """The dataset's items with the image replaced by its VAE posterior q(z|x) (mean and logvar stacked on channels:
    "posterior", CLUE.encode_images' `moments`), computed once, batched: exact while nothing random changes an image
    (no crop or flip); a sampled z0 (CLUEConfig.sample_latents) is still drawn every step."""
    with torch.no_grad():  # every image once, in order
        qs = [vae.encode(batch["image"].to(device)) for batch in DataLoader(dataset, batch_size)]
    return [{"posterior": m, "prompt": dataset.prompts[label], "label": label, "path": path} for m, (path, label) in
            zip(torch.cat([torch.cat([q.mean, q.logvar], 1).float().cpu() for q in qs]), dataset.samples)]


@dataclass
class TrainingState:
    """What a checkpoint saves and restores besides the model's config, and the process that holds it."""
    clue: CLUE
    trainable: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: EMA | None
    stream: BatchStream
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def ema_applied(self):
        return self.ema.applied(self.trainable) if self.ema else nullcontext()


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN or inf: training stops, nothing of that state is written."""


def mean_logs(logs: list[dict]) -> dict:
    """The mean of every number (float or tensor: kept a tensor, no device sync) over steps or micro-batches."""
    numbers = [k for k, v in logs[0].items() if isinstance(v, (int, float, torch.Tensor))]
    return {k: sum(d[k] for d in logs) / len(logs) for k in numbers}


@torch.no_grad()
def check_health(state: TrainingState, window: list[dict], step: int, output: Path):
    """Before a log, grid or checkpoint (one device sync): the losses (of every process) and gradient norms (not fp16's:
    GradScaler skips those steps) of the steps since the last log, the last one `step`, and the trained weights (a
    NaN / inf makes the sum one) finite; else TrainingDiverged at the first bad step."""
    bad = torch.stack([torch.stack([~w["loss"].isfinite(), ~w["grad_norm"].isfinite()]) for w in window]).double()
    if dist.is_initialized():
        dist.all_reduce(bad)  # processes with a non-finite loss (the gradient norms agree: DDP)
    for i, (bad_loss, bad_norm) in enumerate(bad.tolist()):
        at, logs = step - len(window) + i, {k: round(float(v), 6) for k, v in window[i].items()}
        if bad_loss or (bad_norm and not state.scaler.is_enabled()):
            raise diverged(at, f"the loss is {logs['loss']} on {int(bad_loss)} process(es) (logs {logs})" if bad_loss
                           else f"the gradient norm is {logs['grad_norm']} while the loss is finite", output)
    if not torch.stack([p.sum() for p in state.trainable.values()]).sum().isfinite():
        bad = [n for n, p in state.trainable.items() if not p.isfinite().all()]
        raise diverged(step, f"the update made weights NaN/inf or huge ({len(bad)} tensors NaN/inf: {bad[:2]})", output)


def diverged(step: int, what: str, output: Path) -> TrainingDiverged:
    return TrainingDiverged(f"step {step}: {what}. Training stopped; nothing was written for this state. Last good "
                            f"checkpoint: {(list_checkpoints(output) or ['none'])[-1]}. Try a lower --lr, "
                            "--max-grad-norm 1, fp32/bf16 instead of fp16, or check the data.")


def list_checkpoints(output: Path) -> list[Path]:
    """The step_NNNNNN folders of a run, oldest first (one being written has a hidden temporary name)."""
    return sorted((d for d in (output / "checkpoints").glob("step_*") if d.name[5:].isdigit()),
                  key=lambda d: int(d.name[5:]))


def flatten_optimizer(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """AdamW state -> ({"optim.<param name>.<exp_avg|exp_avg_sq|step>": tensor}, JSON param groups)."""
    sd = opt.state_dict()
    tensors = {f"optim.{names[i]}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def unflatten_optimizer(opt, names: list[str], tensors: dict, meta: dict):
    state = {i: m for i, n in enumerate(names)
             if (m := {k[len(f"optim.{n}."):]: v for k, v in tensors.items() if k.startswith(f"optim.{n}.")})}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path: Path, state: TrainingState, step: int, args, info: dict):
    """Collective (every rank hands over its RNG state); rank 0 writes the folder atomically, then deletes all but
    the newest --checkpoints-total-limit."""
    rngs = [get_rng_state(state.device)] * state.world
    if state.world > 1:
        dist.all_gather_object(rngs, rngs[0])  # every rank's
    if state.rank != 0:
        return

    def fill(tmp: Path):
        with state.ema_applied():
            save_clue(state.clue, tmp, extra=info, base=args.model)  # what sample.py loads (LoRA: lora.safetensors)
        opt_tensors, opt_meta = flatten_optimizer(state.opt, list(state.trainable))
        tensors = {**{f"param.{n}": p for n, p in state.trainable.items()}, **opt_tensors,
                   **({f"ema.{n}": t for n, t in state.ema.shadow.items()} if state.ema else {}),
                   **{f"rng.{r}.{k}": v.cpu() for r, (rng, _) in enumerate(rngs) for k, v in rng.items()}}
        write_checkpoint(tmp, "training_state", {
            "step": step, "world_size": state.world, "optimizer": opt_meta, "lr_schedule": state.sched.state_dict(),
            "grad_scaler": state.scaler.state_dict() or None, "ema_updates": state.ema.updates if state.ema else None,
            "data_position": {"epoch": state.stream.epoch, "batches_taken": state.stream.taken,
                              "batch_size": args.batch_size},
            "rng": [meta for _, meta in rngs], "diagnostics": state.clue.last_diagnostics, "args": vars(args)},
            tensors, **STATE_FILES)
    write_folder_atomically(path, fill)
    for old in list_checkpoints(path.parent.parent)[:-args.checkpoints_total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(resume: str, output: Path, rank: int) -> tuple[Path, CLUE, dict, dict] | None:
    """--resume PATH or 'latest' -> (folder, EMA model, state config, state tensors) of the newest intact checkpoint
    (None: none yet). A broken one (a file missing, truncated, corrupt) gets a warning line; the one before is tried."""
    candidates, problems = list_checkpoints(output) if resume == "latest" else [Path(resume)], []
    for folder in reversed(candidates):
        try:
            config, tensors = read_training_state(folder, **STATE_FILES)
            return folder, as_clue(load_stable_diffusion(folder, merge_lora=False), folder), config, tensors
        except (CheckpointError, FileNotFoundError) as e:
            problems.append(f"{folder}: {e}")
            if rank == 0 and folder != candidates[0]:
                print(f"warning: --resume {resume}: {folder} is broken ({e}); trying the one before", file=sys.stderr)
    if problems:
        raise UsageError(f"--resume {resume}: no intact checkpoint; " + "; ".join(problems))
    if rank == 0:
        print(f"--resume latest: no checkpoint in {output / 'checkpoints'}, starting a new run")


def restore(state: TrainingState, ckpt: Path, meta: dict, tensors: dict, args) -> int:
    """Put back what save_checkpoint wrote (the model itself came from find_checkpoint); returns the step."""
    missing = [n for n in state.trainable if f"param.{n}" not in tensors]
    if missing:
        raise UsageError(f"--resume: {ckpt} holds no training state for {len(missing)} trained parameters "
                         f"({missing[:3]}...); use its flags (--freeze-unet, --train-text-encoder, --style-tokens)")
    copy_into(state.trainable, {n: tensors[f"param.{n}"] for n in state.trainable})
    unflatten_optimizer(state.opt, list(state.trainable), tensors, meta["optimizer"])
    state.sched.load_state_dict(meta["lr_schedule"])
    if meta["grad_scaler"]:
        state.scaler.load_state_dict(meta["grad_scaler"])
    if state.ema is not None and meta["ema_updates"] is not None:
        state.ema.shadow = {n: tensors[f"ema.{n}"].to(state.device) for n in state.trainable}
        state.ema.updates = meta["ema_updates"]
    state.stream.epoch, state.stream.taken = meta["data_position"]["epoch"], meta["data_position"]["batches_taken"]
    changed = {k: (v, getattr(args, k, None)) for k, v in meta["args"].items()
               if k not in ("resume", "steps", "output", "checkpoint_every", "sample_every", "log_every",
                            "checkpoints_total_limit", "dump_param_checksum") and getattr(args, k, None) != v}
    if changed and state.rank == 0:
        print(f"warning: {ckpt} was trained with other settings (saved, now): {changed}", file=sys.stderr)
    if meta["world_size"] == state.world:
        set_rng_state({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{state.rank}.")},
                      meta["rng"][state.rank], state.device)
        return meta["step"]
    if state.rank == 0:
        print(f"warning: {ckpt} was written by {meta['world_size']} processes, this run has {state.world}: data "
              "order and noise draws differ from an uninterrupted run", file=sys.stderr)
    seed_everything(args.seed + state.rank + meta["step"])
    return meta["step"]


def param_checksum(tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(n.encode() + tensors[n].detach().cpu().contiguous().numpy().tobytes()
                                   for n in sorted(tensors))).hexdigest()


def write_param_checksums(state: TrainingState, output: Path) -> None:
    """--dump-param-checksum (tests): every rank writes the hash of its weights and EMA; replicas must agree."""
    sums = {"params": param_checksum(state.trainable), "ema": param_checksum(state.ema.shadow) if state.ema else None}
    (output / f"param_checksum.rank{state.rank}.json").write_text(json.dumps(sums))


def append_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl log; a line cut short by a crash is left out."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def plot_curves(output: Path):
    """loss_curve.png: VAE reconstruction (phase 1), diffusion loss, KL per style dimension and (with
    --mmd-weight) the MMD of the batch styles to N(0, I), against the step."""
    import matplotlib  # lazy: a heavy import (~1 s) that only this plot needs
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vae, log = read_jsonl(output / "vae_log.jsonl"), [r for r in read_jsonl(output / "log.jsonl") if "mse" in r]
    panels = [p for p in (("VAE (phase 1)", vae, ("loss", "l1", "l2")), ("diffusion", log, ("loss", "mse")),
                          ("style KL", log, ("kl", "capacity")), ("style MMD to N(0, I)", log, ("mmd",)))
              if any(p[2][0] in r for r in p[1])]
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
        ax.set(title=title, xlabel="step", yscale="linear" if title.startswith("style") else "log",
               ylabel={"style KL": "nats / dimension", "style MMD to N(0, I)": "per dimension"}.get(title, "loss"))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(output / "loss_curve.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def vae_loss(vae: VAE, x: torch.Tensor, kl_weight: float):
    """Phase 1 loss, means per element: |x - D(z)| + (x - D(z))^2 + kl_weight * KL(q(z|x) || N(0, I)),
    z ~ q(z|x): the LDM autoencoder objective (Rombach et al. 2022, Sec. 3.1) without LPIPS and GAN terms."""
    posterior = vae.encode(x)
    error = vae.decode(posterior.sample()) - x
    l1, l2 = error.abs().mean(), error.pow(2).mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # (B,) sums -> nats per latent element
    return l1 + l2 + kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def train_vae(args, dataset, rank, world, device, output: Path) -> VAE:
    """Train the tiny VAE, set scale_factor = 1/std(latents), save it to output/vae (kind "vae")."""
    seed_everything(args.seed)
    vae = VAE(VAEConfig.tiny()).to(device)
    seed_everything(args.seed + rank)
    net = Objective(vae, lambda vae, x: vae_loss(vae, x, args.vae_kl_weight))
    net = DDP(net) if world > 1 else net
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, fused=device.type in ("cpu", "cuda"))
    warmup = max(1, min(50, args.vae_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, args.vae_steps, "cosine", 0.05))
    stream = BatchStream(dataset, args.vae_batch_size, rank, world, args.seed, args.num_workers)
    (output / "vae_log.jsonl").unlink(missing_ok=True)
    t0, bar = time.time(), tqdm(range(args.vae_steps), desc="phase 1: VAE", disable=rank != 0)
    for step in bar:
        loss, logs = net(next(stream)["image"].to(device))
        total = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(total)  # a non-finite loss on any process stops them all
        if not math.isfinite(total.item()):
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
    if not (math.isfinite(vae.cfg.scale_factor) and math.isfinite(l1)):  # an update made weights non-finite
        raise TrainingDiverged(f"VAE: latents or reconstructions NaN/inf after {args.vae_steps} steps; lower --vae-lr")
    if rank == 0:
        info = {"steps": args.vae_steps, "seconds": round(time.time() - t0, 1), "recon_l1": l1}
        write_folder_atomically(output / "vae", lambda tmp: save_vae(vae, tmp, info))
        pairs = torch.cat([images[::32][:16], recon[::32][:16]]).clamp(-1, 1) / 2 + 0.5
        grid = make_grid(pairs.cpu(), 16)  # top: data, bottom: reconstructions
        atomic_write(output / "vae_recon.png", lambda tmp: grid.save(tmp, format="PNG"))
        print(f"phase 1: VAE trained in {info['seconds']} s, held-in L1 {l1:.4f}, scale_factor "
              f"{vae.cfg.scale_factor:.4f} -> {output / 'vae'}")
    barrier()
    return vae
