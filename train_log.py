"""The files a training run writes for people to follow it: log.jsonl and vae_log.jsonl (one JSON object per line:
the step, mean losses, learning rate, gradient norm, seconds; diagnostics lines from clue.py) and loss_curve.png
drawn from them. Used by train.py and train_vae.py; read_jsonl also by a resumed run, which drops the lines
written after its checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def append_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(output: Path):
    """loss_curve.png: VAE reconstruction (phase 1), diffusion loss, KL per style dimension and (with
    --mmd-weight) the MMD of the batch styles to N(0, I), against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vae, log = read_jsonl(output / "vae_log.jsonl"), [r for r in read_jsonl(output / "log.jsonl") if "mse" in r]
    panels = [p for p in (("VAE (phase 1)", vae, ("loss", "l1", "l2")), ("diffusion", log, ("loss", "mse")),
                          ("style KL", log, ("kl", "capacity")), ("style MMD to N(0, I)", log, ("mmd",)))
              if p[1] and any(p[2][0] in r for r in p[1])]
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
        ax.set(title=title, xlabel="step", yscale="linear" if title.startswith("style") else "log")
        ax.set_ylabel({"style KL": "nats / dimension", "style MMD to N(0, I)": "per dimension"}.get(title, "loss"))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = output / ".loss_curve.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, output / "loss_curve.png")
