"""Our whole training step (train.py's optimizer_step) against the step of diffusers' text-to-image recipe.

The reference is the loop body of diffusers' examples/text_to_image/train_text_to_image.py written with diffusers' and
transformers' own pieces: CLIPTokenizer on every item (the recipe's dataset transform), AutoencoderKL
encode -> latent_dist.sample() * scaling_factor, randn_like noise, DDPMScheduler.add_noise (get_velocity for
v-prediction), CLIPTextModel on the token ids, UNet2DConditionModel, F.mse_loss, the two `.item()` logs, backward,
clip_grad_norm_(1.0), torch.optim.AdamW with the recipe's defaults (betas 0.9 / 0.999, weight decay 1e-2, eps 1e-8:
the per-parameter loop on a CPU), get_scheduler("constant"), diffusers.training_utils.EMAModel(foreach=False, its
default). Only the U-Net trains; VAE and text encoder are frozen (requires_grad_(False)), as in the recipe.

Ours is train.py's step on the same weights (diffusers/transformers initialise, ours load the state dicts), data
(scikit-learn's digits through data.ClassFolderDataset, the same batch size) and settings: `--style-tokens 0
--no-train-text-encoder --text-dropout 0` with latents *sampled* from the VAE posterior (CLUEConfig.sample_latents,
as the recipe), so that both do the same work. What ours does differently is what train.py does: the VAE posterior of
every image computed once (train.cache_latents; its cost is reported apart), each distinct prompt encoded once,
fused AdamW, a multi-tensor EMA, logs read back every --log-every steps. CLUE's step (the style encoder, the style
attention, capacity KL + MMD, style dropout) runs beside it: CLUE / vanilla is the style branch's cost.

Configs: `tiny`, the demo's (U-Net 64/128, VAE 32/64/64, text width 64, 32 px, batch 32, v-prediction); `sd2`, an
SD-2-shaped network at reduced width (U-Net as bench/unet_vs_diffusers.py: 128/256/512/512, 64-dim heads, context
1024, linear projections; VAE 64/128/256/256 with one resnet a level, text tower width 1024 with one block: per image
the encoder costs 0.40 and the text tower 0.02 of the U-Net's forward+backward FLOPs, SD 2.1's at 512 px 0.46 and
0.02; 256 px images, 32x32 latents, batch 2, epsilon; 4 images a class, the paper's few-shot regime, so that the
latent cache costs one epoch of the recipe's encoding).

Timing: one CPU thread by default; each round runs --steps-per-round steps of each side in alternating order, and the
reported ratio is the median over rounds of ours / diffusers. Peak memory: every side in a fresh process, the peak
resident set (VmHWM) during three steps above the resident set once models, EMA and data (the latent cache) are
built: what training adds to them, the optimizer's moments, gradients, activations and temporaries (our sides'
processes also hold the recipe's models, idle, where the weights come from: in the base, not in the figure).

    python bench/train_step_vs_diffusers.py                      # both configs, ~6 minutes on a busy 2-core machine
    python bench/train_step_vs_diffusers.py --config tiny --rounds 4 --no-memory
Prints a Markdown table and writes bench/results/train_step_vs_diffusers_cpu.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import train  # noqa: E402
from clue import CLUE, CLUEConfig  # noqa: E402
from convert import hf_clip_to_open_clip  # noqa: E402
from data import ClassFolderDataset, resolve_data  # noqa: E402
from reference import clip_tokenizer_offline, unet_to_diffusers, vae_to_diffusers  # noqa: E402 (tests/reference.py)
from style_encoder import StyleConfig  # noqa: E402
from text_encoder import TextConfig  # noqa: E402
from unet import UNetConfig, is_style_param  # noqa: E402
from unet_vs_diffusers import status_bytes  # noqa: E402 (bench/, beside this file)
from vae import VAEConfig  # noqa: E402

SIDES = ("ours", "diffusers", "clue")
CONFIGS = {
    "tiny": dict(unet=UNetConfig.tiny(), vae=VAEConfig.tiny(), text=TextConfig.tiny(), style=StyleConfig.tiny(),
                 size=32, batch=32, prediction_type="v_prediction"),
    "sd2": dict(unet=UNetConfig(block_channels=(128, 256, 512, 512), layers_per_block=2,
                                attention_levels=(True, True, True, False), num_heads=(2, 4, 8, 8), context_dim=1024,
                                linear_projection=True),
                vae=VAEConfig(block_channels=(64, 128, 256, 256), layers_per_block=1),
                text=TextConfig(width=1024, heads=16, layers=1), style=StyleConfig.sd(1024),
                size=256, batch=2, prediction_type="epsilon", limit_per_class=4),  # few-shot, as the paper
    "smoke": dict(unet=UNetConfig.tiny(block_channels=(32, 32), num_heads=(2, 2)), vae=VAEConfig.tiny(),
                  text=TextConfig.tiny(), style=StyleConfig.tiny(), size=32, batch=8,
                  prediction_type="v_prediction", limit_per_class=16),
}
PROMPT = "a handwritten digit {class}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("tiny", "sd2", "both", "smoke"), default="both",
                   help="tiny (the demo's), sd2 (SD-2-shaped, reduced width), both; smoke: a few seconds (the test)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds, even (each side goes first equally often)")
    p.add_argument("--steps-per-round", type=int, help="steps of each side per round (default: tiny 2, sd2 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: the steadiest ratio on a shared machine)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="folder for the JSON result")
    p.add_argument("--memory-child", nargs=2, metavar=("CONFIG", "SIDE"), help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


class Recipe:
    """The state and loop body of diffusers' train_text_to_image.py (one process, fp32, no accelerate wrapper)."""

    def __init__(self, cfg, dataset, seed=0):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        from transformers import CLIPTextConfig, CLIPTextModel
        torch.manual_seed(seed)
        t = cfg["text"]
        self.unet = UNet2DConditionModel(**unet_to_diffusers(cfg["unet"])).train()
        self.vae = AutoencoderKL(**vae_to_diffusers(cfg["vae"]))
        self.text = CLIPTextModel(CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width,
                                                 num_attention_heads=t.heads, num_hidden_layers=t.layers,
                                                 intermediate_size=int(t.width * t.mlp_ratio),
                                                 max_position_embeddings=t.context_length, hidden_act=t.act))
        self.vae.requires_grad_(False)
        self.text.requires_grad_(False)
        self.tokenizer = clip_tokenizer_offline(tempfile.mkdtemp(prefix="clip-vocab-"))
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type=cfg["prediction_type"])
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr = get_scheduler("constant", optimizer=self.opt)
        self.ema = EMAModel(self.unet.parameters(), model_cls=UNet2DConditionModel, model_config=self.unet.config)
        self.loader = torch.utils.data.DataLoader(RecipeData(dataset, self.tokenizer), batch_size=cfg["batch"],
                                                  shuffle=True, num_workers=0)
        self.batches = iter(())

    def next_batch(self):
        batch = next(self.batches, None)
        if batch is None:  # the recipe's `for epoch ...: for batch in train_dataloader`
            self.batches = iter(self.loader)
            batch = next(self.batches)
        return batch

    def step(self):
        batch = self.next_batch()
        latents = self.vae.encode(batch["pixel_values"]).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text(batch["input_ids"], return_dict=False)[0]
        target = noise if self.scheduler.config.prediction_type == "epsilon" else \
            self.scheduler.get_velocity(latents, noise, timesteps)
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        train_loss = loss.repeat(latents.shape[0]).mean().item()  # the recipe's gathered average, logged every step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.lr.step()
        self.opt.zero_grad()
        self.ema.step(self.unet.parameters())
        return train_loss, loss.detach().item()


class RecipeData(torch.utils.data.Dataset):
    """The recipe's preprocess_train on our images: pixel values in [-1, 1] and the prompt's token ids (tokenized on
    every access, as datasets' with_transform does)."""

    def __init__(self, dataset, tokenizer):
        self.dataset, self.tokenizer = dataset, tokenizer

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        ids = self.tokenizer(item["prompt"], max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": item["image"], "input_ids": ids}


class Ours:
    """train.py's state (train.setup_training: latent cache, fused AdamW, EMA, batch stream) and step
    (train.optimizer_step; training_state.check_health and the logs read back every --log-every steps)."""

    def __init__(self, cfg, dataset, recipe: Recipe, style: bool, out: Path):
        c = cfg["vae"]
        objective = dict(prediction_type=cfg["prediction_type"], scale_factor=c.scale_factor, image_size=cfg["size"],
                         sample_latents=True, text_dropout=0.0)
        if style:  # the demo's objective
            objective.update(kl_mode="capacity", capacity=0.1, gamma=0.2, mmd_weight=0.1, capacity_ramp_steps=1000)
        self.clue = CLUE.from_config(unet=cfg["unet"], vae=c, text=cfg["text"], style=cfg["style"] if style else None,
                                     clue=CLUEConfig(**objective))
        missing, unexpected = self.clue.unet.load_state_dict(recipe.unet.state_dict(), strict=False)
        assert not unexpected and all(is_style_param(k) for k in missing), (missing[:3], unexpected[:3])
        self.clue.vae.load_state_dict(recipe.vae.state_dict())
        self.clue.text_encoder.load_state_dict(hf_clip_to_open_clip(recipe.text.state_dict()))
        self.args = train.parse_args(["--data", "digits", "--preset", "tiny", "--output", str(out), "--device", "cpu",
                                      "--no-train-text-encoder", "--batch-size", str(cfg["batch"]), "--lr", "1e-4",
                                      "--style-tokens", "4" if style else "0"])
        t0 = time.perf_counter()
        self.net, self.state = train.setup_training(self.clue, self.args, dataset, 0, 1, torch.device("cpu"))
        self.setup_seconds = time.perf_counter() - t0  # mostly the latent cache (every image through the VAE once)
        self.net.train()
        self.steps, self.window = 0, []

    def step(self):
        self.window.append(train.optimizer_step(self.net, self.state, self.args, self.steps, nullcontext()))
        self.steps += 1
        if self.steps % self.args.log_every == 0:  # what train.py's loop does at a log step
            train.check_health(self.state, self.window, self.steps, Path(self.args.output))
            self.logs = {k: float(v) for k, v in train.mean_logs(self.window).items()}
            self.window = []


def build(name, sides=SIDES):
    """The dataset and the sides of one config, on the same weights."""
    cfg = CONFIGS[name]
    dataset = ClassFolderDataset(resolve_data("digits"), PROMPT, cfg["size"],
                                 limit_per_class=cfg.get("limit_per_class"))
    recipe = Recipe(cfg, dataset)
    out = Path(tempfile.mkdtemp(prefix="train-step-bench-"))
    models = {"diffusers": recipe} if "diffusers" in sides else {}
    for side in ("ours", "clue"):
        if side in sides:
            models[side] = Ours(cfg, dataset, recipe, style=side == "clue", out=out / side)
    return cfg, dataset, models


@torch.no_grad()
def parity(cfg, dataset, recipe: Recipe, ours: Ours) -> dict:
    """The same computation on both sides for one batch with the same z0 (the posterior mean), noise and timesteps:
    max abs differences of latents, text context and loss (float32 noise only if the step is the same work)."""
    items = [dataset[i] for i in range(min(4, len(dataset)))]
    images, prompts = torch.stack([it["image"] for it in items]), [it["prompt"] for it in items]
    clue, g = ours.clue, torch.Generator().manual_seed(0)
    z_ours = clue.encode_images(images, sample=False)
    z_ref = recipe.vae.encode(images).latent_dist.mean * recipe.vae.config.scaling_factor
    ids = recipe.tokenizer(prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    c_ours, c_ref = clue.encode_prompts(prompts), recipe.text(ids, return_dict=False)[0]
    eps, t = torch.randn(z_ref.shape, generator=g), torch.randint(0, 1000, (len(items),), generator=g)
    target = eps if cfg["prediction_type"] == "epsilon" else clue.schedule.target(z_ours, eps, t)
    loss_ours = F.mse_loss(clue.unet(clue.schedule.q_sample(z_ours, t, eps), t, c_ours), target)
    target = eps if cfg["prediction_type"] == "epsilon" else recipe.scheduler.get_velocity(z_ref, eps, t)
    loss_ref = F.mse_loss(recipe.unet(recipe.scheduler.add_noise(z_ref, eps, t), t, c_ref).sample, target)
    return {"latents": (z_ours - z_ref).abs().max().item(), "context": (c_ours - c_ref).abs().max().item(),
            "loss": abs(loss_ours.item() - loss_ref.item()), "loss_value": loss_ref.item()}


def time_rounds(models, rounds, k):
    """{"wall" | "cpu": {side: [seconds per step, one per round]}}, the sides' order alternating from round to round;
    "cpu" is this process's CPU time (one thread: what another job on the machine takes away does not count)."""
    times, names = {clock: {n: [] for n in models} for clock in ("wall", "cpu")}, list(models)
    for r in range(rounds + 1):  # round 0: warm-up
        for n in (names if r % 2 == 0 else names[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(k):
                models[n].step()
            if r > 0:
                times["wall"][n].append((time.perf_counter() - wall) / k)
                times["cpu"][n].append((time.process_time() - cpu) / k)
    return times


def memory_child(name, side, steps=3):
    """One side in a fresh process: the peak resident set (VmHWM) during `steps` steps above the resident set once
    everything is built (writing 5 to /proc/self/clear_refs resets the peak to the current resident set)."""
    cfg, dataset, models = build(name, ("diffusers", side))
    model = models[side]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_bytes("VmRSS")
    for _ in range(steps):
        model.step()
    print(json.dumps({"step_peak": status_bytes("VmHWM") - base, "resident_before": base}))


def run_config(name, args):
    cfg, dataset, models = build(name)
    k = args.steps_per_round or (1 if name == "sd2" else 2)
    check = parity(cfg, dataset, models["diffusers"], models["ours"])
    n_params = {n: sum(p.numel() for p in (m.unet if n == "diffusers" else m.clue).parameters())
                for n, m in models.items()}
    cache = {"seconds": models["ours"].setup_seconds, "images": len(dataset),
             "bytes": len(dataset) * dataset_latent_bytes(models["ours"])}
    clocks = time_rounds(models, args.rounds, k)
    res = {"config": {key: (asdict(v) if is_dataclass(v) else v) for key, v in cfg.items()},
           "steps_per_round": k, "rounds": args.rounds, "parameters": n_params, "parity_max_abs_diff": check,
           "latent_cache": cache, "seconds_per_step_all": clocks}
    for clock, times in clocks.items():
        ratios = {f"{a}_over_{b}": [x / y for x, y in zip(times[a], times[b])]
                  for a, b in (("ours", "diffusers"), ("clue", "ours"), ("clue", "diffusers"))}
        res[clock] = {"seconds_per_step": {n: statistics.median(v) for n, v in times.items()},
                      "images_per_second": {n: cfg["batch"] / statistics.median(v) for n, v in times.items()},
                      "ratio": {key: statistics.median(v) for key, v in ratios.items()}, "ratios": ratios}
    if not args.no_memory:
        res["step_peak_memory_bytes"] = {}
        for side in SIDES:
            cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
                   "--memory-child", name, side]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            res["step_peak_memory_bytes"][side] = json.loads(out)
    return res


def dataset_latent_bytes(ours: Ours) -> int:
    item = ours.state.stream.dataset[0]
    return item["posterior"].numel() * item["posterior"].element_size() if "posterior" in item else 0


def table(name, r):
    s, ips, mem = r["wall"]["seconds_per_step"], r["wall"]["images_per_second"], r.get("step_peak_memory_bytes")
    lines = [f"\n{name}: batch {r['config']['batch']}, {r['config']['size']} px; median of {r['rounds']} rounds x "
             f"{r['steps_per_round']} step(s); parity (same z0, noise, t): loss diff "
             f"{r['parity_max_abs_diff']['loss']:.1e}"
             f"; latent cache {r['latent_cache']['seconds']:.1f} s once for {r['latent_cache']['images']} images",
             "| step | ms / step (wall) | ms / step (CPU) | images / s | peak memory of the steps (MiB) |",
             "|---|---|---|---|---|"]
    for n, label in (("diffusers", "diffusers recipe"), ("ours", "ours, vanilla"), ("clue", "ours, CLUE")):
        m = f"{mem[n]['step_peak'] / 2 ** 20:.0f}" if mem else "-"
        cpu = 1e3 * r["cpu"]["seconds_per_step"][n]
        lines.append(f"| {label} | {1e3 * s[n]:.0f} | {cpu:.0f} | {ips[n]:.1f} | {m} |")
    for clock in ("wall", "cpu"):
        q = r[clock]["ratio"]
        lines.append(f"{clock}: ours / diffusers {q['ours_over_diffusers']:.3f}, CLUE / ours "
                     f"{q['clue_over_ours']:.3f}, CLUE / diffusers {q['clue_over_diffusers']:.3f} (medians of ratios)")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(*args.memory_child)
    if args.rounds < 2 or args.rounds % 2:
        raise SystemExit(f"train_step_vs_diffusers.py: --rounds must be an even number >= 2, got {args.rounds}")
    import diffusers
    import transformers
    names = {"both": ["tiny", "sd2"]}.get(args.config, [args.config])
    results = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
               "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "configs": {}}
    for name in names:
        results["configs"][name] = r = run_config(name, args)
        print(table(name, r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train_step_vs_diffusers_cpu.json" if args.config != "smoke" else
                        "train_step_vs_diffusers_smoke.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
