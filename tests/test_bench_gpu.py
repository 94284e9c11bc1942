"""bench/gpu.py --smoke: every part of the GPU benchmark at tiny sizes on the CPU, through the real program (one
subprocess, one thread). Its numbers mean nothing; the test checks that each part ran, wrote finite figures to the
JSON and a table to the Markdown file, and that the checks built into the parts hold at tiny size: the same
weights give the same outputs on both sides, the FLOP count sees every attention product, and the stressed
attention logits overflow the explicit fp16 softmax but not the upcast one."""
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["1_unet_train", "2_clue_step", "3_sampling", "4_fp16_upcast", "5_mfu"]
NOT_ON_CPU = {"peak_mib", "memory_ratio", "device_memory_gib"}  # memory is measured on CUDA only


def walk(value, path=""):
    """(path, number) for every number in the JSON, and (path, None) for every null."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")
    elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        yield path, value


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_smoke_run(tmp_path):
    t0, cpu0 = time.time(), cpu_seconds_of_children()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--threads", "1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds, cpu = time.time() - t0, cpu_seconds_of_children() - cpu0
    print(f"bench/gpu.py --smoke: {seconds:.1f} s wall, {cpu:.1f} s CPU")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert cpu < 90  # about 30 s on one core of the 2-core CI machine; wall time depends on its load

    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["meta"]["smoke"] and res["meta"]["device"] == "cpu"
    assert sorted(res["parts"]) == PARTS and not res.get("errors") and not res.get("skipped")
    for path, v in walk(res):
        if v is None:  # allowed: settings, memory on the CPU, errors of an output without a finite element
            assert ".config." in path or path.rsplit(".", 1)[-1] in NOT_ON_CPU | {"max_abs_err", "mean_abs_err"}, path
        else:
            assert math.isfinite(v), path
    md = (tmp_path / "gpu.md").read_text()
    assert all(f"## {i}." in md for i in range(1, 6)) and "SMOKE" in md

    # 1. the same weights: identical U-Net outputs; the counter sees every attention product (CPU kernels by hand)
    p1 = res["parts"]["1_unet_train"]
    assert p1["max_abs_output_diff_fp32"] < 1e-5
    for mode in ("no_checkpointing", "checkpointing"):
        for side in ("ours", "diffusers"):
            assert p1[mode][side]["ms"] > 0 and p1[mode][side]["rounds"] >= 2
    for side in ("ours", "diffusers"):
        flops = p1["no_checkpointing"][side]["flops"]
        assert flops["attention_kernels"] == p1["attention_flops_analytic"] and flops["hand_counted_ops"]
        assert p1["checkpointing"][side]["flops"]["total"] > flops["total"]  # the recomputed forward

    # 2. CLUE and vanilla steps (the style branch adds parameters), fp16 with a GradScaler
    p2 = res["parts"]["2_clue_step"]
    assert p2["trained_parameters"]["clue"] > p2["trained_parameters"]["vanilla"]
    assert p2["fp16_gradscaler"]["params_finite"] and p2["fp16_gradscaler"]["clue"]["ms"] > 0

    # 3. our generation equals the pipeline's in fp32, on images that are not all clipped
    d = res["parts"]["3_sampling"]["fp32"]["image_difference"]
    assert d["max_abs"] < 1e-3 and d["unclipped_fraction"] > 0.05

    # 4. random weights: every path finite; stressed: the explicit fp16 softmax overflows, the upcast does not
    p4 = res["parts"]["4_fp16_upcast"]
    variants = [k for k, v in p4["random_init"].items() if isinstance(v, dict)]
    assert len(variants) == 6 and all(p4["random_init"][k]["finite"] for k in variants)
    s = p4["stressed"]
    assert s["max_logit"] > 65504
    assert s["ours_upcast"]["finite"] and s["diffusers_upcast_classic"]["finite"]
    assert not s["ours_no_upcast_explicit_softmax"]["finite"] and not s["diffusers_no_upcast_classic"]["finite"]

    # 5. one MFU row per measured training step
    rows = res["parts"]["5_mfu"]["rows"]
    assert len(rows) == 6 and all(0 < r["mfu"] <= r["hfu"] for r in rows)
