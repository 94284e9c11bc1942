"""sample.py and CLUE.generate end to end: our generation from weights written by diffusers' save_pretrained
equals diffusers' StableDiffusionPipeline (DDIM, 10 steps, guidance 7.5, a negative prompt, the same initial
latents), and the command line writes what it promises (PNGs, grid, run.json, class subfolders).

The pipeline runs with a real transformers CLIPTokenizer: no tokenizer files can be downloaded here, so the
test builds one from open_clip's bundled BPE vocabulary (reference.clip_tokenizer_offline); the prompts then
go through the pipeline's own tokenizer and text encoder, not through embeddings we computed."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import cli
import sample
from checkpoint import save_clue
from clue import CLUE, CLUEConfig, Sampling
from style_encoder import StyleConfig
from test_clue import PROMPT, SMALL_UNET, build_tiny_sd_pipeline, make_image_folder

PROMPTS = ["a photo of a red cube on a table", "an oil painting of a lighthouse at night"]
NEGATIVE = "blurry, low quality"


@pytest.mark.parametrize("text_mode,prediction_type", [("sd2", "epsilon"), ("sd1", "v_prediction")])
def test_generation_equals_diffusers_pipeline(tmp_path, text_mode, prediction_type):
    pipe = build_tiny_sd_pipeline(tmp_path / "sd", text_mode, prediction_type)
    model, kind = sample.load_model(tmp_path / "sd")
    assert kind == "sd" and model.style_encoder is None and model.cfg.prediction_type == prediction_type
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    final = {}

    def keep_latents(pipeline, i, t, kwargs):  # the pipeline's latents after its last DDIM step
        final["latents"] = kwargs["latents"]
        return {}

    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=10, guidance_scale=7.5,
                   latents=latents, height=16, width=16, output_type="pt", callback_on_step_end=keep_latents).images
    ours_latents = model.generate(PROMPTS, Sampling(steps=10, guidance=7.5, negative_prompt=NEGATIVE, height=16,
                                                    width=16), latents=latents, progress=False, output="latent")
    ours, ref_latents = model.decode_latents(ours_latents), final["latents"]
    err, lat_err = (ours - ref).abs().max().item(), (ours_latents - ref_latents).abs().max().item()
    print(f"{text_mode} {prediction_type}: images in [0,1] max abs err {err:.2e}; final latents {lat_err:.2e}")
    assert ours.shape == ref.shape == (2, 3, 16, 16)
    assert err <= 1e-3 and lat_err <= 1e-3
    assert 0.05 < ((ref > 0) & (ref < 1)).float().mean()  # not a comparison of clipped pixels only


@pytest.fixture(scope="module")
def clue_ckpt(tmp_path_factory):
    """A small CLUE checkpoint (untrained, with a fitted style posterior) and its class folder."""
    from torch.utils.data import DataLoader

    from data import ClassFolderDataset
    root = tmp_path_factory.mktemp("sample_cli")
    data = make_image_folder(str(root / "data"), per_class=3)
    torch.manual_seed(0)
    model = CLUE.from_config(unet=SMALL_UNET, style=StyleConfig.tiny(), clue=CLUEConfig.tiny())
    model.fit_style_posterior(DataLoader(ClassFolderDataset(data, PROMPT, size=32), batch_size=6))
    save_clue(model, root / "ckpt", extra={"prompt_template": PROMPT})
    return root, data


def test_cli_plain_sd(tmp_path):
    build_tiny_sd_pipeline(tmp_path / "sd")
    out = tmp_path / "out"
    record = sample.main(["--model", str(tmp_path / "sd"), "--prompt", "a red cube", "--negative-prompt", "blurry",
                          "--steps", "3", "--batch", "2", "--height", "16", "--width", "16", "--seed", "4",
                          "--out", str(out)])
    files = sorted(os.listdir(out))
    assert files == ["grid.png", "images", "run.json"]
    assert sorted(os.listdir(out / "images")) == ["000000.png", "000001.png"]
    assert Image.open(out / "images" / "000000.png").size == (16, 16)
    run = json.loads((out / "run.json").read_text())
    assert run["model_kind"] == "sd" and run["settings"]["seed"] == 4 and run["settings"]["steps"] == 3
    assert record["n_files"] == 3
    with pytest.raises(cli.UsageError, match="no style branch"):  # a style flag on plain SD: a clear error
        sample.main(["--model", str(tmp_path / "sd"), "--prompt", "x", "--style", "prior", "--steps", "1",
                     "--height", "16", "--width", "16", "--out", str(out)])


def test_cli_clue_dataset_modes(clue_ckpt):
    root, data = clue_ckpt
    ckpt = str(root / "ckpt")
    out = root / "per_class"
    sample.main(["--model", ckpt, "--data", data, "--per-class", "3", "--batch", "2", "--steps", "2",
                 "--out", str(out)])
    assert sorted(p for p in os.listdir(out) if p != "run.json") == ["horizontal_bars", "vertical_bars"]
    assert sorted(os.listdir(out / "vertical_bars")) == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(out / "vertical_bars" / "00000.png").size == (32, 32)
    run = json.loads((out / "run.json").read_text())
    assert [c["prompt"] for c in run["classes"]] == ["a picture of horizontal bars", "a picture of vertical bars"]
    # --scale: percent of the real class counts (3 per class here): 200 % -> 6
    out = root / "scale"
    sample.main(["--model", ckpt, "--data", data, "--scale", "200", "--batch", "6", "--steps", "1",
                 "--style", "posterior-sample", "--out", str(out)])
    assert len(os.listdir(out / "horizontal_bars")) == 6
    # without --data: the classes stored with the checkpoint's style posterior
    out = root / "from_ckpt"
    sample.main(["--model", ckpt, "--per-class", "1", "--steps", "1", "--style", "posterior", "--tau", "0.5",
                 "--out", str(out)])
    assert sorted(p for p in os.listdir(out) if p != "run.json") == ["horizontal_bars", "vertical_bars"]


def test_cli_clue_grids_and_style_flags(clue_ckpt):
    root, data = clue_ckpt
    ckpt = str(root / "ckpt")
    sample.main(["--model", ckpt, "--grid", "classes-x-styles", "--n-styles", "3", "--steps", "2", "--tau", "0.8",
                 "--out", str(root / "grid")])
    grid = Image.open(root / "grid" / "grid.png")
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns, 2 class rows of 32 px, 2 px padding
    ref = os.path.join(data, "vertical_bars", "000.png")
    sample.main(["--model", ckpt, "--grid", "interpolation", "--interpolate", ref, "7", "--n-interp", "4",
                 "--steps", "2", "--out", str(root / "interp")])
    assert Image.open(root / "interp" / "grid.png").size == (4 * 34 + 2, 2 * 34 + 2)
    out = root / "ref"
    sample.main(["--model", ckpt, "--prompt", "a picture of vertical bars", "--style", "reference", "--reference",
                 ref, "--style-scale", "2", "--num-images", "2", "--steps", "2", "--out", str(out)])
    assert {"grid.png", "images", "run.json"} <= set(os.listdir(out))
    with pytest.raises(SystemExit):
        sample.main(["--model", ckpt, "--scale", "100", "--out", str(out)])  # --scale needs --data


def one_line_error(capsys, argv):
    """sample.py's main through cli.run, as `python sample.py` runs it: exit code 2, a message, no traceback."""
    with pytest.raises(SystemExit) as e:
        cli.run(sample.main, argv, "sample.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--n-styles", "0"), ("--num-images", "0"),
                                        ("--height", "0"), ("--width", "-8"), ("--per-class", "-1"),
                                        ("--scale", "-100"), ("--steps", "0"), ("--tau", "nan"), ("--tau", "-1"),
                                        ("--eta", "nan"), ("--eta", "1.5"), ("--style-scale", "inf"),
                                        ("--guidance", "nan"), ("--seed", "-1"), ("--n-interp", "x"),
                                        ("--device", "gpu"), ("--device", "cuda:99")])
def test_bad_flags_are_refused_at_parse_time(capsys, flag, value):
    err = one_line_error(capsys, ["--model", "unused", "--prompt", "x", flag, value])
    assert f"argument {flag}" in err


@pytest.mark.parametrize("flags, says", [
    (["--interpolate", "1", "2"], "--interpolate A B is for --grid interpolation"),
    (["--style-seed", "3"], "--style-seed is for --grid classes-x-styles"),
    (["--negative-prompt", "blurry", "--guidance", "1"], "--guidance > 1"),
    (["--reference", "a.png"], "--style reference"),
    (["--reference-prompt", "x", "--style", "prior"], "--style reference"),
    (["--style", "reference"], "--style reference needs --reference IMAGE"),  # was found after loading the model
    (["--prompt-template", "a {class}", "--per-class", "2"], "give --data"), (["--data", "digits"], "--data is for"),
    (["--class", "3", "--per-class", "2", "--data", "digits"], "--class is for --prompt"),
    (["--num-images", "3", "--per-class", "2"], "--num-images is for --prompt"),
    (["--grid", "classes-x-styles", "--data", "digits"], "drop --prompt")])
def test_flags_the_mode_would_ignore_are_refused(capsys, flags, says):
    """Each of these used to be accepted and then ignored by the mode the other flags chose."""
    assert says in one_line_error(capsys, ["--model", "unused", "--prompt", "x", *flags])


def test_an_error_mid_dataset_is_a_line_of_its_own(clue_ckpt, tmp_path, capsys):
    """A class the posterior does not know is found while the progress bar is drawn: the bar is closed first, so the
    message starts its own line (it used to be printed onto the bar)."""
    root, data = clue_ckpt
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(tmp_path / "data" / "vertical_bars", tmp_path / "data" / "zigzags")
    err = one_line_error(capsys, ["--model", str(root / "ckpt"), "--data", str(tmp_path / "data"), "--per-class", "1",
                                   "--style", "posterior", "--steps", "1", "--out", str(tmp_path / "o")])
    line = next(part for part in re.split(r"[\r\n]", err) if "sample.py: error:" in part)
    assert line.startswith("sample.py: error: --style posterior needs a class") and "'zigzags'" in line, err
    assert len(os.listdir(tmp_path / "o" / "horizontal_bars")) == 1  # the classes before it were drawn


def test_nan_pixels_are_refused_not_written(clue_ckpt, tmp_path, capsys):
    """Weights that hold NaN (or fp16 overflow on a GPU) give NaN pixels: one line, exit 2, no black PNGs."""
    root, _ = clue_ckpt
    model = sample.load_model(root / "ckpt")[0]
    with torch.no_grad():
        model.unet.conv_out.bias.fill_(float("nan"))
    save_clue(model, tmp_path / "nan")
    err = one_line_error(capsys, ["--model", str(tmp_path / "nan"), "--prompt", "x", "--steps", "1",
                                   "--out", str(tmp_path / "o")])
    assert "NaN / infinite pixels (--dtype fp32)" in err and not (tmp_path / "o" / "images").exists(), err


def test_bad_sizes_and_models_end_in_one_line(clue_ckpt, tmp_path, capsys):
    root, data = clue_ckpt
    ckpt = str(root / "ckpt")
    err = one_line_error(capsys, ["--model", ckpt, "--prompt", "x", "--height", "30", "--steps", "1",
                                   "--out", str(tmp_path / "o")])
    assert "--height 30" in err and "multiples of 4" in err
    err = one_line_error(capsys, ["--model", ckpt, "--prompt", "x", "--style", "posterior", "--class", "nope",
                                   "--steps", "1", "--out", str(tmp_path / "o")])
    assert "--class" in err and "horizontal bars" in err
    err = one_line_error(capsys, ["--model", ckpt, "--grid", "interpolation", "--interpolate", "1", "-2",
                                   "--steps", "1", "--out", str(tmp_path / "o")])
    assert "--interpolate '-2'" in err
    err = one_line_error(capsys, ["--model", ckpt, "--prompt", "x", "--style", "reference", "--reference",
                                   str(tmp_path / "missing.png"), "--steps", "1", "--out", str(tmp_path / "o")])
    assert "missing.png" in err
    # a model folder with a broken config.json, or a field of the wrong type: the file (and key) are named
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    config["clue"]["image_size"] = "big"
    (bad / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["--model", str(bad), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert "config.json" in err and "image_size" in err
    (bad / "config.json").write_text("{not json")
    err = one_line_error(capsys, ["--model", str(bad), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert "config.json" in err and "JSON" in err
    # the real entry point, in a fresh interpreter: a model path that does not exist
    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root_dir, "sample.py"), "--model", str(tmp_path / "nothing"),
                           "--prompt", "x", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "nothing" in proc.stderr, proc.stderr
