"""eval.py metrics on feature arrays: FID against closed forms and pytorch-fid, precision / recall and
density / coverage against the `prdc` package (Naeem et al.'s reference code), memorisation."""
import contextlib
import io

import numpy as np
import pytest
import scipy.linalg
from prdc import compute_prdc
from pytorch_fid.fid_score import calculate_frechet_distance

import eval as ev


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _prdc(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sample counts
        return compute_prdc(real, fake, k)


def test_frechet_distance_commuting_covariances_closed_form():
    # same eigenvectors Q: Tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so d^2 = |dmu|^2 + sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(0)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = ev.frechet_distance(mu1, s1, mu2, s2)
    print(f"commuting covariances: FID {got:.6f} vs closed form {expected:.6f}, abs err {abs(got - expected):.2e}")
    assert abs(got - expected) < 1e-8 * max(1, expected)
    assert abs(ev.frechet_distance(mu1, s1, mu1, s1)) < 1e-9  # identical statistics


def test_frechet_distance_general_case_and_pytorch_fid():
    # non-commuting: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric PSD matrix (eigh route)
    rng = np.random.default_rng(1)
    d = 24
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    r1 = scipy.linalg.sqrtm(s1).real
    w = np.linalg.eigvalsh(r1 @ s2 @ r1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(w, 0, None)))
    got = ev.frechet_distance(mu1, s1, mu2, s2)
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    print(f"general covariances: ours {got:.8f}, eigh route {expected:.8f}, pytorch-fid {ref:.8f}; "
          f"max abs err {max(abs(got - expected), abs(got - ref)):.2e}")
    assert abs(got - expected) < 1e-8 * expected and abs(got - ref) < 1e-8 * expected


def test_fid_of_features_with_themselves_and_low_rank():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 32))  # fewer samples than dims: singular covariance
    fid = ev.fid_from_features(x, x)
    print(f"FID(x, x) with 20 samples in 32 dims: {fid:.2e}")
    assert abs(fid) < 1e-6


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="mismatched statistics"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    # not PSD: the product has a negative eigenvalue, its square root is imaginary
    with pytest.raises(ValueError, match="imaginary"):
        ev.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.diag([1.0, 4.0]))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        ev.fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 images"):
        ev.fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_density_coverage_equal_prdc(seed):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    fake = (rng.normal(size=(200, 16)) * 1.3 + 0.4).astype(np.float32)
    ref3, ref5 = _prdc(real, fake, 3), _prdc(real, fake, 5)
    pr, dc = ev.precision_recall(real, fake, k=3), ev.density_coverage(real, fake, k=5)
    errs = [abs(pr["precision"] - ref3["precision"]), abs(pr["recall"] - ref3["recall"]),
            abs(dc["density"] - ref5["density"]), abs(dc["coverage"] - ref5["coverage"])]
    print(f"prdc seed {seed}: ours {pr} {dc}; max abs err vs prdc {max(errs):.2e}")
    assert max(errs) < 1e-12


def test_ties_follow_prdc_strict_inequality():
    # integer features: many distances tie exactly with the radii, and real points are duplicated;
    # "inside a ball" is a strict '<' in prdc, and so here
    rng = np.random.default_rng(3)
    real = rng.integers(0, 3, size=(120, 3)).astype(np.float64)
    fake = rng.integers(0, 3, size=(90, 3)).astype(np.float64)
    ref3, ref5 = _prdc(real, fake, 3), _prdc(real, fake, 5)
    pr, dc = ev.precision_recall(real, fake, 3), ev.density_coverage(real, fake, 5)
    print(f"tied integer features: ours {pr} {dc}, prdc {ref3['precision']:.4f} {ref3['recall']:.4f} "
          f"{ref5['density']:.4f} {ref5['coverage']:.4f}")
    assert pr == {"precision": ref3["precision"], "recall": ref3["recall"]}
    assert dc == {"density": ref5["density"], "coverage": ref5["coverage"]}


def test_nearest_neighbour_radii_chunked_match_full(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 5))
    full = ev.nearest_neighbour_radii(x, 3)
    monkeypatch.setattr(ev, "CHUNK", 7)  # several chunks
    chunked = ev.nearest_neighbour_radii(x, 3)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    brute = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
    print(f"radii: chunked vs full {np.abs(chunked - full).max():.2e}, vs brute force {np.abs(full - brute).max():.2e}")
    assert np.allclose(full, brute, atol=1e-10) and np.allclose(chunked, full, atol=1e-12)


def test_too_few_samples_for_k():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="at least 4 images"):
        ev.precision_recall(x, np.ones((10, 4)), k=3)
    with pytest.raises(ValueError, match="at least 6 images"):
        ev.density_coverage(np.ones((5, 4)), np.ones((10, 4)), k=5)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        ev.precision_recall(np.ones((10, 4)), np.ones((10, 5)))
    with pytest.raises(ValueError, match="2-D"):
        ev.density_coverage(np.ones(10), np.ones((10, 1)))


def test_memorisation_constructed_and_brute_force():
    train = np.array([[0.0, 0], [10, 0], [0, 10], [10, 10]])  # every nearest-neighbour distance is 10
    fake = np.array([[0.0, 0.5],    # 0.5 from train 0 < 10: a near copy
                     [5.0, 5.0],    # 7.07 from all four < 10: also closer than any other training image
                     [30.0, 30.0],  # far away
                     [10, 10]])     # an exact copy
    res = ev.memorisation(train, fake, fake_names=list("abcd"), train_names=list("wxyz"))
    assert res["n_memorised"] == 3 and res["memorised_fraction"] == 0.75
    assert [p["fake"] for p in res["closest_pairs"]] == ["d", "a", "b"]
    assert res["closest_pairs"][0]["train"] == "z" and res["closest_pairs"][0]["distance"] == 0
    # random data against a direct implementation of the definition
    rng = np.random.default_rng(5)
    tr, fk = rng.normal(size=(80, 6)), rng.normal(size=(60, 6)) * 0.7
    d_tt = np.linalg.norm(tr[:, None] - tr[None], axis=-1) + np.diag(np.full(80, np.inf))
    d_ft = np.linalg.norm(fk[:, None] - tr[None], axis=-1)
    j = d_ft.argmin(1)
    expected = np.mean(d_ft[np.arange(60), j] < d_tt.min(1)[j])
    got = ev.memorisation(tr, fk)["memorised_fraction"]
    print(f"memorisation: {got:.4f} vs direct {expected:.4f}")
    assert got == expected
