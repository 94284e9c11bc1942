"""vae.py against diffusers' AutoencoderKL on the same weights (fp32, CPU, tiny config); posterior behaviour."""
import pytest
import torch
from diffusers import AutoencoderKL

from reference import vae_to_diffusers
from vae import VAE, DiagonalGaussian, VAEConfig


def reference_and_ours(cfg, seed=0):
    torch.manual_seed(seed)
    ref = AutoencoderKL(**vae_to_diffusers(cfg)).eval()
    ours = VAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)          # identical names, nothing left over
    return ref, ours


@pytest.mark.parametrize("cfg", [VAEConfig.tiny(), VAEConfig(block_channels=(32, 32, 64, 64), layers_per_block=2)],
                         ids=["tiny", "sd-shaped x8"])
def test_parity_with_diffusers(cfg):
    ref, ours = reference_and_ours(cfg)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 48) * 2 - 1                         # non-square images in [-1, 1]
    with torch.no_grad():
        expected = ref.encode(x).latent_dist
        got = ours.encode(x)
        errs = {"posterior mean": (got.mean - expected.mean).abs().max().item(),
                "posterior logvar": (got.logvar - expected.logvar).abs().max().item(),
                "kl": (got.kl() - expected.kl()).abs().max().item() / expected.kl().abs().max().item(),
                "sample (same generator)": (got.sample(torch.Generator().manual_seed(3))
                                            - expected.sample(torch.Generator().manual_seed(3))).abs().max().item()}
        z = expected.mean
        errs["decode"] = (ours.decode(z) - ref.decode(z).sample).abs().max().item()
    factor = cfg.downsample_factor
    assert factor == 2 ** (len(cfg.block_channels) - 1)
    assert got.mean.shape == (2, cfg.latent_channels, 32 // factor, 48 // factor)
    for name, err in errs.items():
        print(f"\nVAE {cfg.block_channels} {name} vs diffusers: max abs err {err:.2e}" + (" (relative)" if name == "kl" else ""))
        assert err <= 1e-4, name


def test_sd_preset_has_the_released_shapes():
    with torch.device("meta"):
        ref, ours = AutoencoderKL(**vae_to_diffusers(VAEConfig.sd())), VAE(VAEConfig.sd())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert VAEConfig.sd().scale_factor == 0.18215 and VAEConfig.sd().downsample_factor == 8


def test_diagonal_gaussian():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    q = DiagonalGaussian(mean, torch.cat([logvar[:1], torch.full_like(logvar[1:], 50.0)]))
    assert q.logvar.max() == 20.0                                 # clamped as ldm
    assert torch.equal(q.mode(), mean)
    torch.testing.assert_close(q.std, torch.exp(0.5 * q.logvar))
    torch.testing.assert_close(q.var, q.std ** 2)
    # the closed-form KL against torch.distributions
    p = DiagonalGaussian(mean, logvar)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, p.std), torch.distributions.Normal(0, 1))
    torch.testing.assert_close(p.kl(), ref.sum(dim=(1, 2, 3)))
    # reproducible samples with a generator, with the posterior's spread
    a, b = p.sample(torch.Generator().manual_seed(0)), p.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, p.sample(torch.Generator().manual_seed(1)))
    many = DiagonalGaussian(torch.zeros(20000), torch.full((20000,), 2 * torch.log(torch.tensor(3.0)))).sample()
    assert abs(many.std().item() - 3.0) < 0.1


def test_roundtrip_and_bad_inputs():
    vae = VAE(VAEConfig.tiny()).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert vae(x).shape == x.shape
        assert vae(x, sample=True, generator=torch.Generator().manual_seed(0)).shape == x.shape
    with pytest.raises(ValueError, match="scale_factor"):
        vae.decode(x)
    with pytest.raises(ValueError, match="encode expects"):
        vae.encode(torch.randn(1, 4, 8, 8))
