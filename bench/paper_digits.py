"""bench/paper_digits.py: the CLUE paper's comparison (vanilla fine-tuning vs CLUE) reproduced on digits.

CLUE (Park et al., arXiv 2511.10993; ../shared/PAPER.md, its table) compares a vanilla fine-tuned Stable
Diffusion with CLUE on a small medical dataset by FID, k-NN recall and the macro F1 of a classifier trained
on synthetic images at 100/200/500/1000 % of the real count, and on synthetic + real, on an internal and an
external test set. This program runs the same comparison on the built-in digits data (scikit-learn's
handwritten digits) in the LIMITED-data regime of ../shared/DESIGN.md: a few dozen real images per class. It
only orchestrates: every step is one of the project's command-line programs, run as a subprocess.

Phases (each writes into --out; a finished phase is skipped on the next run unless --force, its command
changed, or a phase it depends on was re-run; an interrupted training resumes from its last checkpoint;
--jobs J runs up to J phases at once, each as soon as the phases it depends on are done):
  data         a seeded subset of the digits train split, N images per class, copied to OUT/real_limited/ and
               listed in OUT/real_limited.json: train, sample and eval all read exactly these images.
  vae          the tiny VAE, trained once on that subset (train.py phase 1, a run of 1 U-Net step whose vae/
               folder is kept) and passed with --vae to every model.
  external     with --external make: bench/external_digits.py writes OUT/external_digits (typeset digits).
  pretrain_*   with --pretrain-steps N, the regime of the paper (SD pre-trained on other images, then fine-tuned): the
               digits train split WITHOUT the limited set, labels dropped (one folder "digit", prompt "a handwritten
               digit"), and a vanilla tiny model trained N steps on it with the same VAE (OUT/runs/pretrain).
  train_*      for each of --seeds training seeds s (--seed, --seed + 1, ...): vanilla (--style-tokens 0) and
               CLUE (--style-tokens K), the same flags, data and VAE (from scratch, or fine-tuned from the
               pre-trained base with train.py --model BASE --preset tiny); in OUT/s<s>/.
  sample_*     synthetic class-folder sets at the largest scale: vanilla; CLUE with prior styles at each tau;
               optionally CLUE with its aggregated posterior. Sampling seed --sample-seed + (s - --seed).
  features     the feature classifier for FID / precision / recall / density / coverage, trained on the FULL
               digits train split (eval.py train-classifier): no Inception weights exist offline.
  metrics_*    each synthetic set (and the limited real set) against the real test split; memorisation against
               the limited training set.
  classify_*   eval.py classify: real only, synthetic only at each scale, real + 100 % synthetic; macro F1 on
               the digits test split (and --external), mean over --eval-seeds classifier seeds.
  --frontier   for the first --frontier-seeds training seeds, each model's diversity knobs swept, every point a
               cheap synthetic set (--frontier-steps DDIM steps, --frontier-scale % of the real count) through
               sample, metrics and classify (synthetic only at that scale, no real-only arm): vanilla over the
               text guidance scale and over CADS condition noise, CLUE over tau, the text guidance scale and the
               style guidance scale.
               A point that is a main-table set (same flags, steps and scale) is that set, not sampled again.
Then bench/paper_digits_report.py writes RESULTS/paper_digits.md and .json (every metric as mean ± std over
the training seeds, the paired difference CLUE - vanilla per seed, every command and phase time) and, with
--frontier, the plots RESULTS/paper_digits_frontier_pr.png and _f1.png (the stem is --name: paper_digits, with
--pretrain-steps paper_digits_pretrained, with --quick + _quick).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: train.py, sample.py, eval.py live here
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import paper_digits_report as report  # noqa: E402  (bench/, beside this file: the tables and plots)
from cli import comma_list, finite_float, non_negative_float, non_negative_int, positive_int  # noqa: E402

EXAMPLES = """examples:
  # the comparison over 3 training seeds (30 real images per class), both cores
  python bench/paper_digits.py --jobs 2 --external make
  # ... with the diversity-fidelity frontier of every model
  python bench/paper_digits.py --jobs 2 --external make --frontier
  # a smoke run with tiny settings (a few minutes): runs/paper_digits_quick, bench/results/paper_digits_quick.*
  python bench/paper_digits.py --quick
  # 50 images per class, two temperatures, the aggregated posterior too, on a GPU
  python bench/paper_digits.py --limit-per-class 50 --tau 0.7,1.0 --posterior posterior --device cuda \\
      --out runs/paper_digits_50
  # both models fine-tuned from a base pre-trained on the other train digits without labels: *_pretrained.*
  python bench/paper_digits.py --jobs 2 --external make --pretrain-steps 2000
  # pass extra flags to every train.py run (the same for vanilla and CLUE), or to CLUE's only
  python bench/paper_digits.py --train-args "--kl-mode beta --beta 1e-3"
  python bench/paper_digits.py --clue-args "--capacity 0.3" --name paper_digits_c03
  # continue an interrupted run: the same command again (finished phases are skipped); --force redoes all
"""

# Defaults of the full benchmark and of --quick; an explicit flag always wins.
FULL = dict(limit_per_class=30, vae_steps=600, train_steps=1500, batch_size=32, sample_steps=50, sample_batch=100,
            classify_steps=None, feature_steps=None, eval_seeds=3, seeds=3, external_per_class=100)
QUICK = dict(limit_per_class=10, vae_steps=100, train_steps=100, batch_size=32, sample_steps=10, sample_batch=100,
             classify_steps=60, feature_steps=100, eval_seeds=1, seeds=1, external_per_class=10)
# the --stop-after groups, in order
ORDER = ["data", "vae", "external", "pretrain", "train", "sample", "features", "metrics", "classify"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (see QUICK in the source)")
    g = p.add_argument_group("data and models")
    g.add_argument("--limit-per-class", type=positive_int, help="real training images per class (default 30; quick 10)")
    g.add_argument("--data-seed", type=non_negative_int, default=0, help="seed of the limited subset")
    g.add_argument("--seed", type=non_negative_int, default=0, help="first training seed (the VAE's too)")
    g.add_argument("--seeds", type=positive_int, help="training seeds per model: every metric as mean ± std over "
                   "them, and CLUE - vanilla paired by seed (default 3; quick 1)")
    g.add_argument("--style-tokens", type=positive_int, default=4, help="K style tokens of the CLUE model")
    g.add_argument("--vae-steps", type=positive_int, help="tiny VAE steps (default 600; quick 100)")
    g.add_argument("--train-steps", type=positive_int, help="U-Net (+ style encoder) steps (default 1500; quick 100)")
    g.add_argument("--batch-size", type=positive_int, help="training batch (default 32, capped at the real set size)")
    g.add_argument("--train-args", default="", help="extra train.py flags for every model (later flags win)")
    g.add_argument("--clue-args", default="", help="extra train.py flags for the CLUE model only (an arm of its "
                   "settings, e.g. --capacity 0.3: vanilla's phases stay the same and are not re-run)")
    g.add_argument("--pretrain-steps", type=non_negative_int, default=0,
                   help="> 0: both models are fine-tuned from a vanilla base trained this many steps on the digits "
                        "train split WITHOUT the limited set and without labels (see above; default 0: from scratch)")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--tau", type=comma_list(non_negative_float), default=[1.0],
                   help="style temperature(s) of the CLUE prior draws, comma-separated (default 1)")
    g.add_argument("--posterior", choices=("off", "posterior", "posterior-sample"), default="off",
                   help="also sample CLUE with the aggregated posterior: the class Gaussian fitted to the "
                        "training images' mu (tau 1), or a random training image's mu (default off)")
    g.add_argument("--scales", type=comma_list(positive_int), default=[100, 200, 500, 1000],
                   help="synthetic-only scales, %% of the real count; the largest is generated")
    g.add_argument("--sample-steps", type=positive_int, help="DDIM steps (default 50; quick 10)")
    g.add_argument("--guidance", type=finite_float, default=3.0, help="text guidance scale (train.py's grid default)")
    g.add_argument("--sample-batch", type=positive_int, help="images per generation batch (default 100)")
    g.add_argument("--sample-seed", type=non_negative_int, default=0, help="seed of the initial noise (first seed)")
    g = p.add_argument_group("the diversity-fidelity frontier (--frontier)")
    g.add_argument("--frontier", action="store_true", help="sweep every model's diversity knobs (see above)")
    g.add_argument("--frontier-guidance", type=comma_list(finite_float), default=[1.0, 1.5, 2.0, 3.0, 5.0],
                   help="vanilla: text guidance scales (default 1,1.5,2,3,5)")
    g.add_argument("--frontier-noise", type=comma_list(non_negative_float), default=[0.1, 0.25, 0.5],
                   help="vanilla: CADS condition noise scales at --guidance (default 0.1,0.25,0.5; 0 is the "
                        "guidance point)")
    g.add_argument("--frontier-tau", type=comma_list(non_negative_float), default=[0.0, 0.5, 1.0, 1.5, 2.0],
                   help="CLUE: prior temperatures at --guidance (default 0,0.5,1,1.5,2)")
    g.add_argument("--frontier-style-guidance", type=comma_list(finite_float), default=[0.0, 2.0, 4.0],
                   help="CLUE: style guidance scales at tau 1 and --guidance (default 0,2,4; 1 is the tau 1 point)")
    g.add_argument("--frontier-clue-guidance", type=comma_list(finite_float), default=[1.0, 2.0],
                   help="CLUE: text guidance scales at tau 1 (default 1,2; --guidance is the tau 1 point): the knob "
                        "vanilla's best curve turns, given to CLUE too")
    g.add_argument("--frontier-steps", type=positive_int, default=20, help="DDIM steps of a point (default 20)")
    g.add_argument("--frontier-scale", type=positive_int, default=300,
                   help="images per point, %% of the real count; its synthetic-only F1 is at this scale "
                        "(default 300: 900 images, 1000 takes about 3x as long)")
    g.add_argument("--frontier-eval-seeds", type=positive_int, default=1, help="classifier seeds per point")
    g.add_argument("--frontier-seeds", type=positive_int, default=None,
                   help="sweep the models of the first N training seeds only (default: all --seeds)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-seeds", type=positive_int, help="classifier trainings per arm (default 3; quick 1)")
    g.add_argument("--eval-seed", type=non_negative_int, default=0, help="first classifier seed")
    g.add_argument("--classify-steps", type=positive_int, help="classifier steps per arm (default: eval.py's preset)")
    g.add_argument("--feature-steps", type=positive_int, help="steps of the feature classifier (default: the preset)")
    g.add_argument("--external", default=None,
                   help="an external real test set, DIR/<class>/... (eval.py classify --external), or 'make': "
                        "OUT/external_digits from bench/external_digits.py (typeset digits; a test set only)")
    g.add_argument("--external-per-class", type=positive_int, help="--external make: images per digit (100)")
    g = p.add_argument_group("running")
    g.add_argument("--name", help="stem of the results and of the default work folder (default paper_digits, "
                   "+ _pretrained with --pretrain-steps, + _quick with --quick)")
    g.add_argument("--out", help="work folder (default <repo>/runs/NAME)")
    g.add_argument("--results-dir", default=str(ROOT / "bench" / "results"), help="where the .md/.json/.png go")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    g.add_argument("--threads", type=positive_int, default=1, help="OMP/MKL threads of each subprocess")
    g.add_argument("--jobs", type=positive_int, default=1, help="phases run at once (2 on two cores; default 1)")
    g.add_argument("--force", action="store_true", help="redo every phase, even finished ones")
    g.add_argument("--stop-after", choices=ORDER[:-1], help="stop after this phase group: the table goes to stdout")
    g.add_argument("--verbose", action="store_true", help="echo the subprocesses' output (always in OUT/logs/)")
    a = p.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.name = a.name or "paper_digits" + ("_pretrained" if a.pretrain_steps else "") + ("_quick" if a.quick else "")
    a.out = a.out or str(ROOT / "runs" / a.name)
    a.taus, a.scale_list = a.tau, sorted(set(a.scales))
    a.frontier_seeds = min(a.frontier_seeds or a.seeds, a.seeds)
    if a.external not in (None, "make") and not Path(a.external).is_dir():
        p.error(f"--external {a.external}: not a folder (DIR/<class>/... images, or 'make')")
    if a.device == "auto":
        import torch  # lazy: only to see whether a GPU is there
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
    """Runs phases, skipping finished ones; OUT/phases.json records commands, status and seconds. Thread-safe:
    run_phases calls run() from up to --jobs threads; every change to the record goes through update()."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.state_file = self.out / "phases.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.ran: set[str] = set()
        self.lock = threading.Lock()
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                    "PYTHONUNBUFFERED": "1"}

    def update(self, name: str, new: bool = False, **fields):
        from checkpoint import atomic_write_json
        with self.lock:
            self.state[name] = fields if new else {**self.state[name], **fields}
            atomic_write_json(self.state_file, self.state)

    def run(self, ph: Phase):
        rec, key = self.state.get(ph.name), ph.key()
        same = rec is not None and rec.get("command") == key
        deps_ran = [d for d in ph.deps if d in self.ran]
        if not (self.args.force or not ph.done.exists() or not same or deps_ran):
            self.update(ph.name, skipped_last_run=True)
            log(f"[{ph.name}] done earlier ({rec.get('seconds', 0):.0f} s), skipped")
            return
        resume = (ph.resumable and same and not deps_ran and not self.args.force and rec.get("status") != "done")
        if not resume:  # a fresh run starts from nothing (stale images would mix into a synthetic set)
            if ph.output.is_dir():
                shutil.rmtree(ph.output)
            ph.output.unlink(missing_ok=True)
        before = rec.get("seconds", 0.0) if resume else 0.0
        self.update(ph.name, new=True, command=key, status="started", resumed=resume, deps_rerun=deps_ran)
        log(f"[{ph.name}] " + ("resuming: " if resume else "running: ") + key)
        t0 = time.time()
        try:
            if ph.func is not None:
                ph.func()
            else:
                self._subprocess(ph, ph.argv + (["--resume", "latest"] if resume else []))
        except BaseException as e:  # failed or interrupted (Ctrl-C): keep the time spent for the resumed run
            status = self.state[ph.name]["status"]
            self.update(ph.name, seconds=round(before + time.time() - t0, 1),
                        status=status if status.startswith("failed") else f"interrupted ({e!r})")
            raise
        if ph.keep_only is not None:
            for item in ph.output.iterdir():
                if item.name not in ph.keep_only:
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        self.update(ph.name, status="done", seconds=round(before + time.time() - t0, 1), skipped_last_run=False)
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
            self.update(ph.name, status=f"failed (exit {rc})")
            tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
            raise SystemExit(f"paper_digits: phase {ph.name} failed (exit {rc}); command:\n  "
                             f"{shlex.join(['python', *argv])}\nlast lines of {log_file}:\n{tail}")


def run_phases(runner: Runner, phases: list[Phase], jobs: int = 1):
    """Run the phases in list order, up to `jobs` at once: a phase starts when every phase it depends on (among
    these) has finished. A failure stops the scheduling; the phases already running finish first."""
    names, done, pending, running = {ph.name for ph in phases}, set(), list(phases), {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            ready = [ph for ph in pending if all(d in done or d not in names for d in ph.deps)]
            for ph in ready[:jobs - len(running)]:
                pending.remove(ph)
                running[pool.submit(runner.run, ph)] = ph
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                done.add(running.pop(fut).name)
                fut.result()  # re-raises a failed phase's SystemExit here


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


def materialise_unlabelled(limited_listing: Path, folder: Path, listing: Path):
    """The pre-training set of --pretrain-steps: every image of the digits train split that is NOT in the limited set
    (the files materialise_limited listed), all in ONE class folder, folder/digit/<class>_<index>.png (the labels are
    dropped; the name keeps the row)."""
    from checkpoint import atomic_write_json, read_json
    from data import list_images, resolve_data
    source, taken = resolve_data("digits"), set(read_json(limited_listing)["files"])
    (folder / "digit").mkdir(parents=True)
    files = []
    for path in list_images(source):
        rel = path.relative_to(source)  # <class>/<index>.png
        if rel.as_posix() not in taken:
            shutil.copy2(path, folder / "digit" / f"{rel.parent.name}_{rel.name}")
            files.append(rel.as_posix())
    atomic_write_json(listing, {"source": str(source), "split": "train", "excluded": str(limited_listing),
                                "files": files})


# ------------------------------------------------------------------------------------------ the plan
def training_seeds(args) -> list[int]:
    return [args.seed + i for i in range(args.seeds)]


def arms_of(args) -> list[dict]:
    """The synthetic sets of the main table: (name, model, sample.py style flags, label)."""
    arms = [{"name": "vanilla", "model": "vanilla", "style": ["--style", "none"], "label": "vanilla"}]
    for tau in args.taus:
        arms.append({"name": f"clue_tau{tau:g}", "model": "clue", "style": ["--style", "prior", "--tau", f"{tau:g}"],
                     "label": f"CLUE (prior, τ={tau:g})"})
    if args.posterior != "off":
        arms.append({"name": f"clue_{args.posterior.replace('-', '_')}", "model": "clue",
                     "style": ["--style", args.posterior, "--tau", "1"], "label": f"CLUE ({args.posterior})"})
    return arms


def frontier_curves(args) -> tuple[dict, list[dict]]:
    """The frontier: ({point id: {"model", "flags"}}, [{"label", "model", "knob", "points": [(value, id)]}]). A
    point shared by two curves (vanilla at --guidance without noise, CLUE at tau 1 with w_s 1) is sampled once."""
    w = f"{args.guidance:g}"
    points, curves = {}, []

    def point(pid, model, flags):
        points[pid] = {"model": model, "flags": flags}
        return pid
    van = lambda g: point(f"v-g{g:g}", "vanilla", ["--style", "none", "--guidance", f"{g:g}"])  # noqa: E731
    tau = lambda t: point(f"c-tau{t:g}", "clue", ["--style", "prior", "--tau", f"{t:g}", "--guidance", w])  # noqa: E731
    curves.append({"label": "vanilla: guidance w", "model": "vanilla", "knob": "w",
                   "points": [(g, van(g)) for g in sorted(set(args.frontier_guidance))]})
    curves.append({"label": f"vanilla: CADS noise s (w {w})", "model": "vanilla", "knob": "s", "points": [
        (s, van(args.guidance) if s == 0 else point(f"v-cads{s:g}", "vanilla", [
            "--style", "none", "--guidance", w, "--condition-noise", f"{s:g}"]))
        for s in sorted({0.0, *args.frontier_noise})]})
    curves.append({"label": f"CLUE: tau (w {w})", "model": "clue", "knob": "τ",
                   "points": [(t, tau(t)) for t in sorted(set(args.frontier_tau))]})
    curves.append({"label": "CLUE: guidance w (tau 1)", "model": "clue", "knob": "w", "points": [
        (g, tau(1.0) if g == args.guidance else point(f"c-g{g:g}", "clue", [
            "--style", "prior", "--tau", "1", "--guidance", f"{g:g}"]))
        for g in sorted({args.guidance, *args.frontier_clue_guidance})]})
    curves.append({"label": f"CLUE: style guidance w_s (tau 1, w {w})", "model": "clue", "knob": "w_s", "points": [
        (ws, tau(1.0) if ws == 1 else point(f"c-ws{ws:g}", "clue", [
            "--style", "prior", "--tau", "1", "--guidance", w, "--style-guidance", f"{ws:g}"]))
        for ws in sorted({1.0, *args.frontier_style_guidance})]})
    return points, curves


def shared_points(args) -> dict[str, str]:
    """{frontier point id: main-table arm name} for the points that ARE a main-table set (the same model, flags, DDIM
    steps and image count, and so the same sampling seed): those are sampled and scored once, by the main table."""
    points, _ = frontier_curves(args)
    if args.frontier_steps != args.sample_steps or args.frontier_scale != max(args.scale_list):
        return {}
    arms = {(a["model"], tuple([*a["style"], "--guidance", f"{args.guidance:g}"])): a["name"] for a in arms_of(args)}
    return {pid: arms[key] for pid, pt in points.items() if (key := (pt["model"], tuple(pt["flags"]))) in arms}


def external_folder(args) -> Path | None:
    if args.external is None:
        return None
    return Path(args.out).resolve() / "external_digits" if args.external == "make" else Path(args.external).resolve()


def build_phases(args) -> list[Phase]:
    out = Path(args.out).resolve()
    real, listing = out / "real_limited", out / "real_limited.json"
    batch = min(args.batch_size, args.limit_per_class * 10)
    dev, ext = ["--device", args.device], external_folder(args)
    ext_flags, ext_dep = (["--external", str(ext)] if ext else []), (["external"] if args.external == "make" else [])
    phases = [Phase("data", real, listing, func=lambda: materialise_limited(args, real, listing),
                    signature=json.dumps({"limit_per_class": args.limit_per_class, "seed": args.data_seed}))]
    tiny = ["--val-data", "digits:test", "--preset", "tiny", *dev]  # every train.py run
    common = ["--data", str(real), "--prompt", "a handwritten digit {class}", *tiny]  # those on the limited set
    phases.append(Phase(  # phase 1 of train.py only: the 1-step U-Net and its checkpoint (~100 MB) are deleted
        "vae", out / "runs" / "vae", out / "runs" / "vae" / "vae" / "config.json", deps=["data"],
        keep_only=["vae", "vae_log.jsonl", "vae_recon.png"],
        argv=["train.py", *common, "--seed", str(args.seed), "--style-tokens", "0", "--vae-steps",
              str(args.vae_steps), "--vae-batch-size", str(batch), "--steps", "1", "--batch-size", str(batch),
              "--warmup-steps", "1", "--sample-every", "0", "--checkpoint-every", "0", "--grid-taus", "0",
              "--grid-steps", "1", "--diag-images", "1", "--output", str(out / "runs" / "vae")]))
    vae, pre = out / "runs" / "vae" / "vae", out / "runs" / "pretrain"
    # the models start from the tiny preset and the shared VAE, or (--pretrain-steps) from the pre-trained base
    start = ["--model", str(pre / "final")] if args.pretrain_steps else ["--vae", str(vae)]
    if args.pretrain_steps:
        unlabelled = out / "unlabelled"
        phases.append(Phase("pretrain_data", unlabelled, out / "unlabelled.json", deps=["data"],
                            func=lambda: materialise_unlabelled(listing, unlabelled, out / "unlabelled.json"),
                            signature=json.dumps({"limited": str(real), "excluded": "the limited set"})))
        phases.append(Phase(
            "pretrain", pre, pre / "final" / "config.json", deps=["pretrain_data", "vae"], resumable=True,
            argv=["train.py", "--data", str(unlabelled), "--prompt", "a handwritten {class}", *tiny, "--seed",
                  str(args.seed), "--vae", str(vae), "--style-tokens", "0", "--steps", str(args.pretrain_steps),
                  "--batch-size", str(args.batch_size), "--sample-every", "0", "--checkpoints-total-limit", "1",
                  "--output", str(pre)]))
    if args.external == "make":
        phases.append(Phase("external", ext, ext / "manifest.json", argv=[
            "bench/external_digits.py", "--out", str(ext), "--per-class", str(args.external_per_class)]))
    feat = out / "feature_classifier"
    phases.append(Phase(
        "features", feat, feat / "config.json",
        argv=["eval.py", "train-classifier", "--train", "digits", "--test", "digits:test", "--out", str(feat),
              "--preset", "digits32", "--seed", str(args.eval_seed), *dev, "--quiet",
              *(["--steps", str(args.feature_steps)] if args.feature_steps else [])]))

    def evaluate(tag, fake, dep, scales, eval_seeds, combined, real_arm=True):
        m, c = fake.parent.parent / "metrics" / fake.name, fake.parent.parent / "classify" / fake.name
        return [Phase(f"metrics_{tag}", m, m / "metrics.json", deps=[dep, "features"], argv=[
                    "eval.py", "metrics", "--real", "digits:test", "--fake", str(fake), "--train", str(real),
                    "--features", "classifier", "--classifier", str(feat), "--cache-dir", str(out / "feature_cache"),
                    "--out", str(m), *dev, "--quiet"]),
                Phase(f"classify_{tag}", c, c / "classify.json", deps=["data", dep, *ext_dep], argv=[
                    "eval.py", "classify", "--train", str(real), "--synthetic", str(fake), "--test", "digits:test",
                    *ext_flags, "--scales", ",".join(map(str, scales)), *(["--combined"] if combined else []),
                    *([] if real_arm else ["--no-real"]),
                    "--seeds", str(eval_seeds), "--seed", str(args.eval_seed), "--preset", "digits32",
                    "--out", str(c), *dev, "--quiet",
                    *(["--steps", str(args.classify_steps)] if args.classify_steps else [])])]

    def sample(tag, model_dir, fake, deps, flags, scale, steps, seed):
        return Phase(f"sample_{tag}", fake, fake / "run.json", deps=deps, argv=[
            "sample.py", "--model", str(model_dir / "final"), "--data", str(real), "--scale", str(scale), *flags,
            "--steps", str(steps), "--batch", str(args.sample_batch), "--seed", str(seed), "--device", args.device,
            "--out", str(fake)])

    m = out / "metrics" / "real_limited"
    phases.append(Phase("metrics_real_limited", m, m / "metrics.json", deps=["data", "features"], argv=[
        "eval.py", "metrics", "--real", "digits:test", "--fake", str(real), "--features", "classifier",
        "--classifier", str(feat), "--cache-dir", str(out / "feature_cache"), "--out", str(m), *dev, "--quiet"]))
    points, _ = frontier_curves(args)
    shared = shared_points(args)
    for i, s in enumerate(training_seeds(args)):
        sd = out / f"s{s}"
        for model, tokens in (("vanilla", 0), ("clue", args.style_tokens)):
            run = sd / "runs" / model
            phases.append(Phase(
                f"train_{model}_s{s}", run, run / "final" / "config.json", resumable=True,
                deps=["data", "vae", *(["pretrain"] if args.pretrain_steps else [])],
                argv=["train.py", *common, "--seed", str(s), *start,
                      "--style-tokens", str(tokens), "--steps", str(args.train_steps), "--batch-size", str(batch),
                      "--sample-every", "0", "--checkpoints-total-limit", "1",  # enough to resume (~100 MB each)
                      "--output", str(run), *shlex.split(args.train_args),
                      *(shlex.split(args.clue_args) if model == "clue" else [])]))
        for arm in arms_of(args):
            tag, fake = f"{arm['name']}_s{s}", sd / "synthetic" / arm["name"]
            phases.append(sample(tag, sd / "runs" / arm["model"], fake, ["data", f"train_{arm['model']}_s{s}"],
                                 [*arm["style"], "--guidance", f"{args.guidance:g}"], max(args.scale_list),
                                 args.sample_steps, args.sample_seed + i))
            phases += evaluate(tag, fake, f"sample_{tag}", args.scale_list, args.eval_seeds, True)
        for pid, pt in (points.items() if args.frontier and i < args.frontier_seeds else ()):
            if pid in shared:  # the main table's set, sampled and scored there
                continue
            tag, fake = f"f{pid}_s{s}", sd / "frontier" / "synthetic" / pid
            phases.append(sample(tag, sd / "runs" / pt["model"], fake, ["data", f"train_{pt['model']}_s{s}"],
                                 pt["flags"], args.frontier_scale, args.frontier_steps, args.sample_seed + i))
            phases += evaluate(tag, fake, f"sample_{tag}", [args.frontier_scale], args.frontier_eval_seeds, False,
                               real_arm=False)  # the real-only classifier is the main table's
    return phases


def group_of(name: str) -> str:
    """The --stop-after group of a phase: train_clue_s0 -> train, metrics_vanilla_s1 -> metrics, vae -> vae."""
    return name.split("_")[0]


# ------------------------------------------------------------------------------------------ main
def plan_of(args) -> dict:
    """What the report needs to know of the plan (paper_digits_report.collect)."""
    points, curves = frontier_curves(args)
    return {"seeds": training_seeds(args), "arms": arms_of(args), "points": points, "curves": curves,
            "shared": shared_points(args), "external": external_folder(args)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args)
    phases = [ph for ph in build_phases(args)
              if not args.stop_after or ORDER.index(group_of(ph.name)) <= ORDER.index(args.stop_after)]
    run_phases(runner, phases, args.jobs)
    names = {ph.name for ph in phases}
    phase_times = {k: v for k, v in runner.state.items() if k in names}
    return report.write(args, plan_of(args), phase_times, time.time() - t0)


if __name__ == "__main__":
    main()
