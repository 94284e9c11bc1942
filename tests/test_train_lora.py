"""train.py --lora-rank: a LoRA fine-tune (lora.py) of a tiny SD 2-style model that diffusers' and transformers' own
`save_pretrained` write (test_convert's folder), saved as a small folder (config.json + lora.safetensors) that loads
against the base weights, merged, through convert.load_stable_diffusion, sample.py's path; and resumes bit-exactly.
"""
import json
import shutil
from copy import deepcopy

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

import cli
import sample
import train
from checkpoint import CheckpointError, as_clue, load_clue, save_clue
from clue import CLUE, Sampling, StyleChoice
from convert import load_stable_diffusion
from lora import LoRALinear, add_lora, lora_trains, merge_lora
from style_encoder import StyleConfig
from test_convert import SCHEDULE, SD2, tiny_models, write_diffusers_folder
from test_train import data_dir, one_thread, run_cli  # noqa: F401
from test_train_resume import assert_bit_identical, state
from unet import is_style_param

RANK = 4


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD 2-style diffusers folder (epsilon), written by the reference libraries."""
    return write_diffusers_folder(tmp_path_factory.mktemp("sd"), tiny_models(SD2, seed=2),
                                  DDIMScheduler(**SCHEDULE, clip_sample=False))


def lora_args(data, base, out, *extra):
    return [str(a) for a in (
        "--data", data, "--model", base, "--output", out, "--device", "cpu", "--resolution", 32,
        "--style-width", 32, "--style-layers", 1, "--batch-size", 4, "--lr", 1e-3, "--warmup-steps", 2,
        "--log-every", 1, "--sample-every", 0, "--grid-taus", "0,1", "--grid-steps", 2, "--diag-images", 8,
        "--prompt", "a picture of a {class}", "--lora-rank", RANK, *extra)]


@pytest.fixture(scope="module")
def lora_run(data_dir, sd_folder, tmp_path_factory):  # noqa: F811
    """4 steps of a LoRA fine-tune with checkpoints at 2 and 4, EMA on."""
    out = tmp_path_factory.mktemp("lora") / "run"
    train.main(lora_args(data_dir, sd_folder, out, "--steps", 4, "--checkpoint-every", 2, "--ema-decay", 0.9))
    return out


def test_a_lora_run_saves_a_small_folder_of_the_trained_tensors(lora_run, sd_folder):
    final = lora_run / "final"
    assert {f.name for f in final.iterdir()} == {"config.json", "lora.safetensors"}
    config = json.loads((final / "config.json").read_text())
    assert config["lora"] == {"base": str(sd_folder.resolve()), "rank": RANK, "alpha": float(RANK)}
    tensors = load_file(str(final / "lora.safetensors"))
    unet = [k[len("unet."):] for k in tensors if k.startswith("unet.")]
    assert any(".lora_A." in k for k in unet) and any(".lora_B." in k for k in unet) and all(map(lora_trains, unet))
    assert {k.split(".")[0] for k in tensors} == {"unet", "style_encoder", "style_posterior"}
    # what trained is what the checkpoints' training state holds: the adapters, style layers and style encoder
    trained = [k[len("param."):] for k in state(lora_run, 4) if k.startswith("param.")]
    assert trained and all(k.startswith("style_encoder.") or lora_trains(k[len("unet."):]) for k in trained)
    full = load_stable_diffusion(final)  # the merged model, as big as the base plus the style branch
    full_bytes = sum(t.numel() * t.element_size() for m in (full.unet, full.vae, full.text_encoder)
                     for t in m.state_dict().values())
    small = (final / "lora.safetensors").stat().st_size
    print(f"lora.safetensors {small / 1e6:.2f} MB vs the full model {full_bytes / 1e6:.2f} MB")
    assert small < full_bytes / 20


def test_only_the_adapted_projections_and_style_layers_differ_from_the_base(lora_run, sd_folder):
    base = load_stable_diffusion(sd_folder, style=True)
    merged = load_stable_diffusion(lora_run / "final")
    unmerged = load_stable_diffusion(lora_run / "final", merge_lora=False)
    assert not any(isinstance(m, LoRALinear) for m in merged.unet.modules())
    for part in ("vae", "text_encoder"):
        ours, theirs = getattr(merged, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ours, theirs = merged.unet.state_dict(), base.unet.state_dict()
    assert ours.keys() == theirs.keys()
    changed = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    adapted = [k for k in changed if not is_style_param(k)]
    assert adapted and all(k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))
                           and (".attn1." in k or ".attn2." in k) for k in adapted)  # W + (alpha/r) B A; biases kept
    frozen = {k: v for k, v in unmerged.unet.state_dict().items() if not lora_trains(k)}
    assert frozen.keys() == {k for k in theirs if not is_style_param(k)}
    assert all(torch.equal(v, theirs[k]) for k, v in frozen.items())  # the base weights under the adapters


def test_the_reloaded_model_generates_what_the_trained_one_merged_does(sd_folder, tmp_path):
    """In memory: CLUE on the base with adapters whose B is random (a trained one's is no longer 0). Saved, loaded
    back merged (convert.load_stable_diffusion, sample.load_model: sample.py unchanged), it generates what the
    in-memory model does after merge_lora: the same base weights and the same arithmetic."""
    torch.manual_seed(0)
    model = CLUE.from_stable_diffusion(load_stable_diffusion(sd_folder),
                                       StyleConfig(context_dim=64, width=32, layers=1, heads=4)).eval()
    add_lora(model.unet, RANK, 8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or ".attn_style.to_out." in name:
                p.normal_(0, 0.05)
    save_clue(model, tmp_path / "lora", base=str(sd_folder))
    loaded = as_clue(load_stable_diffusion(tmp_path / "lora"), tmp_path / "lora").eval()
    from_sample, kind = sample.load_model(tmp_path / "lora")
    merged = deepcopy(model)
    assert merge_lora(merged.unet) == sum(isinstance(m, LoRALinear) for m in model.modules())
    kw = dict(sampling=Sampling(steps=3, guidance=3.0, height=32, width=32), latents=torch.randn(2, 4, 8, 8),
              style=StyleChoice(torch.randn(2, *model.style_shape)), progress=False, output="latent")
    with torch.no_grad():
        want, adapted = merged.generate(["a cat", "a dog"], **kw), model.generate(["a cat", "a dog"], **kw)
        got, got_sample = loaded.generate(["a cat", "a dog"], **kw), from_sample.generate(["a cat", "a dog"], **kw)
    err, unmerged_err = (got - want).abs().max().item(), (got - adapted).abs().max().item()
    print(f"reloaded vs in-memory merged: max abs err {err:.2e}; vs in-memory with adapters: {unmerged_err:.2e}")
    assert kind == "clue" and torch.equal(got, got_sample)
    assert err <= 1e-6 and unmerged_err <= 1e-4
    with pytest.raises(ValueError, match="base"):
        save_clue(model, tmp_path / "nobase")  # adapters without the weights they adapt cannot be saved small


def test_vanilla_lora_saves_the_adapters_only(data_dir, sd_folder, tmp_path):  # noqa: F811
    """--style-tokens 0 (the plain fine-tuning baseline) with LoRA: no style branch, the folder holds the adapters."""
    train.main(lora_args(data_dir, sd_folder, tmp_path / "run", "--steps", 1, "--style-tokens", 0, "--lora-rank", 2))
    tensors = load_file(str(tmp_path / "run" / "final" / "lora.safetensors"))
    assert tensors and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    model = as_clue(load_stable_diffusion(tmp_path / "run" / "final"), tmp_path / "run" / "final")
    assert model.style_encoder is None and not model.unet.cfg.style


def test_resume_from_a_lora_checkpoint_is_bit_exact(lora_run, data_dir, sd_folder, tmp_path):  # noqa: F811
    out = tmp_path / "resumed"
    train.main(lora_args(data_dir, sd_folder, out, "--steps", 4, "--checkpoint-every", 2, "--ema-decay", 0.9,
                         "--resume", lora_run / "checkpoints" / "step_000002"))
    assert_bit_identical(state(lora_run, 4), state(out, 4), "LoRA: resumed 2 + 2 vs uninterrupted 4")
    a, b = (load_file(str(run / "final" / "lora.safetensors")) for run in (lora_run, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_lora_flags_is_one_line(lora_run, data_dir, sd_folder, tmp_path, capsys):  # noqa: F811
    argv = lora_args(data_dir, sd_folder, tmp_path / "r", "--steps", 4, "--resume", lora_run / "checkpoints" /
                     "step_000002")
    argv[argv.index("--lora-rank") + 1] = "2"
    code, err = run_cli(argv, capsys)
    assert code == 2 and "--lora-rank 2" in err and "'rank': 4" in err


@pytest.mark.parametrize("extra,message", [
    (["--preset", "tiny", "--lora-rank", "4"], "--lora-rank adapts pretrained weights"),
    (["--model", "sd", "--lora-alpha", "4"], "--lora-alpha needs --lora-rank"),
    (["--model", "sd", "--lora-rank", "4", "--freeze-unet"], "drop --freeze-unet"),
    (["--model", "sd", "--lora-rank", "4", "--train-text-encoder"], "--train-text-encoder"),
    (["--model", "sd", "--lora-rank", "0"], "--lora-rank: '0': must be a positive integer"),
    (["--model", "sd", "--lora-rank", "4", "--lora-alpha", "nan"], "--lora-alpha: 'nan': must be a finite number"),
])
def test_lora_flags_checked_when_parsed(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--data", "digits", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err
    args = train.parse_args(["--data", "digits", "--model", "sd", "--lora-rank", "8"])
    assert args.lora_alpha == 8.0  # alpha defaults to the rank: scale 1


def test_only_the_trained_parameters_reach_the_optimizer_and_the_ema(data_dir, sd_folder, tmp_path):  # noqa: F811
    args = train.parse_args(lora_args(data_dir, sd_folder, tmp_path, "--lora-alpha", 2))
    dataset = train.build_dataset("--data", args.data, args.prompt, args)
    clue = train.build_model(args, dataset, 0, 1, torch.device("cpu"), tmp_path)
    _, st = train.setup_training(clue, args, dataset, 0, 1, torch.device("cpu"))
    want = {n for n, _ in clue.named_parameters() if n.startswith("style_encoder.") or ".lora_A." in n
            or ".lora_B." in n or ".attn_style." in n or ".norm_style." in n}
    assert set(st.trainable) == want == set(st.ema.shadow)
    in_optimizer = {id(p) for g in st.opt.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in st.trainable.values()}
    assert {m.scaling for m in clue.modules() if isinstance(m, LoRALinear)} == {2 / RANK}
    print(f"trainable {sum(p.numel() for p in st.trainable.values())} of {sum(p.numel() for p in clue.parameters())}")


def test_a_lora_folder_names_how_to_load_it_and_a_missing_base(lora_run, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="LoRA folder.*convert.load_stable_diffusion"):
        load_clue(lora_run / "final")
    moved = tmp_path / "moved"
    shutil.copytree(lora_run / "final", moved)
    config = json.loads((moved / "config.json").read_text())
    config["lora"]["base"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        cli.run(sample.main, ["--model", str(moved), "--prompt", "x", "--out", str(tmp_path)], "sample.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "gone") in err and "Traceback" not in err
    assert f"{moved / 'config.json'} [lora] base: the weights this LoRA adapts do not load" in err  # which file says so
