"""Noise schedule, DDPM ancestral sampling and DDIM sampling, for epsilon- and v-prediction.

Papers and notation:
  DDPM  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv 2006.11239). beta_t is the variance
        added at step t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s.
        Eq. 4:    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)                     (q_sample)
        Eq. 6-7:  the posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I) with
                  mu_tilde   = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
                  beta_tilde = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t     ("fixed_small", DDPMSampler)
        Eq. 15:   x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)                    (predict_x0_eps)
  DDIM  Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv 2010.02502).
        NOTE: DDIM's alpha_t is DDPM's alpha_bar_t. We write alpha_bar everywhere.
        Eq. 12:   x_{t-1} = sqrt(alpha_bar_{t-1}) x0_pred + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_pred + sigma_t z
        Eq. 16:   sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t-1})
        eta = 0 is deterministic DDIM; eta = 1 is DDPM's ancestral step with beta_tilde (DDIMSampler).
  v-prediction  Salimans & Ho 2022, "Progressive Distillation" (arXiv 2202.00512), Sec. 4: v = sqrt(alpha_bar_t) eps
        - sqrt(1 - alpha_bar_t) x_0 (velocity), hence x_0 and eps from v (predict_x0_eps).

Stable Diffusion's settings are the defaults here (SD_SCHEDULE, SD_SAMPLER). The schedule is computed once in
float64 and kept as float32 tensors; t (B,) indexes per sample. Left out: other beta schedules (cosine), zero-terminal-
SNR rescaling, "trailing"/"linspace" spacing, thresholding and clipping of x0_pred, learned variances, "sample" output.
"""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Every SD 1.x / 2.x release trains with this schedule ("scaled_linear": linspace(sqrt(b0), sqrt(b1), T)^2) and
# samples with these DDIM settings ("leading" spacing + 1; the final step lands on alpha_bar_0, not on 1).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_SAMPLER = dict(steps_offset=1, set_alpha_to_one=False)


def sd_image_size(prediction_type: str) -> int:
    """The native resolution in pixels of an SD release: 768 for v-prediction (SD 2.x-v), 512 for epsilon."""
    return 768 if prediction_type == "v_prediction" else 512


class NoiseSchedule:
    """The forward process q(x_t | x_0) and the conversions between eps, v and x_0."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon"):
        if not (prediction_type in PREDICTION_TYPES and 0 < beta_start < beta_end < 1 and num_train_timesteps >= 1):
            raise ValueError(f"NoiseSchedule: needs prediction_type in {PREDICTION_TYPES}, 0 < beta_start < beta_end < "
                             f"1, num_train_timesteps >= 1; got {prediction_type!r}, {beta_start}, {beta_end}, "
                             f"{num_train_timesteps}")
        if beta_schedule == "scaled_linear":  # SD: linear in sqrt(beta)
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":  # DDPM paper: 1e-4 .. 0.02
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"NoiseSchedule: beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
        self.num_train_timesteps, self.beta_start, self.beta_end = num_train_timesteps, beta_start, beta_end
        self.beta_schedule, self.prediction_type = beta_schedule, prediction_type
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        self.alpha_bar64 = alpha_bar  # float64 copy: the samplers' per-step scalars come from it
        self.betas, self.alphas, self.alpha_bar = betas.float(), alphas.float(), alpha_bar.float()
        self.sqrt_alpha_bar = alpha_bar.sqrt().float()
        self.sqrt_one_minus_alpha_bar = (1.0 - alpha_bar).sqrt().float()
        self.snr_table = (alpha_bar / (1.0 - alpha_bar)).float()  # signal-to-noise ratio per t

    def to_dict(self) -> dict:
        """The constructor arguments (for a checkpoint's config.json)."""
        return dict(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start, beta_end=self.beta_end,
                    beta_schedule=self.beta_schedule, prediction_type=self.prediction_type)

    def _at(self, table: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        """table[t], shaped to broadcast against x: (B,) -> (B,1,...,1); an int t gives a scalar. A CPU t (CLUE.loss
        draws it there) is checked and looked up on the CPU: no device sync."""
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point:
            raise TypeError(f"NoiseSchedule: timesteps must be integers, got dtype {t.dtype}")
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"NoiseSchedule: t must be a scalar or of shape (B,)=({x.shape[0]},): {tuple(t.shape)}")
        if t.device.type == "cpu" and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"NoiseSchedule: timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        values = table.to(t.device)[t].to(x.device, x.dtype, non_blocking=t.device.type == "cpu")
        return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))

    def q_sample(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM eq. 4, reparametrised)."""
        return self._at(self.sqrt_alpha_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t, x0) * eps

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0  (Salimans & Ho 2022)."""
        return self._at(self.sqrt_alpha_bar, t, x0) * eps - self._at(self.sqrt_one_minus_alpha_bar, t, x0) * x0

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """What the network is trained to output: eps, or v for v-prediction."""
        return eps if self.prediction_type == "epsilon" else self.velocity(x0, eps, t)

    def predict_x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output at (x_t, t) -> its implied (x_0, eps)."""
        a = self._at(self.sqrt_alpha_bar, t, x_t)            # sqrt(alpha_bar_t)
        s = self._at(self.sqrt_one_minus_alpha_bar, t, x_t)  # sqrt(1 - alpha_bar_t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - s * eps) / a                          # DDPM eq. 15
        else:
            x0 = a * x_t - s * model_output                   # x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v
            eps = a * model_output + s * x_t                  # eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t
        return x0, eps

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float32 (min-SNR loss weighting)."""
        t = torch.as_tensor(t)
        return self.snr_table.to(t.device)[t]


def _leading_timesteps(num_train_timesteps: int, n: int, steps_offset: int) -> torch.Tensor:
    """"Leading" spacing: t = (n-1, ..., 1, 0) * (T // n) + steps_offset, descending."""
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"set_timesteps: the number of steps must be in [1, {num_train_timesteps}], got {n}")
    ratio = num_train_timesteps // n
    timesteps = torch.arange(n - 1, -1, -1, dtype=torch.long) * ratio + steps_offset
    if int(timesteps[0]) >= num_train_timesteps:
        raise ValueError(f"set_timesteps: {n} steps with steps_offset {steps_offset} would start at t="
                         f"{int(timesteps[0])} >= {num_train_timesteps}; use at most {num_train_timesteps - 1} steps")
    return timesteps


def randn_cpu(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) drawn in float32 on the CPU (from an optional CPU generator), then moved to `device`: the same seed
    gives the same numbers on every device, as diffusers' randn_tensor does for a CPU generator (clue.py's draws)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype, non_blocking=True)


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, I) shaped like x, in x's dtype, drawn where `generator` lives (without one: x's device's global RNG, not
    the CPU's as randn_cpu), then moved to x's device: the samplers' and the VAE posterior's draws."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _variance_noise(x: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like x for a sampler step: the given `noise`, or randn_like(x, generator)."""
    if noise is None:
        return randn_like(x, generator)
    if generator is not None:
        raise ValueError("step: pass either a generator or explicit noise, not both")
    if noise.shape != x.shape:
        raise ValueError(f"step: noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


class DDIMSampler:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t from eq. 16) over a strided timestep subset."""

    def __init__(self, schedule: NoiseSchedule, steps_offset: int = 1, set_alpha_to_one: bool = False):
        self.schedule = schedule
        self.steps_offset = steps_offset  # SD: 1, so 50 steps run t = 981, 961, ..., 1
        self.final_alpha_bar = 1.0 if set_alpha_to_one else float(schedule.alpha_bar64[0])  # where the last step lands
        self.num_inference_steps, self.timesteps = None, None  # set by set_timesteps

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Choose the sampling timesteps ("leading" spacing); returns them, descending."""
        self.timesteps = _leading_timesteps(self.schedule.num_train_timesteps, num_inference_steps, self.steps_offset)
        self.num_inference_steps = num_inference_steps
        return self.timesteps

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One DDIM step x_t -> x_{t_prev}, t_prev = t - T // n. `noise` or `generator` is used only if eta > 0."""
        if self.num_inference_steps is None:
            raise RuntimeError("DDIMSampler.step: call set_timesteps(n) first")
        t = int(t)
        t_prev = t - self.schedule.num_train_timesteps // self.num_inference_steps
        alpha_bar_t = float(self.schedule.alpha_bar64[t])
        alpha_bar_prev = float(self.schedule.alpha_bar64[t_prev]) if t_prev >= 0 else self.final_alpha_bar
        x0, eps = self.schedule.predict_x0_eps(model_output, x_t, t)
        # eq. 16: sigma_t; eta = 1 gives DDPM's posterior std sqrt(beta_tilde)
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
        # eq. 12: "predicted x0" + "direction pointing to x_t" (+ random noise)
        x_prev = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        if eta > 0:
            x_prev = x_prev + sigma * _variance_noise(x_t, generator, noise)
        return x_prev


class DDPMSampler:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7, variance beta_tilde: "fixed_small").

    With fewer steps than the training chain, a step t -> t_prev uses the strided quantities alpha_t =
    alpha_bar_t / alpha_bar_{t_prev}, beta_t = 1 - alpha_t; the last step lands on alpha_bar = 1 (x_0 itself).
    Same interface as DDIMSampler, without eta (DDIM with eta=1 is this sampler)."""

    def __init__(self, schedule: NoiseSchedule, steps_offset: int = 1):
        self.schedule = schedule
        self.steps_offset = steps_offset  # applies to set_timesteps(n); the full chain has none
        self.set_timesteps(None)

    def set_timesteps(self, num_inference_steps: int | None = None) -> torch.Tensor:
        """n steps with "leading" spacing, or None for the whole training chain T-1, ..., 0."""
        T = self.schedule.num_train_timesteps
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.long) if num_inference_steps is None else \
            _leading_timesteps(T, num_inference_steps, self.steps_offset)
        self.num_inference_steps = num_inference_steps
        steps = self.timesteps.tolist()
        self._prev = dict(zip(steps, steps[1:] + [-1]))  # t -> the next timestep down (-1: the end)
        return self.timesteps

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t_prev} ~ N(mu_tilde, beta_tilde I); no noise when t = 0."""
        t = int(t)
        if t not in self._prev:
            raise ValueError(f"DDPMSampler.step: t={t} is not one of the timesteps set by set_timesteps")
        t_prev = self._prev[t]
        alpha_bar_t = float(self.schedule.alpha_bar64[t])
        alpha_bar_prev = float(self.schedule.alpha_bar64[t_prev]) if t_prev >= 0 else 1.0
        alpha_t, beta_t = alpha_bar_t / alpha_bar_prev, 1 - alpha_bar_t / alpha_bar_prev  # strided: a step t -> t_prev
        x0, _ = self.schedule.predict_x0_eps(model_output, x_t, t)
        # eq. 7: the posterior mean mu_tilde(x_t, x0)
        x_prev = (math.sqrt(alpha_bar_prev) * beta_t / (1 - alpha_bar_t)) * x0 \
            + (math.sqrt(alpha_t) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)) * x_t
        if t > 0:
            beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t  # eq. 7, "fixed_small"
            x_prev = x_prev + math.sqrt(beta_tilde) * _variance_noise(x_t, generator, noise)
        return x_prev
