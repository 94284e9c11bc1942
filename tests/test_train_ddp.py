"""train.py under `torchrun --nproc_per_node 2` on CPU (gloo), both phases (tiny VAE, then CLUE): the two
replicas end with identical weights (each rank writes a checksum of its parameters and of its EMA), and rank 0
alone writes the run's files. (Without DDP the two ranks' different data shards and noise make them differ.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

from test_train import data_dir, make_class_folders, tiny_args  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def test_torchrun_two_processes_keep_identical_replicas(data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *tiny_args(data_dir, out, None, "--vae-steps", "2", "--vae-batch-size", "8",
                                              "--steps", "4", "--grad-accum", "2", "--checkpoint-every", "2",
                                              "--dump-param-checksum")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and (out / "vae" / "model.safetensors").is_file()
    sums = [json.loads((out / f"param_checksum.rank{r}.json").read_text()) for r in (0, 1)]
    print(f"rank 0 params {sums[0]['params'][:16]}..., rank 1 params {sums[1]['params'][:16]}...")
    assert sums[0] == sums[1]
    # 24 images, 2 ranks x batch 8: each rank takes 12 images (one batch) per epoch; the checkpoint records it
    ckpt = json.loads((out / "checkpoints" / "step_000004" / "training_state.json").read_text())
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
            if "mse" in line] == [1, 2, 3, 4]  # one writer: no duplicated lines
