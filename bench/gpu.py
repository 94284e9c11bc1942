"""SD-scale training and sampling on one CUDA device, side by side with diffusers (issue 13).

One program, one process, five parts. Every comparison runs on the SAME random weights and inputs (diffusers
initialises, ours loads its state dict: the module names are diffusers'), with warm-up rounds first, then repeats
that alternate which side goes first, torch.cuda.synchronize around every timer, medians (ratios: the median of
the per-round ratios ours / diffusers, below 1 = we are faster), and the peak-memory counter reset between sides.

1. U-Net training step. SD 2.1-base-shaped U-Net at full size (channels 320/640/1280/1280, 64-dim heads, context
   1024, 866 M parameters), bf16 autocast, batch 8 of 64x64 latents, forward + backward + AdamW, with and without
   gradient checkpointing: ms/step, images/s, peak memory, ours / diffusers.
2. A whole CLUE training step at 512 px, the body of train.py's loop (VAE encode, text encoder, style encoder,
   U-Net, capacity-KL + MMD loss, clipping, AdamW, EMA; VAE and text encoder frozen), bf16; the vanilla step (no
   style branch) for the style branch's cost; the CLUE step in fp16 with a GradScaler (train.py's fp16 path).
3. Sampling. 50 DDIM steps, guidance 7.5, batch 4 at 512 px: CLUE.generate against diffusers'
   StableDiffusionPipeline on the same U-Net, VAE and CLIP text weights (the pipeline tokenizes with its own
   CLIPTokenizer, built offline from open_clip's BPE file): seconds per batch under bf16 autocast (how
   sample.py --dtype bf16 runs), and the image difference in fp32 (TF32 off).
4. fp16 inference of the SD 2.1-768-v U-Net (96x96 latents) with the fp32 attention upcast and without it,
   against fp32. Random weights give small attention logits (every path agrees), so it is repeated with W_q, W_k
   scaled until the largest logit q.k/sqrt(d) is 1.5x fp16's maximum (65504), the regime the upcast exists for:
   there the explicit softmax(QK^T) in fp16 overflows (inf - inf = NaN) and the upcast one does not. Every fp16
   path is far from fp32 there all the same: fp16's rounding of q and k (2^-11, about 50 in a logit of 1e5) is
   larger than the gaps between logits, so the upcast buys finite outputs, not the accuracy the fp16 projections
   lost. Without the upcast both paths are shown: PyTorch's fused SDPA kernels (which accumulate q.k and the
   softmax in fp32 anyway) and the explicit one (SDPA's math backend with fp16 reductions allowed; diffusers'
   classic AttnProcessor). Ours runs as sample.py does (fp32 weights, fp16 autocast); diffusers as its users do
   (fp16 weights), where the classic processor honours upcast_attention and AttnProcessor2_0 (its default)
   ignores it.
5. MFU. FLOPs of each training step of parts 1 and 2 (torch.utils.flop_counter.FlopCounterMode over one step;
   attention kernels the counter has no formula for are counted by hand) over its median time, against the bf16
   dense peak measured at the start of the same run (8192^3 matmuls). With checkpointing, MFU uses the model's
   FLOPs (the step without it) and HFU the counted ones, recomputation included.

Results: OUT/gpu.json, rewritten after every part (a timeout still leaves the finished parts), and OUT/gpu.md.
A time budget (--budget, default 420 s) shortens repeats and then skips parts, so that the whole run stays under
8 minutes on one H100/H200. --smoke runs every part at tiny sizes on the CPU (tests/test_bench_gpu.py); its
numbers mean nothing, its part 4 runs fp16 autocast on the CPU (other kernels than CUDA's), and nothing is
measured for memory. Nothing reaches a model hub.

    python bench/gpu.py                            # CUDA: writes bench/results/gpu.json and gpu.md
    python bench/gpu.py --smoke --out /tmp/gpu     # CPU, tiny sizes, well under a minute
"""
import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # the reference libraries must never try to reach a hub

sys.path.insert(0, os.path.join(ROOT, "tests"))
from clue import CLUE, CLUEConfig, Sampling  # noqa: E402
from convert import hf_clip_to_open_clip  # noqa: E402
from reference import clip_tokenizer_offline, unet_to_diffusers, vae_to_diffusers  # noqa: E402 (tests/reference.py)
from schedulers import NoiseSchedule  # noqa: E402
from style_encoder import StyleConfig, StyleEncoder  # noqa: E402
from text_encoder import TextConfig, TextEncoder  # noqa: E402
from training_state import EMA  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402
from vae import VAE, VAEConfig  # noqa: E402

FP16_MAX = 65504.0
NEGATIVE = "blurry, low quality"
PARTS = {1: "unet_train", 2: "clue_step", 3: "sampling", 4: "fp16_upcast", 5: "mfu"}
WEIGHT = {1: 0.25, 2: 0.25, 3: 0.35, 4: 0.15}  # shares of the time budget (part 5 is bookkeeping)


def text_to_image(model: CLUE, prompts: list[str], negative: str, steps: int, guidance: float, latents):
    """CLUE.generate, plain text-to-image from given initial latents."""
    return model.generate(prompts, Sampling(steps=steps, guidance=guidance, negative_prompt=negative),
                          latents=latents, progress=False)


# ------------------------------------------------------------------------------------ sizes and diffusers configs
def sizes(smoke: bool) -> dict:
    if not smoke:
        return dict(unet=UNetConfig.sd21_base(style=False), unet_v=UNetConfig.sd21(style=False), vae=VAEConfig.sd(),
                    text=TextConfig.sd21(), style=StyleConfig.sd(1024), train_batch=8, latent=64, image=512,
                    sample_batch=4, steps=50, v_batch=2, v_latent=96, matmul=8192, warmup=2, repeats=10,
                    sample_repeats=3)
    unet = UNetConfig(block_channels=(32, 32, 64, 64), layers_per_block=1, attention_levels=(True, True, True, False),
                      num_heads=(2, 2, 4, 4), context_dim=64, style=False)
    return dict(unet=unet, unet_v=replace(unet, upcast_attention=True), vae=VAEConfig.tiny(), text=TextConfig.tiny(),
                style=StyleConfig.tiny(), train_batch=2, latent=16, image=64, sample_batch=2, steps=3, v_batch=2,
                v_latent=16, matmul=256, warmup=1, repeats=2, sample_repeats=2)


def text_to_transformers(cfg: TextConfig):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width,
                          intermediate_size=int(cfg.mlp_ratio * cfg.width), num_attention_heads=cfg.heads,
                          num_hidden_layers=cfg.layers, max_position_embeddings=cfg.context_length,
                          hidden_act=cfg.act, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=0 if cfg.pad == "zero" else 49407)


# ------------------------------------------------------------------------------------ timing, memory, FLOPs
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def interleaved(fns: dict, dev, warmup: int, repeats: int, deadline: float, min_repeats: int = 3) -> dict:
    """{name: [seconds per timed round]}: warm-up rounds, then rounds alternating who goes first; stops early (after
    min_repeats) once the part's deadline has passed."""
    names, times = list(fns), {n: [] for n in fns}
    for r in range(warmup + repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            s = timed(fns[n], dev)
            if r >= warmup:
                times[n].append(s)
        if r + 1 - warmup >= min(min_repeats, repeats) and time.monotonic() > deadline:
            break
    return times


def summary(times: dict, batch: int, a: str = "ours", b: str = "diffusers") -> dict:
    out = {n: {"ms": 1e3 * statistics.median(s), "images_per_s": batch / statistics.median(s), "rounds": len(s)}
           for n, s in times.items()}
    if a in times and b in times:
        out["ratio"] = statistics.median([x / y for x, y in zip(times[a], times[b])])  # time, ours / diffusers
    return out


def own_bytes(*modules, opt=None, ema=None) -> int:
    """Bytes held between steps by one side: parameters and buffers, optimizer states, EMA shadow."""
    seen, tensors = set(), []
    for m in modules:
        tensors += [t for t in list(m.parameters()) + list(m.buffers())]
    if opt is not None:
        tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    if ema is not None:
        tensors += list(ema.shadow.values())
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def peak_bytes(fn, dev, held: int):
    """Peak allocated memory of one call as if this side were alone: the peak above what was allocated before
    the call (both sides' weights and states) plus what this side holds itself. None on the CPU."""
    if dev.type != "cuda":
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base + held


def mib(b):
    return None if b is None else b / 2 ** 20


def free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _sdpa_fwd_flops(q, k, v, *args, out_shape=None, **kw):
    b, h, n, d = q                                 # shapes: FlopCounterMode passes them in place of tensors
    return 2 * b * h * n * k[2] * d + 2 * b * h * n * k[2] * v[3]       # Q K^T, then P V


def _sdpa_bwd_flops(grad_out, q, k, v, *args, out_shape=None, **kw):
    return 2 * _sdpa_fwd_flops(q, k, v)           # dQ, dK from dS; dV, dP from dO


def count_flops(fn) -> dict:
    """FLOPs of one call by op. The CPU's flash-attention kernels have no formula in FlopCounterMode: they are
    counted by hand (the CUDA kernels and the math path's bmm are counted by torch itself)."""
    from torch.utils.flop_counter import FlopCounterMode
    aten, custom = torch.ops.aten, {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_fwd_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_bwd_flops)):
        if hasattr(aten, name):
            custom[getattr(aten, name)] = formula
    try:
        with FlopCounterMode(display=False, custom_mapping=custom) as counter:
            fn()
    except Exception as e:                                          # noqa: BLE001  MFU lacks a row, the part stays
        return {"error": f"{type(e).__name__}: {e}"}
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    attention = sum(v for k, v in by_op.items() if "attention" in k)
    return {"total": int(counter.get_total_flops()), "attention_kernels": attention,
            "by_op": by_op, "hand_counted_ops": sorted(str(k) for k in custom if str(k) in by_op)}


def unet_attention_flops(cfg: UNetConfig, batch: int, h: int, w: int, context_len: int = 77) -> int:
    """Forward FLOPs of the U-Net's attention products alone (QK^T and PV, 4 N M C per sample and block), from the
    config: a cross-check that the counter saw every attention kernel."""
    def blocks(level, ch, count):
        n = math.ceil(h / 2 ** level) * math.ceil(w / 2 ** level)  # tokens: the stride-2 convs round up
        return count * cfg.transformer_depth * 4 * batch * (n * n + n * context_len) * ch

    total = sum(blocks(i, ch, 2 * cfg.layers_per_block + 1)        # down: layers_per_block, up: one more
                for i, (ch, attend) in enumerate(zip(cfg.block_channels, cfg.attention_levels)) if attend)
    return total + blocks(len(cfg.block_channels) - 1, cfg.block_channels[-1], 1)   # the middle block


# ------------------------------------------------------------------------------------ the run: budget, results, files
class Run:
    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.dev = torch.device("cpu" if args.smoke else "cuda")
        self.S = sizes(args.smoke)
        if args.repeats:
            self.S["repeats"] = self.S["sample_repeats"] = args.repeats
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.results = {"meta": self.meta(), "parts": {}}

    def meta(self) -> dict:
        import diffusers
        d = self.dev
        return {"smoke": self.smoke, "device": d.type,
                "device_name": torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda,
                "device_memory_gib": (torch.cuda.get_device_properties(d).total_memory / 2 ** 30
                                      if d.type == "cuda" else None),
                "threads": torch.get_num_threads(), "budget_s": self.args.budget,
                "tf32": False, "cudnn_benchmark": d.type == "cuda",
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def part_deadline(self, part: int) -> float:
        """This part's share of the time left, by the remaining parts' weights."""
        left = [p for p in WEIGHT if p >= part]
        share = WEIGHT[part] / sum(WEIGHT[p] for p in left)
        return time.monotonic() + share * max(0.0, self.deadline - time.monotonic())

    def record(self, part: int, value: dict):
        self.results["parts"][f"{part}_{PARTS[part]}"] = value
        self.results["meta"]["elapsed_s"] = time.monotonic() - self.t0
        self.write()

    def write(self):
        os.makedirs(self.args.out, exist_ok=True)
        for name, text in (("gpu.json", json.dumps(self.results, indent=1)), ("gpu.md", markdown(self.results))):
            path = os.path.join(self.args.out, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------ part 1: the U-Net training step
def part_unet_train(run: Run) -> dict:
    from diffusers import UNet2DConditionModel
    S, dev, deadline = run.S, run.dev, run.part_deadline(1)
    cfg, B, L = S["unet"], S["train_batch"], S["latent"]
    torch.manual_seed(0)
    with torch.device(dev):
        ref = UNet2DConditionModel(**unet_to_diffusers(cfg)).train()
        ours = UNet(replace(cfg)).train()                              # its own config: checkpointing is set on it
    ours.load_state_dict(ref.state_dict(), strict=True)            # identical names: the same weights
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, cfg.in_channels, L, L, generator=g).to(dev)
    t = torch.randint(0, 1000, (B,), generator=g).to(dev)
    c = torch.randn(B, 77, cfg.context_dim, generator=g).to(dev)
    target = torch.randn(B, cfg.out_channels, L, L, generator=g).to(dev)
    with torch.no_grad():
        k = min(B, 2)
        parity = (ours(x[:k], t[:k], c[:k]) - ref(x[:k], t[:k], encoder_hidden_states=c[:k]).sample).abs().max().item()
    calls = {"ours": lambda: ours(x, t, c), "diffusers": lambda: ref(x, t, encoder_hidden_states=c).sample}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-6, weight_decay=1e-2) for n, m in
            (("ours", ours), ("diffusers", ref))}

    def step(name):
        def fn():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = calls[name]()
            F.mse_loss(out.float(), target).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        return fn

    steps = {n: step(n) for n in calls}
    res = {"config": {**asdict(cfg), "batch": B, "latent": L, "context": [77, cfg.context_dim], "autocast": "bf16",
                      "optimizer": "AdamW (torch default foreach)"},
           "parameters": sum(p.numel() for p in ours.parameters()), "max_abs_output_diff_fp32": parity}
    for i, (mode, ckpt) in enumerate((("no_checkpointing", False), ("checkpointing", True))):
        ours.cfg.gradient_checkpointing = ckpt                        # read by UNet.forward (train.py does this)
        if ckpt:
            ref.enable_gradient_checkpointing()
        else:
            ref.disable_gradient_checkpointing()
        mode_deadline = time.monotonic() + (deadline - time.monotonic()) / (2 - i)
        r = summary(interleaved(steps, dev, S["warmup"], S["repeats"], mode_deadline), B)
        for n, m in (("ours", ours), ("diffusers", ref)):
            r[n]["peak_mib"] = mib(peak_bytes(steps[n], dev, own_bytes(m, opt=opts[n])))
            r[n]["flops"] = count_flops(steps[n])
        if dev.type == "cuda":
            r["memory_ratio"] = r["ours"]["peak_mib"] / r["diffusers"]["peak_mib"]
        res[mode] = r
    res["attention_flops_analytic"] = 3 * unet_attention_flops(cfg, B, L, L)   # forward + backward (2x)
    return res


# ------------------------------------------------------------------------------------ part 2: the whole CLUE step
def build_clue(S, dev, style: bool, shared: CLUE | None = None) -> CLUE:
    """CLUE (or the vanilla baseline) on SD 2.1-base-shaped parts; frozen VAE and text encoder, as train.py
    fine-tunes SD. `shared` lends its VAE and text encoder."""
    with torch.device(dev):
        vae = shared.vae if shared is not None else VAE(S["vae"])
        text = shared.text_encoder if shared is not None else TextEncoder(S["text"])
        unet = UNet(replace(S["unet"], style=style))
        style_encoder = StyleEncoder(S["style"]) if style else None
    cfg = CLUEConfig(prediction_type="epsilon", scale_factor=S["vae"].scale_factor, image_size=S["image"],
                     kl_mode="capacity", gamma=0.2, capacity=0.1, capacity_ramp_steps=5000, mmd_weight=0.1)
    model = CLUE(vae, text, unet, style_encoder, NoiseSchedule(prediction_type="epsilon"), cfg).train()
    model.vae.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    return model


def part_clue_step(run: Run) -> dict:
    S, dev, deadline = run.S, run.dev, run.part_deadline(2)
    B, H = S["train_batch"], S["image"]
    torch.manual_seed(0)
    models = {"clue": build_clue(S, dev, True)}
    models["vanilla"] = build_clue(S, dev, False, shared=models["clue"])
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(B, 3, H, H, generator=g).mul(2).sub(1).to(dev),
             "prompt": [f"an otoscopic image of class {i % 4}" for i in range(B)]}
    state = {}
    for n, m in models.items():
        trainable = {k: p for k, p in m.named_parameters() if p.requires_grad}
        state[n] = dict(trainable=trainable, opt=torch.optim.AdamW(trainable.values(), lr=1e-6, weight_decay=1e-2),
                        ema=EMA(trainable, 0.999), step=0)

    def step(name, dtype=torch.bfloat16, scaler=None):
        m, st = models[name], state[name]
        scaler = scaler or torch.amp.GradScaler(dev.type, enabled=False)

        def fn():                                  # train.py's loop body, one micro-batch
            with torch.autocast(dev.type, dtype=dtype):
                loss, logs = m.loss(batch, st["step"])
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"{name}: loss {loss.item()} at step {st['step']} ({logs})")
            scaler.scale(loss).backward()
            scaler.unscale_(st["opt"])
            torch.nn.utils.clip_grad_norm_(st["trainable"].values(), 1.0)
            scaler.step(st["opt"])
            scaler.update()
            st["opt"].zero_grad(set_to_none=True)
            st["ema"].update(st["trainable"])
            st["step"] += 1
        return fn

    res = {"config": {"image": H, "batch": B, "unet": asdict(S["unet"]), "vae": asdict(S["vae"]),
                      "text": asdict(S["text"]), "style": asdict(S["style"]), "clue": asdict(models["clue"].cfg),
                      "trained": "U-Net + style encoder (VAE, text encoder frozen)", "ema_decay": 0.999,
                      "max_grad_norm": 1.0},
           "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
           "trained_parameters": {n: sum(p.numel() for p in st["trainable"].values()) for n, st in state.items()}}
    fns = {n: step(n) for n in models}
    times = interleaved(fns, dev, S["warmup"], S["repeats"], time.monotonic() + 0.7 * (deadline - time.monotonic()))
    r = summary(times, B, "clue", "vanilla")
    r["style_branch_cost"] = r.pop("ratio") - 1                     # time of CLUE / vanilla - 1
    for n, m in models.items():
        held = own_bytes(m, opt=state[n]["opt"], ema=state[n]["ema"])
        r[n]["peak_mib"] = mib(peak_bytes(fns[n], dev, held))
        r[n]["flops"] = count_flops(fns[n])
    res["bf16"] = r
    # fp16 autocast + GradScaler, the CLUE model alone (train.py --mixed-precision fp16)
    scaler = torch.amp.GradScaler(dev.type, init_scale=2.0 ** 16)
    fp16 = step("clue", torch.float16, scaler)
    times = interleaved({"clue": fp16}, dev, S["warmup"], S["repeats"], deadline)
    r16 = summary(times, B)
    r16["clue"]["peak_mib"] = mib(peak_bytes(fp16, dev, own_bytes(models["clue"], opt=state["clue"]["opt"],
                                                                    ema=state["clue"]["ema"])))
    r16["grad_scale_final"] = float(scaler.get_scale())
    r16["params_finite"] = all(bool(torch.isfinite(p).all()) for p in state["clue"]["trainable"].values())
    res["fp16_gradscaler"] = r16
    return res


# ------------------------------------------------------------------------------------ part 3: sampling vs the pipeline
def part_sampling(run: Run) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    S, dev, deadline = run.S, run.dev, run.part_deadline(3)
    B, H, steps, L = S["sample_batch"], S["image"], S["steps"], S["latent"]
    torch.manual_seed(0)
    with torch.device(dev):
        d_unet = UNet2DConditionModel(**unet_to_diffusers(S["unet"])).eval()
        d_vae = AutoencoderKL(**vae_to_diffusers(S["vae"])).eval()
        d_text = CLIPTextModel(text_to_transformers(S["text"])).eval()
        unet, vae, text = UNet(S["unet"]).eval(), VAE(S["vae"]).eval(), TextEncoder(S["text"]).eval()
    unet.load_state_dict(d_unet.state_dict(), strict=True)
    vae.load_state_dict(d_vae.state_dict(), strict=True)
    text.load_state_dict(hf_clip_to_open_clip(d_text.state_dict()), strict=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              timestep_spacing="leading")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer_offline(tmp, S["text"].pad)
    pipe = StableDiffusionPipeline(vae=d_vae, text_encoder=d_text, tokenizer=tokenizer, unet=d_unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    model = CLUE(vae, text, unet, None, NoiseSchedule(prediction_type="epsilon"),
                 CLUEConfig(prediction_type="epsilon", scale_factor=S["vae"].scale_factor, image_size=H))
    prompts = ["a photograph of an astronaut riding a horse", "an oil painting of a lighthouse at night",
               "a watercolour of a fox in the snow", "a macro photo of a dew drop on a leaf"][:B]
    prompts += [f"a picture of thing {i}" for i in range(len(prompts), B)]
    latents = torch.randn(B, 4, L, L, generator=torch.Generator().manual_seed(0))
    out = {}

    def ours(dtype=None):
        def fn():
            with torch.autocast(dev.type, dtype=dtype) if dtype else nullcontext():
                out["ours"] = text_to_image(model, prompts, NEGATIVE, steps, 7.5, latents).float()
        return fn

    def diffusers(dtype=None):
        def fn():
            with torch.autocast(dev.type, dtype=dtype) if dtype else nullcontext():
                out["diffusers"] = pipe(prompt=prompts, negative_prompt=[NEGATIVE] * B, num_inference_steps=steps,
                                        guidance_scale=7.5, latents=latents, height=H, width=H,
                                        output_type="pt").images.float()
        return fn

    def difference() -> dict:
        a, b = out["ours"], out["diffusers"]
        return {"max_abs": (a - b).abs().max().item(), "mean_abs": (a - b).abs().mean().item(),
                "unclipped_fraction": ((b > 0) & (b < 1)).float().mean().item()}

    res = {"config": {"batch": B, "image": H, "steps": steps, "guidance": 7.5, "negative_prompt": NEGATIVE,
                      "scheduler": "DDIM leading, steps_offset 1, set_alpha_to_one False"}}
    # 1. fp32 (TF32 off): the image difference, one run each
    res["fp32"] = {"ours_s": timed(ours(), dev), "diffusers_s": timed(diffusers(), dev),
                   "image_difference": difference()}
    # 2. bf16 autocast: seconds per batch, interleaved
    fns = {"ours": ours(torch.bfloat16), "diffusers": diffusers(torch.bfloat16)}
    times = interleaved(fns, dev, 1, S["sample_repeats"], deadline, min_repeats=2)
    r = summary(times, B)
    for n in fns:
        r[n]["s_per_batch"] = r[n]["ms"] / 1e3
        r[n]["peak_mib"] = mib(peak_bytes(fns[n], dev, own_bytes(*((unet, vae, text) if n == "ours" else
                                                                     (d_unet, d_vae, d_text)))))
    r["image_difference"] = difference()
    res["bf16"] = r
    return res


# ------------------------------------------------------------------------------------ part 4: fp16 and the upcast
class MaxLogit(TorchDispatchMode):
    """Records the largest |q.k| * scale over every fused attention kernel that runs (fp32 reference pass)."""

    def __init__(self):
        super().__init__()
        self.max, self.calls = 0.0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in str(func) and "backward" not in str(func):
            q, k = args[0].float(), args[1].float()
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            for i in range(0, q.shape[2], 2048):                   # rows in chunks: (B,h,2048,M) at a time
                self.max = max(self.max, (q[:, :, i:i + 2048] @ k.transpose(-1, -2)).abs().max().item() * scale)
            self.calls += 1
        return func(*args, **kwargs)


def part_fp16_upcast(run: Run) -> dict:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel
    S, dev = run.S, run.dev
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[run.args.low_precision]
    cfg_up = S["unet_v"]
    cfg_no = replace(cfg_up, upcast_attention=False)
    B, L = S["v_batch"], S["v_latent"]
    torch.manual_seed(0)
    with torch.device(dev):
        ref = UNet2DConditionModel(**unet_to_diffusers(cfg_up)).eval()
        up, no = UNet(cfg_up).eval(), UNet(cfg_no).eval()
    init = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    ref.to(low)                                                      # diffusers' way: weights in fp16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg_up.in_channels, L, L, generator=g).to(dev)
    t = torch.tensor([999, 500, 250, 50][:B] + [500] * max(0, B - 4)).to(dev)
    c = torch.randn(B, 77, cfg_up.context_dim, generator=g).to(dev)

    def ours(model, explicit=False):
        """sample.py --dtype fp16. explicit: SDPA's math backend, softmax(QK^T) with fp16 reductions allowed (by
        default that backend too computes in fp32)."""
        backend = sdpa_kernel(SDPBackend.MATH) if explicit else nullcontext()
        allow = getattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp", lambda on: None)  # torch >= 2.5
        allow(explicit)
        try:
            with torch.no_grad(), torch.autocast(dev.type, dtype=low), backend:
                return model(x, t, c).float()
        finally:
            allow(False)

    def theirs(processor, upcast):
        ref.set_attn_processor(processor)
        for m in ref.modules():
            if isinstance(m, DiffusersAttention):
                m.upcast_attention = upcast
        with torch.no_grad():
            return ref(x.to(low), t, encoder_hidden_states=c.to(low)).sample.float()

    def stats(out, reference):
        ok = torch.isfinite(out)
        d = (out - reference).abs()[ok]
        return {"finite": bool(ok.all()), "nonfinite_fraction": 1 - ok.float().mean().item(),
                "max_abs_err": d.max().item() if d.numel() else None,
                "mean_abs_err": d.mean().item() if d.numel() else None}

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    res = {"config": {**asdict(cfg_up), "batch": B, "latent": L, "timesteps": t.tolist(),
                      "low_precision": run.args.low_precision, "prediction": "v (SD 2.1-768-v U-Net)",
                      "ours": "fp32 weights, autocast", "diffusers": f"weights in {run.args.low_precision}",
                      "stress_target_logit": 1.5 * FP16_MAX}}
    for name in ("random_init", "stressed"):
        weights = init
        if name == "stressed":                                       # largest logit -> 1.5 x fp16's maximum
            alpha = math.sqrt(1.5 * FP16_MAX / res["random_init"]["max_logit"])
            weights = {k: v * alpha if k.endswith(("attn1.to_q.weight", "attn1.to_k.weight", "attn2.to_q.weight",
                                                   "attn2.to_k.weight")) else v for k, v in init.items()}
        for m in (up, no, ref):
            m.load_state_dict(weights, strict=True)
        probe = MaxLogit()
        with torch.no_grad(), sdpa_kernel(fused), probe:
            reference = up(x, t, c).float()                          # fp32 reference (TF32 off)
        if probe.calls == 0:
            raise RuntimeError("part 4: no fused attention kernel ran in the fp32 pass; cannot measure logits")
        r = {"max_logit": probe.max, "reference_std": reference.std().item(),
             "ours_upcast": stats(ours(up), reference),
             "ours_no_upcast_fused_sdpa": stats(ours(no), reference),
             "ours_no_upcast_explicit_softmax": stats(ours(no, explicit=True), reference),
             "diffusers_upcast_classic": stats(theirs(AttnProcessor(), True), reference),
             "diffusers_no_upcast_classic": stats(theirs(AttnProcessor(), False), reference),
             "diffusers_sdpa_default": stats(theirs(AttnProcessor2_0(), True), reference)}
        if name == "stressed":
            r["alpha"] = alpha
        res[name] = r
        free(dev)
    return res


# ------------------------------------------------------------------------------------ part 5: MFU
def matmul_peak(dev, n: int, iters: int = 10, rounds: int = 3) -> dict:
    """bf16 dense peak of this device: n^3 matmuls, 3 warm-ups, `rounds` timed windows of `iters` products."""
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(rounds):
        s = timed(lambda: [a @ b for _ in range(iters)], dev)
        rates.append(2 * n ** 3 * iters / s)
    return {"n": n, "peak_flops": max(rates), "median_flops": statistics.median(rates)}


def part_mfu(run: Run) -> dict:
    peak = run.results["meta"]["matmul_peak"]["peak_flops"]
    rows = []
    p1 = run.results["parts"].get("1_unet_train", {})
    for side in ("ours", "diffusers") if "no_checkpointing" in p1 else ():
        counted = p1["no_checkpointing"][side]["flops"]
        if "total" not in counted:
            continue
        attention = counted["attention_kernels"] + counted["by_op"].get("aten.bmm", 0)
        # attention the counter missed (a kernel without a formula) is added by hand, from the config
        analytic = p1["attention_flops_analytic"]
        hand = analytic - attention if attention < 0.5 * analytic else 0
        for mode in ("no_checkpointing", "checkpointing"):
            if mode in p1:
                r, recompute = p1[mode][side], 4 / 3 if mode == "checkpointing" else 1   # forward run twice
                if "total" not in r["flops"]:
                    continue
                rows.append(dict(step=f"U-Net {side}, {mode.replace('_', ' ')}", batch=p1["config"]["batch"],
                                 ms=r["ms"], flops=counted["total"] + hand,
                                 hardware_flops=r["flops"]["total"] + hand * recompute, attention_added_by_hand=hand))
    p2 = run.results["parts"].get("2_clue_step", {})
    for side in ("clue", "vanilla"):
        if "bf16" in p2 and "total" in p2["bf16"][side]["flops"]:
            r = p2["bf16"][side]
            rows.append(dict(step=f"{side} step (whole)", batch=p2["config"]["batch"], ms=r["ms"],
                             flops=r["flops"]["total"], hardware_flops=r["flops"]["total"], attention_added_by_hand=0))
    for row in rows:
        s = row["ms"] / 1e3
        row.update(achieved_tflops=row["flops"] / s / 1e12, mfu=row["flops"] / s / peak,
                   hfu=row["hardware_flops"] / s / peak)
    return {"peak_tflops_measured": peak / 1e12, "rows": rows}


# ------------------------------------------------------------------------------------ report
def _fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def markdown(res: dict) -> str:
    """The tables of gpu.md, from the results so far."""
    m, P, f = res["meta"], res["parts"], _fmt
    title = "SMOKE, tiny sizes on the CPU: numbers mean nothing" if m["smoke"] else m["device_name"]
    out = [f"# GPU benchmark ({title})", "",
           f"torch {m['torch']}, diffusers {m['diffusers']}, CUDA {m['cuda']}; started {m['started']}, "
           f"{f(m.get('elapsed_s'), '.0f')} s; TF32 off; bf16 matmul peak "
           f"{f(m.get('matmul_peak', {}).get('peak_flops', 0) / 1e12)} TFLOP/s measured.", ""]
    if "1_unet_train" in P:
        p, c = P["1_unet_train"], P["1_unet_train"]["config"]
        out += [f"## 1. U-Net training step ({p['parameters'] / 1e6:.0f} M parameters, batch {c['batch']}, "
                f"{c['latent']}x{c['latent']} latents, bf16 autocast, AdamW; fp32 output difference "
                f"{p['max_abs_output_diff_fp32']:.2e})", ""]
        out += _table(["", "ours ms/step", "diffusers ms/step", "ours / diffusers", "ours img/s", "diffusers img/s",
                       "ours peak MiB", "diffusers peak MiB", "memory ours / diffusers"],
                      [[mode.replace("_", " "), f(r["ours"]["ms"]), f(r["diffusers"]["ms"]), f(r["ratio"], ".3f"),
                        f(r["ours"]["images_per_s"], ".2f"), f(r["diffusers"]["images_per_s"], ".2f"),
                        f(r["ours"]["peak_mib"], ".0f"), f(r["diffusers"]["peak_mib"], ".0f"),
                        f(r.get("memory_ratio"), ".3f")]
                       for mode, r in ((k, p[k]) for k in ("no_checkpointing", "checkpointing") if k in p)])
    if "2_clue_step" in P:
        p, c = P["2_clue_step"], P["2_clue_step"]["config"]
        r16 = p["fp16_gradscaler"]
        out += [f"## 2. Whole training step at {c['image']} px, batch {c['batch']} (VAE encode, text encoder, style "
                "encoder, U-Net, loss, clipping, AdamW, EMA)", ""]
        rows = [(f"{n}, bf16", p["bf16"][n], n) for n in ("clue", "vanilla")] + \
            [("clue, fp16 + GradScaler", r16["clue"], "clue")]
        out += _table(["step", "ms/step", "images/s", "peak MiB", "trained parameters"],
                      [[name, f(r["ms"]), f(r["images_per_s"], ".2f"), f(r["peak_mib"], ".0f"),
                        f"{p['trained_parameters'][n] / 1e6:.1f} M"] for name, r, n in rows])
        out += [f"Style branch cost: {100 * p['bf16']['style_branch_cost']:+.1f} % time per step over vanilla. "
                f"fp16: final grad scale {r16['grad_scale_final']:g}, parameters finite: {r16['params_finite']}.", ""]
    if "3_sampling" in P:
        p, c = P["3_sampling"], P["3_sampling"]["config"]
        r, r32 = p["bf16"], p["fp32"]
        d32, d16 = r32["image_difference"], r["image_difference"]
        out += [f"## 3. Sampling: {c['steps']} DDIM steps, guidance {c['guidance']}, batch {c['batch']} at "
                f"{c['image']} px, ours vs StableDiffusionPipeline", ""]
        out += _table(["", "ours", "diffusers", "ours / diffusers"],
                      [[f"bf16 autocast, s per batch (median of {r['ours']['rounds']})",
                        f(r["ours"]["s_per_batch"], ".3f"), f(r["diffusers"]["s_per_batch"], ".3f"),
                        f(r["ratio"], ".3f")],
                       ["bf16 peak MiB", f(r["ours"]["peak_mib"], ".0f"), f(r["diffusers"]["peak_mib"], ".0f"), ""],
                       ["fp32, s per batch (one run)", f(r32["ours_s"], ".2f"), f(r32["diffusers_s"], ".2f"),
                        f(r32["ours_s"] / r32["diffusers_s"], ".3f")]])
        out += [f"Image difference (images in [0, 1]): fp32 max {d32['max_abs']:.2e}, mean {d32['mean_abs']:.2e} "
                f"({100 * d32['unclipped_fraction']:.0f} % of pixels unclipped); bf16 max {d16['max_abs']:.2e}, "
                f"mean {d16['mean_abs']:.2e}.", ""]
    if "4_fp16_upcast" in P:
        p, c = P["4_fp16_upcast"], P["4_fp16_upcast"]["config"]
        out += [f"## 4. {c['low_precision']} inference of the v-prediction U-Net, {c['latent']}x{c['latent']} "
                "latents, against fp32", ""]
        out += _table(["weights", "max logit", "output std", "variant", "finite", "non-finite", "max abs err",
                       "mean abs err"],
                      [[w, f"{p[w]['max_logit']:.3g}", f(p[w]["reference_std"], ".3f"), k, v["finite"],
                        f"{100 * v['nonfinite_fraction']:.1f} %", f(v["max_abs_err"], ".2e"),
                        f(v["mean_abs_err"], ".2e")]
                       for w in ("random_init", "stressed") if w in p for k, v in p[w].items() if isinstance(v, dict)])
    if "5_mfu" in P:
        p = P["5_mfu"]
        out += [f"## 5. MFU against the measured bf16 peak ({p['peak_tflops_measured']:.1f} TFLOP/s)", ""]
        out += _table(["step", "batch", "ms", "TFLOP per step (model)", "achieved TFLOP/s", "MFU", "HFU"],
                      [[r["step"], r["batch"], f(r["ms"]), f"{r['flops'] / 1e12:.3g}", f(r["achieved_tflops"]),
                        f"{100 * r['mfu']:.1f} %", f"{100 * r['hfu']:.1f} %"] for r in p["rows"]])
    out += [f"**{k} failed:** `{v.strip().splitlines()[-1]}`" for k, v in res.get("errors", {}).items()]
    out += [f"**{k} skipped:** {v}" for k, v in res.get("skipped", {}).items()]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every part at tiny sizes on the CPU (for the test)")
    p.add_argument("--out", default=None, help="folder for gpu.json and gpu.md (default bench/results; with "
                   "--smoke a new temporary folder)")
    p.add_argument("--parts", default="1,2,3,4,5", help="which parts to run, comma-separated")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run: repeats are cut, then "
                   "parts skipped, to stay inside it")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 10 training, 3 "
                   "sampling; smoke 2)")
    p.add_argument("--low-precision", choices=("fp16", "bf16"), default="fp16", help="part 4's low precision")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --smoke, else torch's)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="gpu_smoke_") if args.smoke else os.path.join(ROOT, "bench", "results")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here; run it on a GPU, or use --smoke for the CPU check")
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    torch.backends.cuda.matmul.allow_tf32 = False              # fp32 references are fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = not args.smoke
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()                     # e.g. its note on casting a model with .to(fp16)
    run = Run(args)
    run.results["meta"]["matmul_peak"] = matmul_peak(run.dev, run.S["matmul"])
    print(f"bench/gpu.py: {run.results['meta']['device_name']}, bf16 matmul peak "
          f"{run.results['meta']['matmul_peak']['peak_flops'] / 1e12:.1f} TFLOP/s; writing {args.out}", flush=True)
    wanted = [int(p) for p in args.parts.split(",")]
    functions = {1: part_unet_train, 2: part_clue_step, 3: part_sampling, 4: part_fp16_upcast, 5: part_mfu}
    for part in sorted(wanted):
        key, left = f"{part}_{PARTS[part]}", run.deadline - time.monotonic()
        if part != 5 and left < 15:
            run.results.setdefault("skipped", {})[key] = f"time budget spent ({args.budget:.0f} s)"
            run.write()
            continue
        t0 = time.monotonic()
        try:
            value = functions[part](run)
            value["seconds"] = time.monotonic() - t0
            run.record(part, value)
            print(f"part {part} ({PARTS[part]}) done in {value['seconds']:.1f} s", flush=True)
        except Exception:                                           # noqa: BLE001  keep the other parts' figures
            run.results.setdefault("errors", {})[key] = traceback.format_exc()
            run.write()
            print(f"part {part} ({PARTS[part]}) FAILED:\n{traceback.format_exc()}", flush=True)
        free(run.dev)                                               # the part's models went with its frame
    run.results["meta"]["elapsed_s"] = time.monotonic() - run.t0
    run.write()
    print(markdown(run.results), flush=True)
    print(f"wrote {os.path.join(args.out, 'gpu.json')} and gpu.md in {run.results['meta']['elapsed_s']:.0f} s")
    if run.results.get("errors"):
        raise SystemExit(f"bench/gpu.py: parts failed: {sorted(run.results['errors'])}")
    return run.results


if __name__ == "__main__":
    main()
