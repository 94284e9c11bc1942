"""bench/paper_digits.py: a smoke run of the whole comparison with minuscule settings (3 real digits per class,
2 training steps, 2 DDIM steps, 3 classifier steps), and the bookkeeping a user relies on to resume a run
(in process, on cheap phases: a second full invocation would cost another dozen interpreter starts): finished
phases are skipped, a changed command or a re-run dependency re-runs a phase, --force re-runs all.

The numbers of such a run mean nothing; the test checks that every phase ran through the real programs
(train.py, sample.py, eval.py) on the same limited real set, and that the report and the JSON hold them."""
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import paper_digits  # noqa: E402

SMOKE = ["--quick", "--limit-per-class", "3", "--vae-steps", "2", "--train-steps", "2", "--batch-size", "8",
         "--sample-steps", "2", "--sample-batch", "64", "--scales", "100,200", "--classify-steps", "3",
         "--feature-steps", "3", "--train-args", "--grid-steps 1 --grid-taus 0 --diag-images 8 --warmup-steps 1"]


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

    # both models: the same command but for --style-tokens and the run folder; the same trained VAE
    phases = json.loads((work / "phases.json").read_text())
    van, clue = phases["train_vanilla"]["command"].split(), phases["train_clue"]["command"].split()
    diff = [(a, b) for a, b in zip(van, clue) if a != b]
    assert len(van) == len(clue) and diff == [("0", "4"), (str(work / "runs" / "vanilla"), str(work / "runs" / "clue"))]
    assert str(work / "runs" / "vae" / "vae") in van
    assert sorted(p.name for p in (work / "runs" / "vae").iterdir()) == ["vae", "vae_log.jsonl", "vae_recon.png"]
    assert json.loads((work / "runs" / "clue" / "final" / "config.json").read_text())["style"] is not None
    assert json.loads((work / "runs" / "vanilla" / "final" / "config.json").read_text())["style"] is None

    # synthetic sets at the largest scale (200 % of 3 = 6 per class), from the same real class folders
    for arm in ("vanilla", "clue_tau1"):
        for c in range(10):
            assert len(list((work / "synthetic" / arm / str(c)).glob("*.png"))) == 6

    # report: stdout == the .md file; the JSON has every phase with its time and the parsed results
    md = (results / "paper_digits_quick.md").read_text()
    assert proc.stdout.strip() == md.strip()
    assert "| metric | vanilla | CLUE (prior, τ=1) |" in md and "F1, synthetic only, 200 %" in md
    rec = json.loads((results / "paper_digits_quick.json").read_text())
    names = {"data", "vae", "train_vanilla", "train_clue", "sample_vanilla", "sample_clue_tau1", "features",
             "metrics_real_limited", "metrics_vanilla", "metrics_clue_tau1", "classify_vanilla", "classify_clue_tau1"}
    assert set(rec["phases"]) == names and all(r["status"] == "done" and r["seconds"] >= 0
                                               for r in rec["phases"].values())
    for arm in ("vanilla", "clue_tau1"):
        a = rec["arms"][arm]
        assert a["metrics"]["n_real"] == 359 and a["metrics"]["n_fake"] == 60 and a["n_synthetic"] == 60
        assert a["metrics"]["features"] == "classifier" and a["metrics"]["n_train"] == 30  # memorisation vs limited
        got = {(x["arm"], x["scale_percent"]): x["n_images"] for x in a["classify"]["arms"]}
        assert got == {("real", None): 30, ("synthetic", 100): 30, ("synthetic", 200): 60,
                       ("real+synthetic", 100): 60}
    real_f1 = [paper_digits.f1_of(rec["arms"][a], "real", None)["mean"] for a in ("vanilla", "clue_tau1")]
    assert real_f1[0] == pytest.approx(real_f1[1], abs=1e-12)  # the same real-only runs in every column
    assert rec["reference"]["real_limited_vs_test"]["n_fake"] == 30
    assert rec["real_limited"]["files"] == listing["files"] and rec["settings"]["limit_per_class"] == 3



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
