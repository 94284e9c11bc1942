"""bench/paper_digits.py: a smoke run of the whole comparison with minuscule settings (3 real digits per class,
2 training seeds, 2 training steps, 2 DDIM steps, 3 classifier steps, a four-point frontier on the first seed, a
20-image external set, two phases at a time), and the bookkeeping a user relies on to resume a run (in process,
on cheap phases): finished phases are skipped, a changed command or a re-run dependency re-runs a phase, --force
re-runs all, --jobs runs a phase only after those it depends on.

The numbers of such a run mean nothing; the test checks that every phase ran through the real programs
(train.py, sample.py, eval.py, bench/external_digits.py) on the same limited real set, that the report's
summaries and paired differences are those of the per-seed numbers, and that the plots were written."""
import json
import os
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import paper_digits  # noqa: E402
import paper_digits_report  # noqa: E402

SMOKE = ["--quick", "--limit-per-class", "3", "--vae-steps", "2", "--train-steps", "2", "--batch-size", "8",
         "--sample-steps", "2", "--sample-batch", "64", "--scales", "100,200", "--classify-steps", "3",
         "--feature-steps", "3", "--train-args", "--grid-steps 1 --grid-taus 0 --diag-images 8 --warmup-steps 1",
         "--seeds", "2", "--jobs", "2", "--external", "make", "--external-per-class", "2",
         "--frontier", "--frontier-seeds", "1", "--frontier-guidance", "3", "--frontier-noise", "0.5",
         "--frontier-tau", "1", "--frontier-style-guidance", "0", "--frontier-clue-guidance", "3",
         "--frontier-scale", "100", "--frontier-steps", "2"]
POINTS = ["v-g3", "v-cads0.5", "c-tau1", "c-ws0"]


def run_bench(tmp, extra=()):
    cmd = [sys.executable, str(ROOT / "bench" / "paper_digits.py"), *SMOKE, "--out", str(tmp / "work"),
           "--results-dir", str(tmp / "results"), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, time.time() - t0


def test_smoke_run(tmp_path):
    proc, seconds = run_bench(tmp_path)
    print(f"smoke run: {seconds:.1f} s wall")
    work, results = tmp_path / "work", tmp_path / "results"

    # the limited real set: 3 images per class, listed, the files there
    listing = json.loads((work / "real_limited.json").read_text())
    assert listing["counts"] == [3] * 10 and len(listing["files"]) == 30
    assert all((work / "real_limited" / f).is_file() for f in listing["files"])
    assert sorted(p.relative_to(work / "real_limited").as_posix()
                  for p in (work / "real_limited").rglob("*.png")) == sorted(listing["files"])

    # per seed, both models: the same command but for --style-tokens and the run folder; the same trained VAE;
    # the two seeds differ in --seed and the folders only
    phases = json.loads((work / "phases.json").read_text())
    cmd = {(m, s): phases[f"train_{m}_s{s}"]["command"].split() for m in ("vanilla", "clue") for s in (0, 1)}
    for s in (0, 1):
        van, clue = cmd["vanilla", s], cmd["clue", s]
        diff = [(a, b) for a, b in zip(van, clue) if a != b]
        assert len(van) == len(clue) and diff == [("0", "4"), (str(work / f"s{s}" / "runs" / "vanilla"),
                                                               str(work / f"s{s}" / "runs" / "clue"))]
        assert str(work / "runs" / "vae" / "vae") in van
    diff = {(a, b) for a, b in zip(cmd["clue", 0], cmd["clue", 1]) if a != b}
    assert diff == {("0", "1"), (str(work / "s0" / "runs" / "clue"), str(work / "s1" / "runs" / "clue"))}
    assert sorted(p.name for p in (work / "runs" / "vae").iterdir()) == ["vae", "vae_log.jsonl", "vae_recon.png"]
    assert json.loads((work / "s1" / "runs" / "clue" / "final" / "config.json").read_text())["style"] is not None

    # synthetic sets at the largest scale (200 % of 3 = 6 per class); frontier points (100 %) on seed 0 only
    for s in (0, 1):
        for arm in ("vanilla", "clue_tau1"):
            assert all(len(list((work / f"s{s}" / "synthetic" / arm / str(c)).glob("*.png"))) == 6 for c in range(10))
    assert sorted(p.name for p in (work / "s0" / "frontier" / "synthetic").iterdir()) == sorted(POINTS)
    assert not (work / "s1" / "frontier").exists()
    flags = {p: phases[f"sample_f{p}_s0"]["command"] for p in POINTS}
    assert "--condition-noise 0.5" in flags["v-cads0.5"] and "--style-guidance 0" in flags["c-ws0"]
    assert all("--steps 2 " in f and "--scale 100 " in f and "--guidance 3" in f for f in flags.values())

    # the external set: 2 typeset images per digit, used by every classify phase
    manifest = json.loads((work / "external_digits" / "manifest.json").read_text())
    assert manifest["counts"] == {str(d): 2 for d in range(10)} and len(manifest["images"]) == 20
    assert all(f"--external {work / 'external_digits'}" in r["command"] for k, r in phases.items()
               if k.startswith("classify_"))

    # report: stdout == the .md file; the JSON has every phase, the per-seed numbers and their summaries
    md = (results / "paper_digits_quick.md").read_text()
    assert proc.stdout.strip() == md.strip()
    assert ("| metric | vanilla | CLUE (prior, τ=1) | CLUE (prior, τ=1) − vanilla (paired) |" in md
            and "F1 test, synthetic only, 200 %" in md and "F1 external, synthetic only, 200 %" in md)
    rec = json.loads((results / "paper_digits_quick.json").read_text())
    names = {"data", "vae", "external", "features", "metrics_real_limited"} | {
        f"{kind}_{arm}_s{s}" for s in (0, 1) for arm in ("vanilla", "clue_tau1")
        for kind in ("sample", "metrics", "classify")} | {f"train_{m}_s{s}" for m in ("vanilla", "clue")
                                                          for s in (0, 1)} | {
        f"{kind}_f{p}_s0" for p in POINTS for kind in ("sample", "metrics", "classify")}
    assert set(rec["phases"]) == names and all(r["status"] == "done" for r in rec["phases"].values())
    for arm in ("vanilla", "clue_tau1"):
        for s in ("0", "1"):
            a = rec["arms"][arm]["per_seed"][s]
            assert a["n_synthetic"] == 60 and all(a.get(k) is not None for k in (
                "recall", "fid", "memorised", "syn_test_100", "syn_external_200", "real+syn_test", "real_external"))
        summ = rec["arms"][arm]["summary"]["recall"]
        assert summ["n"] == 2 and summ["mean"] == pytest.approx(sum(summ["values"]) / 2)
    van, clue = (rec["arms"][a]["per_seed"] for a in ("vanilla", "clue_tau1"))
    for key in ("recall", "syn_test_200", "syn_external_200"):
        d = rec["paired_minus_vanilla"]["clue_tau1"][key]
        assert d["values"] == pytest.approx([clue[s][key] - van[s][key] for s in ("0", "1")])
    assert [van[s]["real_test"] for s in ("0", "1")] == [clue[s]["real_test"] for s in ("0", "1")]

    # the frontier: every point scored, the CLUE points against vanilla at the same precision, the two plots
    assert all(rec["frontier"][p]["summary"]["recall"]["n"] == 1 for p in POINTS)
    assert all("syn_test_100" in rec["frontier"][p]["summary"] for p in POINTS)
    assert {r["point"] for r in rec["matched_precision"]} == {"c-tau1", "c-ws0"}
    assert all(set(r["gain"]) == {"recall", "syn_test_100", "syn_external_100", "fid"}
               for r in rec["matched_precision"])
    for suffix in ("pr", "f1"):
        assert Image.open(results / f"paper_digits_quick_frontier_{suffix}.png").size[0] > 300
    assert "### Diversity-fidelity frontier" in md and "CLUE against vanilla's best knob at the same precision" in md


def test_matched_precision_reads_vanillas_best_curve_per_seed():
    """Worked by hand: at precision 0.90 curve A reads (recall, F1, FID) halfway between its points, curve B has
    less recall there, so A is vanilla's best knob; a seed whose CLUE precision no vanilla curve reaches is left out."""
    def pt(p, r, f1, fid):
        return {"precision": p, "recall": r, "syn_test_300": f1, "fid": fid}
    per_seed = {  # seed -> {point: scores}
        "0": {"a1": pt(0.95, 0.30, 0.80, 1.0), "a2": pt(0.85, 0.50, 0.85, 0.6), "b1": pt(0.92, 0.35, 0.82, 0.9),
              "b2": pt(0.88, 0.38, 0.83, 0.8), "c": pt(0.90, 0.60, 0.90, 0.5)},
        "1": {"a1": pt(0.95, 0.30, 0.80, 1.0), "a2": pt(0.85, 0.60, 0.85, 0.6), "b1": pt(0.92, 0.35, 0.82, 0.9),
              "b2": pt(0.88, 0.38, 0.83, 0.8), "c": pt(0.90, 0.55, 0.88, 0.6)},
        "2": {"a1": pt(0.95, 0.30, 0.80, 1.0), "a2": pt(0.85, 0.50, 0.85, 0.6), "b1": pt(0.92, 0.35, 0.82, 0.9),
              "b2": pt(0.88, 0.38, 0.83, 0.8), "c": pt(0.99, 0.20, 0.70, 2.0)}}
    frontier = {p: {"per_seed": {s: per_seed[s][p] for s in per_seed}} for p in per_seed["0"]}
    curves = [{"label": "A", "model": "vanilla", "knob": "w", "points": [(1, "a1"), (2, "a2")]},
              {"label": "B", "model": "vanilla", "knob": "s", "points": [(0, "b1"), (1, "b2")]},
              {"label": "C", "model": "clue", "knob": "tau", "points": [(1.0, "c")]}]
    [row] = paper_digits_report.matched_precision(frontier, curves, [0, 1, 2], ("recall", "syn_test_300", "fid"))
    assert row["point"] == "c" and row["matched_seeds"] == 2
    assert row["vanilla"]["recall"]["values"] == pytest.approx([0.40, 0.45])
    assert row["gain"]["recall"]["values"] == pytest.approx([0.20, 0.10])
    assert row["gain"]["syn_test_300"]["values"] == pytest.approx([0.075, 0.055])
    assert row["gain"]["fid"]["values"] == pytest.approx([-0.3, -0.2])
    assert row["pooled_std"]["syn_test_300"] == pytest.approx(0.01)  # sqrt((var(.90, .88) + var(.825, .825)) / 2)


def test_frontier_points_that_are_main_sets_are_not_sampled_again(tmp_path):
    """A point with the main table's flags, DDIM steps and image count is that set: no phases of its own (the report
    reads the main table's scores); the other points classify without a real-only arm (the main table has it)."""
    args = paper_digits.parse_args(["--out", str(tmp_path), "--tau", "1,1.5", "--scales", "300", "--sample-steps", "20",
                                    "--frontier", "--frontier-guidance", "1,3", "--frontier-noise", "0.5",
                                    "--frontier-tau", "1,2", "--frontier-style-guidance", "2",
                                    "--frontier-clue-guidance", "1,3", "--seeds", "1"])
    assert paper_digits.shared_points(args) == {"v-g3": "vanilla", "c-tau1": "clue_tau1"}
    names = {ph.name: ph for ph in paper_digits.build_phases(args)}
    assert {n for n in names if n.startswith("sample_f")} == {f"sample_f{p}_s0" for p in
                                                                ("v-g1", "v-cads0.5", "c-tau2", "c-g1", "c-ws2")}
    assert "--no-real" in names["classify_fv-g1_s0"].argv and "--no-real" not in names["classify_vanilla_s0"].argv
    args.frontier_steps = 10  # another DDIM step count: no point is a main-table set any more
    assert paper_digits.shared_points(args) == {}


def test_pretrained_arm_fine_tunes_both_models_from_a_base_trained_without_the_limited_set(tmp_path):
    """--pretrain-steps: a vanilla base trained on the train digits minus the limited set, in one unlabelled folder;
    both models start from it (train.py --model BASE --preset tiny) instead of the tiny preset's random weights."""
    from data import list_images, resolve_data
    args = paper_digits.parse_args(["--out", str(tmp_path), "--pretrain-steps", "50", "--seeds", "1"])
    assert args.name == "paper_digits_pretrained"
    phases = {ph.name: ph for ph in paper_digits.build_phases(args)}
    pre = phases["pretrain"].argv
    assert pre[pre.index("--steps") + 1] == "50" and pre[pre.index("--style-tokens") + 1] == "0"
    assert pre.count("--data") == 1 and pre[pre.index("--data") + 1] == str(tmp_path / "unlabelled")
    assert pre[pre.index("--prompt") + 1] == "a handwritten {class}" and "--preset" in pre
    for model in ("vanilla", "clue"):
        argv = phases[f"train_{model}_s0"].argv
        assert argv[argv.index("--model") + 1] == str(tmp_path / "runs" / "pretrain" / "final")
        assert "--vae" not in argv and "--preset" in argv and "pretrain" in phases[f"train_{model}_s0"].deps
    phases["data"].func()
    phases["pretrain_data"].func()
    limited = {p.name for p in list_images(tmp_path / "real_limited")}
    unlabelled = [p.name.split("_") for p in list_images(tmp_path / "unlabelled")]
    assert {p.parent.name for p in list_images(tmp_path / "unlabelled")} == {"digit"}
    assert not limited & {index for _, index in unlabelled}
    assert len(unlabelled) + len(limited) == len(list_images(resolve_data("digits")))


def test_clue_args_change_the_clue_runs_only(tmp_path):
    """--clue-args: an arm of CLUE's settings; vanilla's commands (so its finished phases) stay as they were."""
    plain, arm = ({ph.name: ph.key() for ph in paper_digits.build_phases(paper_digits.parse_args(
        ["--out", str(tmp_path), "--seeds", "1", *extra]))} for extra in ([], ["--clue-args", "--capacity 0.3"]))
    assert [n for n in plain if plain[n] != arm[n]] == ["train_clue_s0"] and arm["train_clue_s0"].endswith(
        "--capacity 0.3")


def test_runner_reruns_what_changed(tmp_path):
    """In-process phases: skip when done; re-run on a changed command, a re-run dependency, or --force."""
    args = Namespace(out=str(tmp_path), force=False, threads=1, verbose=False)
    calls = []

    def phases(sig_a="a1"):
        def make(name, sig, deps):
            out = tmp_path / name

            def func():
                calls.append(name)
                out.mkdir()
                (out / "done").write_text(sig)
            return paper_digits.Phase(name, out, out / "done", func=func, signature=sig, deps=deps)
        return [make("a", sig_a, []), make("b", "b1", ["a"]), make("c", "c1", [])]

    def run_all(**kw):
        calls.clear()
        runner = paper_digits.Runner(Namespace(**{**vars(args), **kw}))
        for ph in phases(kw.get("sig_a", "a1")):
            runner.run(ph)
        return list(calls)

    assert run_all() == ["a", "b", "c"]
    assert run_all() == []                                  # everything done: skipped
    assert run_all(sig_a="a2") == ["a", "b"]                # a's command changed -> a, and b that depends on it
    (tmp_path / "c" / "done").unlink()
    assert run_all(sig_a="a2") == ["c"]                     # an output went missing -> that phase only
    assert run_all(sig_a="a2", force=True) == ["a", "b", "c"]


def test_jobs_wait_for_dependencies(tmp_path):
    """run_phases with 2 jobs: an independent phase runs beside a slow one, a dependent one only after it."""
    args = Namespace(out=str(tmp_path), force=False, threads=1, verbose=False)
    spans, lock = {}, threading.Lock()

    def make(name, deps, seconds):
        out = tmp_path / name

        def func():
            t0 = time.time()
            time.sleep(seconds)
            out.mkdir()
            (out / "done").write_text("x")
            with lock:
                spans[name] = (t0, time.time())
        return paper_digits.Phase(name, out, out / "done", func=func, signature=name, deps=deps)
    paper_digits.run_phases(paper_digits.Runner(args), [make("a", [], 0.4), make("b", ["a"], 0.0),
                                                        make("c", [], 0.0)], jobs=2)
    assert spans["c"][0] < spans["a"][1] <= spans["b"][0]
    state = json.loads((tmp_path / "phases.json").read_text())
    assert all(state[k]["status"] == "done" for k in "abc")


def test_interrupted_subprocess_phase_resumes(tmp_path):
    """A resumable phase (train.py) that failed part-way is continued with --resume latest, its folder kept;
    the failure names the phase, the command and the log's last lines."""
    out = tmp_path / "t"
    script = ("import sys, pathlib; out = pathlib.Path(sys.argv[1]); out.mkdir(exist_ok=True)\n"
              "if '--resume' not in sys.argv: (out / 'partial').write_text('x'); print('interrupted'); sys.exit(3)\n"
              "assert (out / 'partial').exists(); (out / 'done').write_text(' '.join(sys.argv[1:]))")
    phase = paper_digits.Phase("t", out, out / "done", argv=["-c", script, str(out)], resumable=True)
    args = Namespace(out=str(tmp_path), force=False, threads=1, verbose=False)
    with pytest.raises(SystemExit, match=r"phase t failed \(exit 3\)[\s\S]*interrupted"):
        paper_digits.Runner(args).run(phase)
    assert json.loads((tmp_path / "phases.json").read_text())["t"]["status"] == "failed (exit 3)"
    paper_digits.Runner(args).run(phase)
    assert (out / "done").read_text() == f"{out} --resume latest"
    rec = json.loads((tmp_path / "phases.json").read_text())["t"]
    assert rec["status"] == "done" and rec["resumed"] is True


def test_external_digits_reproducible_and_digits_like(tmp_path):
    """bench/external_digits.py: the same seed writes the same files; 8x8 ink counts 0..16 as the optdigits
    preprocessing gives, drawn as data.py draws the digits (32 px, dark on white); the glyph fills the height."""
    import numpy as np

    import external_digits
    a, b, c = (external_digits.make_external(tmp_path / name, 2, seed) for name, seed in (("a", 0), ("b", 0),
                                                                                              ("c", 1)))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 20 and a == b and a["images"] != c["images"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    counts = external_digits.render("4", external_digits.fonts()[0], external_digits.draw_params(
        np.random.default_rng(0)))
    assert counts.shape == (8, 8) and counts.min() == 0 and 8 <= counts.max() <= 16
    assert (counts.max(axis=1) > 0).all()  # normalised to the full height: ink in every row
    img = Image.open(tmp_path / "a" / files[0])
    assert img.size == (32, 32) and img.mode == "L" and np.asarray(img).max() == 255
