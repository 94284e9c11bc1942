"""bench/paper_digits.py: the CLUE paper's comparison (vanilla fine-tuning vs CLUE) reproduced on digits.

CLUE (Park et al., arXiv 2511.10993; ../shared/PAPER.md, its table) compares a vanilla fine-tuned Stable
Diffusion with CLUE on a small medical dataset by FID, k-NN recall and the macro F1 of a classifier trained
on synthetic images at 100/200/500/1000 % of the real count, and on synthetic + real. This program runs the
same comparison on the built-in digits data (scikit-learn's handwritten digits) in the LIMITED-data regime
of ../shared/DESIGN.md: a few dozen real images per class. It only orchestrates: every step is one of the
project's command-line programs, run as a subprocess (`python train.py / sample.py / eval.py ...`).

Phases (each writes into --out; a finished phase is skipped on the next run unless --force, its command
changed, or a phase it depends on was re-run; an interrupted training resumes from its last checkpoint):
  data         a seeded subset of the digits train split, N images per class (data.ClassFolderDataset's
               limit_per_class), copied to OUT/real_limited/<class>/ and listed in OUT/real_limited.json:
               train, sample and eval all read exactly these images.
  vae          the tiny VAE, trained once on that subset (train.py phase 1; train.py has no VAE-only mode, so
               this is a run of 1 U-Net step whose vae/ folder is kept) and passed with --vae to both models.
  train_*      vanilla (--style-tokens 0) and CLUE (--style-tokens K): the same flags, seed and VAE.
  sample_*     a synthetic class-folder set at the largest scale (sample.py --scale): vanilla; CLUE with
               prior styles at each tau; optionally CLUE with its aggregated posterior (beyond the paper).
               Smaller scales are nested class-balanced subsets that eval.py classify draws.
  features     the feature classifier for FID / precision / recall / density / coverage, trained on the FULL
               digits train split (eval.py train-classifier): no Inception weights exist offline.
  metrics_*    each synthetic set (and, as a reference, the limited real set) against the real test split;
               memorisation against the limited training set (eval.py metrics --features classifier).
  classify_*   eval.py classify: real only, synthetic only at each scale, real + 100 % synthetic; macro F1
               on the digits test split, mean and std over --eval-seeds classifier seeds.
Then one Markdown table (stdout and RESULTS/paper_digits.md) and JSON (RESULTS/paper_digits.json) with
every setting, command and the wall time of each phase. --quick writes paper_digits_quick.* instead.

Left out: the paper's external test set (digits has none), Inception features, several training seeds of
the generative models (one --seed per run; run again with another --seed and --out for a spread).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: train.py, sample.py, eval.py live here
sys.path.insert(0, str(ROOT))

EXAMPLES = """examples:
  # the full comparison (30 real images per class): about an hour on one CPU thread (estimated from --quick)
  python bench/paper_digits.py
  # a smoke run with tiny settings (a few minutes): runs/paper_digits_quick, bench/results/paper_digits_quick.*
  python bench/paper_digits.py --quick
  # 50 images per class, two temperatures, the aggregated posterior too, on a GPU
  python bench/paper_digits.py --limit-per-class 50 --tau 0.7,1.0 --posterior posterior --device cuda \\
      --out runs/paper_digits_50
  # pass extra flags to both train.py runs (the same for vanilla and CLUE)
  python bench/paper_digits.py --train-args "--kl-mode beta --beta 1e-3"
  # continue an interrupted run: the same command again (finished phases are skipped); --force redoes all
"""

# Defaults of the full benchmark and of --quick; an explicit flag always wins.
FULL = dict(limit_per_class=30, vae_steps=600, train_steps=1500, batch_size=32, sample_steps=50, sample_batch=100,
            classify_steps=None, feature_steps=None, eval_seeds=3, out=str(ROOT / "runs" / "paper_digits"))
QUICK = dict(limit_per_class=10, vae_steps=100, train_steps=100, batch_size=32, sample_steps=10, sample_batch=100,
             classify_steps=60, feature_steps=100, eval_seeds=1, out=str(ROOT / "runs" / "paper_digits_quick"))
# The paper's numbers (PAPER.md; otoscopic images, Inception features: a different scale, for orientation only).
PAPER = {"fid": (46.81, 9.30), "recall": (0.4960, 0.7029), "f1_syn_1000": (0.7383, 0.8321),
         "f1_real_syn": (None, 0.9476)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (see QUICK in the source)")
    g = p.add_argument_group("data and models")
    g.add_argument("--limit-per-class", type=int, help="real training images per class (default 30; quick 10)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the limited subset")
    g.add_argument("--seed", type=int, default=0, help="training seed of the VAE and of both models (the same)")
    g.add_argument("--style-tokens", type=int, default=4, help="K style tokens of the CLUE model")
    g.add_argument("--vae-steps", type=int, help="tiny VAE steps (default 600; quick 100)")
    g.add_argument("--train-steps", type=int, help="U-Net (+ style encoder) steps (default 1500; quick 100)")
    g.add_argument("--batch-size", type=int, help="training batch (default 32, capped at the real set size)")
    g.add_argument("--train-args", default="", help="extra train.py flags for BOTH models (later flags win)")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--tau", default="1.0", help="style temperature(s) of the CLUE prior draws, comma-separated")
    g.add_argument("--posterior", choices=("off", "posterior", "posterior-sample"), default="off",
                   help="also sample CLUE with the aggregated posterior: the class Gaussian fitted to the "
                        "training images' mu (tau 1), or a random training image's mu (default off)")
    g.add_argument("--scales", default="100,200,500,1000", help="synthetic-only scales, %% of the real count; "
                   "the largest is generated")
    g.add_argument("--sample-steps", type=int, help="DDIM steps (default 50; quick 10)")
    g.add_argument("--guidance", type=float, default=3.0, help="text guidance scale (train.py's grid default)")
    g.add_argument("--sample-batch", type=int, help="images per generation batch (default 100)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the initial noise (sample.py --seed)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-seeds", type=int, help="classifier trainings per arm (default 3; quick 1)")
    g.add_argument("--eval-seed", type=int, default=0, help="first classifier seed")
    g.add_argument("--classify-steps", type=int, help="classifier steps per arm (default: eval.py's preset)")
    g.add_argument("--feature-steps", type=int, help="steps of the feature classifier (default: the preset)")
    g = p.add_argument_group("running")
    g.add_argument("--out", help="work folder (default <repo>/runs/paper_digits; quick: runs/paper_digits_quick)")
    g.add_argument("--results-dir", default=str(ROOT / "bench" / "results"), help="where the .md/.json go")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    g.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS / MKL_NUM_THREADS of the subprocesses")
    g.add_argument("--force", action="store_true", help="redo every phase, even finished ones")
    g.add_argument("--stop-after", choices=("data", "vae", "train", "sample", "features", "metrics"),
                   help="stop after this phase: the table of what exists goes to stdout only")
    g.add_argument("--verbose", action="store_true", help="echo the subprocesses' output (always in OUT/logs/)")
    a = p.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.taus = [float(t) for t in a.tau.split(",") if t.strip()]
    a.scale_list = sorted({int(s) for s in a.scales.split(",") if s.strip()})
    if not a.taus or not a.scale_list or min(a.scale_list) <= 0:
        p.error("--tau and --scales need at least one value; scales are positive percentages")
    if min(a.limit_per_class, a.vae_steps, a.train_steps, a.batch_size, a.sample_steps, a.eval_seeds,
           a.style_tokens, a.threads) < 1:
        p.error("--limit-per-class, steps, --batch-size, --eval-seeds, --style-tokens, --threads must be >= 1")
    if a.device == "auto":
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


# ------------------------------------------------------------------------------------------ phases
@dataclass
class Phase:
    """One step of the benchmark: a subprocess (argv after `python`) or an in-process function."""
    name: str
    output: Path                        # the folder (or file) this phase owns: removed before a fresh run
    done: Path                          # exists once the phase has finished
    argv: list[str] | None = None       # e.g. ["train.py", "--data", ...]
    func: object = None                 # or a function run in this process
    signature: str = ""                 # what the phase depends on, for functions (argv's own text otherwise)
    deps: list[str] = field(default_factory=list)
    resumable: bool = False             # train.py: an interrupted run continues with --resume latest
    keep_only: list[str] | None = None  # after success, delete everything in `output` but these names

    def key(self) -> str:
        return shlex.join(["python", *self.argv]) if self.argv else self.signature


class Runner:
    """Runs phases in order, skipping finished ones; OUT/phases.json records commands, status and seconds."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.state_file = self.out / "phases.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.ran: set[str] = set()
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                    "PYTHONUNBUFFERED": "1"}

    def save(self):
        from checkpoint import atomic_write_json
        atomic_write_json(self.state_file, self.state)

    def run(self, ph: Phase):
        rec, key = self.state.get(ph.name), ph.key()
        same = rec is not None and rec.get("command") == key
        deps_ran = [d for d in ph.deps if d in self.ran]
        if not (self.args.force or not ph.done.exists() or not same or deps_ran):
            rec["skipped_last_run"] = True
            self.save()
            log(f"[{ph.name}] done earlier ({rec.get('seconds', 0):.0f} s), skipped")
            return
        resume = (ph.resumable and same and not deps_ran and not self.args.force and rec.get("status") != "done")
        if not resume:  # a fresh run starts from nothing (stale images would mix into a synthetic set)
            if ph.output.is_dir():
                shutil.rmtree(ph.output)
            ph.output.unlink(missing_ok=True)
        before = rec.get("seconds", 0.0) if resume else 0.0
        self.state[ph.name] = {"command": key, "status": "started", "resumed": resume, "deps_rerun": deps_ran}
        self.save()
        log(f"[{ph.name}] " + ("resuming: " if resume else "running: ") + key)
        t0 = time.time()
        try:
            if ph.func is not None:
                ph.func()
            else:
                self._subprocess(ph, ph.argv + (["--resume", "latest"] if resume else []))
        except BaseException as e:  # failed or interrupted (Ctrl-C): keep the time spent for the resumed run
            status = self.state[ph.name]["status"]
            self.state[ph.name].update(seconds=round(before + time.time() - t0, 1),
                                       status=status if status.startswith("failed") else f"interrupted ({e!r})")
            self.save()
            raise
        if ph.keep_only is not None:
            for item in ph.output.iterdir():
                if item.name in ph.keep_only:
                    continue
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        self.state[ph.name].update(status="done", seconds=round(before + time.time() - t0, 1),
                                   skipped_last_run=False)
        self.save()
        self.ran.add(ph.name)
        log(f"[{ph.name}] finished in {time.time() - t0:.1f} s")

    def _subprocess(self, ph: Phase, argv: list[str]):
        log_file = self.out / "logs" / f"{ph.name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as f:
            proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in proc.stdout:
                f.write(line)
                if self.args.verbose:
                    sys.stderr.write(line)
            rc = proc.wait()
        if rc != 0:
            self.state[ph.name]["status"] = f"failed (exit {rc})"
            tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
            raise SystemExit(f"paper_digits: phase {ph.name} failed (exit {rc}); command:\n  "
                             f"{shlex.join(['python', *argv])}\nlast lines of {log_file}:\n{tail}")


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the limited set
def materialise_limited(args, folder: Path, listing: Path):
    """Copy the seeded N-per-class subset of the digits train split to folder/<class>/ (names kept, so every
    file traces back to its row in load_digits) and list it in `listing`."""
    from checkpoint import atomic_write_json
    from data import DIGITS_PROMPT, ClassFolderDataset, resolve_data
    source = resolve_data("digits")
    ds = ClassFolderDataset(source, DIGITS_PROMPT, size=32, limit_per_class=args.limit_per_class,
                            seed=args.data_seed)
    files = []
    for path, _ in ds.samples:
        rel = Path(path).relative_to(source)  # <class>/<index>.png
        (folder / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, folder / rel)
        files.append(rel.as_posix())
    atomic_write_json(listing, {"source": str(source), "split": "train", "limit_per_class": args.limit_per_class,
                                "seed": args.data_seed, "selection": "data.ClassFolderDataset(limit_per_class, seed)",
                                "class_names": ds.class_names, "counts": ds.class_counts, "files": files})


# ------------------------------------------------------------------------------------------ the plan
def arms_of(args) -> list[dict]:
    """The synthetic sets: (name, model, sample.py style flags, label)."""
    arms = [{"name": "vanilla", "model": "vanilla", "style": ["--style", "none"], "label": "vanilla"}]
    for tau in args.taus:
        arms.append({"name": f"clue_tau{tau:g}", "model": "clue", "style": ["--style", "prior", "--tau", f"{tau:g}"],
                     "label": f"CLUE (prior, τ={tau:g})"})
    if args.posterior != "off":
        arms.append({"name": f"clue_{args.posterior.replace('-', '_')}", "model": "clue",
                     "style": ["--style", args.posterior, "--tau", "1"], "label": f"CLUE ({args.posterior})"})
    return arms


def build_phases(args) -> list[Phase]:
    out = Path(args.out).resolve()
    real, listing = out / "real_limited", out / "real_limited.json"
    n_real = args.limit_per_class * 10
    batch = min(args.batch_size, n_real)
    dev = ["--device", args.device]
    phases = [Phase("data", real, listing, func=lambda: materialise_limited(args, real, listing),
                    signature=json.dumps({"limit_per_class": args.limit_per_class, "seed": args.data_seed}))]
    common = ["--data", str(real), "--prompt", "a handwritten digit {class}", "--val-data", "digits:test",
              "--preset", "tiny", "--seed", str(args.seed), *dev]
    phases.append(Phase(  # phase 1 of train.py only: the 1-step U-Net and its checkpoint (~100 MB) are deleted
        "vae", out / "runs" / "vae", out / "runs" / "vae" / "vae" / "config.json", deps=["data"],
        keep_only=["vae", "vae_log.jsonl", "vae_recon.png"],
        argv=["train.py", *common, "--style-tokens", "0", "--vae-steps", str(args.vae_steps),
              "--vae-batch-size", str(batch), "--steps", "1", "--batch-size", str(batch), "--warmup-steps", "1",
              "--sample-every", "0", "--checkpoint-every", "0", "--grid-taus", "0", "--grid-steps", "1",
              "--diag-images", "1", "--output", str(out / "runs" / "vae")]))
    vae = out / "runs" / "vae" / "vae"
    for model, tokens in (("vanilla", 0), ("clue", args.style_tokens)):
        run = out / "runs" / model
        phases.append(Phase(
            f"train_{model}", run, run / "final" / "config.json", deps=["data", "vae"], resumable=True,
            argv=["train.py", *common, "--vae", str(vae), "--style-tokens", str(tokens),
                  "--steps", str(args.train_steps), "--batch-size", str(batch), "--sample-every", "0",
                  "--checkpoints-total-limit", "1",  # enough to resume; each checkpoint is ~100 MB
                  "--output", str(run), *shlex.split(args.train_args)]))
    top = max(args.scale_list)
    for arm in arms_of(args):
        syn = out / "synthetic" / arm["name"]
        phases.append(Phase(
            f"sample_{arm['name']}", syn, syn / "run.json", deps=["data", f"train_{arm['model']}"],
            argv=["sample.py", "--model", str(out / "runs" / arm["model"] / "final"), "--data", str(real),
                  "--scale", str(top), *arm["style"], "--steps", str(args.sample_steps),
                  "--guidance", f"{args.guidance:g}", "--batch", str(args.sample_batch),
                  "--seed", str(args.sample_seed), "--device", args.device, "--out", str(syn)]))
    feat = out / "feature_classifier"
    phases.append(Phase(
        "features", feat, feat / "config.json",
        argv=["eval.py", "train-classifier", "--train", "digits", "--test", "digits:test", "--out", str(feat),
              "--preset", "digits32", "--seed", str(args.eval_seed), *dev, "--quiet",
              *(["--steps", str(args.feature_steps)] if args.feature_steps else [])]))
    metric_sets = [("real_limited", real, "data")] + \
                  [(a["name"], out / "synthetic" / a["name"], f"sample_{a['name']}") for a in arms_of(args)]
    for name, fake, dep in metric_sets:
        m = out / "metrics" / name
        phases.append(Phase(
            f"metrics_{name}", m, m / "metrics.json", deps=[dep, "features"],
            argv=["eval.py", "metrics", "--real", "digits:test", "--fake", str(fake),
                  *(["--train", str(real)] if name != "real_limited" else []),
                  "--features", "classifier", "--classifier", str(feat), "--cache-dir", str(out / "feature_cache"),
                  "--out", str(m), *dev, "--quiet"]))
    for arm in arms_of(args):
        c = out / "classify" / arm["name"]
        phases.append(Phase(
            f"classify_{arm['name']}", c, c / "classify.json", deps=["data", f"sample_{arm['name']}"],
            argv=["eval.py", "classify", "--train", str(real), "--synthetic", str(out / "synthetic" / arm["name"]),
                  "--test", "digits:test", "--scales", ",".join(map(str, args.scale_list)), "--combined",
                  "--seeds", str(args.eval_seeds), "--seed", str(args.eval_seed), "--preset", "digits32",
                  "--out", str(c), *dev, "--quiet",
                  *(["--steps", str(args.classify_steps)] if args.classify_steps else [])]))
    return phases


def group_of(name: str) -> str:
    """The --stop-after group of a phase: train_clue -> train, metrics_vanilla -> metrics, vae -> vae."""
    return name.split("_")[0]


# ------------------------------------------------------------------------------------------ the report
def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def collect(args) -> dict:
    """Everything the phases wrote, in one JSON-ready dict."""
    out = Path(args.out).resolve()
    res = {"arms": {}, "reference": {}}
    for arm in arms_of(args):
        m = read_json(out / "metrics" / arm["name"] / "metrics.json")
        c = read_json(out / "classify" / arm["name"] / "classify.json")
        entry = {"label": arm["label"], "model": arm["model"], "style_flags": arm["style"], "metrics": m}
        if c:
            entry["classify"] = {"n_real": c["n_real"], "seeds": c["seeds"], "recipe": c["recipe"],
                                 "arms": [{k: a[k] for k in ("arm", "scale_percent", "n_images")} |
                                          {"macro_f1": a["test"]["macro_f1"], "mean": a["test"]["mean"],
                                           "std": a["test"]["std"], "accuracy_mean": a["test"]["accuracy_mean"]}
                                          for a in c["arms"]]}
        s = read_json(out / "synthetic" / arm["name"] / "run.json")
        entry["n_synthetic"] = s["n_files"] if s else None
        res["arms"][arm["name"]] = entry
    res["reference"]["real_limited_vs_test"] = read_json(out / "metrics" / "real_limited" / "metrics.json")
    feat = read_json(out / "feature_classifier" / "config.json")
    res["reference"]["feature_classifier"] = None if feat is None else {
        "trained_on": feat.get("trained_on"), "seed": feat.get("seed"), "classifier": feat.get("classifier"),
        "recipe": feat.get("recipe"), "test": {k: feat["test"][k] for k in ("macro_f1", "accuracy")}
        if feat.get("test") else None}
    res["training"] = {m: read_json(out / "runs" / m / "summary.json") for m in ("vanilla", "clue")}
    res["real_limited"] = read_json(out / "real_limited.json")
    return res


def f1_of(entry: dict, arm: str, scale) -> dict | None:
    for a in (entry.get("classify") or {}).get("arms", []):
        if a["arm"] == arm and a["scale_percent"] == scale:
            return a
    return None


def fmt(x, digits=3, pm=None) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" + (f" ± {pm:.{digits}f}" if pm else "")


def markdown(args, res: dict, phases: dict, wall: float) -> str:
    arms = arms_of(args)
    cols = [res["arms"][a["name"]] for a in arms]
    head = "| metric | " + " | ".join(a["label"] for a in arms) + " | paper: vanilla / CLUE |"
    lines = [f"## CLUE vs vanilla fine-tuning on digits, {args.limit_per_class} real images per class"
             + (" (--quick: smoke settings, not a result)" if args.quick else ""), "", head,
             "|---|" + "---|" * len(arms) + "---|"]

    def row(name, values, paper=None):
        ref = "" if paper is None else " / ".join("-" if v is None else f"{v:g}" for v in paper)
        lines.append(f"| {name} | " + " | ".join(values) + f" | {ref} |")

    met = lambda key, d=3: [fmt((c["metrics"] or {}).get(key), d) for c in cols]  # noqa: E731
    row("FID ↓ (classifier features, vs real test)", met("fid", 2), PAPER["fid"])
    row("k-NN precision (k=3)", met("precision"))
    row("k-NN recall (k=3)", met("recall"), PAPER["recall"])
    row("density (k=5)", met("density"))
    row("coverage (k=5)", met("coverage"))
    row("memorised fraction (vs the limited train set)",
        [fmt(((c["metrics"] or {}).get("memorisation") or {}).get("memorised_fraction")) for c in cols])
    for s in args.scale_list:
        cells = [f1_of(c, "synthetic", s) for c in cols]
        row(f"F1, synthetic only, {s} %", [fmt(a and a["mean"], 3, a and a["std"]) for a in cells],
            PAPER["f1_syn_1000"] if s == 1000 else None)
    cells = [f1_of(c, "real+synthetic", 100) for c in cols]
    row("F1, real + 100 % synthetic", [fmt(a and a["mean"], 3, a and a["std"]) for a in cells], PAPER["f1_real_syn"])
    cells = [f1_of(c, "real", None) for c in cols]
    row(f"F1, real only ({args.limit_per_class * 10} images; same runs in every column)",
        [fmt(a and a["mean"], 3, a and a["std"]) for a in cells])
    ref, feat = res["reference"]["real_limited_vs_test"], res["reference"]["feature_classifier"]
    lines += ["", "F1: macro F1 on the digits test split, mean ± std over "
              f"{args.eval_seeds} classifier seed(s). Synthetic sets: {max(args.scale_list)} % of the real count "
              f"per class, {args.sample_steps} DDIM steps, guidance {args.guidance:g}. The paper's column is a "
              "different dataset (otoscopy) with Inception features: for orientation only."]
    if ref:
        lines += ["", f"Reference, the {ref['n_fake']} limited real training images vs the {ref['n_real']} test "
                  f"images: FID {ref['fid']:.2f}, precision {ref['precision']:.3f}, recall {ref['recall']:.3f}, "
                  f"density {ref['density']:.3f}, coverage {ref['coverage']:.3f} (fewer images than the synthetic "
                  "sets: k-NN metrics depend on set sizes)."]
    if feat and feat.get("test"):
        lines += [f"Feature classifier (trained on the full train split): test macro F1 "
                  f"{feat['test']['macro_f1']:.3f}."]
    diag = (res["training"].get("clue") or {}).get("diagnostics") or {}
    if diag:
        lines += [f"CLUE style latent (held-out): KL per dim {fmt(diag.get('kl_per_dim'), 4)}, active units "
                  f"{diag.get('active_units')}, denoising loss with the style from the encoder "
                  f"{fmt(diag.get('loss_encoder'), 4)}, prior {fmt(diag.get('loss_prior'), 4)}, aggregated "
                  f"posterior {fmt(diag.get('loss_aggregate'), 4)}, none {fmt(diag.get('loss_none'), 4)}."]
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {rec.get('seconds', '-')} |" for name, rec in phases.items()]
    lines += [f"| total of the phases | {sum(r.get('seconds', 0) for r in phases.values()):.1f} |",
              f"| this invocation (wall; {sum(bool(r.get('skipped_last_run')) for r in phases.values())} phases "
              f"done earlier, skipped) | {wall:.1f} |", "",
              f"Settings: limit {args.limit_per_class}/class (data seed {args.data_seed}), training seed "
              f"{args.seed}, {args.train_steps} steps (VAE {args.vae_steps}), batch {args.batch_size}, style tokens "
              f"{args.style_tokens}, train args {args.train_args!r}, tau {args.tau}, device {args.device}, "
              f"{args.threads} thread(s). Commands: the JSON beside this file."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args)
    phases = build_phases(args)
    order = ["data", "vae", "train", "sample", "features", "metrics", "classify"]
    for ph in phases:
        if args.stop_after and order.index(group_of(ph.name)) > order.index(args.stop_after):
            continue
        runner.run(ph)
    wall = time.time() - t0
    names = {ph.name for ph in phases}
    phase_times = {k: v for k, v in runner.state.items() if k in names}
    res = collect(args)
    import torch
    record = {"benchmark": "bench/paper_digits.py", "quick": args.quick, "settings": vars(args),
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "cpu_count": os.cpu_count(), "device": args.device, "threads": args.threads},
              "phases": phase_times, "wall_seconds_this_invocation": round(wall, 1),
              "work_folder": str(out.resolve()), **res}
    text = markdown(args, res, phase_times, wall)
    print(text)
    if args.stop_after:  # a partial table must not replace a finished one
        log(f"--stop-after {args.stop_after}: nothing written to {args.results_dir}; work folder {out}")
        return record
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = "paper_digits_quick" if args.quick else "paper_digits"
    from checkpoint import atomic_write_json
    (results / f"{stem}.md").write_text(text + "\n")
    atomic_write_json(results / f"{stem}.json", json.loads(json.dumps(record, default=str)))
    log(f"wrote {results / (stem + '.md')} and {results / (stem + '.json')}; work folder {out}")
    return record


if __name__ == "__main__":
    main()
