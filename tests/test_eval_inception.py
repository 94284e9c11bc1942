"""inception.py against pytorch-fid's FID Inception-v3, on the same random weights.

pytorch-fid builds its network only by downloading the weights (`fid_inception_v3` calls
`load_state_dict_from_url`). We replace that one function with one that returns OUR random state
dict: pytorch-fid then builds its own FIDInceptionA/C/E blocks, resize and scaling untouched, and
its strict load_state_dict also proves that our parameter names are exactly its names."""
import numpy as np
import pytest
import torch
from PIL import Image
import pytorch_fid.inception as pfi
from pytorch_fid.fid_score import get_activations

import eval as ev
import inception
from checkpoint import CheckpointError


def _random_state(seed=0):
    """Random FIDInceptionV3 weights with well-scaled activations: random BatchNorm affine
    parameters, then running statistics measured on one random batch (train-mode forward, momentum None)."""
    torch.manual_seed(seed)
    net = inception.FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the running stats become this batch's stats
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 40, 40))
    state = net.state_dict()
    # the real weight file also holds the 1008-way classifier, which pool3 does not use
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    return state


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    state = _random_state()
    path = tmp_path_factory.mktemp("inception") / inception.FID_WEIGHTS_NAME
    torch.save(state, path)
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        pfi.load_state_dict_from_url = original
    return inception.load_fid_inception(str(path)), reference, str(path)


def test_pool3_equals_pytorch_fid(nets):
    ours, reference, _ = nets
    x = torch.rand(2, 3, 32, 32)  # small images: both networks resize them to 299 (the FID path)
    with torch.no_grad():
        a, b = ours(x), reference(x)[0].flatten(1)
    err = (a - b).abs().max().item()
    print(f"Inception pool3 vs pytorch-fid: shape {tuple(a.shape)}, max abs err {err:.2e}, "
          f"mean |feature| {b.abs().mean():.3f}")
    assert a.shape == (2, 2048) and err < 1e-5
    # the check can fail: torchvision's plain pooling in the last block gives different features
    ours.Mixed_7c.pool = "avg"
    with torch.no_grad():
        changed = (ours(x) - b).abs().max().item()
    ours.Mixed_7c.pool = "max"
    print(f"with an average pool in Mixed_7c instead: max abs diff {changed:.2e}")
    assert changed > 1e-3


def test_folder_features_equal_pytorch_fid_pipeline(nets, tmp_path):
    # image files -> features, our loader + network vs pytorch-fid's own loader + network
    ours, reference, path = nets
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        f = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(f)
        files.append(str(f))
    feats, kept = ev.extract_features(str(tmp_path), ev.InceptionFeatures(path), cache_dir=None, progress=False)
    ref = get_activations(files, reference, batch_size=2, dims=2048, device="cpu", num_workers=0)
    err = np.abs(feats - ref).max()
    print(f"folder -> Inception features vs pytorch-fid get_activations: max abs err {err:.2e}")
    assert kept == files and err < 1e-5
    # the command line on the Inception path: a folder against itself (the second pass hits the cache)
    res = ev.main(["metrics", "--real", str(tmp_path), "--fake", str(tmp_path), "--inception-weights", path,
                   "--k-pr", "1", "--k-dc", "1", "--cache-dir", str(tmp_path / "cache"), "--out",
                   str(tmp_path / "res"), "--quiet"])
    scale = 2 * np.trace(np.cov(feats, rowvar=False))  # Tr(S1) + Tr(S2): the size of the terms that cancel
    print(f"Inception FID of a folder with itself (2 images, rank-1 covariance): {res['fid']:.2e}, "
          f"relative to Tr(S1) + Tr(S2) = {scale:.1f}: {abs(res['fid']) / scale:.1e}")
    assert res["feature_dim"] == 2048 and abs(res["fid"]) < 1e-4 * scale and res["precision"] == 1.0


def test_missing_or_wrong_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="github.com/mseitzer/pytorch-fid/releases"):
        inception.load_fid_inception(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match=r"(?s)bad.pth: the FID Inception .* parameters of ours with no source key"
                                              r".*source keys with no parameter of ours.*conv.weight"):
        inception.load_fid_inception(str(bad))
    cut = tmp_path / "cut.pth"  # a truncated download: the disk layer names the file
    cut.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated"):
        inception.load_fid_inception(str(cut))
