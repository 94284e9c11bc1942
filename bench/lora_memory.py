"""Trainable parameters and peak memory of a CLUE fine-tuning step with and without LoRA (lora.py), on the CPU.

The SD-2-shaped bench config of bench/unet_vs_diffusers.py (U-Net channels 128/256/512/512, 64-dim heads, context
1024, linear projections, 2 resnets per level, attention on the first three levels) with CLUE's style branch, and
the SD style encoder (StyleConfig.sd(1024)). One training step as train.py takes it, minus the frozen VAE and text
encoder (their outputs are inputs here: batch 2 of 32x32 latents, a 77-token context): style encoder -> s = mu +
sigma eps, U-Net(z_t, t, c, s), MSE + beta KL, backward, AdamW over what trains:
  full       the U-Net, the style encoder (what `train.py --model` trains)
  lora R     adapters of rank R (alpha = R) on attn1/attn2 to_q/to_k/to_v/to_out.0, the style layers, the style
             encoder (`--lora-rank R`); the U-Net's base weights frozen
  style only the style layers and the style encoder (`--freeze-unet`), for reference
Parameters are counted exactly (and the adapters checked against r * (in + out) per adapted layer). Peak memory: each
mode runs in a fresh subprocess; after the model and the inputs are built, /proc/self/clear_refs resets the resident
set's high-water mark (VmHWM, what getrusage's ru_maxrss reports for this process) to the current resident set, two
steps run, and the step's peak is VmHWM - VmRSS before it (gradients, AdamW moments, activations); the whole
process's VmHWM, torch itself included, is reported too. Linux only (the /proc files).
Step times (full, the middle rank, style only): in this one process, their steps interleaved round by round (the
order alternating), the median of `--repeats` rounds as a ratio to the full step; on a shared machine the CPU-time
ratio is the steadier one.

    python bench/lora_memory.py                 # ~3 minutes on two busy cores; bench/results/lora_memory.json
    python bench/lora_memory.py --ranks 4,16,64 --repeats 4
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cli import comma_list, non_negative_int, positive_int  # noqa: E402
from lora import LoRALinear, add_lora, lora_trains  # noqa: E402
from style_encoder import StyleConfig, StyleEncoder  # noqa: E402
from text_encoder import TextConfig, TextEncoder  # noqa: E402
from unet import UNet, UNetConfig, is_style_param  # noqa: E402
from unet_vs_diffusers import status_bytes  # noqa: E402 (bench/, beside this file)
from vae import VAE, VAEConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=comma_list(positive_int), default=[4, 16, 64], help="LoRA ranks, comma-separated")
    p.add_argument("--size", type=positive_int, default=32, help="latent height = width")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--repeats", type=non_negative_int, default=2, help="timed rounds of interleaved steps (0: none)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (1: the steadiest on a shared machine)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one mode's memory, in its own process
    return p.parse_args(argv)


UNET = UNetConfig(block_channels=(128, 256, 512, 512), layers_per_block=2, attention_levels=(True, True, True, False),
                  num_heads=(2, 4, 8, 8), context_dim=1024, linear_projection=True, style=True)


def build(mode: str, cfg: UNetConfig = UNET):
    """(U-Net, style encoder, {name: trained parameter}) of a mode: "full", "style", "lora<R>"."""
    torch.manual_seed(0)
    unet, encoder = UNet(cfg).train(), StyleEncoder(StyleConfig.sd(cfg.context_dim)).train()
    if mode.startswith("lora"):
        add_lora(unet, int(mode[4:]), float(mode[4:]))
    keep = {"full": lambda n: True, "style": is_style_param}.get(mode, lora_trains)
    trained = {f"unet.{n}": p for n, p in unet.named_parameters() if keep(n)}
    trained.update({f"style_encoder.{n}": p for n, p in encoder.named_parameters()})
    for n, p in unet.named_parameters():
        p.requires_grad_(keep(n))
    return unet, encoder, trained


def inputs(args):
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(args.batch, 4, args.size, args.size, generator=g)
    return (z0, torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (args.batch,), generator=g),
            torch.randn(args.batch, 77, UNET.context_dim, generator=g))


def step(unet, encoder, opt, batch):
    """One CLUE training step on fixed inputs (z_t: a fixed mix standing in for the noise schedule)."""
    z0, eps, t, context = batch
    mu, logvar = encoder(z0, context)
    s = encoder.sample(mu, logvar)
    pred = unet(0.8 * z0 + 0.6 * eps, t, context, style=s)
    loss = F.mse_loss(pred, eps) + 1e-2 * encoder.kl(mu, logvar).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def child(args):
    torch.set_num_threads(args.threads)
    unet, encoder, trained = build(args.child)
    opt, batch = torch.optim.AdamW(trained.values(), lr=1e-5), inputs(args)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_bytes("VmRSS")
    for _ in range(2):
        step(unet, encoder, opt, batch)
    print(json.dumps({"rss_before_step": before, "step_peak_above": status_bytes("VmHWM") - before,
                      "process_peak": status_bytes("VmHWM")}))


def count(mode: str, cfg: UNetConfig = UNET) -> dict:
    unet, encoder, trained = build(mode, cfg)
    adapters = [m for m in unet.modules() if isinstance(m, LoRALinear)]
    n_adapter = sum(p.numel() for n, p in trained.items() if ".lora_" in n)
    assert n_adapter == sum(m.rank * (m.weight.shape[0] + m.weight.shape[1]) for m in adapters)
    total = sum(p.numel() for p in (*unet.parameters(), *encoder.parameters()))
    return {"total": total, "trained": sum(p.numel() for p in trained.values()), "adapters": n_adapter,
            "style_layers": sum(p.numel() for n, p in trained.items() if is_style_param(n)),
            "style_encoder": sum(p.numel() for p in encoder.parameters()), "adapted_layers": len(adapters)}


def timing(modes, args) -> dict:
    """Median over rounds of each mode's (wall, CPU) step time over the full step's, all modes in this process."""
    built = {m: build(m) for m in modes}
    opts = {m: torch.optim.AdamW(built[m][2].values(), lr=1e-5) for m in modes}
    batch, times = inputs(args), {m: [] for m in modes}
    for r in range(args.repeats + 1):  # round 0: warm-up (AdamW allocates its moments)
        for m in (modes if r % 2 else modes[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            step(*built[m][:2], opts[m], batch)
            if r:
                times[m].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {m: {"wall_s": statistics.median(w for w, _ in times[m]), "cpu_s": statistics.median(c for _, c in times[m]),
                "wall_ratio_to_full": statistics.median(w / f[0] for (w, _), f in zip(times[m], times["full"])),
                "cpu_ratio_to_full": statistics.median(c / f[1] for (_, c), f in zip(times[m], times["full"]))}
            for m in modes}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    modes = ["full", *(f"lora{r}" for r in args.ranks), "style"]
    rows = {}
    for m in modes:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", m, "--size", str(args.size),
                              "--batch", str(args.batch), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True).stdout
        rows[m] = {"parameters": count(m), "memory_bytes": json.loads(out.strip().splitlines()[-1])}
    middle = f"lora{args.ranks[len(args.ranks) // 2]}"
    times = timing(["full", middle, "style"], args) if args.repeats else {}  # three models held at once
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"SD-2-shaped U-Net {UNET.block_channels} with the style branch + StyleConfig.sd; batch {args.batch} of "
          f"{args.size}x{args.size} latents, {args.threads} thread(s), load average {' '.join(load)}\n")
    print("| mode | trained parameters | of which adapters | % of all | step peak above the built model (MiB) | "
          "process peak (MiB) | step time / full (wall, CPU) |\n|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        n, mem, t = r["parameters"], r["memory_bytes"], times.get(m)
        ratio = f"{t['wall_ratio_to_full']:.2f}, {t['cpu_ratio_to_full']:.2f}" if t else "-"
        print(f"| {m.replace('lora', 'LoRA r=')} | {n['trained']:,} | {n['adapters']:,} | "
              f"{100 * n['trained'] / n['total']:.1f} | {mem['step_peak_above'] / 2**20:.0f} | "
              f"{mem['process_peak'] / 2**20:.0f} | {ratio} |")
    full = rows["full"]["parameters"]
    print(f"\nall parameters (U-Net with style layers + style encoder): {full['total']:,}; style layers "
          f"{full['style_layers']:,}, style encoder {full['style_encoder']:,}")
    with torch.device("meta"):  # the real SD 2.1-base sizes: counted exactly, nothing allocated
        sd21 = {m: count(m, UNetConfig.sd21_base(style=True)) for m in modes}
        frozen = sum(p.numel() for m in (VAE(VAEConfig.sd()), TextEncoder(TextConfig.sd21())) for p in m.parameters())
    print("SD 2.1-base (channels 320/640/1280/1280), trained parameters: " + ", ".join(
        f"{m} {n['trained'] / 1e6:.1f} M ({100 * n['trained'] / n['total']:.1f} %)" for m, n in sd21.items()))
    full_mb = 4 * (sd21["full"]["total"] + frozen) / 1e6  # fp32: what model.safetensors holds, VAE and text encoder too
    print(f"saved model, fp32: full {full_mb:.0f} MB; a LoRA folder holds what trained: " + ", ".join(
        f"{m} {4 * n['trained'] / 1e6:.0f} MB" for m, n in sd21.items() if m.startswith("lora")) +
        "; vanilla LoRA (--style-tokens 0: adapters only) " + ", ".join(
        f"r={m[4:]} {4 * n['adapters'] / 1e6:.0f} MB" for m, n in sd21.items() if m.startswith("lora")))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "lora_memory.json")
    with open(path, "w") as f:
        json.dump({"unet": {k: v for k, v in vars(UNET).items()}, "style": vars(StyleConfig.sd(UNET.context_dim)),
                   "batch": args.batch, "size": args.size, "threads": args.threads, "repeats": args.repeats,
                   "load_average": load, "torch": torch.__version__, "memory": "VmHWM/VmRSS of /proc/self/status in a "
                   "subprocess per mode, VmHWM reset by /proc/self/clear_refs after building", "modes": rows,
                   "step_time": times, "sd21_base_parameters": sd21, "sd21_base_frozen_vae_text": frozen},
                  f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
