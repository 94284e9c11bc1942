"""schedulers.py against diffusers' DDPMScheduler / DDIMScheduler with Stable Diffusion's settings.

All inputs are float32 (diffusers' DDIM computes in the input dtype). Our schedule is computed in
float64 and rounded to float32; diffusers computes it in float32, so the tables differ by float32
rounding (~5e-7) and trajectories by a few float32 ulps of their values.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from schedulers import DDIMSampler, DDPMSampler, NoiseSchedule

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PREDICTIONS = ["epsilon", "v_prediction"]
ALPHA_BAR64 = NoiseSchedule(**SD).alpha_bar64


def diffusers_ddim(prediction_type="epsilon", **kw):
    return DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading", prediction_type=prediction_type, **kw)


def diffusers_ddpm(prediction_type="epsilon"):
    return DDPMScheduler(**SD, clip_sample=False, steps_offset=1, timestep_spacing="leading",
                         variance_type="fixed_small", prediction_type=prediction_type)


def fake_denoiser(x_t, t, prediction_type, data):
    """A stand-in for the U-Net: guesses x0 = data + 0.1 tanh(x_t) and returns the eps or v that
    this guess implies at noise level t (computed in float64 independently of both schedulers),
    so outputs have the size of a real network's (O(1)) and errors propagate through x_t."""
    alpha_bar = ALPHA_BAR64[int(t)]
    a, s = alpha_bar.sqrt().item(), (1 - alpha_bar).sqrt().item()
    x0 = data + 0.1 * torch.tanh(x_t)
    eps = (x_t - a * x0) / s
    return eps if prediction_type == "epsilon" else a * eps - s * x0


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_tables_match_diffusers(schedule):
    kw = SD if schedule == "scaled_linear" else dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    ours, ref = NoiseSchedule(**kw), DDPMScheduler(**kw)
    assert ours.alpha_bar.dtype == torch.float32
    errs = {name: max_err(getattr(ours, name), getattr(ref, ref_name))
            for name, ref_name in [("betas", "betas"), ("alphas", "alphas"), ("alpha_bar", "alphas_cumprod")]}
    print(f"\n{schedule}: " + ", ".join(f"{k} max abs err {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-6


@pytest.mark.parametrize("n", [1, 7, 10, 20, 50, 250, 999])
def test_timesteps_match_diffusers(n):
    schedule = NoiseSchedule(**SD)
    ddim, ddpm = DDIMSampler(schedule), DDPMSampler(schedule)
    ref_ddim, ref_ddpm = diffusers_ddim(), diffusers_ddpm()
    ref_ddim.set_timesteps(n)
    ref_ddpm.set_timesteps(n)
    assert torch.equal(ddim.set_timesteps(n), ref_ddim.timesteps)
    assert torch.equal(ddpm.set_timesteps(n), ref_ddpm.timesteps)
    assert ddim.timesteps.dtype == torch.long and ddim.timesteps[-1] == 1  # steps_offset 1


def test_timesteps_out_of_range_raise():
    # diffusers would return t=1000 here (and fail later indexing alphas_cumprod[1000]).
    with pytest.raises(ValueError, match="at most 999"):
        DDIMSampler(NoiseSchedule(**SD)).set_timesteps(1000)
    with pytest.raises(ValueError):
        DDIMSampler(NoiseSchedule(**SD)).set_timesteps(0)
    full = DDPMSampler(NoiseSchedule(**SD)).set_timesteps(None)  # the whole training chain
    assert full[0] == 999 and full[-1] == 0 and len(full) == 1000


def test_add_noise_velocity_snr_match_diffusers():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 6, generator=g), torch.randn(4, 4, 8, 6, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    ours, ref32, ref64 = NoiseSchedule(**SD), diffusers_ddpm(), diffusers_in_float64(diffusers_ddpm())
    noisy, velocity = ours.q_sample(x0, t, eps), ours.velocity(x0, eps, t)
    errs = {
        "q_sample vs add_noise fp32": max_err(noisy, ref32.add_noise(x0, eps, t)),
        "q_sample vs add_noise fp64": max_err(noisy.double(), ref64.add_noise(x0.double(), eps.double(), t)),
        "velocity vs get_velocity fp32": max_err(velocity, ref32.get_velocity(x0, eps, t)),
        "velocity vs get_velocity fp64": max_err(velocity.double(),
                                                 ref64.get_velocity(x0.double(), eps.double(), t)),
    }
    snr_ref = compute_snr(ref64, t)  # diffusers.training_utils (min-SNR weighting)
    snr_err = ((ours.snr(t) - snr_ref).abs() / snr_ref).max().item()
    size = max(x0.abs().max().item(), eps.abs().max().item())
    print("\n" + "; ".join(f"{k} max abs err {v:.2e}" for k, v in errs.items())
          + f"; snr max rel err {snr_err:.2e}; max |x0|, |eps| {size:.2f}")
    assert max(errs.values()) <= 1e-6 * max(1.0, size) and snr_err <= 1e-6
    # per-sample indexing: row b uses t[b]
    assert torch.equal(noisy[2], ours.q_sample(x0[2:3], 500, eps[2:3])[0])
    # target() is eps or v by prediction type
    assert torch.equal(ours.target(x0, eps, t), eps)
    assert torch.equal(NoiseSchedule(**SD, prediction_type="v_prediction").target(x0, eps, t), velocity)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_predict_x0_eps_inverts_q_sample(prediction_type):
    schedule = NoiseSchedule(**SD, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400, 950])
    x_t = schedule.q_sample(x0, t, eps)
    x0_hat, eps_hat = schedule.predict_x0_eps(schedule.target(x0, eps, t), x_t, t)
    e_x0, e_eps = max_err(x0_hat, x0), max_err(eps_hat, eps)
    print(f"\n{prediction_type}: x0 round trip max abs err {e_x0:.2e}, eps {e_eps:.2e}")
    assert e_x0 <= 1e-4 and e_eps <= 1e-4  # 1/sqrt(alpha_bar) and 1/sqrt(1-alpha_bar) amplify rounding


def diffusers_in_float64(ref):
    """The same diffusers scheduler evaluated in float64: its betas formula (scheduling_ddpm.py,
    "scaled_linear") in float64; fed float64 inputs it then computes every step in float64.
    This is the exact answer both float32 implementations approximate."""
    betas = torch.linspace(SD["beta_start"] ** 0.5, SD["beta_end"] ** 0.5, SD["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    ref.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]  # DDIM, set_alpha_to_one=False
    return ref


@pytest.fixture
def ddpm_noise_in_any_dtype(monkeypatch):
    """diffusers' DDPM step draws its noise with randn_tensor(dtype=model_output.dtype). Draw it in
    float32 from the same generator and cast, so that the float64 reference gets the identical
    noise (the float32 draws are unchanged)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    def randn_float32(shape, generator=None, device=None, dtype=None, **_):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)

    monkeypatch.setattr(ddpm_module, "randn_tensor", randn_float32)


def run_trajectories(ours, ref32, ref64, timesteps, prediction_type, eta=None, seed=0):
    """20 consecutive steps from the same start, each sampler on its own trajectory (errors
    propagate through the denoiser). DDIM (eta given): identical explicit variance noise for all.
    DDPM (eta None): three generators with the same seed. Returns the largest |difference| over
    all steps between ours and diffusers in float32, ours and diffusers in float64, diffusers in
    float32 and in float64, and the largest |x| on the way."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 12, generator=g)
    data = torch.randn(2, 4, 16, 12, generator=g)
    x_ours, x32, x64 = x.clone(), x.clone(), x.double()
    gens = [torch.Generator().manual_seed(seed + 1) for _ in range(3)]
    err32 = err64 = ref_err = size = 0.0
    for t in timesteps:
        outs = [fake_denoiser(v, t, prediction_type, d) for v, d in
                [(x_ours, data), (x32, data), (x64, data.double())]]
        if eta is None:
            x_ours = ours.step(outs[0], t, x_ours, generator=gens[0])
            x32 = ref32.step(outs[1], t, x32, generator=gens[1]).prev_sample
            x64 = ref64.step(outs[2], t, x64, generator=gens[2]).prev_sample
        else:
            z = torch.randn(x.shape, generator=g) if eta > 0 else None
            x_ours = ours.step(outs[0], t, x_ours, eta=eta, noise=z)
            x32 = ref32.step(outs[1], t, x32, eta=eta, variance_noise=z).prev_sample
            x64 = ref64.step(outs[2], t, x64, eta=eta,
                             variance_noise=None if z is None else z.double()).prev_sample
        err32 = max(err32, max_err(x_ours, x32))
        err64 = max(err64, max_err(x_ours.double(), x64))
        ref_err = max(ref_err, max_err(x32.double(), x64))
        size = max(size, x64.abs().max().item())
    return err32, err64, ref_err, size


def check(label, err32, err64, ref_err, size):
    print(f"\n{label}, 20 steps: ours vs diffusers fp32 max abs err {err32:.2e}; ours vs diffusers "
          f"evaluated in fp64 {err64:.2e}; diffusers fp32 vs fp64 {ref_err:.2e}; max |x| {size:.2f}")
    # float32 rounding: a few ulps of the largest value (ulp(4) = 4.8e-7).
    tol = 1e-6 * max(1.0, size)
    assert err64 <= tol
    # The gap to diffusers' float32 run is its own float32 error (alpha_bar rounded to float32
    # loses 1 - alpha_bar near t=0) plus ours.
    assert err32 <= ref_err + tol


def strided_samplers(ours_cls, diffusers_sampler, prediction_type) -> tuple:
    """Ours, diffusers' in float32 and in float64, each set to 20 strided steps."""
    samplers = (ours_cls(NoiseSchedule(**SD, prediction_type=prediction_type)), diffusers_sampler(prediction_type),
                diffusers_in_float64(diffusers_sampler(prediction_type)))
    for s in samplers:
        s.set_timesteps(20)
    return samplers


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_match_diffusers(prediction_type, eta):
    ours, ref32, ref64 = strided_samplers(DDIMSampler, diffusers_ddim, prediction_type)
    check(f"DDIM {prediction_type} eta={eta}",
          *run_trajectories(ours, ref32, ref64, ours.timesteps, prediction_type, eta=eta))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_steps_match_diffusers(prediction_type, ddpm_noise_in_any_dtype):
    ours, ref32, ref64 = strided_samplers(DDPMSampler, diffusers_ddpm, prediction_type)
    check(f"DDPM {prediction_type} (strided, same generator seed)",
          *run_trajectories(ours, ref32, ref64, ours.timesteps, prediction_type))


def test_ddpm_full_chain_last_steps_match_diffusers(ddpm_noise_in_any_dtype):
    """The unstrided chain (no set_timesteps on either side) at its end, t = 19, ..., 0 (no noise at t=0)."""
    ours = DDPMSampler(NoiseSchedule(**SD))
    ref32, ref64 = diffusers_ddpm(), diffusers_in_float64(diffusers_ddpm())
    check("DDPM full chain t=19..0", *run_trajectories(ours, ref32, ref64, ours.timesteps[-20:], "epsilon"))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generator_noise_equals_explicit_noise(sampler):
    schedule = NoiseSchedule(**SD)
    ours = DDIMSampler(schedule) if sampler == "ddim" else DDPMSampler(schedule)
    ours.set_timesteps(10)
    kw = {"eta": 0.7} if sampler == "ddim" else {}
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = int(ours.timesteps[3])
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    drawn = ours.step(out, t, x, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(drawn, ours.step(out, t, x, noise=z, **kw))
    assert not torch.equal(drawn, ours.step(out, t, x, noise=-z, **kw))
    with pytest.raises(ValueError, match="not both"):
        ours.step(out, t, x, generator=torch.Generator(), noise=z, **kw)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_eta_one_is_ddpm(prediction_type):
    """DDIM eq. 16 with eta=1 is DDPM's ancestral step (Song et al. 2021, Sec. 4.1); with
    set_alpha_to_one both end on alpha_bar=1, so all 20 steps agree given the same noise."""
    schedule = NoiseSchedule(**SD, prediction_type=prediction_type)
    ddim, ddpm = DDIMSampler(schedule, set_alpha_to_one=True), DDPMSampler(schedule)
    ddim.set_timesteps(20)
    ddpm.set_timesteps(20)
    g = torch.Generator().manual_seed(3)
    data, x_a = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_b, err = x_a.clone(), 0.0
    for t in ddim.timesteps:
        z = torch.randn(x_a.shape, generator=g)
        x_a = ddim.step(fake_denoiser(x_a, t, prediction_type, data), t, x_a, eta=1.0, noise=z)
        x_b = ddpm.step(fake_denoiser(x_b, t, prediction_type, data), t, x_b, noise=z)
        err = max(err, max_err(x_a, x_b))
    print(f"\nDDIM eta=1 vs DDPM ({prediction_type}): max abs err {err:.2e}")
    assert err <= 1e-5


def test_ddim_needs_set_timesteps_and_bad_inputs_raise():
    ddim = DDIMSampler(NoiseSchedule(**SD))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ddim.step(torch.zeros(1, 4, 8, 8), 981, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        NoiseSchedule(**SD).q_sample(torch.zeros(2, 4), torch.tensor([0, 1000]), torch.zeros(2, 4))
