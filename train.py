"""train.py: train CLUE (or the vanilla baseline) on a folder of labelled images.

CLUE (Park et al., arXiv 2511.10993) fine-tunes Stable Diffusion with a KL-regularised Style Encoder
whose tokens feed a second cross-attention layer; the objective itself is `CLUE.loss` in clue.py
(diffusion MSE + beta * KL or gamma * |KL - C|). This file is the training PROGRAM around it:

  from a public SD checkpoint  (--model PATH): VAE and text encoder frozen, U-Net + style encoder trained;
  from scratch (--preset tiny): phase 1 trains the tiny VAE (L1 + L2 reconstruction + a small KL, as the
      LDM autoencoders without their GAN/LPIPS terms; Rombach et al. 2022, Sec. 3.1) and sets its latent
      scale factor to 1/std of the latents (how SD's 0.18215 was chosen); phase 2 trains the U-Net and the
      style encoder and the text encoder (everything but the VAE of phase 1; --no-train-text-encoder keeps the
      random text features, which already tell a few fixed-format prompts apart, and saves ~15 % per CPU step).

Optimisation: AdamW (Loshchilov & Hutter 2019), linear warm-up then cosine or constant learning rate,
gradient clipping, gradient accumulation, an EMA of the weights (used for samples, diagnostics and the
saved model), autocast on GPU (GradScaler for fp16). Multi-GPU: `torchrun` sets RANK / WORLD_SIZE /
LOCAL_RANK; DistributedDataParallel averages gradients (nccl on GPU, gloo on CPU); rank 0 writes every file.

Checkpoints: `checkpoints/step_NNNNNN/` every --checkpoint-every steps, written atomically, the newest
--checkpoints-total-limit kept. Each holds the EMA model (loadable by sample.py) and everything the run needs
to go on: `--resume` continues it so that on CPU N + N steps give bit-identical weights to 2N uninterrupted steps.

Here: the arguments, the model (build_model, select_trainable), the sample grids and the loop (train), top to
bottom. Beside it:
  training_state.py  what makes a run resumable and reproducible: the checkpoint format, save_checkpoint /
                     load_training_state, RNG states, the data position, LR schedule, EMA, torchrun helpers
  train_vae.py       phase 1 of --preset tiny: the tiny VAE
  train_log.py       log.jsonl, vae_log.jsonl and loss_curve.png

Left out: LoRA, prior preservation, multi-node launch helpers, data-loader worker RNG restoration
(with --num-workers > 0 the order of images still resumes exactly, random crops/flips do not).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from checkpoint import atomic_write_json, load_clue, save_clue
from unet import is_style_param
from training_state import (append_jsonl, plot_curves, read_jsonl, load_vae, train_vae, EMA, BatchStream, TrainingDiverged, all_reduce_sum, barrier, list_checkpoints,
                            load_training_state, lr_factor, param_checksum, rng_preserved, save_checkpoint,
                            seed_everything, setup_distributed, write_folder_atomically)

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
    g.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="train the text encoder too (default: yes from scratch with --preset tiny, where it starts "
                        "random; no with --model, where it is the pretrained CLIP)")
    g = p.add_argument_group("objective (CLUEConfig)")
    g.add_argument("--kl-mode", choices=("beta", "capacity"), default="capacity",
                   help="beta * KL, or gamma * |KL - C| (default capacity)")
    g.add_argument("--beta", type=float, default=1e-2, help="weight of the KL per dimension in beta mode")
    g.add_argument("--beta-warmup-steps", type=int, default=0, help="beta ramps up over these steps")
    g.add_argument("--gamma", type=float, default=0.2, help="weight of |KL - C| in capacity mode")
    g.add_argument("--capacity", type=float, default=0.1, help="target KL C, nats per style dimension")
    g.add_argument("--capacity-ramp-steps", type=int, default=None, help="C ramps up over these (default steps/2)")
    g.add_argument("--mmd-weight", type=float, default=0.1,
                   help="lambda: weight of MMD^2(aggregated posterior, N(0, I)) per style dimension, which keeps "
                        "prior draws at tau 1 on the styles of the data (StyleEncoder.prior_mmd; 0: off)")
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
    g.add_argument("--grid-taus", default="0,1,1,1,1,1,2,3",
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
    for name, tiny, sd in (("resolution", 32, 512), ("steps", 2000, 10000), ("batch_size", 32, 4), ("lr", 1e-3, 1e-5),
                           ("train_text_encoder", True, False)):
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.preset else sd)
    if min(a.steps, a.batch_size, a.grad_accum) < 1 or a.style_tokens < 0:
        p.error("--steps, --batch-size, --grad-accum must be >= 1 and --style-tokens >= 0")
    if a.capacity_ramp_steps is None:
        a.capacity_ramp_steps = a.steps // 2
    return a


# ------------------------------------------------------------------------------------ data
def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_dataset(data_arg, template, args, limit=None):
    from data import ClassFolderDataset, resolve_data
    try:
        return ClassFolderDataset(resolve_data(data_arg), template, args.resolution, args.random_crop, args.flip,
                                  limit_per_class=limit, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: --data {data_arg}: {e}") from None


# ------------------------------------------------------------------------------------ model
def build_model(args, dataset, rank, world, device, output: Path):
    """A fresh CLUE: on converted SD weights (--model) or the tiny preset (phase 1 VAE + random rest)."""
    from clue import CLUE, CLUEConfig
    from style_encoder import StyleConfig
    objective = dict(kl_mode=args.kl_mode, beta=args.beta, beta_warmup_steps=args.beta_warmup_steps,
                     gamma=args.gamma, capacity=args.capacity, capacity_ramp_steps=args.capacity_ramp_steps,
                     mmd_weight=args.mmd_weight, min_snr_gamma=args.min_snr_gamma, text_dropout=args.text_dropout,
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
    """VAE frozen; text encoder trained with --train-text-encoder (default for --preset tiny); U-Net trained unless
    --freeze-unet (then only its style layers); the style encoder always."""
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
    from data import make_grid
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
    clue = load_clue(resume) if resume else build_model(args, dataset, rank, world, device, output)
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
            write_folder_atomically(output / "final", lambda tmp: save_clue(clue, tmp, extra=info))
    if args.dump_param_checksum:  # every rank: replicas must hold the same weights
        sums = {"params": param_checksum(trainable), "ema": param_checksum(ema.shadow) if ema else None}
        (output / f"param_checksum.rank{rank}.json").write_text(json.dumps(sums))
    summary = {"steps": step, "steps_this_run": step - start_step, "world_size": world, "device": str(device),
               "seconds": {"vae_phase_and_model": round(t_build, 1), "train_loop": round(t_train, 1),
                           "final_posterior_diagnostics_grid_save": round(time.time() - t0, 1),
                           "total": round(time.time() - t_start, 1)},
               "trained_parameters": n_train, "diagnostics": clue.last_diagnostics,
               "outputs": {"final_model": str(output / "final"), "grid": str(output / "samples.png"),
                           "loss_curve": str(output / "loss_curve.png"), "log": str(log_file)}}
    if rank == 0:
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
