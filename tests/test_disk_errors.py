"""Bad files at the disk layer (checkpoint.py, convert.py): every one is refused with a CheckpointError (a ValueError)
naming the file and the key, and `python convert.py` turns it into one line and exit code 2, never a traceback.
Old folders (format version 1 without "kind") still load."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import convert
from checkpoint import (CheckpointError, config_from_dict, load_clue, load_vae, read_checkpoint, read_state_dict,
                        save_clue, write_checkpoint)
from clue import CLUEConfig
from convert import load_stable_diffusion
from test_clue import small_clue
from unet import UNetConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clue_dir(tmp_path_factory):
    """A tiny CLUE checkpoint with a style posterior for one class."""
    model = small_clue()
    k, d = model.style_encoder.cfg.tokens, model.unet.cfg.context_dim
    model.style_posterior["zero"] = {"prompt": "a picture of zero", "mean": torch.randn(k, d), "var": torch.ones(k, d),
                                     "factors": torch.randn(2, k, d), "psi": torch.ones(k, d),
                                     "mus": torch.randn(3, k, d)}
    folder = tmp_path_factory.mktemp("clue") / "ckpt"
    save_clue(model, folder, extra={"steps": 1})
    return folder


def edited(clue_dir, tmp_path, edit) -> Path:
    """A copy of the checkpoint whose config.json is edit(config) (or, given a string, that text)."""
    folder = shutil.copytree(clue_dir, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    new = edit(config) if callable(edit) else edit
    (folder / "config.json").write_text(new if isinstance(new, str) else json.dumps(config if new is None else new))
    return folder


def run_convert(capsys, *argv) -> str:
    """convert.py's main as the command line runs it: the one-line message on stderr, exit code 2."""
    with pytest.raises(SystemExit) as e:
        cli.run(convert.main, [str(a) for a in argv], "convert.py")
    err = capsys.readouterr().err
    print(err)
    assert e.value.code == 2 and "Traceback" not in err and err.startswith("convert.py: error: ")
    return err


def test_no_ema_on_a_folder_is_refused(clue_dir, tmp_path, capsys):
    """--no-ema picks between a single file's two U-Nets; on a folder it used to be accepted and ignored."""
    with pytest.raises(SystemExit) as e:
        convert.main([str(clue_dir), str(tmp_path / "out"), "--no-ema"])
    assert e.value.code == 2 and "--no-ema" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="use_ema=False, unet_heads, text_heads apply to single files only"):
        load_stable_diffusion(clue_dir, use_ema=False)  # the Python API: refused as unet_heads / text_heads are


def test_round_trip_and_convert_of_a_good_clue_checkpoint(clue_dir, tmp_path, capsys):
    back = load_clue(clue_dir)
    assert back.train_config == {"steps": 1} and list(back.style_posterior) == ["zero"]
    convert.main([str(clue_dir), str(tmp_path / "out"), "--half"])  # a CLUE folder is rebuilt and checked as one
    again = load_clue(tmp_path / "out")
    assert again.train_config == {"steps": 1} and again.style_posterior["zero"]["prompt"] == "a picture of zero"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["kind"] == "clue"
    assert torch.equal(again.style_posterior["zero"]["mus"], back.style_posterior["zero"]["mus"].half().float())


def test_old_folder_without_kind_still_loads(clue_dir, tmp_path):
    """Folders written before "kind" existed: format version 1, no "kind" key."""
    folder = edited(clue_dir, tmp_path, lambda c: {k: v for k, v in c.items() if k != "kind"})
    assert "kind" not in json.loads((folder / "config.json").read_text())
    assert load_clue(folder).style_posterior["zero"]["prompt"] == "a picture of zero"
    assert load_stable_diffusion(folder).unet.cfg.style


def set_in(section, key, value):
    def edit(config):
        config[section][key] = value
    return edit


BROKEN_CONFIGS = {  # what is broken -> what the message says (after the file's name)
    "in_channels '4'": (set_in("unet", "in_channels", "4"), r"\[unet\] in_channels: expected an integer, got '4'"),
    "block_channels 64": (set_in("unet", "block_channels", 64), r"\[unet\] block_channels: expected a list, got 64"),
    "num_heads [8, 'x']": (set_in("unet", "num_heads", [8, "x"]), r"\[unet\] num_heads\[1\]: expected an integer"),
    "style 1": (set_in("unet", "style", 1), r"\[unet\] style: expected true or false, got 1"),
    "beta 'big'": (set_in("clue", "beta", "big"), r"\[clue\] beta: expected a number, got 'big'"),
    "min_snr_gamma '5'": (set_in("clue", "min_snr_gamma", "5"), r"\[clue\] min_snr_gamma: expected a number"),
    "unknown field": (set_in("vae", "colour", 3), r"\[vae\]: unknown VAEConfig fields \['colour'\]"),
    "heads 0": (set_in("unet", "num_heads", [0, 0]), r"\[unet\]: .*"),
    "a JSON list": (lambda c: [c], r"expected a JSON object, got a list"),
    "invalid JSON": ('{"format": "clue-pytorch", ', r"not valid JSON"),
    "no schedule": (lambda c: {k: v for k, v in c.items() if k != "schedule"}, r"missing the schedule section"),
    "schedule a string": (lambda c: {**c, "schedule": "x"}, r"\[schedule\]: expected a JSON object"),
    "beta_start < 0": (set_in("schedule", "beta_start", -0.1), r"0 < beta_start < beta_end < 1.*got 'epsilon', -0.1"),
    "beta_end > 1": (set_in("schedule", "beta_end", 1.5), r"0 < beta_start < beta_end < 1.*0.00085, 1.5, 1000"),
    "two prediction types": (set_in("schedule", "prediction_type", "v_prediction"), r"prediction_type 'epsilon' but "
                             r"\[schedule\] prediction_type 'v_prediction'; the model was trained with one"),
    "no timesteps": (set_in("schedule", "num_train_timesteps", 0), r"num_train_timesteps >= 1; got .*, 0"),
    "image_size 'big'": (lambda c: {**c, "image_size": "big"}, r"image_size: expected an integer"),
    "clue a string": (lambda c: {**c, "clue": "x"}, r"\[clue\]: expected a JSON object \(CLUEConfig fields\)"),
    "no style section": (lambda c: {**c, "style": None}, r"unet.style is True but the style section is missing"),
    "style a list": (lambda c: {**c, "style": [1]}, r"\[style\]: expected a JSON object"),
    "posterior a string": (lambda c: {**c, "style_posterior": "x"}, r"\[style_posterior\]: expected a JSON object"),
    "posterior classes": (set_in("style_posterior", "classes", "zero"), r"posterior\] classes: expected a list"),
    "posterior prompts": (set_in("style_posterior", "prompts", []), r"1 classes, 0 prompts, 1 counts"),
    # numbers a model cannot be built, trained or sampled with (each ended in a traceback or was taken)
    "num_heads -1": (set_in("unet", "num_heads", [-1, -1]), r"\[unet\]: UNetConfig fields \['num_heads=\[-1, -1\]'\]"),
    "no VAE levels": (set_in("vae", "block_channels", []), r"\[vae\]: VAEConfig fields \['block_channels=\[\]'\]"),
    "no text layers": (set_in("text", "layers", 0), r"\[text\]: TextConfig fields \['layers=0'\] out of range"),
    "mlp_ratio 1e12": (set_in("text", "mlp_ratio", 1e12), r"needs more memory than there is"),  # (petabytes)
    "eps NaN": (set_in("unet", "resnet_eps", float("nan")), r"\[unet\]: UNetConfig fields \['resnet_eps=NaN'\]"),
    "dropout 2": (set_in("clue", "text_dropout", 2.0), r"\[clue\]: CLUEConfig fields \['text_dropout=2.0'\] out of"),
    "kl_mode 'x'": (set_in("clue", "kl_mode", "x"), r"CLUEConfig.kl_mode must be 'beta' or 'capacity', got 'x'"),
    "beta < 0": (set_in("clue", "beta", -1.0), r"\[clue\]: CLUEConfig fields \['beta=-1.0'\] out of range"),
    "style heads 3": (set_in("style", "heads", 3), r"\[style\]: StyleConfig\(width=\d+\) must be a multiple of 4"),
    "steps_offset -1": (set_in("sampler", "steps_offset", -1), r"\[sampler\]: steps_offset -1 must lie in \[0, 999\]"),
    "image_size 0": (lambda c: {**c, "image_size": 0}, r"top-level fields \['image_size=0'\] out of range"),
    "image_size 30": (lambda c: {**c, "image_size": 30}, r"image_size 30 is not a multiple of the VAE's downsampling"),
    "clue image_size": (set_in("clue", "image_size", 30), r"\[clue\]: image_size 30 is not a multiple of the VAE's"),
    "train a string": (lambda c: {**c, "train": "x"}, r"\[train\]: expected a JSON object, got 'x'"),
    "prompt_template 5": (set_in("train", "prompt_template", 5), r"\[train\] prompt_template: expected a string"),
    "diagnostics a list": (lambda c: {**c, "diagnostics": [1]}, r"\[diagnostics\]: expected a JSON object"),
    "kind": (lambda c: {**c, "kind": "classifier"}, r"holds a 'classifier' checkpoint, expected 'stable_diffusion'"),
    "version": (lambda c: {**c, "version": 7}, r"format version 7 is not one this code reads"),
}


@pytest.mark.parametrize("case", list(BROKEN_CONFIGS))
def test_broken_config_is_named(clue_dir, tmp_path, capsys, case):
    edit, message = BROKEN_CONFIGS[case]
    folder = edited(clue_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / 'config.json'))}.*{message}") as e:
        load_clue(folder)
    print(e.value)
    # convert.py refuses to copy it through (what it would write could not be loaded): one line, exit code 2
    err = run_convert(capsys, folder, tmp_path / "out")
    assert str(folder / "config.json") in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "config.json").exists()


def rewritten(clue_dir, tmp_path, edit) -> Path:
    """A copy of the checkpoint whose model.safetensors holds edit(tensors)."""
    folder = shutil.copytree(clue_dir, tmp_path / "ckpt")
    config, tensors = read_checkpoint(folder)
    write_checkpoint(folder, "clue", {k: v for k, v in config.items() if k not in ("format", "version", "kind")},
                     edit(tensors))
    return folder


def test_missing_posterior_tensors_are_named(clue_dir, tmp_path, capsys):
    folder = rewritten(clue_dir, tmp_path, lambda t: {k: v for k, v in t.items() if k != "style_posterior.0.psi"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: the style posterior of class 'zero' lacks tensors "
                                              r"\['style_posterior.0.psi'\]; refit it"):
        load_clue(folder)
    assert "style_posterior.0.psi" in run_convert(capsys, folder, tmp_path / "out")


@pytest.mark.parametrize("name, make", [("mean", lambda k, d: torch.ones(3)), ("psi", lambda k, d: torch.ones(1, 1)),
                                        ("factors", lambda k, d: torch.ones(2, 64)),
                                        ("mus", lambda k, d: torch.ones(3, 2, 9)),
                                        ("mean", lambda k, d: torch.ones(k, d, dtype=torch.int64)),
                                        ("psi", lambda k, d: -torch.ones(k, d)),
                                        ("mus", lambda k, d: torch.full((3, k, d), float("nan")))])
def test_posterior_tensors_of_other_shapes_are_named(clue_dir, tmp_path, capsys, name, make):
    """Not the style encoder's (K, D) styles in real numbers: sampling would end in a torch error, broadcast them or
    round them."""
    k, d = read_checkpoint(clue_dir)[1]["style_posterior.0.mean"].shape
    folder = rewritten(clue_dir, tmp_path, lambda tensors: {**tensors, f"style_posterior.0.{name}": make(k, d)})
    t = make(k, d)
    found = re.escape(f"'{name}': '{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}'")
    with pytest.raises(CheckpointError, match=rf"model.safetensors: the style posterior of class 'zero' has .*{found}"
                                              rf".* \(wrong: \['{name}'\]\); the model's styles \(K, D\): "
                                              rf"\({k}, {d}\), finite real numbers, var and psi >= 0; refit"):
        load_clue(folder)
    assert "refit it" in run_convert(capsys, folder, tmp_path / "out")


def test_weights_of_integers_are_refused_halves_taken(clue_dir, tmp_path):
    """An integer (or boolean) tensor where our parameter is real would be rounded into it; fp16 / bf16 are cast."""
    weights = read_checkpoint(clue_dir)[1]["unet.conv_out.weight"]
    folder = rewritten(clue_dir, tmp_path, lambda t: {**t, "unet.conv_out.weight": weights.to(torch.int64)})
    with pytest.raises(CheckpointError, match=r"(?s)shape or dtype mismatches.*conv_out.weight: \(.*\) int64 in "
                                              r"the source, \(.*\) float32 in our model"):
        load_clue(folder)
    shutil.rmtree(folder)
    folder = rewritten(clue_dir, tmp_path, lambda t: {**t, "unet.conv_out.weight": weights.to(torch.bfloat16)})
    assert torch.equal(load_clue(folder).unet.conv_out.weight, weights.to(torch.bfloat16).float())


def test_posterior_counts_must_match_its_tensors(clue_dir, tmp_path):
    folder = edited(clue_dir, tmp_path, set_in("style_posterior", "counts", [4]))  # the tensors hold 3 images
    with pytest.raises(CheckpointError, match=r"style posterior of class 'zero' has .* for 4 images"):
        load_clue(folder)


def test_stored_style_layers_must_be_in_the_file(clue_dir, tmp_path):
    """The config says the U-Net has style layers: the audit does not let them keep their initialisation."""
    folder = rewritten(clue_dir, tmp_path, lambda t: {k: v for k, v in t.items() if "attn_style.to_q" not in k})
    with pytest.raises(CheckpointError, match=r"(?s)model.safetensors: the U-Net \(unet.\*\) weights do not match.*"
                                              r"parameters of ours with no source key.*attn_style.to_q.weight"):
        load_clue(folder)


def test_config_from_dict_checks_every_type():
    assert config_from_dict(CLUEConfig, {"min_snr_gamma": None, "beta": 1}, "x") == CLUEConfig(beta=1)
    off = {"beta": 0.0, "mmd_weight": 0, "beta_warmup_steps": 0, "text_dropout": 1.0, "style_dropout": 0.0}
    assert config_from_dict(CLUEConfig, off, "x") == CLUEConfig(**off)  # 0 (off) and dropout 1 are in range
    assert config_from_dict(UNetConfig, {"attention_levels": [True, False], "block_channels": [32, 64],
                                         "num_heads": [1, 2]}, "x").attention_levels == (True, False)
    for d, message in (({"attention_levels": [1, 0]}, r"x attention_levels\[0\]: expected true or false"),
                       ({"resnet_eps": "1e-5"}, r"x resnet_eps: expected a number, got '1e-5'"),
                       ({"context_dim": 64.0}, r"x context_dim: expected an integer, got 64.0"),
                       ({"norm_groups": 0, "context_dim": -8}, r"x: UNetConfig fields \['norm_groups=0', 'context_dim"),
                       ("unet", r"x: expected a JSON object \(UNetConfig fields\), got 'unet'")):
        with pytest.raises(CheckpointError, match=message):
            config_from_dict(UNetConfig, d, "x")


# ------------------------------------------------------------------------------ files that are not what they say
class Custom:
    """A class a pickle names: torch.load(weights_only=True) refuses to build it, so its code never runs."""
    def __init__(self):
        self.x = 1

    def __setstate__(self, state):
        print("this must never run")


def test_pickle_with_code_is_refused_with_the_reason(tmp_path, capsys):
    f = tmp_path / "model.ckpt"  # the legacy (non-zip) format and today's zip format, both holding an object
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callback": Custom()}, f, _use_new_zipfile_serialization=False)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callback": Custom()}, tmp_path / "zip.ckpt")
    for path in (f, tmp_path / "zip.ckpt"):
        with pytest.raises(CheckpointError) as e:
            read_state_dict(path)
        msg = str(e.value)
        print(msg)
        assert msg.startswith(f"{path}: holds pickled Python objects beyond tensors") and "nothing in it was run" in msg
        assert "safetensors with a tool you trust" in msg and "weights_only=False" not in msg
    assert "this must never run" not in capsys.readouterr().out
    err = run_convert(capsys, f, tmp_path / "out")
    assert "nothing in it was run" in err and "weights_only=False" not in err


def test_out_dir_that_is_a_file(clue_dir, tmp_path):
    """The real command line: one line on stderr, exit code 2, no traceback."""
    (tmp_path / "taken").write_text("x")
    r = subprocess.run([sys.executable, "convert.py", str(clue_dir), str(tmp_path / "taken")], cwd=ROOT,
                       capture_output=True, text=True)
    print(r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    taken = tmp_path / "taken"
    assert r.stderr.strip().endswith(f"convert.py: error: argument out_dir: '{taken}': {taken} exists and is not a "
                                     "folder; give a new or an existing folder")
    r = subprocess.run([sys.executable, "convert.py", str(tmp_path / "nowhere"), str(tmp_path / "o"),
                        "--prediction-type", "x"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--prediction-type: invalid choice" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["train.py", "--data", "digits", "--output"], ["sample.py", "--model", "m", "--out"],
                                  ["eval.py", "train-classifier", "--train", "digits", "--out"]])
def test_every_program_refuses_an_output_folder_inside_a_file(tmp_path, argv):
    """Checked when the flags are parsed, before any data or weights are read: one line naming the flag and the file."""
    (tmp_path / "taken").write_text("x")
    r = subprocess.run([sys.executable, *argv, str(tmp_path / "taken" / "run")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].endswith(f"{tmp_path / 'taken'} exists and is not a folder; give a new or an "
                                              "existing folder"), r.stderr
    assert argv[-1] in r.stderr.splitlines()[-1] and (tmp_path / "taken").read_text() == "x"


# ------------------------------------------------------------------------------ read_checkpoint: what resume relies on
STATE = dict(json_name="training_state.json", tensors_name="training_state.safetensors")


@pytest.mark.parametrize("damage", ["truncated tensors", "broken json", "json list", "json empty", "tensors missing"])
def test_read_checkpoint_names_the_broken_file(tmp_path, damage):
    write_checkpoint(tmp_path, "training_state", {"step": 3}, {"adam.m": torch.randn(64, 64)}, **STATE)
    assert read_checkpoint(tmp_path, "training_state", **STATE)[0]["step"] == 3
    tensors, config = tmp_path / STATE["tensors_name"], tmp_path / STATE["json_name"]
    if damage == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "tensors missing":
        tensors.unlink()
    else:
        config.write_text({"broken json": '{"format": "clue-pytorch", "step": ', "json list": "[1, 2]",
                           "json empty": ""}[damage])
    bad = tensors if "tensors" in damage else config
    with pytest.raises(FileNotFoundError if damage == "tensors missing" else CheckpointError,
                       match=rf"^{re.escape(str(bad))}: ") as e:
        read_checkpoint(tmp_path, "training_state", **STATE)
    print(e.value)


def test_load_vae_reads_any_folder_of_ours_with_a_vae(clue_dir, tmp_path):
    """train.py --vae: the VAE of a CLUE checkpoint loads with its weights; a folder of ours without one is refused."""
    vae, model = load_vae(clue_dir), load_clue(clue_dir)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), model.vae.state_dict().values()))
    assert vae.cfg.scale_factor == model.cfg.scale_factor
    write_checkpoint(tmp_path, "classifier", {"classes": ["a"]}, {"head.weight": torch.zeros(1, 2)})
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: holds no VAE (no 'vae' section")):
        load_vae(tmp_path)
    for scale, message in (("x", r"scale_factor: expected a number, got 'x'"), (0, r"\['scale_factor=0'\] out of")):
        folder = edited(clue_dir, tmp_path / str(scale), lambda c: {**c, "scale_factor": scale})
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder))}.*{message}"):
            load_vae(folder)  # (used to be a ValueError traceback, or a VAE scaled by 0)


def test_read_checkpoint_takes_the_first_training_state_files(tmp_path):
    """The first train.py wrote training_state.json with no "format" / "version" / "kind": it still reads; any other
    JSON without "format" (a config.json) is refused."""
    for folder, names in ((tmp_path / "state", STATE), (tmp_path / "model", {})):
        write_checkpoint(folder, "training_state", {"step": 3}, {"w": torch.zeros(2)}, **names)
        f = folder / names.get("json_name", "config.json")
        f.write_text(json.dumps({"step": 3}))
    assert read_checkpoint(tmp_path / "state", "training_state", **STATE)[0] == {"step": 3}
    with pytest.raises(CheckpointError, match=r"config.json: 'format' is None, expected 'clue-pytorch'"):
        read_checkpoint(tmp_path / "model")


def test_read_checkpoint_names_any_json_format_value(tmp_path):
    """A "format" that is not a string (a list, an object) is refused with the same one-line error, not a TypeError."""
    write_checkpoint(tmp_path, "vae", {"vae": {}}, {"w": torch.zeros(2)})
    for value in ([1, 2], {"a": 1}, 3):
        (tmp_path / "config.json").write_text(json.dumps({"format": value, "version": 1}))
        with pytest.raises(CheckpointError, match=r"'format' is .*expected 'clue-pytorch'; not a folder written"):
            read_checkpoint(tmp_path)
