"""Time and memory of our U-Net (unet.py) against diffusers' UNet2DConditionModel on the same weights and inputs.

An SD-2-shaped network at reduced width (default channels 128/256/512/512, 64-dim heads, context 1024, linear
projections, 32x32 latents, batch 2). For each of `--repeats` rounds it times, in alternating order, our forward
(no grad, as in sampling) and diffusers', then forward+backward (as in training); the reported ratio is the median over
rounds of ours / diffusers (below 1: we are faster). Peak memory: on CPU each model runs in a fresh subprocess and
the peak resident set (VmHWM) above the resident set after building the model is reported; on CUDA
torch.cuda.max_memory_allocated above the allocation before the call. On CUDA the bf16 autocast figures are added.
On CPU both wall-clock and process CPU time are reported; with other jobs on the machine the CPU-time ratio is the
steadier one (one thread by default, so no thread waits for a descheduled sibling).
The style branch is not built (style=False): both sides compute plain SD.

Example (CPU, about 2.5 minutes on a busy two-core machine):
    python bench/unet_vs_diffusers.py --repeats 4
    python bench/unet_vs_diffusers.py --device cuda --batch 8 --size 64 --repeats 10
Prints a Markdown table and writes bench/results/unet_vs_diffusers_<device>.json.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from reference import unet_to_diffusers  # noqa: E402 (tests/reference.py)
from unet import UNet, UNetConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", default="128,256,512,512", help="level widths, comma-separated (SD 2.1: 320,640,1280,1280)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head width; heads = width / head-dim (SD 2.x: 64)")
    p.add_argument("--layers-per-block", type=int, default=2, help="resnets per down level (SD: 2)")
    p.add_argument("--context-dim", type=int, default=1024, help="text-token width (SD 2.x: 1024)")
    p.add_argument("--context-len", type=int, default=77, help="text tokens per prompt (SD: 77)")
    p.add_argument("--size", type=int, default=32, help="latent height = width (32 = 256 px images)")
    p.add_argument("--batch", type=int, default=2, help="batch size")
    p.add_argument("--repeats", type=int, default=4, help="timed rounds (each: both models, forward and forward+backward); "
                   "even, so that each model goes first equally often")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads); 1 gives the steadiest CPU-time "
                   "ratio on a shared machine, raise it on an idle one")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="folder for the JSON result")
    p.add_argument("--memory-child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)  # internal: one CPU run
    return p.parse_args(argv)


def make_config(args):
    channels = tuple(int(c) for c in args.channels.split(","))
    bad = [c for c in channels if c % args.head_dim]
    if bad:
        raise SystemExit(f"unet_vs_diffusers.py: widths {bad} are not multiples of --head-dim {args.head_dim}")
    return UNetConfig(block_channels=channels, layers_per_block=args.layers_per_block,
                      attention_levels=(True,) * (len(channels) - 1) + (False,),
                      num_heads=tuple(c // args.head_dim for c in channels), context_dim=args.context_dim,
                      linear_projection=True, style=False)


def build(which, cfg, device):
    from diffusers import UNet2DConditionModel
    if which == "diffusers":
        return UNet2DConditionModel(**unet_to_diffusers(cfg)).to(device)
    return UNet(cfg).to(device)


def make_inputs(args, cfg, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    context = torch.randn(args.batch, args.context_len, cfg.context_dim, generator=g)
    return x.to(device), t.to(device), context.to(device)


def call(model, inputs):
    out = model(*inputs)
    return out if torch.is_tensor(out) else out.sample


def forward(model, inputs, autocast_dtype=None):
    with torch.no_grad(), torch.autocast(inputs[0].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return call(model, inputs)


def forward_backward(model, inputs, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(inputs[0].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = call(model, inputs)
    out.float().pow(2).mean().backward()


def timed(fn, device):
    """(wall-clock seconds, CPU seconds of this process) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in bytes; the bench scripts' one reader of it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024                 # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status (the CPU memory figures need Linux)")


def memory_child(args):
    """One model in a fresh process: peak resident set (VmHWM, the ru_maxrss of this process image) above the resident
    set after building the model. ru_maxrss itself is inherited from the parent through fork+exec, VmHWM is not;
    writing 5 to /proc/self/clear_refs also resets it to the current resident set, so building the model cannot
    leave a higher earlier peak."""
    torch.set_num_threads(args.threads)
    cfg = make_config(args)
    torch.manual_seed(0)
    model = build(args.memory_child, cfg, torch.device("cpu")).train()
    inputs = make_inputs(args, cfg, torch.device("cpu"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass                                                      # then slack_before says how much the build left
    base = status_bytes("VmRSS")
    peak_before = status_bytes("VmHWM")
    forward(model, inputs)
    peak_fwd = status_bytes("VmHWM")
    forward_backward(model, inputs)
    peak_train = status_bytes("VmHWM")
    print(json.dumps({"forward": peak_fwd - base, "forward_backward": peak_train - base,
                      "slack_before": peak_before - base, "model_and_inputs": base}))


def cpu_memory(which, argv):
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-child", which]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def cuda_memory(model, inputs, fn, autocast_dtype=None):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(model, inputs, autocast_dtype)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    return peak


def bench(models, inputs, args, device, autocast_dtype=None):
    """Interleaved rounds; returns {phase: {name: [(wall s, cpu s) per round]}}."""
    times = {"forward": {n: [] for n in models}, "forward_backward": {n: [] for n in models}}
    names = list(models)
    for r in range(args.warmup + args.repeats):
        for phase, fn in (("forward", forward), ("forward_backward", forward_backward)):
            for n in (names if r % 2 == 0 else names[::-1]):     # alternate who goes first
                s = timed(lambda: fn(models[n], inputs, autocast_dtype), device)
                models[n].zero_grad(set_to_none=True)             # the next run starts from the same memory state
                if r >= args.warmup:
                    times[phase][n].append(s)
    return times


def summarise(times):
    """Medians per model and the median over rounds of ours / diffusers, for wall-clock and process CPU time."""
    out = {}
    for phase, per in times.items():
        out[phase] = {}
        for i, clock in enumerate(("wall", "cpu")):
            ours, theirs = [s[i] for s in per["ours"]], [s[i] for s in per["diffusers"]]
            ratios = [o / d for o, d in zip(ours, theirs)]
            out[phase][clock] = {"ours_ms": 1e3 * statistics.median(ours), "diffusers_ms": 1e3 * statistics.median(theirs),
                                 "median_ratio": statistics.median(ratios), "ratios": ratios,
                                 "ours_s": ours, "diffusers_s": theirs}
    return out


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    if args.repeats < 1 or args.repeats % 2:
        raise SystemExit(f"unet_vs_diffusers.py: --repeats must be a positive even number (got {args.repeats}): the "
                         "order alternates and each model must go first equally often")
    import diffusers
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.set_num_threads(args.threads)
    cfg = make_config(args)

    # Same weights: diffusers initialises, ours loads its state dict (strict: the names are identical).
    torch.manual_seed(0)
    ref = build("diffusers", cfg, device).train()
    ours = UNet(cfg).to(device).train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    inputs = make_inputs(args, cfg, device)
    err = (forward(ours, inputs) - forward(ref, inputs)).abs().max().item()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"config: channels {cfg.block_channels}, heads {cfg.num_heads}, context {cfg.context_dim}x{args.context_len}, "
          f"latents {args.batch}x{cfg.in_channels}x{args.size}x{args.size}, {n_params / 1e6:.1f}M parameters, "
          f"device {device}, threads {torch.get_num_threads()}; max abs output diff {err:.2e}")

    models = {"ours": ours, "diffusers": ref}
    results = {"fp32": summarise(bench(models, inputs, args, device))}
    if device.type == "cuda":
        results["bf16_autocast"] = summarise(bench(models, inputs, args, device, torch.bfloat16))

    memory = {}
    if not args.no_memory:
        if device.type == "cpu":
            for n in models:
                memory[n] = cpu_memory(n, [a for a in argv if a != "--no-memory"])
            memory = {"fp32": memory}
        else:
            for key, dtype in (("fp32", None), ("bf16_autocast", torch.bfloat16)):
                memory[key] = {n: {"forward": cuda_memory(m, inputs, forward, dtype),
                                   "forward_backward": cuda_memory(m, inputs, forward_backward, dtype)}
                               for n, m in models.items()}

    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    print(f"\n| {device.type}, {torch.get_num_threads()} thread(s) | ours | diffusers | ours / diffusers |\n|---|---|---|---|")
    for prec, res in results.items():
        for phase in ("forward", "forward_backward"):
            for clock in clocks:
                r = res[phase][clock]
                print(f"| {prec} {phase.replace('_', '+')}, {clock} time (ms, median of {args.repeats}) | "
                      f"{r['ours_ms']:.0f} | {r['diffusers_ms']:.0f} | {r['median_ratio']:.3f} (median of ratios) |")
        for phase in ("forward", "forward_backward"):
            if prec in memory:
                o, d = memory[prec]["ours"][phase], memory[prec]["diffusers"][phase]
                print(f"| {prec} {phase.replace('_', '+')} peak memory (MiB) | {o / 2**20:.0f} | {d / 2**20:.0f} | "
                      f"{o / max(d, 1):.3f} |")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"unet_vs_diffusers_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"config": {**vars(cfg), "batch": args.batch, "size": args.size, "context_len": args.context_len},
                   "parameters": n_params, "max_abs_output_diff": err, "device": device.type,
                   "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
                   "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
                   "torch": torch.__version__, "diffusers": diffusers.__version__,
                   "time": results, "peak_memory_bytes": memory}, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
