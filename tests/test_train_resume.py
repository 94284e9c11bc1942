"""train.py --resume: N + N steps are bit-identical to 2N uninterrupted steps on CPU; checkpoints are written
atomically (a crash while writing leaves no half checkpoint) and rotated (--checkpoints-total-limit)."""
import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import data_dir, make_class_folders, make_vae_folder, one_thread, tiny_args, vae_dir  # noqa: F401


def state(out, step):
    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "training_state.safetensors"))


def assert_bit_identical(a: dict, b: dict, what: str):
    keys = [k for k in a if k.startswith(("param.", "ema.", "optim."))]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(("param.", "ema.", "optim.")))
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in keys)
    print(f"{what}: {len(keys)} tensors, max abs err {worst:.2e}")
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_exact(data_dir, vae_dir, tmp_path):
    """8 micro-batches of 8 from 24 images (3 per epoch): the checkpoint at step 3 falls mid-epoch. Random
    crops, flips (global torch RNG in the data loader), EMA, gradient accumulation, text and style dropout:
    everything random must come back."""
    common = ("--steps", "6", "--grad-accum", "2", "--random-crop", "--flip", "--ema-decay", "0.9")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # A: 6 steps with checkpoints (and sample grids + diagnostics) at 3 and 6
    train.main(tiny_args(data_dir, a, vae_dir, *common, "--checkpoint-every", "3", "--sample-every", "3"))
    # B: resume A's step-3 checkpoint in another folder, run to 6
    train.main(tiny_args(data_dir, b, vae_dir, *common, "--resume", a / "checkpoints" / "step_000003"))
    assert_bit_identical(state(a, 6), state(b, 6), "resumed 3 + 3 vs uninterrupted 6")
    # C: 6 steps without any checkpoint or grid on the way: side work must not move the training streams
    train.main(tiny_args(data_dir, c, vae_dir, *common))
    assert_bit_identical(state(a, 6), state(c, 6), "with vs without intermediate checkpoints")
    final_a, final_b = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_latest_after_a_crash_while_writing(data_dir, vae_dir, tmp_path, monkeypatch):
    """A crash inside checkpoint writing leaves only a hidden temporary folder; --resume latest takes the
    previous complete checkpoint, cleans the leftover, and finishes the run like an uninterrupted one."""
    import training_state
    out = tmp_path / "run"
    real, calls = training_state.atomic_write_json, {"n": 0}

    def crash_on_second_state(path, obj):
        if path.name == "training_state.json":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated crash while writing the step-4 checkpoint")
        return real(path, obj)
    # the name save_checkpoint calls: training_state.py imports it from checkpoint.py
    monkeypatch.setattr(training_state, "atomic_write_json", crash_on_second_state)
    args = tiny_args(data_dir, out, vae_dir, "--steps", "6", "--checkpoint-every", "2")
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        train.main(args)
    assert calls["n"] == 2  # the patch took effect: step 2 written, step 4 interrupted
    monkeypatch.setattr(training_state, "atomic_write_json", real)
    ckpts = out / "checkpoints"
    assert [p.name for p in train.list_checkpoints(out)] == ["step_000002"]
    assert not (ckpts / "step_000004").exists() and (ckpts / ".tmp-step_000004").exists()
    train.main(args + ["--resume"])  # bare --resume means latest
    assert not (ckpts / ".tmp-step_000004").exists()
    train.main(tiny_args(data_dir, tmp_path / "straight", vae_dir, "--steps", "6", "--checkpoint-every", "2"))
    assert_bit_identical(state(out, 6), state(tmp_path / "straight", 6), "crash + resume latest vs straight")


def test_checkpoints_are_rotated(data_dir, vae_dir, tmp_path):
    out = tmp_path / "rot"
    train.main(tiny_args(data_dir, out, vae_dir, "--steps", "5", "--checkpoint-every", "1",
                         "--checkpoints-total-limit", "2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", "step_000005"]
    for p in (out / "checkpoints").iterdir():
        assert {f.name for f in p.iterdir()} == {"config.json", "model.safetensors", "training_state.json",
                                                 "training_state.safetensors"}
