"""train.py: the pieces (LR schedule, EMA, optimizer flattening, RNG state: training_state.py) and whole tiny
runs on CPU.

Whole runs use tiny synthetic class folders drawn with PIL and a tiny model (U-Net 32/32, style encoder
width 32, one layer); each takes seconds. Resume and torchrun have their own files (test_train_resume.py,
test_train_ddp.py), which import the helpers below.
"""
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import train
import training_state
from checkpoint import load_clue
from style_encoder import StyleConfig


# ------------------------------------------------------------------------------------ helpers
def make_class_folders(root, per_class=8, size=(40, 36), seed=0):
    """Three classes of 40x36 RGB images (random crops to 32 px have room): horizontal bars, vertical bars,
    rings, with random position and thickness."""
    rng = random.Random(seed)
    for cls in ("horizontal_bar", "vertical_bar", "ring"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", size, "white")
            d = ImageDraw.Draw(img)
            w, h, t = size[0], size[1], rng.randint(2, 6)
            if cls == "horizontal_bar":
                y = rng.randint(6, h - 6 - t)
                d.rectangle([4, y, w - 4, y + t], fill="black")
            elif cls == "vertical_bar":
                x = rng.randint(6, w - 6 - t)
                d.rectangle([x, 4, x + t, h - 4], fill="black")
            else:
                r = rng.randint(6, 12)
                d.ellipse([w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r], outline="black", width=t)
            img.save(root / cls / f"{i:03d}.png")
    return root


def make_vae_folder(path, seed=0):
    """An (untrained) tiny VAE in the folder format the previous train.py's phase 1 wrote (no "kind" yet), which
    --vae still reads."""
    from dataclasses import asdict

    from checkpoint import atomic_write_json, atomic_write_safetensors
    from vae import VAE, VAEConfig
    torch.manual_seed(seed)
    vae = VAE(VAEConfig.tiny(scale_factor=1.0))
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(path / "model.safetensors", {f"vae.{k}": v for k, v in vae.state_dict().items()})
    atomic_write_json(path / "config.json", {"format": "clue-pytorch", "version": 1, "vae": asdict(vae.cfg),
                                             "scale_factor": 1.0})
    return path


def tiny_args(data, out, vae=None, *extra):
    """Arguments of a tiny CPU run: small U-Net and style encoder, grid of 2 columns x 2 DDIM steps."""
    args = ["--data", str(data), "--preset", "tiny", "--output", str(out), "--device", "cpu",
            "--unet-channels", "32,32", "--style-width", "32", "--style-layers", "1",
            "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1",
            "--sample-every", "0", "--checkpoint-every", "0", "--grid-taus", "0,1", "--grid-steps", "2",
            "--diag-images", "16", "--prompt", "a picture of a {class}"]
    if vae is not None:
        args += ["--vae", str(vae)]
    return args + [str(a) for a in extra]


def run_cli(argv, capsys):
    """train.command_line, what `python train.py ...` runs -> (exit code, stderr); never a traceback."""
    with pytest.raises(SystemExit) as e:
        train.command_line([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and a busy 2-core machine makes two threads 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_vae_folder(tmp_path_factory.mktemp("vae") / "vae")


# ------------------------------------------------------------------------------------ pieces
def test_lr_schedule_warmup_cosine_constant():
    f = [training_state.lr_factor(s, warmup=10, total=110, schedule="cosine", min_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)          # linear warm-up to the peak
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)       # half-way down the cosine
    assert f[110] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert training_state.lr_factor(500, 10, 110, "constant", 0.1) == 1.0


def test_ema_matches_the_formula_and_swaps_back():
    p = {"w": torch.zeros(3)}
    ema = training_state.EMA(p, decay=0.9)
    expected = torch.zeros(3)
    for n in range(1, 6):
        p["w"] = torch.full((3,), float(n))
        ema.update(p)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * p["w"]
    err = (ema.shadow["w"] - expected).abs().max().item()
    print(f"EMA vs formula max abs err {err:.2e}")
    assert err < 1e-6
    param = torch.nn.Parameter(torch.ones(3))
    ema2 = training_state.EMA({"w": param}, 0.5)
    ema2.shadow["w"] = torch.full((3,), 7.0)
    with ema2.applied({"w": param}):
        assert torch.equal(param.data, torch.full((3,), 7.0))
    assert torch.equal(param.data, torch.ones(3))


def test_optimizer_state_round_trips_through_tensors_and_json():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        net(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    names = [n for n, _ in net.named_parameters()]
    tensors, meta = training_state.flatten_optimizer(opt, names)
    assert set(tensors) == {f"optim.{n}.{k}" for n in names for k in ("step", "exp_avg", "exp_avg_sq")}
    tensors = {k: v.clone() for k, v in tensors.items()}         # as read back from disk
    meta = json.loads(json.dumps(meta))                          # through JSON, as on disk
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=5.0)
    training_state.unflatten_optimizer(opt2, names, tensors, meta)
    x = torch.randn(5, 4)
    for model, o in ((net, opt), (twin, opt2)):
        model(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip():
    state = training_state.get_rng_state(torch.device("cpu"))
    state = (state[0], json.loads(json.dumps(state[1])))
    first = (torch.rand(3), np.random.rand(3), random.random())
    training_state.set_rng_state(*state, torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_help_has_examples():
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "x"])  # neither --model nor --preset


def test_help_text(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for example in ("--data digits --preset tiny", "--style-tokens 0", "--resume latest", "torchrun"):
        assert example in text


# ------------------------------------------------------------------------------------ whole runs
def test_tiny_run_loss_goes_down_and_writes_everything(data_dir, tmp_path):
    out = tmp_path / "run"
    summary = train.main(tiny_args(data_dir, out, None, "--vae-steps", "3", "--vae-batch-size", "8",
                                   "--steps", "40", "--lr-schedule", "constant", "--lr", "2e-3",
                                   "--ema-decay", "0"))
    log = [r for r in read_log(out) if "mse" in r]
    first, last = np.mean([r["mse"] for r in log[:5]]), np.mean([r["mse"] for r in log[-5:]])
    print(f"diffusion mse: first 5 steps {first:.4f}, last 5 steps {last:.4f}")
    assert last < 0.8 * first
    for f in ("vae/config.json", "vae/model.safetensors", "vae_log.jsonl", "vae_recon.png", "log.jsonl",
              "loss_curve.png", "samples.png", "summary.json", "final/config.json", "final/model.safetensors",
              "checkpoints/step_000040/training_state.json"):
        assert (out / f).is_file(), f
    assert Image.open(out / "loss_curve.png").size[0] > 100
    model = load_clue(out / "final")
    assert sorted(model.style_posterior) == ["horizontal bar", "ring", "vertical bar"]
    config = json.loads((out / "final" / "config.json").read_text())
    diag = config["diagnostics"]
    assert set(diag) >= {"kl_per_dim", "active_units", "agg_kl_per_dim", "loss_encoder", "loss_prior",
                         "loss_aggregate", "loss_none"}
    assert config["train"]["prompt_template"] == "a picture of a {class}"
    assert summary["diagnostics"] == diag
    assert any(r.get("event") == "diagnostics" for r in read_log(out))


def test_vanilla_baseline_has_no_style_parameters(data_dir, vae_dir, tmp_path):
    out = tmp_path / "vanilla"
    train.main(tiny_args(data_dir, out, vae_dir, "--steps", "2", "--style-tokens", "0"))
    model = load_clue(out / "final")
    assert model.style_encoder is None
    assert not [n for n, _ in model.named_parameters() if "style" in n]
    assert (out / "samples.png").is_file()


def test_fine_tune_freezes_vae_and_text_encoder(data_dir, vae_dir, tmp_path):
    """--model: a checkpoint in our format stands in for SD; VAE and text encoder must not move, the U-Net
    must; --freeze-unet moves only the U-Net's style layers."""
    from unet import is_style_param
    base = tmp_path / "base"
    train.main(tiny_args(data_dir, base, vae_dir, "--steps", "1"))
    args = [a for a in tiny_args(data_dir, tmp_path / "ft", None, "--steps", "2", "--ema-decay", "0",
                                 "--resolution", "32")]
    args[args.index("--preset"):args.index("--preset") + 2] = ["--model", str(base / "final")]
    args[args.index("--unet-channels"):args.index("--unet-channels") + 2] = []
    train.main(args)
    before, after = load_clue(base / "final").state_dict(), load_clue(tmp_path / "ft" / "final").state_dict()
    moved = {k.split(".")[0] for k in after if k in before and not torch.equal(before[k], after[k])}
    assert "unet" in moved and "vae" not in moved and "text_encoder" not in moved
    args[args.index("--output") + 1] = str(tmp_path / "ft2")
    train.main(args + ["--freeze-unet"])
    after = load_clue(tmp_path / "ft2" / "final").state_dict()
    moved_unet = [k for k in after if k.startswith("unet.") and not torch.equal(before[k], after[k])]
    assert moved_unet and all(is_style_param(k) for k in moved_unet)


def test_fine_tune_of_a_tiny_base_uses_the_tiny_preset(data_dir, vae_dir, tmp_path, capsys):
    """--model PATH --preset tiny (a base pre-trained by us): the tiny style encoder (4 heads, not SD's 8) and
    objective (z0 = the VAE mean), the tiny defaults (lr 1e-3, text encoder trained); the base's frozen VAE."""
    base = tmp_path / "base"
    train.main(tiny_args(data_dir, base, vae_dir, "--steps", "1", "--style-tokens", "0"))
    argv = tiny_args(data_dir, tmp_path / "ft", None, "--steps", "1", "--model", str(base / "final"))
    del argv[argv.index("--unet-channels"):argv.index("--unet-channels") + 2]
    args = train.parse_args(argv)
    assert (args.lr, args.train_text_encoder, args.resolution) == (1e-3, True, 32)
    train.main(argv)
    ft, vanilla = load_clue(tmp_path / "ft" / "final"), load_clue(base / "final")
    assert ft.style_encoder.cfg.heads == StyleConfig.tiny().heads != StyleConfig.sd().heads
    assert ft.style_encoder.cfg.width == 32 and not ft.cfg.sample_latents
    assert all(torch.equal(v, vanilla.vae.state_dict()[k]) for k, v in ft.vae.state_dict().items())
    for extra, message in ((["--unet-channels", "32,32"], "--model brings its own"), (["--vae", "v"], "--vae is for")):
        with pytest.raises(SystemExit):
            train.parse_args(argv + extra)
        assert message in capsys.readouterr().err


def test_text_encoder_trains_from_scratch_and_stays_frozen_when_fine_tuning(tmp_path):
    """DESIGN: from scratch (--preset tiny) everything but the phase-1 VAE trains, the text encoder included;
    on public weights (--model) the text encoder is frozen; both can be overridden."""
    from clue import CLUE, CLUEConfig
    from style_encoder import StyleConfig
    from unet import UNetConfig
    model = CLUE.from_config(unet=UNetConfig.tiny(block_channels=(32, 32), num_heads=(2, 2)),
                             style=StyleConfig.tiny(), clue=CLUEConfig.tiny())
    text = {n for n, _ in model.named_parameters() if n.startswith("text_encoder.")}
    for extra, trains_text in (([], True), (["--no-train-text-encoder"], False)):
        names = set(train.select_trainable(model, train.parse_args(tiny_args("digits", tmp_path, None, *extra))))
        assert (text <= names) == trains_text and not (text & names) == trains_text
        assert not any(n.startswith("vae.") for n in names) and any(n.startswith("style_encoder.") for n in names)
    for extra, trains_text in (([], False), (["--train-text-encoder"], True)):
        argv = ["--data", "digits", "--model", str(tmp_path / "sd"), "--output", str(tmp_path / "o"), *extra]
        assert train.parse_args(argv).train_text_encoder == trains_text


def test_nan_loss_stops_with_a_clear_message_and_writes_nothing(data_dir, vae_dir, tmp_path, monkeypatch):
    import clue
    original = clue.CLUE.loss

    def poisoned(self, batch, step=0, generator=None):
        loss, logs = original(self, batch, step, generator)
        return (loss * math.nan if step == 3 else loss), logs
    monkeypatch.setattr(clue.CLUE, "loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(training_state.TrainingDiverged, match=r"step 3: the loss is nan.*step_000002"):
        train.main(tiny_args(data_dir, out, vae_dir, "--steps", "6", "--checkpoint-every", "2"))
    assert [p.name for p in training_state.list_checkpoints(out)] == ["step_000002"]
    assert not (out / "final").exists() and not (out / "summary.json").exists()


def test_empty_class_folder_is_a_clear_error(data_dir, vae_dir, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    (bad / "empty_class").mkdir()
    code, err = run_cli(tiny_args(bad, tmp_path / "out", vae_dir, "--steps", "1"), capsys)
    assert code == 2 and "--data" in err and "empty_class contains no readable images" in err


def test_corrupt_image_is_skipped_with_a_warning(data_dir, vae_dir, tmp_path, capsys, caplog):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    (bad / "ring" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    train.main(tiny_args(bad, tmp_path / "out", vae_dir, "--steps", "1"))
    out = capsys.readouterr().out
    assert "data: 24 images" in out and "1 unreadable files skipped" in out
    assert "broken.png" in caplog.text  # data.py's one warning line per skipped file


# ------------------------------------------------------------------------------------ bad input (issue 12)
@pytest.mark.parametrize("flag, value", [
    ("--checkpoints-total-limit", "0"), ("--checkpoints-total-limit", "-1"), ("--log-every", "0"), ("--steps", "1.5"),
    ("--batch-size", "0"), ("--lr", "nan"), ("--lr", "-1e-3"), ("--text-dropout", "1.5"), ("--ema-decay", "-0.1"),
    ("--max-grad-norm", "inf"), ("--grid-taus", "0,x"), ("--unet-channels", "32,0"), ("--vae-steps", "-5"),
    ("--seed", "x"), ("--device", "gpu"), ("--device", "cuda:99")])
def test_bad_numbers_are_refused_when_parsed(flag, value, tmp_path, capsys):
    """--checkpoints-total-limit 0 used to delete every checkpoint; now no number is used unchecked."""
    code, err = run_cli(["--data", "digits", "--preset", "tiny", "--output", tmp_path / "o", flag, value], capsys)
    assert code == 2 and f"error: argument {flag}:" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--beta", "0.05"], ["--kl-mode", "beta", "--capacity", "0.2"],
                                   ["--kl-mode", "beta", "--capacity-ramp-steps", "10"]])
def test_flags_of_the_other_kl_mode_are_refused(flags, tmp_path, capsys):
    """--beta under the default capacity objective used to be ignored without a word."""
    code, err = run_cli(["--data", "digits", "--preset", "tiny", "--output", tmp_path / "o", *flags], capsys)
    assert code == 2 and "--kl-mode" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (["--vae", "v", "--vae-steps", "10"], "there is no phase 1"),
    (["--model", "m", "--vae-lr", "1e-3"], "there is no phase 1"),
    (["--vae", "v", "--vae-batch-size", "8"], "there is no phase 1"),
    (["--model", "m", "--vae-kl-weight", "0"], "there is no phase 1"),
    (["--lr-schedule", "constant", "--min-lr-ratio", "0.5"], "--min-lr-ratio is where --lr-schedule cosine ends")])
def test_flags_without_a_phase_or_schedule_to_act_on_are_refused(flags, message, tmp_path, capsys):
    """--vae-steps beside --vae (a trained VAE reused) or --model (SD's VAE), --min-lr-ratio with a constant rate:
    each used to be ignored without a word."""
    code, err = run_cli(["--data", "digits", "--preset", "tiny", "--output", tmp_path / "o", *flags], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()


def test_defaults_of_refusable_flags_fill_in_where_they_act():
    args = train.parse_args(["--data", "digits", "--preset", "tiny", "--vae-lr", "1e-3"])
    assert (args.vae_steps, args.vae_lr, args.vae_batch_size, args.vae_kl_weight) == (400, 1e-3, 32, 1e-4)
    assert args.min_lr_ratio == 0.1


def test_bad_number_from_the_command_line_is_one_line(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "train.py", "--data", "digits", "--preset", "tiny", "--output",
                           str(tmp_path / "o"), "--checkpoints-total-limit", "0"],
                          cwd=Path(train.__file__).parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --checkpoints-total-limit: '0': must be a positive integer" in proc.stderr


def test_mixed_precision_on_cpu_is_refused_when_parsed(tmp_path, capsys):
    code, err = run_cli(tiny_args("digits", tmp_path / "o", None, "--mixed-precision", "bf16"), capsys)
    assert code == 2 and "error: --mixed-precision bf16 is autocast on a GPU" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_data_folder_and_bad_vae_folder_are_one_line(data_dir, tmp_path, capsys):
    code, err = run_cli(tiny_args(tmp_path / "nowhere", tmp_path / "o", None), capsys)
    assert code == 2 and "--data" in err and "nowhere" in err
    (tmp_path / "notvae").mkdir()
    code, err = run_cli(tiny_args(data_dir, tmp_path / "o", tmp_path / "notvae"), capsys)
    assert code == 2 and "notvae" in err and "config.json" in err


def test_vae_phase_divergence_is_one_line_of_its_own(data_dir, tmp_path, monkeypatch, capsys):
    """A NaN loss in phase 1 (the VAE): exit code 1, nothing written for the VAE, the message on its own line."""
    real, calls = training_state.vae_loss, {"n": 0}

    def poisoned(vae, x, kl_weight):
        loss, logs = real(vae, x, kl_weight)
        calls["n"] += 1
        return loss * (math.nan if calls["n"] == 2 else 1.0), logs
    monkeypatch.setattr(training_state, "vae_loss", poisoned)
    code, err = run_cli(tiny_args(data_dir, tmp_path / "o", None, "--vae-steps", "3", "--vae-batch-size", "8"), capsys)
    assert code == 1 and not (tmp_path / "o" / "vae").exists()
    lines = re.split(r"[\r\n]", err)
    assert any(part.startswith("train.py: training diverged: VAE step 1: loss nan") for part in lines), err


@pytest.mark.parametrize("where", ["weights", "gradients"])
def test_non_finite_update_with_a_finite_loss_stops_clearly(where, data_dir, vae_dir, tmp_path, monkeypatch, capsys):
    """An update that puts inf into a weight (or a gradient norm that is inf) while the loss is still finite: the
    divergence message (it used to crash in the diagnostics' eigh), exit code 1, no final model."""
    calls = {"n": 0}
    if where == "weights":
        adamw_step = torch.optim.AdamW.step

        def poisoned(self, *a, **kw):
            out = adamw_step(self, *a, **kw)
            calls["n"] += 1
            if calls["n"] == 2:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].view(-1)[0] = math.inf
            return out
        monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    else:
        clip = torch.nn.utils.clip_grad_norm_

        def poisoned(params, max_norm, *a, **kw):
            calls["n"] += 1
            return clip(params, max_norm, *a, **kw) * (math.inf if calls["n"] == 2 else 1.0)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    out = tmp_path / "run"
    code, err = run_cli(tiny_args(data_dir, out, vae_dir, "--steps", "4", "--checkpoint-every", "1",
                                  "--log-every", "10"), capsys)
    assert calls["n"] >= 2 and code == 1 and "training diverged" in err and "step_000001" in err
    assert any(part.startswith("train.py: training diverged") for part in re.split(r"[\r\n]", err)), err  # own line
    assert ("weights NaN/inf or huge (1 tensors" if where == "weights" else "gradient norm is inf") in err
    assert [p.name for p in training_state.list_checkpoints(out)] == ["step_000001"]
    assert not (out / "final").exists() and not (out / "summary.json").exists()
