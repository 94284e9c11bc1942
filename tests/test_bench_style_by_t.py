"""bench/style_by_t.py on a small CLUE checkpoint: the three kinds of style are scored on the same noisy latents,
so a style branch that is still at its zero initialisation gives three equal losses at every t, and once the
branch has weights only the losses with a style move (the style-free loss is the same number as before)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import save_clue
from clue import CLUE, CLUEConfig
from style_encoder import StyleConfig
from test_clue import PROMPT, SMALL_UNET, make_image_folder
from unet import is_style_param

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import style_by_t  # noqa: E402


def run(model, folder: Path, data: str) -> dict:
    save_clue(model, folder, extra={"prompt_template": PROMPT})
    out = folder / "by_t.json"
    style_by_t.main(["--model", str(folder), "--data", data, "--timesteps", "100,900", "--repeats", "1",
                     "--out", str(out)])
    assert out.with_suffix(".png").stat().st_size > 0
    return {int(t): r for t, r in json.loads(out.read_text())["loss_by_t"].items()}


def test_same_noise_for_every_style(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class=3)
    torch.manual_seed(0)
    model = CLUE.from_config(unet=SMALL_UNET, style=StyleConfig.tiny(), clue=CLUEConfig.tiny())
    silent = run(model, tmp_path / "silent", data)
    assert sorted(silent) == [100, 900]
    for r in silent.values():  # zero-initialised style attention: the style changes nothing yet
        assert r["encoder"] == r["prior"] == r["none"] > 0
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if is_style_param(name):
                p.normal_(0, 0.2)
    loud = run(model, tmp_path / "loud", data)
    for t in (100, 900):
        assert loud[t]["none"] == pytest.approx(silent[t]["none"], rel=1e-6)  # style off: the same computation
        assert loud[t]["encoder"] != loud[t]["none"] and loud[t]["prior"] != loud[t]["none"]

