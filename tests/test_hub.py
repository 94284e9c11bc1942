"""--model owner/name: a Hugging Face repo id, fetched by huggingface_hub.snapshot_download (convert.py). Nothing is
downloaded here: the download function is replaced by one that returns a diffusers folder written in the test by
diffusers' and transformers' own save_pretrained, keeping only the files the allow_patterns let through (with
huggingface_hub's own filter); offline, the real function fails and the programs say so in one line."""
import importlib.metadata
import json
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
from diffusers import DDIMScheduler
from huggingface_hub.utils import filter_repo_objects

import cli
import convert
import sample
import train
from checkpoint import as_clue
from clue import Sampling
from convert import HUB_FILES, load_stable_diffusion
from test_convert import SCHEDULE, SD2, assert_matches, tiny_models, write_diffusers_folder
from test_train import data_dir, one_thread  # noqa: F401

REPO = "someone/tiny-sd2"
NO_RESPONSE = SimpleNamespace(headers={}, request=None)  # what huggingface_hub's HTTP errors read of a response


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """What the repo holds: a diffusers pipeline folder, its tokenizer (which pads with the end token: the text mode
    the loader reads from it, where the weights alone would say SD 2's zero padding) and files the loader needs not;
    and the reference models that wrote it."""
    from transformers import CLIPTokenizer
    models, vocab = tiny_models(SD2, seed=3), tmp_path_factory.mktemp("vocab")
    root = write_diffusers_folder(tmp_path_factory.mktemp("repo"), models, DDIMScheduler(**SCHEDULE, clip_sample=False))
    (vocab / "vocab.json").write_text(json.dumps({"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    (vocab / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token="<|endoftext|>").save_pretrained(
        root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not needed")
    (root / "v2-1_512-ema-pruned.ckpt").write_bytes(b"not needed either")
    return root, models


@pytest.fixture
def hub(repo, tmp_path, monkeypatch):
    """convert.snapshot_download replaced: the repo's files that allow_patterns lets through, copied to a snapshot
    folder, as huggingface_hub's cache would hold them; the calls are recorded."""
    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        if repo_id != REPO:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 {repo_id}", response=NO_RESPONSE)
        snapshot = tmp_path / "snapshots" / "abc123"
        files = [p.relative_to(repo[0]).as_posix() for p in repo[0].rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo[0] / name, snapshot / name)
        return str(snapshot)
    monkeypatch.setattr(convert, "snapshot_download", fake_snapshot_download)
    return calls, tmp_path / "snapshots" / "abc123"


def test_a_repo_id_loads_through_snapshot_download(hub, repo):
    calls, snapshot = hub
    sd = load_stable_diffusion(REPO)
    assert calls == [(REPO, HUB_FILES)]
    assert_matches(sd, repo[1], "hub")  # the same numbers as the reference models that wrote the repo
    assert sd.text_encoder.cfg.pad == "eos"  # the tokenizer's files came too
    fetched = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    print("fetched:", fetched)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in fetched and "model_index.json" not in fetched
    assert not any(name.endswith(".ckpt") for name in fetched)


def test_a_local_path_is_never_looked_up(hub, repo, tmp_path):
    calls, _ = hub
    load_stable_diffusion(repo[0])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_stable_diffusion(tmp_path / "not" / "there")  # not owner/name: a missing path, no download
    assert calls == []


@pytest.mark.parametrize("failure", ["offline", "network", "no such repo"])
def test_a_repo_that_cannot_be_fetched_is_one_clear_line(failure, repo, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the real function, offline
    if failure == "network":
        def no_network(repo_id, **kw):
            raise huggingface_hub.errors.LocalEntryNotFoundError("ConnectError: [Errno -2] Name or service not known")
        monkeypatch.setattr(convert, "snapshot_download", no_network)
    elif failure == "no such repo":
        def not_found(repo_id, **kw):
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 Client Error: {repo_id}", response=NO_RESPONSE)
        monkeypatch.setattr(convert, "snapshot_download", not_found)
    with pytest.raises(FileNotFoundError, match=f"{REPO}: not a local path, and the Hugging Face repo could not be "
                                                 "fetched"):
        load_stable_diffusion(REPO)
    for program, main, argv in (("sample.py", sample.main, ["--model", REPO, "--prompt", "x", "--out", tmp_path]),
                                ("train.py", train.main, ["--model", REPO, "--data", "digits", "--output", tmp_path])):
        with pytest.raises(SystemExit) as e:
            cli.run(main, [str(a) for a in argv], program)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"{program}: error: {REPO}" in err and "could not be fetched" in err and "pass that folder" in err


def test_a_lora_fine_tune_of_a_repo_records_the_repo_id(hub, data_dir, tmp_path):  # noqa: F811
    """The LoRA folder names the base as the user did (the repo id, not this machine's cache path); loading it
    fetches the base again (from the cache when it is there)."""
    calls, _ = hub
    out = tmp_path / "run"
    train.main(["--data", str(data_dir), "--model", REPO, "--output", str(out), "--device", "cpu", "--resolution",
                "32", "--style-width", "32", "--style-layers", "1", "--batch-size", "4", "--steps", "2",
                "--sample-every", "0", "--checkpoint-every", "0", "--grid-taus", "0", "--grid-steps", "1",
                "--diag-images", "8", "--lora-rank", "2"])
    assert json.loads((out / "final" / "config.json").read_text())["lora"]["base"] == REPO
    model = as_clue(load_stable_diffusion(out / "final"), out / "final")
    assert [c[0] for c in calls] == [REPO, REPO]
    images = model.generate(["a ring"], Sampling(steps=1, guidance=1.0, height=32, width=32), progress=False)
    assert images.shape == (1, 3, 32, 32) and images.isfinite().all()


def test_huggingface_hub_is_no_new_dependency():
    """open_clip_torch, a runtime requirement, requires huggingface_hub itself."""
    assert any(r.lower().startswith("huggingface") for r in importlib.metadata.requires("open_clip_torch"))
