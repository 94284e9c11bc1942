"""Phase 1 of `train.py --preset tiny`: train the tiny VAE from scratch (not a program of its own; train.py
calls train_vae, or load_vae for --vae FOLDER).

The objective is the LDM autoencoder's (Rombach et al. 2022, Sec. 3.1) without its LPIPS and GAN terms: L1 + L2
reconstruction plus a small KL to N(0, I) per latent element. After training, the latent scale factor is set to
1/std of the latents, the way SD's 0.18215 was chosen, so that the diffusion of phase 2 sees unit-variance
latents. Outputs in the run folder: vae/ (config.json + model.safetensors, the format --vae reads),
vae_log.jsonl and vae_recon.png (top row data, bottom row reconstructions).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from checkpoint import atomic_write_json, atomic_write_safetensors, config_from_dict, read_checkpoint_dir
from train_log import append_jsonl
from training_state import (BatchStream, TrainingDiverged, all_reduce_sum, barrier, lr_factor, seed_everything,
                            write_folder_atomically)


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
    from vae import VAE, VAEConfig
    config, tensors = read_checkpoint_dir(path)
    if "vae" not in config:
        raise SystemExit(f"train.py: --vae {path}: config.json has no 'vae' entry")
    vae = VAE(config_from_dict(VAEConfig, config["vae"], "vae"))
    vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    vae.cfg.scale_factor = float(config.get("scale_factor", vae.cfg.scale_factor))
    return vae
