"""bench/style_by_t.py: where in the noise schedule does CLUE's style tell the U-Net something?

CLUE (Park et al., arXiv 2511.10993) trains eps_theta(z_t, t, c, s) with the style s = mu(x) of the image being
denoised. Averaged over t, the style lowers the held-out loss by only 5-13 % on the digits (train.py's diagnostics).
This program splits that average by timestep: for held-out images and fixed t, the training loss (the model's target,
eps or v) with the style from the encoder (s = mu(x): the image's own style), with a prior draw s ~ N(0, I) and with
no style (the style branch off), the same noise z_t for all three. `none - encoder` is what the image's style is worth
to the denoiser at that noise level; `prior - none` what a draw that is not this image's style costs (a draw is
another image's style: a positive gap means the style is used, not ignored). Writes a table, JSON and a plot.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules

from checkpoint import atomic_write_json, load_clue  # noqa: E402
from cli import comma_list, non_negative_int, positive_int  # noqa: E402
from data import ClassFolderDataset, resolve_data  # noqa: E402
from schedulers import randn_cpu  # noqa: E402
from style_stats import encode_dataset  # noqa: E402

EXAMPLES = """examples:
  python bench/style_by_t.py --model runs/demo/final                      # digits test split, 10 timesteps
  python bench/style_by_t.py --model runs/x/final --data heldout/ --out runs/x/style_by_t.json
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a CLUE folder (train.py's final/ or a checkpoint)")
    p.add_argument("--data", default="digits:test", help="held-out class folders (default: the digits test split)")
    p.add_argument("--timesteps", type=comma_list(non_negative_int),
                   default=[50, 150, 250, 350, 450, 550, 650, 750, 850, 950], help="t values (default 50,150,..,950)")
    p.add_argument("--repeats", type=positive_int, default=2, help="noise draws per image and t (default 2)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per U-Net call")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the noise and the prior draws")
    p.add_argument("--out", help="JSON file (default: MODEL/style_by_t.json; the plot beside it as .png)")
    return p.parse_args(argv)


@torch.no_grad()
def loss_by_t(model, loader, timesteps: list[int], repeats: int, seed: int) -> dict:
    """{t: {"encoder", "prior", "none": mean MSE to the target}} over the loader's images, `repeats` draws each."""
    cache = [(z0, c, mu) for z0, _, _, c, mu, _ in encode_dataset(model, loader)]  # the encoder runs once
    gen, out = torch.Generator().manual_seed(seed), {}
    for t_value in timesteps:
        sums, n = {"encoder": 0.0, "prior": 0.0, "none": 0.0}, 0
        for _ in range(repeats):
            for z0, c, mu in cache:
                t = torch.full((len(z0),), t_value, dtype=torch.long, device=z0.device)
                eps = randn_cpu(z0.shape, gen, z0.device)
                z_t, target = model.schedule.q_sample(z0, t, eps), model.schedule.target(z0, eps, t)
                for kind, s in (("encoder", mu), ("prior", randn_cpu(mu.shape, gen, mu.device)), ("none", None)):
                    sums[kind] += (model.unet(z_t, t, c, style=s).float() - target).pow(2).flatten(1).mean(1).sum()
                n += len(z0)
        out[t_value] = {k: float(v) / n for k, v in sums.items()}
    return out


def plot(result: dict, path: Path):
    import matplotlib  # lazy: the optional plotting dependency
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ts = sorted(result)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in ("encoder", "prior", "none"):
        a.plot(ts, [result[t][kind] for t in ts], marker="o", label=f"style: {kind}")
    a.set(xlabel="timestep t", ylabel="held-out loss (target MSE)", title="loss by noise level")
    b.plot(ts, [1 - result[t]["encoder"] / result[t]["none"] for t in ts], marker="o")
    b.axhline(0, color="gray", lw=0.5)
    b.set(xlabel="timestep t", ylabel="1 - encoder / none", title="what the image's own style is worth")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = load_clue(args.model)
    if model.style_encoder is None:
        raise SystemExit(f"style_by_t: {args.model} has no style encoder (a vanilla model): nothing to measure")
    train = model.train_config or {}
    data = ClassFolderDataset(resolve_data(args.data), train.get("prompt_template", "a handwritten digit {class}"),
                              size=model.cfg.image_size)
    result = loss_by_t(model, DataLoader(data, batch_size=args.batch), args.timesteps, args.repeats, args.seed)
    print(f"{args.model}: {len(data)} images of {args.data}, {args.repeats} noise draw(s) each, "
          f"target {model.schedule.prediction_type}")
    print(f"{'t':>5} {'encoder':>9} {'prior':>9} {'none':>9} {'1-enc/none':>11} {'prior/none-1':>13}")
    for t, r in result.items():
        print(f"{t:>5} {r['encoder']:9.4f} {r['prior']:9.4f} {r['none']:9.4f} {1 - r['encoder'] / r['none']:11.3f} "
              f"{r['prior'] / r['none'] - 1:13.3f}")
    out = Path(args.out) if args.out else Path(args.model) / "style_by_t.json"
    atomic_write_json(out, {"model": str(args.model), "data": args.data, "images": len(data),
                            "repeats": args.repeats, "seed": args.seed, "loss_by_t": result})
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
