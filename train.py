"""train.py: train CLUE (or the vanilla baseline) on a folder of labelled images.

CLUE (Park et al., arXiv 2511.10993) fine-tunes Stable Diffusion with a KL-regularised Style Encoder whose tokens
feed a second cross-attention layer; the objective is `CLUE.loss` (clue.py). This is the program around it:
  --model PATH   fine-tune SD: VAE and text encoder frozen, U-Net + style encoder + style attention trained;
  --preset tiny  from scratch: phase 1 trains a tiny VAE (training_state.train_vae), phase 2 everything else
                 (--no-train-text-encoder keeps the random text features, which tell fixed-format prompts apart);
  both           fine-tune a tiny base of ours (e.g. pre-trained without labels) with the tiny preset's sizes.
AdamW (Loshchilov & Hutter 2019), warm-up then cosine or constant LR, gradient clipping and accumulation, an EMA
of the weights (for samples, diagnostics, the saved model), autocast on GPU; under torchrun DistributedDataParallel
(rank 0 writes every file); `--resume` goes on bit-exactly on CPU; LoRA on --model; no prior preservation.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from checkpoint import atomic_write, atomic_write_json, load_vae, save_clue, write_folder_atomically
from cli import (UsageError, comma_list, finite_float, non_negative_float, non_negative_int, output_folder,
                 positive_float, positive_int, probability, run, torch_device)
from clue import CLUE, CLUEConfig, Sampling, StyleChoice
from convert import load_stable_diffusion
from data import ClassFolderDataset, DataError, default_prompt_template, make_grid, resolve_data
from lora import add_lora, lora_settings, lora_trains
from schedulers import PREDICTION_TYPES
from style_encoder import StyleConfig
from text_encoder import TextConfig
from training_state import (EMA, BatchStream, Objective, TrainingDiverged, TrainingState, append_jsonl, barrier,
                            cache_latents, check_health, find_checkpoint, lr_factor, mean_logs, plot_curves,
                            read_jsonl, restore, rng_preserved, save_checkpoint, seed_everything, setup_distributed,
                            train_vae, write_param_checksums)
from unet import UNetConfig, is_style_param

EXAMPLES = """examples (the first is demo.sh: a tiny CLUE on scikit-learn's digits, from scratch, on a CPU):
  python train.py --data digits --preset tiny --output runs/demo
  python train.py --data digits --preset tiny --output runs/demo --resume latest   # go on from the newest checkpoint
  torchrun --nproc_per_node 2 train.py --data digits --preset tiny --output runs/ddp  # 2 GPUs (or CPU processes)
  # CLUE fine-tuning SD 2.1-base (any format convert.py reads) on your class folders; the vanilla baseline
  python train.py --data ears/ --model sd21-base/ --prompt "an otoscopic image of {class}" --mixed-precision bf16
  python train.py --data ears/ --model sd21-base/ --style-tokens 0 --output runs/ears_vanilla
  python train.py --data digits --model runs/vanilla/final --preset tiny --output runs/ft  # from a tiny base of ours
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="folder with one subfolder of images per class, or 'digits'")
    g.add_argument("--prompt", help="template with {class} (default: 'a handwritten digit {class}' for digits)")
    g.add_argument("--resolution", type=positive_int, help="image size in pixels (default: 32 tiny, 512 SD)")
    g.add_argument("--limit-per-class", type=positive_int, help="keep N images per class (seeded; few-shot)")
    g.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    g.add_argument("--flip", action="store_true", help="random horizontal flips (off: they change digits)")
    g.add_argument("--val-data", help="held-out images for the diagnostics (default: digits:test, or --data)")
    g.add_argument("--num-workers", type=non_negative_int, default=0, help="data-loader processes (0: exact resume)")
    g.add_argument("--no-latent-cache", action="store_true", help="encode every step, not each image once (less RAM)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="SD weights to fine-tune (any format convert.py reads, or a Hugging Face repo id)")
    g.add_argument("--preset", choices=("tiny",), help="train a tiny model from scratch instead; with --model: the "
                   "base is a tiny model (the tiny style encoder, objective and defaults)")
    g.add_argument("--prediction-type", choices=PREDICTION_TYPES, help="single SD files, --preset tiny (v_prediction)")
    g.add_argument("--vae", help="tiny preset: reuse this trained VAE folder instead of phase 1")
    g.add_argument("--style-tokens", type=non_negative_int, default=4, help="K style tokens; 0 = vanilla baseline")
    g.add_argument("--style-width", type=positive_int, help="style encoder width (default: its preset)")
    g.add_argument("--style-layers", type=positive_int, help="style encoder layers (default: its preset)")
    g.add_argument("--unet-channels", type=comma_list(positive_int, as_text=True),
                   help="tiny preset: U-Net widths, e.g. 64,128")
    g.add_argument("--freeze-unet", action="store_true", help="train only the style encoder + style attention")
    g.add_argument("--lora-rank", type=positive_int, help="--model: LoRA adapters of rank R on the U-Net attention "
                   "(to_q/k/v/out of attn1, attn2; the rest frozen), saved as a small lora.safetensors")
    g.add_argument("--lora-alpha", type=positive_float, help="LoRA scale: the update is (alpha / R) B A (default: R)")
    g.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction,
                   help="train the text encoder too (default: yes with --preset tiny, no with --model)")
    g = p.add_argument_group("objective (CLUEConfig)")
    g.add_argument("--kl-mode", choices=("beta", "capacity"), default="capacity", help="beta * KL, or gamma * |KL - C|")
    g.add_argument("--beta", type=non_negative_float, help="beta mode: weight of the KL per dimension (default 0.01)")
    g.add_argument("--beta-warmup-steps", type=non_negative_int, help="beta mode: beta ramps up over these (default 0)")
    g.add_argument("--gamma", type=non_negative_float, help="capacity mode: weight of |KL - C| (default 0.2)")
    g.add_argument("--capacity", type=non_negative_float, help="capacity mode: target KL C per dimension (default 0.1)")
    g.add_argument("--capacity-ramp-steps", type=non_negative_int, help="capacity mode: C ramps up (default steps/2)")
    g.add_argument("--mmd-weight", type=non_negative_float, default=0.1, help="lambda of MMD^2(q(s), N(0, I)) (0: off)")
    g.add_argument("--min-snr-gamma", type=positive_float, help="min-SNR loss weighting (5.0 is common)")
    g.add_argument("--text-dropout", type=probability, default=0.1, help="p(prompt -> '') for guidance")
    g.add_argument("--style-dropout", type=probability, default=0.1, help="p(style branch skipped)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, help="optimizer steps (default: 2000 tiny, 10000 SD)")
    g.add_argument("--batch-size", type=positive_int, help="per process and micro-batch (default: 32 tiny, 4 SD)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=positive_float, help="peak learning rate (default: 1e-3 tiny, 1e-5 SD)")
    g.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    g.add_argument("--warmup-steps", type=non_negative_int, default=100, help="linear LR warm-up steps")
    g.add_argument("--min-lr-ratio", type=non_negative_float, help="cosine ends at lr * this (default 0.1)")
    g.add_argument("--weight-decay", type=non_negative_float, default=1e-2, help="AdamW decoupled weight decay")
    g.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--ema-decay", type=probability, default=0.999, help="EMA of the weights (0: off)")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="autocast on GPU")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute U-Net blocks in backward")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--device", type=torch_device, default="auto", help="auto, cpu, cuda, cuda:1 (torchrun: LOCAL_RANK)")
    g = p.add_argument_group("tiny VAE (phase 1 of --preset tiny)")
    g.add_argument("--vae-steps", type=non_negative_int, help="VAE optimizer steps (default 400)")
    g.add_argument("--vae-lr", type=positive_float, help="(default 2e-3)")
    g.add_argument("--vae-batch-size", type=positive_int, help="(default 32)")
    g.add_argument("--vae-kl-weight", type=non_negative_float, help="KL weight per latent element (default 1e-4)")
    g = p.add_argument_group("outputs")
    g.add_argument("--output", type=output_folder, default="runs/clue", help="run folder (default runs/clue)")
    g.add_argument("--log-every", type=positive_int, default=10, help="log line every N steps")
    g.add_argument("--sample-every", type=non_negative_int, default=500, help="sample grid every N steps (0: end only)")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=500, help="checkpoint every N steps (0: end)")
    g.add_argument("--checkpoints-total-limit", type=positive_int, default=3, help="keep the newest N checkpoints")
    g.add_argument("--resume", nargs="?", const="latest", help="a checkpoint folder, or latest (newest intact)")
    g.add_argument("--grid-taus", type=comma_list(non_negative_float), default="0,1,1,1,1,1,2,3",
                   help="grid columns: tau of each prior draw s ~ N(0, tau^2 I) (vanilla: one noise seed each)")
    g.add_argument("--grid-steps", type=positive_int, default=25, help="DDIM steps of the grid")
    g.add_argument("--guidance", type=finite_float, default=3.0, help="text guidance scale of the grid")
    g.add_argument("--diag-images", type=positive_int, default=400, help="held-out images for the diagnostics")
    g.add_argument("--dump-param-checksum", action="store_true", help="testing: every rank writes its weights' hash")
    a = p.parse_args(argv)
    for wrong, message in (  # flags that contradict each other
        (a.model is None and a.preset is None, "give --model PATH (fine-tune SD) or --preset tiny (from scratch)"),
        (a.vae and (a.model or not a.preset), "--vae is for --preset tiny (a fine-tune takes the VAE from --model)"),
        ((a.model or a.vae) and {a.vae_steps, a.vae_lr, a.vae_batch_size, a.vae_kl_weight} != {None},
         "--vae-steps/-lr/-batch-size/-kl-weight: there is no phase 1 to train with --vae or --model (VAE given)"),
        (a.prompt is not None and "{class}" not in a.prompt, f"--prompt {a.prompt!r} needs a {{class}} placeholder"),
        (a.freeze_unet and a.style_tokens == 0, "--freeze-unet with --style-tokens 0 leaves nothing to train"),
        (a.unet_channels and a.model, "--unet-channels sizes a U-Net from scratch; --model brings its own"),
        (a.lora_rank and not a.model, "--lora-rank adapts pretrained weights (--model); --preset tiny trains in full"),
        (a.lora_alpha and not a.lora_rank, "--lora-alpha needs --lora-rank"),
        (a.mixed_precision != "no" and not a.device.startswith("cuda"),
         f"--mixed-precision {a.mixed_precision} is autocast on a GPU; on {a.device} use --mixed-precision no"),
        (a.min_lr_ratio is not None and a.lr_schedule != "cosine", "--min-lr-ratio is where --lr-schedule cosine ends"),
        (a.kl_mode == "beta" and {a.gamma, a.capacity, a.capacity_ramp_steps} != {None},
         "--gamma, --capacity and --capacity-ramp-steps are for --kl-mode capacity (the default), not beta"),
        (a.kl_mode == "capacity" and {a.beta, a.beta_warmup_steps} != {None},
         "--beta and --beta-warmup-steps are for --kl-mode beta; --kl-mode capacity (the default) takes --gamma"),
        (a.lora_rank and (a.freeze_unet or a.train_text_encoder),
         "--lora-rank trains the adapters and the style parts: drop --freeze-unet and --train-text-encoder")):
        if wrong:
            p.error(message)
    a.lora_alpha = a.lora_alpha or (float(a.lora_rank) if a.lora_rank else None)
    by_preset = dict(resolution=(32, 512), steps=(2000, 10000), batch_size=(32, 4), lr=(1e-3, 1e-5),  # (tiny, SD)
                     train_text_encoder=(True, False))
    fixed = dict(beta=1e-2, beta_warmup_steps=0, gamma=0.2, capacity=0.1, min_lr_ratio=0.1, vae_steps=400, vae_lr=2e-3,
                 vae_batch_size=32, vae_kl_weight=1e-4)  # parsed as None, so that the checks above see them given
    defaults = {**{k: v[0] if a.preset else v[1] for k, v in by_preset.items()}, **fixed}
    vars(a).update({k: v for k, v in defaults.items() if getattr(a, k) is None})
    a.capacity_ramp_steps = a.steps // 2 if a.capacity_ramp_steps is None else a.capacity_ramp_steps
    return a


# ------------------------------------------------------------------------------------ data and model
def build_dataset(flag: str, data_arg, template, args, limit=None) -> ClassFolderDataset:
    try:
        return ClassFolderDataset(resolve_data(data_arg), template, args.resolution, args.random_crop, args.flip,
                                  limit_per_class=limit, seed=args.seed)
    except (DataError, FileNotFoundError) as e:  # one line naming the flag (data.py's own messages may already)
        raise DataError(str(e) if str(e).startswith(flag) else f"{flag} {data_arg}: {e}") from None


def build_model(args, dataset, rank, world, device, output: Path) -> CLUE:
    """A fresh CLUE: on converted SD weights (--model) or the tiny preset (phase 1 VAE + random rest)."""
    objective = {k: getattr(args, k) for k in ("kl_mode", "beta", "beta_warmup_steps", "gamma", "capacity",
                 "capacity_ramp_steps", "mmd_weight", "min_snr_gamma", "text_dropout", "style_dropout")}
    objective["image_size"] = args.resolution
    sizes = {k: v for k, v in (("tokens", args.style_tokens), ("width", args.style_width),
                               ("layers", args.style_layers)) if v}  # --style-tokens 0: no style branch (vanilla)
    if args.model:
        sd = load_stable_diffusion(args.model, prediction_type=args.prediction_type)
        preset = StyleConfig.tiny() if args.preset else StyleConfig.sd()  # --preset tiny: a tiny base
        style = replace(preset, context_dim=sd.unet.cfg.context_dim, latent_channels=sd.unet.cfg.in_channels, **sizes)
        seed_everything(args.seed)
        clue = CLUE.from_stable_diffusion(sd, style if args.style_tokens else None,
                                          CLUEConfig.tiny(**objective) if args.preset else CLUEConfig(**objective))
        if args.lora_rank:  # drawn after the style encoder: its initialisation is that of a run without LoRA
            add_lora(clue.unet, args.lora_rank, args.lora_alpha)
        return clue
    vae = load_vae(args.vae) if args.vae else train_vae(args, dataset, rank, world, device, output)
    widths = tuple(int(c) for c in args.unet_channels.split(",")) if args.unet_channels else None
    unet = UNetConfig.tiny(block_channels=widths, attention_levels=(True,) * len(widths),
                           num_heads=(4,) * len(widths)) if widths else UNetConfig.tiny()
    seed_everything(args.seed)
    # v-prediction by default (SD 2.1's, the paper's base): at high noise the v target is nearly -x0, what a style says
    objective.update(scale_factor=vae.cfg.scale_factor, prediction_type=args.prediction_type or "v_prediction")
    style = replace(StyleConfig.tiny(), **sizes) if args.style_tokens else None
    clue = CLUE.from_config(unet=unet, vae=vae.cfg, text=TextConfig.tiny(), style=style,
                            clue=CLUEConfig.tiny(**objective))
    clue.vae.load_state_dict(vae.state_dict())
    return clue


def select_trainable(clue, args) -> dict[str, nn.Parameter]:
    """VAE frozen; text encoder trained with --train-text-encoder (default for --preset tiny); U-Net trained unless
    --freeze-unet (then only its style layers) or --lora-rank (its adapters and style layers); the style encoder
    always. The optimizer, the EMA and the checkpoints' training state hold what this returns, nothing else."""
    if args.lora_rank and lora_settings(clue.unet) != {"rank": args.lora_rank, "alpha": args.lora_alpha}:
        raise UsageError(f"--lora-rank {args.lora_rank} --lora-alpha {args.lora_alpha:g}, but the model's adapters are "
                         f"{lora_settings(clue.unet) or 'none'} (resume with the flags a checkpoint was trained with)")
    for name, p in clue.named_parameters():
        part = name.split(".")[0]
        unet = lora_trains(name) if args.lora_rank else not args.freeze_unet or is_style_param(name)
        p.requires_grad_({"vae": False, "text_encoder": args.train_text_encoder, "unet": unet}.get(part, True))
    return {n: p for n, p in clue.named_parameters() if p.requires_grad}


def setup_training(clue, args, dataset, rank, world, device) -> tuple[nn.Module, TrainingState]:
    """The network DDP runs, and what trains: parameters, AdamW, LR schedule, GradScaler, EMA, data stream."""
    clue.to(device)
    clue.unet.cfg.gradient_checkpointing = args.gradient_checkpointing  # read by UNet.forward
    trainable = select_trainable(clue, args)
    net = Objective(clue, lambda clue, batch, step: clue.loss(batch, step))
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(trainable.values(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type in ("cpu", "cuda"))  # one kernel for all tensors (CPU: 4x faster)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.warmup_steps, args.steps, args.lr_schedule, args.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=args.mixed_precision == "fp16")
    ema = EMA(trainable, args.ema_decay) if args.ema_decay > 0 else None
    cache = not (args.random_crop or args.flip or args.no_latent_cache)  # same image every epoch: its posterior once
    images = cache_latents(dataset, clue.vae, device, args.batch_size) if cache else dataset
    stream = BatchStream(images, args.batch_size, rank, world, args.seed, args.num_workers, device.type == "cuda")
    if rank == 0:
        total, trained = (sum(p.numel() for p in ps) / 1e6 for ps in (clue.parameters(), trainable.values()))
        print(f"model: {total:.2f} M parameters, {trained:.2f} M trained; style tokens {args.style_tokens}; {world} "
              f"process(es) on {device}; VAE latents {'cached' if cache else 'encoded every step'}")
    return net, TrainingState(clue, trainable, opt, sched, scaler, ema, stream, rank, world, device)


# ------------------------------------------------------------------------------------ the step, samples, side work
def optimizer_step(net, state: TrainingState, args, step: int, autocast) -> dict:
    """One AdamW step over --grad-accum micro-batches -> its logs, tensors: nothing here waits for the device."""
    micro_logs = []
    for micro in range(args.grad_accum):
        batch = {k: v.to(state.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in next(state.stream).items()}
        sync = state.world == 1 or micro == args.grad_accum - 1  # DDP all-reduces gradients on the last one only
        with nullcontext() if sync else net.no_sync():
            with autocast:
                loss, logs = net(batch, step)
            state.scaler.scale(loss / args.grad_accum).backward()
        micro_logs.append({**logs, "loss": loss.detach()})  # the loss that was backpropagated
    state.scaler.unscale_(state.opt)
    grad_norm = nn.utils.clip_grad_norm_(state.trainable.values(), args.max_grad_norm or float("inf"))
    lr = state.opt.param_groups[0]["lr"]
    state.scaler.step(state.opt)
    state.scaler.update()
    state.opt.zero_grad(set_to_none=True)
    state.sched.step()
    if state.ema:
        state.ema.update(state.trainable)
    return {**mean_logs(micro_logs), "lr": lr, "grad_norm": grad_norm}


@torch.no_grad()
def sample_grid(clue, prompts: list[str], names: list[str], args, path: Path, source: str = "prior"):
    """Rows: classes; the same initial noise in every cell, so a row shows what the style alone changes. source
    "prior": columns are prior draws at --grid-taus, the same draw down a column (CLUE's unprompted embeddings);
    "posterior_sample": each cell the mu of a random training image of its class. Vanilla: columns are noise seeds."""
    rows, cols, C = len(prompts), len(args.grid_taus), clue.unet.cfg.in_channels
    h, gen, style = args.resolution // clue.vae.cfg.downsample_factor, torch.Generator().manual_seed(args.seed), None
    if clue.style_encoder is None:
        latents = torch.randn((cols, C, h, h), generator=gen).repeat(rows, 1, 1, 1)
    else:
        latents = torch.randn((1, C, h, h), generator=gen).expand(rows * cols, -1, -1, -1)
        draws = torch.randn((cols, *clue.style_shape), generator=gen) * torch.tensor(args.grid_taus)[:, None, None]
        style = StyleChoice(draws.repeat(rows, 1, 1))  # cell (row r, column j) is index r * cols + j
        if source == "posterior_sample":
            classes = [n for n in names for _ in range(cols)]
            style = StyleChoice(clue.make_style(StyleChoice(source, classes=classes), rows * cols, generator=gen))
    images = clue.generate([p for p in prompts for _ in range(cols)], Sampling(args.grid_steps, args.guidance),
                           style, latents=latents, progress=False)
    labels = [f"seed {j}" if clue.style_encoder is None else f"tau {tau:g}" if source == "prior" else f"image {j}"
              for j, tau in enumerate(args.grid_taus)]
    grid = make_grid(images.float().cpu(), cols, zoom=max(1, 96 // args.resolution), row_labels=names,
                     col_labels=labels)  # 32 px digits are shown 3x larger
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


@dataclass
class SideWork:
    """Diagnostics, sample grids and checkpoints between steps: on rank 0 with the EMA weights, without moving the
    training RNG; at the end also the aggregated posterior (per class), its grid and the final model."""
    state: TrainingState
    args: argparse.Namespace
    dataset: ClassFolderDataset
    val_loader: DataLoader | None
    info: dict  # what every saved model records about the run

    def __call__(self, step: int, checkpoint: bool, grid: Path | None, final: bool = False):
        s, clue, output, names = self.state, self.state.clue, Path(self.args.output), self.dataset.class_names
        posterior = final and clue.style_encoder is not None  # the aggregated posterior, per class
        if s.rank == 0:
            with rng_preserved(s.device), s.ema_applied():
                if posterior:
                    clue.fit_style_posterior(DataLoader(self.dataset, batch_size=64, shuffle=False))
                if checkpoint:
                    diag = clue.diagnostics(self.val_loader, seed=self.args.seed,
                                            max_batches=math.ceil(self.args.diag_images / self.val_loader.batch_size))
                    append_jsonl(output / "log.jsonl", {"step": step, "event": "diagnostics", **diag})
                    print("\n" + f"step {step} diagnostics: " + ", ".join(
                        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in diag.items()))
                if grid is not None:
                    sample_grid(clue, self.dataset.prompts, names, self.args, grid)
                if posterior:
                    sample_grid(clue, self.dataset.prompts, names, self.args, output / "samples_posterior.png",
                                source="posterior_sample")
                plot_curves(output)
        if checkpoint:
            self.info["step"] = step
            save_checkpoint(output / "checkpoints" / f"step_{step:06d}", s, step, self.args, self.info)
        barrier()

    def finish(self, step: int):
        output, s = Path(self.args.output), self.state
        self(step, True, output / "samples.png", final=True)
        if s.rank == 0:
            with s.ema_applied():
                write_folder_atomically(output / "final",  # a LoRA run: a small folder, adapters on --model
                                        lambda tmp: save_clue(s.clue, tmp, extra=self.info, base=self.args.model))
        if self.args.dump_param_checksum:
            write_param_checksums(s, output)


def run_steps(net, state: TrainingState, args, step: int, side_work: SideWork) -> int:
    """Optimizer steps from `step` to --steps -> the last step. Losses, gradient norms and weights are checked finite
    (one device sync) before anything is logged, sampled or saved (the side work, every --sample/checkpoint-every)."""
    output, log_file, rank = Path(args.output), Path(args.output) / "log.jsonl", state.rank
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    autocast = torch.autocast(state.device.type, dtype=dtype) if dtype else nullcontext()
    net.train()
    t_loop, window = time.time(), []
    with tqdm(total=args.steps, initial=step, desc="phase 2: CLUE", disable=rank != 0) as bar:  # closed on errors too
        while step < args.steps:
            window.append(optimizer_step(net, state, args, step, autocast))
            step += 1
            bar.update(1)
            log = step % args.log_every == 0 or step == args.steps
            checkpoint = step < args.steps and args.checkpoint_every > 0 and step % args.checkpoint_every == 0
            sample = step < args.steps and args.sample_every > 0 and step % args.sample_every == 0
            if log or checkpoint or sample:
                check_health(state, window, step, output)
            if log:  # the step's tensors are read back here only
                logs, window = {k: float(v) for k, v in mean_logs(window).items()}, []
                bar.set_postfix(loss=f"{logs['loss']:.4f}", kl=f"{logs.get('kl', 0):.3f}")
                if rank == 0:
                    append_jsonl(log_file, {"step": step, **logs, "seconds": round(time.time() - t_loop, 2)})
            if checkpoint or sample:
                side_work(step, checkpoint, output / "samples" / f"step_{step:06d}.png" if sample else None)
    return step


# ------------------------------------------------------------------------------------ main
def train(args, rank, world, device) -> dict:
    # 1. the run folder (without the leftovers of a crash while writing a checkpoint) and the data
    t_start, output, log_file = time.time(), Path(args.output), Path(args.output) / "log.jsonl"
    if rank == 0:
        (output / "checkpoints").mkdir(parents=True, exist_ok=True)
        for junk in (output / "checkpoints").glob(".*-step_*"):
            shutil.rmtree(junk, ignore_errors=True)
    barrier()
    template = args.prompt or default_prompt_template(args.data)
    dataset = build_dataset("--data", args.data, template, args, args.limit_per_class)
    if rank == 0:
        skipped = f"; {len(dataset.skipped)} unreadable files skipped" if dataset.skipped else ""
        print(f"data: {len(dataset)} images in {dataset.num_classes} classes {dataset.class_counts}, prompts like "
              f"{dataset.prompts[0]!r}{skipped}")
    # 2. the model: the newest intact checkpoint's (folder, model, state, tensors), or a fresh one
    t0 = time.time()
    resume = find_checkpoint(args.resume, output, rank) if args.resume else None
    clue = resume[1] if resume else build_model(args, dataset, rank, world, device, output)
    t_build = time.time() - t0
    # 3. what trains, and where a resumed run left it
    net, state = setup_training(clue, args, dataset, rank, world, device)
    if resume:
        step = restore(state, resume[0], *resume[2:], args)
        if rank == 0:  # drop log lines written after that checkpoint by the interrupted run
            log_file.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(log_file) if r.get("step", 0) <= step))
            print(f"resumed from {resume[0]} at step {step}")
    else:
        step = 0
        if rank == 0:
            log_file.unlink(missing_ok=True)
        seed_everything(args.seed + rank)  # every rank its own noise; the weights are identical (DDP)
    # 4. held-out data for the diagnostics (rank 0), and the side work between steps
    val_loader = None
    if rank == 0:
        val_arg = args.val_data or ("digits:test" if args.data in ("digits", "digits:train") else None)
        val_set = build_dataset("--val-data", val_arg, template, args) if val_arg else dataset
        val_loader = DataLoader(val_set, batch_size=min(64, len(val_set)), shuffle=False)
    side_work = SideWork(state, args, dataset, val_loader, {
        "prompt_template": template, "class_names": dataset.class_names, "data": str(args.data),
        "limit_per_class": args.limit_per_class, "resolution": args.resolution, "args": vars(args)})
    # 5. the loop up to --steps
    t_loop = time.time()
    start_step, step = step, run_steps(net, state, args, step, side_work)
    t_train, t0 = time.time() - t_loop, time.time()
    # 6. the end: aggregated posterior, diagnostics, the grids, the last checkpoint, the final model, a summary
    side_work.finish(step)
    summary = {"steps": step, "steps_this_run": step - start_step, "world_size": world, "device": str(device),
               "seconds": {"vae_phase_and_model": round(t_build, 1), "train_loop": round(t_train, 1),
                           "final_posterior_diagnostics_grid_save": round(time.time() - t0, 1),
                           "total": round(time.time() - t_start, 1)},
               "trained_parameters": sum(p.numel() for p in state.trainable.values()),
               "diagnostics": clue.last_diagnostics,
               "outputs": {"final_model": str(output / "final"), "grid": str(output / "samples.png"),
                           "loss_curve": str(output / "loss_curve.png"), "log": str(log_file)}}
    if rank == 0:
        atomic_write_json(output / "summary.json", summary)
        print(json.dumps(summary, indent=1))
    barrier()
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def command_line(argv=None):
    """`python train.py`: a user's mistake is one line and exit code 2 (cli.run), a diverged run one line and 1."""
    try:
        run(main, argv, "train.py")
    except TrainingDiverged as e:
        print(f"train.py: training diverged: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    command_line()
