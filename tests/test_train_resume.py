"""train.py --resume: N + N steps are bit-identical to 2N uninterrupted steps on CPU; checkpoints are written
atomically (a crash while writing leaves no half checkpoint) and rotated (--checkpoints-total-limit); a corrupt
newest checkpoint is reported and skipped; checkpoints written before "kind" existed still resume."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import train
import training_state
from test_train import data_dir, make_class_folders, one_thread, run_cli, tiny_args, vae_dir  # noqa: F401


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
    out = tmp_path / "run"
    real, calls = checkpoint.atomic_write_json, {"n": 0}

    def crash_on_second_state(path, obj):
        if path.name == "training_state.json":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated crash while writing the step-4 checkpoint")
        return real(path, obj)
    # the name write_checkpoint (checkpoint.py) calls for training_state.json
    monkeypatch.setattr(checkpoint, "atomic_write_json", crash_on_second_state)
    args = tiny_args(data_dir, out, vae_dir, "--steps", "6", "--checkpoint-every", "2")
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        train.main(args)
    assert calls["n"] == 2  # the patch took effect: step 2 written, step 4 interrupted
    monkeypatch.setattr(checkpoint, "atomic_write_json", real)
    ckpts = out / "checkpoints"
    assert [p.name for p in training_state.list_checkpoints(out)] == ["step_000002"]
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


@pytest.fixture(scope="module")
def four_steps(data_dir, vae_dir, tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("four") / "run"
    train.main(tiny_args(data_dir, out, vae_dir, "--steps", "4", "--checkpoint-every", "2"))
    return out


def truncate(f):
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def edit_json(f, drop=(), **changes):
    """Rewrite JSON file f with `changes`, the keys in `drop` removed."""
    obj = {**json.loads(f.read_text()), **changes}
    f.write_text(json.dumps({k: v for k, v in obj.items() if k not in drop}))


def edit_tensors(f, edit):
    """Rewrite safetensors file f as edit(its tensors)."""
    save_file(edit(load_file(str(f))), str(f))


def first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


CORRUPTIONS = {"training_state.safetensors": truncate, "model.safetensors": truncate,
               "training_state.json": lambda f: f.write_text('{"format": "clue-pytorch", "step": '),
               "config.json": lambda f: f.write_text("{not json")}
CORRUPTIONS.update({  # valid JSON, but not what resuming reads (each used to end in a traceback)
    "training_state.json (no optimizer)": lambda f: edit_json(f, drop=["optimizer"]),
    "training_state.json (step a string)": lambda f: edit_json(f, step="4"),
    "training_state.json (no epoch)": lambda f: edit_json(f, data_position={"batches_taken": 1, "batch_size": 8}),
    "training_state.json (rng of 2 processes)": lambda f: edit_json(f, rng=2 * json.loads(f.read_text())["rng"])})
CORRUPTIONS.update({  # tensors or settings that do not fit each other (tracebacks at the first step, or rounded)
    "training_state.safetensors (a moment of another shape)":
        lambda f: edit_tensors(f, lambda t: {**t, first(t, ".exp_avg"): torch.zeros(3)}),
    "training_state.safetensors (integer weights)":
        lambda f: edit_tensors(f, lambda t: {**t, (k := first(t, ".weight")): t[k].long()}),
    "training_state.safetensors (no numpy RNG)": lambda f: edit_tensors(f, lambda t: {
        k: v for k, v in t.items() if k != "rng.0.numpy"}),
    "training_state.json (the step of another folder)": lambda f: edit_json(f, step=2),
    "training_state.json (two param groups)": lambda f: edit_json(f, optimizer={"param_groups": 2 * json.loads(
        f.read_text())["optimizer"]["param_groups"]}),
    "training_state.json (lr_schedule empty)": lambda f: edit_json(f, lr_schedule={})})


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_resume_latest_skips_a_corrupt_newest_checkpoint(name, four_steps, data_dir, vae_dir, tmp_path, capsys):
    """A corrupt (not half-written) newest checkpoint: a warning naming it and the file, then the one before it
    resumes, and the run ends bit-identical to the uninterrupted one."""
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    file = name.split(" ")[0]
    CORRUPTIONS[name](out / "checkpoints" / "step_000004" / file)
    train.main(tiny_args(data_dir, out, vae_dir, "--steps", "4", "--checkpoint-every", "2", "--resume"))
    captured = capsys.readouterr()
    print(captured.err)
    assert "step_000004 is broken" in captured.err and file in captured.err and "Traceback" not in captured.err
    assert "resumed from" in captured.out and "step_000002 at step 2" in captured.out
    assert_bit_identical(state(four_steps, 4), state(out, 4), f"resumed past a corrupt {name}")


def test_resume_with_no_intact_checkpoint_stops_with_one_line(four_steps, data_dir, vae_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    truncate(out / "checkpoints" / "step_000002" / "training_state.safetensors")
    CORRUPTIONS["training_state.json"](out / "checkpoints" / "step_000004" / "training_state.json")
    code, err = run_cli(tiny_args(data_dir, out, vae_dir, "--steps", "4", "--resume", "latest"), capsys)
    assert code == 2 and "train.py: error: --resume latest: no intact checkpoint" in err
    assert "step_000002" in err and "step_000004" in err and "training_state.safetensors" in err
    code, err = run_cli(tiny_args(data_dir, out, vae_dir, "--resume", tmp_path), capsys)  # not a checkpoint at all
    assert code == 2 and f"--resume {tmp_path}" in err and "training_state.json" in err


def test_checkpoints_of_the_previous_train_py_still_resume(four_steps, data_dir, vae_dir, tmp_path):
    """The previous train.py wrote training_state.json without "format" / "version" / "kind" and config.json without
    "kind": such a checkpoint resumes bit-exactly."""
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    for name, keys in (("training_state.json", ("format", "version", "kind")), ("config.json", ("kind",))):
        f = out / "checkpoints" / "step_000002" / name
        f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k not in keys}))
    shutil.rmtree(out / "checkpoints" / "step_000004")
    train.main(tiny_args(data_dir, out, vae_dir, "--steps", "4", "--checkpoint-every", "2", "--resume"))
    assert_bit_identical(state(four_steps, 4), state(out, 4), "resumed from a checkpoint of the previous train.py")
