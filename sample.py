"""Generate images: plain Stable Diffusion text-to-image, or CLUE with every style control.

The sampler itself is CLUE.generate (clue.py: DDIM, Song et al. 2021, with classifier-free guidance, Ho &
Salimans 2022, one batched U-Net call per step). This program loads a model, decides what to draw, and writes
PNGs, a grid PNG and `run.json` (every setting, so a figure can be reproduced) into --out.

Models: a CLUE checkpoint folder (train.py / checkpoint.save_clue), or any Stable Diffusion weights convert.py
reads (a diffusers folder, a single .safetensors / .ckpt, our converted folder): plain text-to-image.

Four modes:
  prompts (default)     --prompt P (repeatable) x --num-images N each          -> out/images/000000.png..., out/grid.png
  a synthetic dataset   --per-class N | --scale PCT (percent of --data's class counts) -> out/<class>/00000.png
                        (class subfolders named like --data's, ready for `eval.py classify`)
  --grid classes-x-styles  rows: classes, columns: --n-styles style draws. The initial noise is the same in
                        every cell and column j uses the same prior draw for every class, so a row shows what
                        style alone changes and a column shows one style across classes.
  --grid interpolation  rows: classes, columns: slerp between the two --interpolate endpoints.

Left out: img2img, inpainting, other samplers, prompt weighting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from checkpoint import as_clue, atomic_write_json
from cli import (UsageError, finite_float, non_negative_float, non_negative_int, output_folder, positive_float,
                 positive_int, probability, run, torch_device)
from clue import CLUE, Sampling, StyleChoice, slerp
from convert import load_stable_diffusion
from data import (ClassFolderDataset, DataError, decode_problem, default_prompt_template, load_image, make_grid,
                  resolve_data, to_pil)
from unet import Attention

EXAMPLES = """examples:
  # plain text-to-image from Stable Diffusion weights (diffusers folder or single file)
  python sample.py --model stable-diffusion-2-1-base --prompt "a photo of an astronaut riding a horse" \\
      --negative-prompt "blurry" --steps 50 --guidance 7.5 --seed 0 --num-images 4 --dtype fp16 --out out/astronaut
  python sample.py --model v2-1_512-ema-pruned.safetensors --prediction-type epsilon --prompt "a lighthouse"
  # a CLUE checkpoint: 8 images of one class with prior styles at temperature 0.7
  python sample.py --model runs/digits/final --prompt "a handwritten digit 3" --style prior --tau 0.7 --num-images 8
  # a synthetic training set at 1000 % of the real class counts, for eval.py classify
  python sample.py --model runs/digits/final --data digits --scale 1000 --out synth/clue_1000
  # the diversity knobs: CADS noise on the text condition (any model), style guidance (CLUE)
  python sample.py --model runs/digits/vanilla/final --data digits --per-class 50 --condition-noise 0.1 --out synth/cads
  python sample.py --model runs/digits/final --prompt "a handwritten digit 3" --style-guidance 2 --num-images 8
  # the figure: rows digits, columns style draws
  python sample.py --model runs/digits/final --grid classes-x-styles --n-styles 8 --out figs/styles
  # interpolation between the styles of two reference images, for every class
  python sample.py --model runs/digits/final --grid interpolation --interpolate a.png b.png --n-interp 8
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a CLUE checkpoint folder, or SD weights convert.py reads")
    p.add_argument("--out", type=output_folder, default="samples", help="output folder (created; default: samples)")
    g = p.add_argument_group("text and sampler")
    g.add_argument("--prompt", action="append", help="prompt; repeat the flag for several prompts")
    g.add_argument("--negative-prompt", default="", help="prompt of the unconditional half of the guidance batch")
    g.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--guidance", type=finite_float, default=7.5, help="classifier-free guidance scale w; <= 1: off")
    g.add_argument("--eta", type=probability, default=0.0, help="DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like")
    g.add_argument("--condition-noise", type=non_negative_float, default=0.0, metavar="S",
                   help="CADS (Sadat et al. 2024): Gaussian noise of scale S on the text context, annealed from all "
                        "noise (t >= tau2) to none (t <= tau1), t running 1 -> 0; 0 (default): off. A diversity knob "
                        "for every model (vanilla's own); typical S: 0.1 to 0.25")
    g.add_argument("--cads-tau1", type=probability, default=None, help="CADS tau1 in [0, 1] (default 0.6)")
    g.add_argument("--cads-tau2", type=probability, default=None, help="CADS tau2 in [0, 1], > tau1 (default 0.9)")
    g.add_argument("--cads-psi", type=probability, default=None,
                   help="CADS psi in [0, 1]: weight of the noisy context rescaled to the clean one's mean and std "
                        "(default 1)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial noise (batch i: seed + i)")
    g.add_argument("--height", type=positive_int, default=None,
                   help="pixels, a multiple of the VAE's downsampling factor (default: the model's image size)")
    g.add_argument("--width", type=positive_int, default=None, help="pixels, likewise (default: the model's size)")
    g.add_argument("--batch", type=positive_int, default=4, help="images per U-Net batch (default 4)")
    g.add_argument("--num-images", type=positive_int, default=None, help="images per prompt (default: --batch)")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="single SD files only (they cannot store it): convert.py's default is epsilon for SD 1.x, "
                        "v_prediction for SD 2.x; pass epsilon for the 512 px 2.x-base files")
    g.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast precision on GPU (fp32 only on CPU); fp16 on a v-prediction model turns on "
                        "the fp32 attention upcast (SD 2.1-v needs it)")
    g = p.add_argument_group("style (CLUE checkpoints)")
    g.add_argument("--style", choices=("none", "prior", "posterior", "posterior-sample", "reference"), default=None,
                   help="where the style tokens come from: none (branch off), prior N(0, tau^2 I), posterior "
                        "(the class's Gaussian fitted to the training images), posterior-sample (a random training "
                        "image's mu), reference (--reference image). Default: prior for CLUE, none for plain SD")
    g.add_argument("--tau", type=non_negative_float, default=1.0, help="style temperature >= 0 (0: the mean style)")
    g.add_argument("--style-scale", type=finite_float, default=1.0, help="multiplier of the style branch output")
    g.add_argument("--style-guidance", type=finite_float, default=1.0, metavar="W",
                   help="style guidance scale w_s: eps(c, no style) + w_s (eps(c, s) - eps(c, no style)), composed "
                        "with --guidance (clue.py); 1 (default): the style as it is, 0: no style, > 1: more style")
    g.add_argument("--style-seed", type=non_negative_int, default=None,
                   help="--grid classes-x-styles: seed of the columns' style draws (default: --seed + 1)")
    g.add_argument("--reference", default=None, help="reference image for --style reference")
    g.add_argument("--reference-prompt", default=None, help="prompt of the reference image (default: the prompt)")
    g.add_argument("--class", dest="class_name", default=None,
                   help="class name for --style posterior* in prompt mode (default: the class whose prompt matches)")
    g = p.add_argument_group("synthetic dataset (CLUE checkpoints)")
    g.add_argument("--data", default=None, help="the real class folder (or 'digits'): class names and counts")
    g.add_argument("--prompt-template", default=None,
                   help="prompt with {class}; default: the checkpoint's training template, else data.py's default")
    g.add_argument("--per-class", type=positive_int, default=None, help="images per class")
    g.add_argument("--scale", type=positive_float, default=None,
                   help="percent of --data's real count per class (1000 = 10x)")
    g = p.add_argument_group("figures")
    g.add_argument("--grid", choices=("classes-x-styles", "interpolation"), default=None, help="figure mode")
    g.add_argument("--n-styles", type=positive_int, default=8, help="columns of --grid classes-x-styles")
    g.add_argument("--interpolate", nargs=2, metavar=("A", "B"), default=None,
                   help="endpoints of --grid interpolation: image paths (reference styles) or integers "
                        "(seeds of prior draws at --tau)")
    g.add_argument("--n-interp", type=positive_int, default=8, help="columns of --grid interpolation")
    a = p.parse_args(argv)
    dataset_or_grid = a.per_class is not None or a.scale is not None or a.grid is not None
    for wrong, message in (  # flags that contradict each other, or that the chosen mode would ignore
        (a.per_class is not None and a.scale is not None, "give --per-class or --scale, not both"),
        (a.scale is not None and a.data is None, "--scale needs --data (the real class counts)"),
        (a.grid == "interpolation" and a.interpolate is None, "--grid interpolation needs --interpolate A B"),
        (a.negative_prompt and a.guidance <= 1, "--negative-prompt is guidance's other half: it needs --guidance > 1"),
        (a.interpolate is not None and a.grid != "interpolation", "--interpolate A B is for --grid interpolation"),
        (a.style_seed is not None and a.grid != "classes-x-styles", "--style-seed is for --grid classes-x-styles"),
        ((a.reference or a.reference_prompt) and a.style != "reference",
         "--reference / --reference-prompt are for --style reference"),
        (a.style == "reference" and a.reference is None, "--style reference needs --reference IMAGE"),
        (a.prompt_template is not None and a.data is None, "--prompt-template names --data's classes: give --data"),
        (a.data is not None and not dataset_or_grid, "--data is for --per-class, --scale or --grid (not --prompt)"),
        (a.class_name is not None and dataset_or_grid, "--class is for --prompt images; datasets and grids draw "
                                                       "every class"),
        (a.num_images is not None and dataset_or_grid, "--num-images is for --prompt images (datasets: --per-class)"),
        (a.prompt and a.data is not None and dataset_or_grid, "--prompt with --data: the classes' prompts come from "
                                                              "--prompt-template; drop --prompt")):
        if wrong:
            p.error(message)
    cads = {k: getattr(a, k) for k in ("cads_tau1", "cads_tau2", "cads_psi") if getattr(a, k) is not None}
    if cads and a.condition_noise == 0:
        p.error("--cads-tau1/--cads-tau2/--cads-psi shape the CADS noise: give --condition-noise S > 0 too")
    a.cads = {**{f: getattr(Sampling, f) for f in ("cads_tau1", "cads_tau2", "cads_psi")}, **cads}
    if a.cads["cads_tau1"] >= a.cads["cads_tau2"]:
        p.error(f"--cads-tau1 {a.cads['cads_tau1']:g} must be below --cads-tau2 {a.cads['cads_tau2']:g}")
    if a.device == "cpu" and a.dtype != "fp32":
        p.error("--dtype bf16/fp16 is for GPUs; on the CPU the model runs in fp32")
    return a


# ------------------------------------------------------------------------------------------ helpers
def load_model(path, device="cpu", prediction_type=None):
    """(CLUE model, "clue" | "sd"): a CLUE checkpoint, or SD weights wrapped as a CLUE without style branch."""
    sd = load_stable_diffusion(path, prediction_type=prediction_type)
    if "clue" in sd.extra_config:  # a CLUE checkpoint folder (checkpoint.save_clue)
        if prediction_type is not None:
            raise UsageError(f"--prediction-type is for single SD files; the CLUE checkpoint {path} stores its own")
        return as_clue(sd, path).to(device).eval(), "clue"
    return CLUE.from_stable_diffusion(sd, style_cfg=None).to(device).eval(), "sd"


def load_reference(path, height, width) -> torch.Tensor:
    """An image file -> (1,3,H,W) in [-1,1] at the generation size (data.py's reader: RGB, resize, centre crop)."""
    if (problem := decode_problem(path)) is not None:
        raise DataError(f"reference image {path}: {problem}")
    if height != width:
        img = Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return load_image(path, height)[None]


def class_plan(args, model) -> list[dict]:
    """The classes to draw: [{"folder", "name", "prompt", "real", "count"}], from --data or the checkpoint."""
    posterior, train = model.style_posterior, getattr(model, "train_config", None) or {}
    if args.data is not None:
        root = resolve_data(args.data)
        template = args.prompt_template or train.get("prompt_template") or default_prompt_template(args.data)
        ds = ClassFolderDataset(root, template)
        folders = {}
        for path, label in ds.samples:
            folders.setdefault(label, Path(path).relative_to(root).parts[0])
        plan = [{"folder": folders[i], "name": name, "real": ds.class_counts[i],
                 "prompt": posterior[name]["prompt"] if name in posterior else ds.prompts[i]}
                for i, name in enumerate(ds.class_names)]
    elif posterior:
        plan = [{"folder": name.replace(" ", "_"), "name": name, "prompt": p["prompt"], "real": len(p["mus"])}
                for name, p in posterior.items()]
    elif args.prompt:
        plan = [{"folder": f"prompt_{i}", "name": None, "prompt": q, "real": None} for i, q in enumerate(args.prompt)]
    else:
        raise UsageError("no classes known: pass --data DIR (class folders) or --prompt, or use a CLUE checkpoint "
                         "with a fitted style posterior")
    for c in plan:
        c["count"] = (int(round(args.scale / 100 * c["real"])) if args.scale is not None
                      else args.per_class if args.per_class is not None else (args.num_images or args.batch))
    return plan


def style_choice(args, model, kind, n, name, height, width) -> StyleChoice | None:
    """The --style flags as generate()'s StyleChoice for n images of class `name` (None: no style branch)."""
    style = args.style or ("prior" if kind == "clue" and model.style_encoder is not None else "none")
    if style == "none":
        return None
    if model.style_encoder is None:
        raise UsageError(f"--style {style}: this model has no style branch (plain SD or a --style-tokens 0 "
                         "baseline); use --style none")
    choice = StyleChoice(style.replace("-", "_"), tau=args.tau, scale=args.style_scale)
    if style.startswith("posterior"):
        if name not in model.style_posterior:  # known classes: those the checkpoint's posterior was fitted on
            raise UsageError(f"--style {style} needs a class of the checkpoint's style posterior ('--class NAME' "
                             f"for --prompt images; a --data folder's class names); got {name!r}, known: "
                             f"{sorted(model.style_posterior) or 'none (use --style prior)'}")
        choice.classes = [name] * n
    if style == "reference":
        choice.reference = load_reference(args.reference, height, width)
        choice.reference_prompts = [args.reference_prompt] if args.reference_prompt else None
    return choice


def endpoint_style(model, spec, prompt, tau, height, width) -> torch.Tensor:
    """An --interpolate endpoint: an image path (its encoder mu) or an integer seed (a prior draw at tau)."""
    if os.path.isfile(spec):
        reference = load_reference(spec, height, width)
        return model.make_style(StyleChoice("reference", reference=reference, reference_prompts=[prompt]), 1)
    if not spec.isdigit():
        raise UsageError(f"--interpolate {spec!r}: neither an image file nor an integer seed >= 0")
    return model.make_style(StyleChoice("prior", tau=tau), 1, generator=torch.Generator().manual_seed(int(spec)))


@dataclass
class Drawer:
    """What every mode needs: the model (kind "clue" or "sd"), the --style flags, the DDIM settings, the autocast."""
    model: CLUE
    kind: str
    args: argparse.Namespace
    sampling: Sampling
    autocast: object

    def generate(self, prompts, style, seed=None, latents=None, progress=False) -> torch.Tensor:
        with self.autocast:
            images = self.model.generate(prompts, self.sampling, style, seed=seed, latents=latents,
                                         progress=progress).float().cpu()
        if not images.isfinite().all():  # written, they would be black PNGs and exit 0
            raise UsageError(f"the model gave NaN / infinite pixels (--dtype {self.args.dtype}): fp16 overflows in "
                             "some models, use --dtype bf16 or fp32; in fp32 the checkpoint holds NaN / inf or broken "
                             "values")
        return images

    def style(self, n: int, name) -> StyleChoice | None:
        return style_choice(self.args, self.model, self.kind, n, name, self.sampling.height, self.sampling.width)

    def same_noise(self, n: int) -> torch.Tensor:
        """One initial noise (from --seed) for every cell of a grid row."""
        f = self.model.vae.cfg.downsample_factor
        shape = (1, self.model.unet.cfg.in_channels, self.sampling.height // f, self.sampling.width // f)
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.args.seed)).expand(n, -1, -1, -1)


def draw_grid(d: Drawer, plan: list[dict], out: Path) -> list[str]:
    """--grid: a row per class, the same initial noise in every cell -> out/grid.png."""
    args, cells = d.args, []
    if args.grid == "classes-x-styles":  # column j: the same style draw (--style-seed) in every row
        n, seed = args.n_styles, args.style_seed if args.style_seed is not None else args.seed + 1
        for c in tqdm(plan, desc="rows (classes)"):
            choice = d.style(n, c["name"])
            cells.append(d.generate([c["prompt"]] * n, choice and replace(choice, seed=seed), latents=d.same_noise(n)))
    else:  # interpolation: slerp between the two --interpolate endpoints
        n, size = args.n_interp, (d.sampling.height, d.sampling.width)
        for c in tqdm(plan, desc="rows (classes)"):
            s0, s1 = (endpoint_style(d.model, spec, c["prompt"], args.tau, *size) for spec in args.interpolate)
            styles = torch.cat([slerp(s0, s1, a) for a in torch.linspace(0, 1, n).tolist()])
            cells.append(d.generate([c["prompt"]] * n, StyleChoice(styles, scale=args.style_scale),
                                    latents=d.same_noise(n)))
    make_grid(torch.cat(cells), n).save(out / "grid.png")
    return [str(out / "grid.png")]


def draw_dataset(d: Drawer, plan: list[dict], out: Path) -> list[str]:
    """--per-class / --scale: each class's count of images -> out/<class folder>/00000.png, batch b seeded seed + b."""
    written, batch_index = [], 0
    with tqdm(total=sum(c["count"] for c in plan), desc="images") as bar:  # closed before any error prints
        for c in plan:
            folder = out / c["folder"]
            folder.mkdir(parents=True, exist_ok=True)
            for start in range(0, c["count"], d.args.batch):
                n = min(d.args.batch, c["count"] - start)
                images = d.generate([c["prompt"]] * n, d.style(n, c["name"]), seed=d.args.seed + batch_index)
                batch_index += 1
                for j, img in enumerate(images):
                    to_pil(img).save(folder / f"{start + j:05d}.png")
                    written.append(str(folder / f"{start + j:05d}.png"))
                bar.update(n)
    return written


def draw_prompts(d: Drawer, out: Path) -> list[str]:
    """--prompt P x --num-images N -> out/images/000000.png... and out/grid.png (a row per prompt)."""
    args = d.args
    if not args.prompt:
        raise UsageError("pass --prompt (or --per-class / --scale / --grid for a CLUE checkpoint)")
    n_each = args.num_images or args.batch
    prompts = [q for q in args.prompt for _ in range(n_each)]
    name = args.class_name if args.class_name is not None else next(  # default: the class of the prompt
        (k for k, p in d.model.style_posterior.items() if p["prompt"] == args.prompt[0]), None)
    chunks = [prompts[start:start + args.batch] for start in range(0, len(prompts), args.batch)]
    images = torch.cat([d.generate(chunk, d.style(len(chunk), name), seed=args.seed + b, progress=True)
                        for b, chunk in enumerate(chunks)])
    (out / "images").mkdir(exist_ok=True)  # apart from grid.png, so eval.py can read the folder as it is
    written = []
    for i, img in enumerate(images):
        to_pil(img).save(out / "images" / f"{i:06d}.png")
        written.append(str(out / "images" / f"{i:06d}.png"))
    make_grid(images, min(len(images), max(n_each, 1))).save(out / "grid.png")
    return written + [str(out / "grid.png")]


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start, device = time.time(), torch.device(args.device)
    # 1. the model, and the flags that need it to be checked
    model, kind = load_model(args.model, device, args.prediction_type)
    height, width = args.height or model.cfg.image_size, args.width or model.cfg.image_size
    f = model.vae.cfg.downsample_factor
    if height % f or width % f:
        raise UsageError(f"--height {height} / --width {width}: both must be multiples of {f}, the VAE's "
                         f"downsampling factor (pixels per latent), e.g. {max(f, height // f * f)}")
    if args.grid == "interpolation" and model.style_encoder is None:
        raise UsageError("--grid interpolation needs a model with a style branch")
    if args.style_guidance != 1.0 and (model.style_encoder is None or args.style == "none"):
        raise UsageError(f"--style-guidance {args.style_guidance:g} guides a style: this model has none (plain SD "
                         "or a --style-tokens 0 baseline) or --style none was given")
    # 2. precision and the DDIM settings
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if dtype is torch.float16 and model.cfg.prediction_type == "v_prediction":  # SD 2.1-v overflows in fp16
        for m in (m for m in model.unet.modules() if isinstance(m, Attention)):
            m.upcast = True  # attention softmax in fp32
    sampling = Sampling(steps=args.steps, guidance=args.guidance, eta=args.eta, negative_prompt=args.negative_prompt,
                        height=height, width=width, style_guidance=args.style_guidance,
                        condition_noise=args.condition_noise, **args.cads)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    d = Drawer(model, kind, args, sampling, autocast)
    # 3. the mode: a grid, a synthetic dataset or prompts
    out, record = Path(args.out), {}
    out.mkdir(parents=True, exist_ok=True)
    if args.grid is not None or args.per_class is not None or args.scale is not None:
        record["classes"] = plan = class_plan(args, model)
    if args.grid is not None:
        written = draw_grid(d, plan, out)
    elif args.per_class is not None or args.scale is not None:
        written = draw_dataset(d, plan, out)
    else:
        written = draw_prompts(d, out)
    # 4. every setting, so that the run can be reproduced
    record.update(settings=vars(args), model_kind=kind, prediction_type=model.cfg.prediction_type,
                  height=height, width=width, n_files=len(written), seconds=round(time.time() - t_start, 2),
                  device=str(device), torch=torch.__version__, python=platform.python_version(),
                  command=" ".join(sys.argv) if argv is None else "sample.py " + " ".join(map(str, argv)))
    atomic_write_json(out / "run.json", json.loads(json.dumps(record, default=str)))
    print(f"wrote {len(written)} files to {out} in {record['seconds']} s (settings: {out / 'run.json'})")
    return record


if __name__ == "__main__":
    run(main, program="sample.py")
