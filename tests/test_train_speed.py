"""What makes train.py's step fast must not change what it computes (issue 10): the VAE posterior cached once per
image (train.cache_latents) gives the loss of encoding every step, sampled latents included; each distinct prompt
encoded once gives the context and the gradients of encoding every prompt; a run with the cache resumes
bit-exactly; the step reads nothing back from the device (on a GPU: torch's sync debug mode); the training-step
benchmark against diffusers' recipe computes the same loss on both sides."""
import json
import math

import pytest
import torch

import train
import training_state
from clue import CLUE, CLUEConfig
from data import ClassFolderDataset
from style_encoder import StyleConfig
from test_train import data_dir, make_class_folders, one_thread, read_log, tiny_args, vae_dir  # noqa: F401
from test_train_resume import assert_bit_identical, state
from unet import UNetConfig

PROMPT = "a picture of a {class}"


def small_clue(**clue_kw) -> CLUE:
    torch.manual_seed(0)
    return CLUE.from_config(unet=UNetConfig.tiny(block_channels=(32, 32), num_heads=(2, 2)), style=StyleConfig.tiny(),
                            clue=CLUEConfig.tiny(**clue_kw))


@pytest.mark.parametrize("sample_latents", [False, True])
def test_cached_posterior_gives_the_loss_of_encoding_every_step(data_dir, sample_latents):
    """The same batches, the same generator: the loss from the cached posterior equals the loss from the images to
    float32 rounding (the cache encodes batches of 64 in dataset order, the step the shuffled batch: the convolutions
    may round the last bit differently for another batch), every draw (t, noise, a sampled z0, the dropouts) alike."""
    model = small_clue(sample_latents=sample_latents, text_dropout=0.5, style_dropout=0.5)
    dataset = ClassFolderDataset(data_dir, PROMPT, 32)
    cached = training_state.cache_latents(dataset, model.vae, torch.device("cpu"), batch_size=64)
    assert len(cached) == len(dataset) and "image" not in cached[0]
    worst = 0.0
    for seed, idx in enumerate(([0, 5, 9, 23], [17, 3, 3, 11], list(range(24)))):
        batch = torch.utils.data.default_collate([dataset[i] for i in idx])
        from_cache = torch.utils.data.default_collate([cached[i] for i in idx])
        assert from_cache["prompt"] == batch["prompt"] and torch.equal(from_cache["label"], batch["label"])
        with torch.no_grad():
            a, logs_a = model.loss(batch, step=50, generator=torch.Generator().manual_seed(seed))
            b, logs_b = model.loss(from_cache, step=50, generator=torch.Generator().manual_seed(seed))
        worst = max(worst, abs(a.item() - b.item()) / abs(a.item()))
        assert logs_a["text_dropped"] == logs_b["text_dropped"] and logs_a["style_kept"] == logs_b["style_kept"]
    print(f"sample_latents={sample_latents}: cached vs encoded loss, max relative difference {worst:.1e}")
    assert worst < 1e-5


def test_a_run_with_cached_latents_logs_the_losses_of_an_uncached_run(data_dir, vae_dir, tmp_path):
    """Whole runs: with the cache (the default without --random-crop / --flip) and without it (--no-latent-cache),
    same seed: the same loss at every step, to float32 rounding."""
    args = ("--steps", "5", "--text-dropout", "0.3")
    train.main(tiny_args(data_dir, tmp_path / "cached", vae_dir, *args))
    train.main(tiny_args(data_dir, tmp_path / "plain", vae_dir, *args, "--no-latent-cache"))
    cached, plain = ([r["loss"] for r in read_log(tmp_path / run) if "mse" in r] for run in ("cached", "plain"))
    print("losses, cached:", cached, "\n        plain: ", plain)
    assert len(cached) == len(plain) == 5
    assert cached == pytest.approx(plain, rel=1e-4)  # 5 AdamW steps amplify the first steps' rounding a little


def test_random_crop_flip_or_no_cache_encode_every_step(data_dir, vae_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "cache_latents", lambda *a: pytest.fail("latents cached although the images change"))
    for flag in ("--random-crop", "--flip", "--no-latent-cache"):
        train.main(tiny_args(data_dir, tmp_path / flag, vae_dir, "--steps", "1", flag))
        assert "VAE latents encoded every step" in capsys.readouterr().out


def test_resume_with_cached_latents_is_bit_exact(data_dir, vae_dir, tmp_path):
    """test_train_resume's check with the cache on (no crop or flip), latents sampled from the cached posterior: the
    resumed run rebuilds the cache from the checkpoint's VAE and continues bit for bit."""
    common = ("--steps", "6", "--grad-accum", "2", "--ema-decay", "0.9")
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(tiny_args(data_dir, a, vae_dir, *common, "--checkpoint-every", "3"))
    train.main(tiny_args(data_dir, b, vae_dir, *common, "--resume", a / "checkpoints" / "step_000003"))
    assert_bit_identical(state(a, 6), state(b, 6), "cached latents: resumed 3 + 3 vs uninterrupted 6")
    opt = json.loads((a / "checkpoints" / "step_000006" / "training_state.json").read_text())["optimizer"]
    assert all(g["fused"] for g in opt["param_groups"])  # the fused AdamW on the CPU


def test_each_distinct_prompt_is_encoded_once_with_the_same_context_and_gradients():
    model = small_clue()
    prompts = ["a picture of a ring", "", "a picture of a ring", "a picture of a bar", "", "a picture of a ring"]
    calls = []
    hook = model.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    context = model.encode_prompts(prompts)
    hook.remove()
    assert calls == [3] and context.shape == (6, 77, 64)
    separate = torch.cat([model.encode_prompts([p]) for p in prompts])
    print(f"deduplicated vs one prompt at a time: max abs diff {(context - separate).abs().max().item():.1e}")
    assert torch.allclose(context, separate, atol=1e-6)
    weights = torch.randn_like(context)  # any loss of the context: the repeats' gradients add up in one encoding
    grads = []
    for c in (context, separate):
        model.zero_grad()
        (c * weights).sum().backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in model.text_encoder.parameters()]))
    err = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()
    print(f"text-encoder gradients: max abs diff / max abs gradient {err:.1e}")
    assert err < 1e-5


def test_the_step_logs_tensors_and_reads_them_back_at_log_steps(data_dir, vae_dir, tmp_path, monkeypatch):
    """optimizer_step returns tensors (nothing read back: no device sync on a GPU); the log line of --log-every 2
    holds the float means of the two steps."""
    seen = []
    step = train.optimizer_step

    def spy(*a, **kw):
        seen.append(step(*a, **kw))
        return seen[-1]
    monkeypatch.setattr(train, "optimizer_step", spy)
    out = tmp_path / "run"
    train.main(tiny_args(data_dir, out, vae_dir, "--steps", "4", "--log-every", "2"))
    assert len(seen) == 4 and all(torch.is_tensor(s[k]) for s in seen for k in ("loss", "mse", "kl", "grad_norm"))
    log = [r for r in read_log(out) if "mse" in r]
    assert [r["step"] for r in log] == [2, 4]
    for r, pair in zip(log, (seen[:2], seen[2:])):
        for k in ("loss", "mse", "kl", "grad_norm", "lr"):
            assert r[k] == pytest.approx(sum(float(s[k]) for s in pair) / 2, rel=1e-6), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_step_does_not_synchronise_with_the_gpu(data_dir, vae_dir, tmp_path):
    """torch.cuda.set_sync_debug_mode("error") raises at any synchronising call (.item(), a blocking copy, ...):
    none in a step after the first (which allocates the optimizer state)."""
    args = train.parse_args(tiny_args(data_dir, tmp_path, vae_dir, "--device", "cuda"))
    device = torch.device("cuda")
    dataset = train.build_dataset("--data", args.data, args.prompt, args)
    clue = train.build_model(args, dataset, 0, 1, device, tmp_path)
    net, st = train.setup_training(clue, args, dataset, 0, 1, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    train.optimizer_step(net, st, args, 0, autocast)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        window = [train.optimizer_step(net, st, args, s, autocast) for s in (1, 2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    training_state.check_health(st, window, 3, tmp_path)
    assert all(math.isfinite(float(w["loss"])) for w in window)


def test_benchmark_computes_the_same_loss_as_diffusers_recipe(tmp_path):
    """bench/train_step_vs_diffusers.py --config smoke: one round of every side; on one batch with the same z0,
    noise and timesteps ours and diffusers' pieces give the same latents, context and loss (the same work)."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import train_step_vs_diffusers as bench
    res = bench.main(["--config", "smoke", "--rounds", "2", "--steps-per-round", "1", "--no-memory",
                      "--out", str(tmp_path)])["configs"]["smoke"]
    print(json.dumps(res["parity_max_abs_diff"]), res["wall"]["seconds_per_step"])
    diff = res["parity_max_abs_diff"]
    assert diff["latents"] < 1e-5 and diff["context"] < 1e-5 and diff["loss"] < 1e-5 * diff["loss_value"] + 1e-7
    assert set(res["wall"]["seconds_per_step"]) == set(bench.SIDES) and res["cpu"]["ratio"]["ours_over_diffusers"] > 0
    assert (tmp_path / "train_step_vs_diffusers_smoke.json").is_file()
