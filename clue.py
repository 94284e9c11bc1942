"""CLUE: Stable Diffusion with a KL-regularised Style Encoder and a second (style) cross-attention.

Park et al., "CLUE: Controllable Latent space of Unprompted Embeddings for Diversity Management in Text-to-Image
Synthesis", arXiv 2511.10993 (2025), read as in ../shared/DESIGN.md ("CLUE as this project implements it"). This
file composes the parts (vae.py, text_encoder.py, unet.py, style_encoder.py, schedulers.py) into one model:

1. `loss`: the training objective
       L = E_{z0, c, eps, t} || target - f(z_t, t, c, s) ||^2        DDPM "simple" loss (Ho et al. 2020, eq. 14)
         + beta * KL(q(s|z0,c) || N(0, I))                          beta-VAE term (Higgins et al. 2017)
     or  + gamma * | KL(q(s|z0,c) || N(0, I)) - C |                 capacity objective (Burgess et al. 2018, eq. 8)
         + lambda * MMD^2(q(s), N(0, I))                              optional, on the aggregated posterior q(s)
   with z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps, target eps or v (Salimans & Ho 2022),
   s = mu + sigma * eps_s (reparameterisation), the KL of a diagonal Gaussian
       KL = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2)   per dimension,
   both terms as *means* (per latent element, per style dimension), optional min-SNR-gamma weights
   (Hang et al. 2023), and condition dropout for classifier-free guidance (Ho & Salimans 2022). The MMD term
   (InfoVAE, Zhao et al. 2019) shapes q(s) = E_x q(s|x), where prior draws land, which the per-image KL bounds but
   does not shape (StyleEncoder.prior_mmd).
2. `generate`: DDIM (Song et al. 2021, eq. 12) with classifier-free guidance (Ho & Salimans 2022) in ONE batched
   U-Net call per step, eps_hat = eps(z_t, c_neg, s) + w * (eps(z_t, c, s) - eps(z_t, c_neg, s)); the style s from
   the prior N(0, tau^2 I) ("unprompted embeddings"), a class's aggregated posterior, a reference image, or given
   (StyleChoice, make_style). BOTH halves get the same style, so guidance acts on the text only; training matches it
   (text dropout keeps the style). Beyond the paper: style guidance w_s != 1 samples p(x) p(c|x)^w p(s|x,c)^w_s
   (Liu et al. 2022's product by the chain rule, as InstructPix2Pix, Brooks et al. 2023, eq. 3):
       eps_hat = eps(c_neg, 0) + w * (eps(c, 0) - eps(c_neg, 0)) + w_s * (eps(c, s) - eps(c, 0))   (0: no style)
   (w_s = 1 runs the 2-part form: the same where the style acts alike with any text). CADS: condition_annealing.
3. The per-class style posteriors and the diagnostics of the style latent (style_stats.py), kept with the model.

Left out: img2img/inpainting, other samplers than DDIM, guidance rescale. A CLUE without a style encoder
(`style=None`) is plain Stable Diffusion: that is how sample.py does text-to-image.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import style_stats
from schedulers import SD_SAMPLER, DDIMSampler, NoiseSchedule, randn_cpu
from style_encoder import StyleConfig, StyleEncoder
from text_encoder import TextConfig, TextEncoder, tokenize
from unet import UNet, UNetConfig
from vae import VAE, DiagonalGaussian, VAEConfig

STYLE_SOURCES = ("prior", "posterior", "posterior_sample", "reference")  # StyleChoice.source, or a tensor
POSTERIOR_TENSORS = ("mean", "var", "factors", "psi", "mus")  # per class, see CLUE.fit_style_posterior


@dataclass
class StableDiffusion:
    unet: UNet
    vae: VAE
    text_encoder: TextEncoder
    schedule: NoiseSchedule         # betas / alpha_bar of training, with the prediction type
    prediction_type: str            # "epsilon" or "v_prediction": what the U-Net outputs
    scale_factor: float             # latents fed to the U-Net are vae.encode(x) * scale_factor (SD: 0.18215)
    image_size: int = 512           # native resolution in pixels (512: SD 1.x / 2.x-base; 768: SD 2.x-v)
    sampler_config: dict = field(default_factory=lambda: dict(SD_SAMPLER))  # DDIM steps_offset, set_alpha_to_one
    source: str = ""                # what was read: "diffusers folder", "single file (SD 2.x, ...)", ...
    notes: list = field(default_factory=list)           # conversion report: ignored keys, defaults taken
    extra_config: dict = field(default_factory=dict)    # our format: config entries beyond SD (style, clue, ...)
    extra_tensors: dict = field(default_factory=dict)   # our format: tensors beyond SD (style_encoder.*, ...)


@dataclass
class CLUEConfig:
    prediction_type: str = "epsilon"       # "epsilon" or "v_prediction": the U-Net's output (= the schedule's)
    scale_factor: float = 0.18215          # VAE latents are multiplied by this (SD's 0.18215; a tiny VAE gets 1/std)
    image_size: int = 512                  # default generation height/width in pixels (SD 2.1-v: 768, tiny: 32)
    sample_latents: bool = True            # training: z0 drawn from the VAE posterior (True) or its mean (False)
    kl_mode: str = "beta"                  # "beta": beta * KL; "capacity": gamma * |KL - C| (Burgess et al. 2018)
    beta: float = 1e-2                     # weight of the mean-per-dimension KL in "beta" mode
    beta_warmup_steps: int = 0             # beta ramps linearly from 0 to beta over these steps (0: no warm-up)
    gamma: float = 1.0                     # weight of |KL - C| in "capacity" mode
    capacity: float = 0.05                 # target KL C in nats per style dimension ("capacity" mode)
    capacity_ramp_steps: int = 1000        # C ramps linearly from 0 to `capacity` over these steps
    mmd_weight: float = 0.0                # lambda: weight of MMD^2(q(s), N(0, I)) per style dimension; 0: off
    min_snr_gamma: float | None = None     # min-SNR-gamma loss weights (Hang et al. 2023; 5.0 is theirs); None: off
    text_dropout: float = 0.1              # probability that a training prompt is replaced by "" (for CFG)
    style_dropout: float = 0.1             # probability that the style branch is skipped for a training sample

    @classmethod
    def tiny(cls, **kw) -> "CLUEConfig":
        """The demo preset: 32 px images, latents from the VAE mean (a tiny VAE is nearly deterministic)."""
        return cls(**{"image_size": 32, "sample_latents": False, **kw})


@dataclass
class Sampling:
    """How CLUE.generate samples: DDIM with classifier-free guidance."""
    steps: int = 50                          # DDIM steps
    guidance: float = 7.5                    # text guidance scale w; <= 1 runs the text branch only (as diffusers)
    style_guidance: float = 1.0              # style guidance scale w_s (module docstring); 1: the style as it is
    condition_noise: float = 0.0             # CADS noise scale s on the text context (condition_annealing); 0: off
    cads_tau1: float = 0.6                   # CADS: the clean context for t <= tau1 (t in [0, 1], sampling 1 -> 0),
    cads_tau2: float = 0.9                   # noise only for t >= tau2, linear between (Sadat et al.'s defaults)
    cads_psi: float = 1.0                    # CADS: weight of the noisy context rescaled to c's mean and std
    eta: float = 0.0                         # DDIM eta: 0 deterministic, 1 DDPM's ancestral noise
    negative_prompt: str | list[str] = ""    # the unconditional half's prompt (one, or one per image)
    height: int | None = None                # pixels, a multiple of the VAE's downsampling factor;
    width: int | None = None                 # None: CLUEConfig.image_size


@dataclass
class StyleChoice:
    """Where CLUE.generate's style tokens come from (CLUE.make_style) and how strongly they act."""
    source: str | torch.Tensor = "prior"     # one of STYLE_SOURCES, or style tokens (K,D) / (1|n,K,D) used as given
    tau: float = 1.0                         # temperature: prior N(0, tau^2 I), posterior covariance x tau^2
    scale: float = 1.0                       # the U-Net's style_scale (0: the style branch is skipped)
    classes: list[str] | None = None         # "posterior*": one class name per image
    reference: torch.Tensor | None = None    # "reference": images (B,3,H,W) in [-1, 1], B = 1 or one per image
    reference_prompts: list[str] | None = None  # their prompts (generate: default the generation prompts)
    seed: int | None = None                  # own RNG for the style draws (fixed noise, varying style)


def condition_annealing(c: torch.Tensor, t: float, sp: Sampling, generator=None) -> torch.Tensor:
    """CADS (Sadat et al., ICLR 2024), the text context at diffusion time t in [0, 1] (sampling runs 1 -> 0): noise
    early (diverse layouts), the clean c late (c itself when s = 0 or gamma = 1); n ~ N(0, I) from `generator`,
        c_hat = sqrt(gamma(t)) c + s sqrt(1 - gamma(t)) n,  gamma(t) = clip((tau2 - t) / (tau2 - tau1), 0, 1),
        c_hat <- psi * (c_hat rescaled to each image's mean and std of c) + (1 - psi) * c_hat."""
    gamma = min(1.0, max(0.0, (sp.cads_tau2 - t) / (sp.cads_tau2 - sp.cads_tau1)))  # 1 (t <= tau1), 0 (t >= tau2)
    if sp.condition_noise == 0 or gamma == 1.0:
        return c
    c_hat = gamma ** 0.5 * c + sp.condition_noise * (1 - gamma) ** 0.5 * randn_cpu(c.shape, generator, c.device)
    mean, std = (lambda y: y.mean((1, 2), True)), (lambda y: y.std((1, 2), keepdim=True))  # per image (B,77,D)
    return sp.cads_psi * ((c_hat - mean(c_hat)) / std(c_hat) * std(c) + mean(c)) + (1 - sp.cads_psi) * c_hat


def slerp(s0: torch.Tensor, s1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two styles (per sample, over all K*D numbers): stays on the shell where
    Gaussian draws live, where plain lerp would shrink the norm halfway (Shoemake 1985; White 2016)."""
    a, b = s0.flatten(1).double(), s1.flatten(1).double()
    cos = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1, keepdim=True).clamp(-1, 1)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    near = so.abs() < 1e-6  # (almost) parallel: lerp is exact enough
    w0 = torch.where(near, 1 - alpha + 0 * so, torch.sin((1 - alpha) * omega) / so.where(~near, 1.0))
    w1 = torch.where(near, alpha + 0 * so, torch.sin(alpha * omega) / so.where(~near, 1.0))
    return (w0 * a + w1 * b).view_as(s0).to(s0.dtype)


class CLUE(nn.Module):
    def __init__(self, vae: VAE, text_encoder: TextEncoder, unet: UNet, style_encoder: StyleEncoder | None,
                 schedule: NoiseSchedule, cfg: CLUEConfig, sampler_config: dict | None = None):
        super().__init__()
        if cfg.prediction_type != schedule.prediction_type:
            raise ValueError(f"CLUEConfig.prediction_type={cfg.prediction_type!r} but the schedule predicts "
                             f"{schedule.prediction_type!r}: make them agree")
        if (style_encoder is not None) != unet.cfg.style:  # the vanilla baseline has no style parameters at all
            raise ValueError(f"a U-Net with UNetConfig(style={unet.cfg.style}) and {'a' if style_encoder else 'no'} "
                             "style encoder: build both or neither (CLUE.from_stable_diffusion does this)")
        self.vae, self.text_encoder, self.unet, self.style_encoder = vae, text_encoder, unet, style_encoder
        self.schedule, self.cfg = schedule, cfg
        self.sampler_config = dict(sampler_config or SD_SAMPLER)  # DDIM steps_offset, set_alpha_to_one
        # the aggregated posterior per class (fit_style_posterior): {name: {"prompt", *POSTERIOR_TENSORS}}
        self.style_posterior: dict[str, dict] = {}
        self.last_diagnostics: dict | None = None  # the latest diagnostics(), saved with the checkpoint
        self.train_config: dict | None = None       # what save_clue(extra=...) stored, e.g. the training settings

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def from_stable_diffusion(cls, sd, style_cfg: StyleConfig | None = None, clue_cfg: CLUEConfig | None = None):
        """CLUE on top of converted SD weights (convert.load_stable_diffusion). The U-Net is rebuilt with or
        without the style layers as needed; the new `attn_style.to_out.0` is zero, so before training the
        model's outputs are bit-identical to plain SD. `style_cfg=None` (or tokens=0): the vanilla baseline."""
        use_style = style_cfg is not None and style_cfg.tokens > 0
        unet = sd.unet
        if unet.cfg.style != use_style:
            unet = UNet(replace(sd.unet.cfg, style=use_style)).to(next(sd.unet.parameters()).device)
            unet.load_state_dict(sd.unet.state_dict(), strict=False)  # the configs differ in the style layers only
        if use_style and (style_cfg.context_dim != unet.cfg.context_dim
                          or style_cfg.latent_channels != unet.cfg.in_channels):
            raise ValueError(f"StyleConfig(context_dim={style_cfg.context_dim}, latent_channels="
                             f"{style_cfg.latent_channels}) must match the U-Net (context_dim={unet.cfg.context_dim}, "
                             f"in_channels={unet.cfg.in_channels})")
        clue_cfg = replace(clue_cfg or CLUEConfig(), prediction_type=sd.prediction_type,
                           scale_factor=float(sd.scale_factor), **({} if clue_cfg else {"image_size": sd.image_size}))
        style = StyleEncoder(style_cfg).to(next(unet.parameters()).device) if use_style else None
        return cls(sd.vae, sd.text_encoder, unet, style, sd.schedule, clue_cfg, sd.sampler_config)

    def as_stable_diffusion(self) -> StableDiffusion:
        """The SD parts of this model as a StableDiffusion (shares the modules, copies nothing; checkpoint.py)."""
        return StableDiffusion(self.unet, self.vae, self.text_encoder, self.schedule, self.cfg.prediction_type,
                               self.cfg.scale_factor, self.cfg.image_size, dict(self.sampler_config), "CLUE")

    @classmethod
    def from_config(cls, unet: UNetConfig | None = None, vae: VAEConfig | None = None, text: TextConfig | None = None,
                    style: StyleConfig | str | None = "tiny", clue: CLUEConfig | None = None,
                    schedule: dict | None = None):
        """A model from scratch (random weights), by default the tiny demo preset (UNetConfig.tiny(), ..., "tiny");
        `style=None` or tokens=0: the vanilla baseline; `schedule`: NoiseSchedule arguments (default SD's)."""
        unet, vae, text = unet or UNetConfig.tiny(), vae or VAEConfig.tiny(), text or TextConfig.tiny()
        clue = clue or CLUEConfig.tiny(scale_factor=vae.scale_factor)
        style = StyleConfig.tiny() if isinstance(style, str) and style == "tiny" else style
        use_style = style is not None and style.tokens > 0
        sched = NoiseSchedule(**{**(schedule or {}), "prediction_type": clue.prediction_type})
        return cls(VAE(vae), TextEncoder(text), UNet(replace(unet, style=use_style)),
                   StyleEncoder(style) if use_style else None, sched, clue)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor | None, sample: bool | None = None, generator=None,
                      moments: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B,3,H,W) -> z0 = scale_factor * (posterior sample or mean), (B,4,H/f,W/f). `moments`, in
        place of the images: the VAE posterior's mean and logvar stacked on channels (B,8,h,w), computed once per image
        (train.py's latent cache): the encoder is skipped, the sample drawn from them as from its output."""
        posterior = self.vae.encode(images.to(self.device)) if moments is None else \
            DiagonalGaussian(*moments.to(self.device, non_blocking=True).chunk(2, dim=1))
        sample = self.cfg.sample_latents if sample is None else sample
        z = posterior.sample(generator=generator) if sample else posterior.mean
        return z * self.cfg.scale_factor

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text context c (B,77,D), the SD pipeline's prompt embeddings. Each distinct prompt is encoded once
        and its row repeated (a batch of fixed-format prompts holds a few); the repeats' gradients add up in it."""
        prompts, cfg, dev = list(prompts), self.text_encoder.cfg, self.device
        rows = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # distinct prompts, first-seen order
        context = self.text_encoder(tokenize(list(rows), cfg.context_length, cfg.pad).to(dev, non_blocking=True))
        return context if len(rows) == len(prompts) else \
            context[torch.tensor([rows[p] for p in prompts]).to(dev, non_blocking=True)]

    def encode_style(self, z0: torch.Tensor, context: torch.Tensor):
        """(mu, logvar) of the style posterior q(s | z0, c), each (B,K,D)."""
        return self.style_encoder(z0, context)

    @staticmethod
    def unpack(batch, class_names: list[str] | None = None) -> tuple[torch.Tensor, list[str], list[str] | None]:
        """A batch -> (images in [-1,1], prompts, class names or None): a data.py dict ("image", "prompt", "label",
        names from `class_names`, the dataset's list) or an (images, prompts) tuple."""
        if not isinstance(batch, dict):
            return batch[0], list(batch[1]), None
        names = [class_names[int(j)] for j in batch["label"]] if "label" in batch and class_names is not None else None
        return batch["image"], list(batch["prompt"]), names

    def kl_weight(self, step: int) -> tuple[float, float]:
        """(weight, capacity) at a training step: beta with linear warm-up, or gamma with C ramped linearly."""
        c, ramp = self.cfg, lambda steps: min(1.0, step / steps) if steps > 0 else 1.0
        if c.kl_mode == "beta":
            return c.beta * ramp(c.beta_warmup_steps), 0.0
        if c.kl_mode == "capacity":
            return c.gamma, c.capacity * ramp(c.capacity_ramp_steps)
        raise ValueError(f"CLUEConfig.kl_mode must be 'beta' or 'capacity', got {c.kl_mode!r}")

    def loss(self, batch, step: int = 0, generator: torch.Generator | None = None):
        """The training objective L of the module docstring on one batch -> (loss, logs), logs = {loss, mse, kl (nats
        per style dimension), ...} as detached tensors (nothing here waits for the device). The prompt is "" with
        p=text_dropout, the style branch skipped (style_scale 0, exactly as style=None) with p=style_dropout; the style
        encoder always sees the real prompt. A dict batch may carry z0 instead of images: scaled "latents", or the VAE
        posterior's moments, "posterior" (train.py's latent cache). Random draws come from `generator` (CPU; None: the
        global RNG)."""
        dev = self.device
        if isinstance(batch, dict) and ("latents" in batch or "posterior" in batch):  # z0 computed once per image
            prompts = list(batch["prompt"])
            z0 = batch["latents"].to(dev, non_blocking=True) if "latents" in batch else \
                self.encode_images(None, generator=generator, moments=batch["posterior"])
        else:
            images, prompts, _ = self.unpack(batch)
            z0 = self.encode_images(images, generator=generator)
        B, context = len(prompts), self.encode_prompts(prompts)
        drop_text = torch.rand(B, generator=generator) < self.cfg.text_dropout
        unet_context = context
        if drop_text.any():  # classifier-free guidance: the empty prompt's embedding for those samples
            empty = self.encode_prompts([""]).expand_as(context)
            unet_context = torch.where(drop_text.to(dev, non_blocking=True)[:, None, None], empty, context)
        t = torch.randint(0, self.schedule.num_train_timesteps, (B,), generator=generator)  # CPU: for the schedule
        eps = randn_cpu(z0.shape, generator, dev, z0.dtype)
        z_t = self.schedule.q_sample(z0, t, eps)  # z_t = sqrt(abar) z0 + sqrt(1-abar) eps (DDPM eq. 4)
        logs = {}
        style, style_scale, kl, mmd = None, 1.0, torch.zeros((), device=dev), torch.zeros((), device=dev)
        if self.style_encoder is not None:
            mu, logvar = self.encode_style(z0, context)
            style = self.style_encoder.sample(mu, logvar, eps=randn_cpu(mu.shape, generator, dev, mu.dtype))
            keep = (torch.rand(B, generator=generator) >= self.cfg.style_dropout).to(z0.dtype)
            style_scale = keep.to(dev, non_blocking=True)[:, None, None]  # (B,1,1): 0 skips the style branch there
            kl = self.style_encoder.kl(mu, logvar).mean()  # mean over B,K,D: nats per style dimension
            if self.cfg.mmd_weight > 0:  # MMD^2 of the batch's sampled styles (the aggregated posterior) to N(0, I)
                mmd = self.style_encoder.prior_mmd(style)
                logs["mmd"] = mmd.detach()
            logs["style_kept"] = keep.mean()
        pred = self.unet(z_t, t.to(dev, non_blocking=True), unet_context, style=style, style_scale=style_scale)
        target = self.schedule.target(z0, eps, t)
        mse_b = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,): mean over elements (DDPM simple)
        if self.cfg.min_snr_gamma is not None:  # w_b = min(SNR_t, gamma) / SNR_t (eps), / (SNR_t + 1) (v)
            snr = self.schedule.snr(t).to(dev, non_blocking=True)  # alpha_bar / (1 - alpha_bar)
            w = snr.clamp(max=self.cfg.min_snr_gamma)
            w = w / (snr + 1) if self.cfg.prediction_type == "v_prediction" else w / snr
            mse_b = w * mse_b
        mse = mse_b.mean()
        weight, capacity = self.kl_weight(step)
        if self.style_encoder is None:
            loss = mse
        else:
            kl_term = weight * kl if self.cfg.kl_mode == "beta" else weight * (kl - capacity).abs()  # gamma |KL - C|
            loss = mse + kl_term + self.cfg.mmd_weight * mmd
        logs.update(loss=loss.detach(), mse=mse.detach(), kl=kl.detach(), kl_weight=weight, capacity=capacity,
                    text_dropped=drop_text.float().mean())
        return loss, logs

    @property
    def style_shape(self) -> tuple[int, int]:
        """(K, D): style tokens per image and their width."""
        return self.style_encoder.cfg.tokens, self.style_encoder.cfg.context_dim

    def make_style(self, choice: StyleChoice, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n style token sets (n,K,D) from choice.source (StyleChoice), random draws from `generator`."""
        if self.style_encoder is None:
            raise ValueError("this model has no style branch (style tokens 0 / plain SD): use style=None")
        if isinstance(choice.source, torch.Tensor):
            return self._given_style(choice.source, n)
        makers = {"prior": self._prior_style, "posterior": self._posterior_style,
                  "posterior_sample": self._posterior_sample_style, "reference": self._reference_style}
        if not isinstance(choice.source, str) or choice.source not in makers:
            raise ValueError(f"StyleChoice.source must be a tensor or one of {STYLE_SOURCES}, got {choice.source!r}")
        return makers[choice.source](choice, n, generator)

    def _given_style(self, style: torch.Tensor, n: int) -> torch.Tensor:
        """Style tokens (K,D) or (1|n,K,D), used as given."""
        (K, D), s = self.style_shape, style.to(self.device, torch.float32)
        s = s[None] if s.dim() == 2 else s
        if s.shape[1:] != (K, D) or s.shape[0] not in (1, n):
            raise ValueError(f"a style tensor must be (K,D)=({K},{D}) or (1|{n},{K},{D}), got {tuple(style.shape)}")
        return s.expand(n, K, D).contiguous()

    def _prior_style(self, choice: StyleChoice, n: int, generator) -> torch.Tensor:
        """s ~ N(0, tau^2 I): the paper's unprompted embeddings (tau = 0: the mean style, zeros)."""
        return choice.tau * randn_cpu((n, *self.style_shape), generator, self.device)

    def _class_posteriors(self, choice: StyleChoice, n: int) -> list[dict]:
        """The fitted style posterior (fit_style_posterior) of each image's class, choice.classes."""
        known = sorted(self.style_posterior)
        if not known:
            raise ValueError("no style posterior in this model: run fit_style_posterior(loader) (train.py does "
                             "it before saving) or use the prior")
        if choice.classes is None or len(choice.classes) != n:
            raise ValueError(f"StyleChoice({choice.source!r}) needs classes=[a class per image] ({n}); known: {known}")
        if unknown := [name for name in choice.classes if str(name) not in self.style_posterior]:
            raise ValueError(f"class {unknown[0]!r} not in the style posterior; known: {known}")
        return [self.style_posterior[str(name)] for name in choice.classes]

    def _posterior_style(self, choice: StyleChoice, n: int, generator) -> torch.Tensor:
        """A draw from each class's Gaussian fitted to its training images' styles, the covariance x tau^2."""
        draws = [style_stats.posterior_draw(p, choice.tau, generator) for p in self._class_posteriors(choice, n)]
        return torch.stack(draws).to(self.device, torch.float32)

    def _posterior_sample_style(self, choice: StyleChoice, n: int, generator) -> torch.Tensor:
        """The mu of a random training image of each class."""
        mus = [p["mus"] for p in self._class_posteriors(choice, n)]
        picks = [m[torch.randint(len(m), (1,), generator=generator).item()] for m in mus]
        return torch.stack(picks).to(self.device, torch.float32)

    def _reference_style(self, choice: StyleChoice, n: int, generator=None) -> torch.Tensor:
        """mu of the encoder on the reference images in [-1,1] (one, or one per image) with their prompts."""
        if choice.reference is None or choice.reference_prompts is None:
            raise ValueError("StyleChoice('reference') needs reference images (B,3,H,W) in [-1,1] and their prompts")
        reference = choice.reference[None] if choice.reference.dim() == 3 else choice.reference
        with torch.no_grad():
            z0 = self.encode_images(reference, sample=False)
            mu, _ = self.encode_style(z0, self.encode_prompts(list(choice.reference_prompts)[:len(z0)]))
        if len(mu) not in (1, n):
            raise ValueError(f"StyleChoice('reference'): {len(mu)} reference images for {n} images; give 1 or {n}")
        return mu.float().expand(n, *self.style_shape).contiguous()

    @torch.no_grad()
    def generate(self, prompts: list[str] | str, sampling: Sampling | None = None, style: StyleChoice | None = None,
                 *, seed: int | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output: str = "image", progress: bool = True) -> torch.Tensor:
        """Text(-and-style)-to-image, one image per prompt: DDIM with guidance (`sampling`, default Sampling()), the
        style tokens from `style` (StyleChoice; None: no style branch) -> images in [0, 1] (B,3,H,W), or the final
        scaled latents for output="latent". Random draws, in order: z_T (B,4,h,w) unless `latents` are given, from
        `generator` (or a CPU one seeded with `seed`, or the global RNG), the style (StyleChoice.seed: its own RNG),
        CADS noise at each step where it acts."""
        sp = sampling or Sampling()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        B, dev = len(prompts), self.device
        negs = [sp.negative_prompt] * B if isinstance(sp.negative_prompt, str) else list(sp.negative_prompt)
        generator = torch.Generator().manual_seed(seed) if generator is None and seed is not None else generator
        height, width = sp.height or self.cfg.image_size, sp.width or self.cfg.image_size
        f = self.vae.cfg.downsample_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        if latents is None:  # DDIM's initial noise sigma is 1
            latents = randn_cpu((B, self.unet.cfg.in_channels, height // f, width // f), generator, dev)
        x = latents.to(dev, torch.float32)
        s, style_scale = None, 1.0 if style is None else style.scale
        if style is not None:  # reference prompts default to the prompts; StyleChoice.seed: the style's own RNG
            s = self.make_style(replace(style, reference_prompts=style.reference_prompts or prompts), B,
                                generator if style.seed is None else torch.Generator().manual_seed(style.seed))
        cfg_on, sg_on = sp.guidance > 1.0, s is not None and sp.style_guidance != 1.0
        n = 1 + cfg_on + sg_on  # batch parts: [c_neg (with s; without when sg_on)] [c, no style (sg_on)] [c, s]
        if sg_on:  # the style branch off (scale 0: exactly as style=None) in every part but the last
            style_scale = torch.tensor([0.0] * (n - 1) + [style_scale], device=dev).repeat_interleave(B)[:, None, None]
        c, c_neg = self.encode_prompts(prompts), self.encode_prompts(negs) if cfg_on else None
        style_in = s.repeat(n, 1, 1) if s is not None else None  # the same style in every part
        sampler = DDIMSampler(self.schedule, **self.sampler_config)
        for t in tqdm(sampler.set_timesteps(sp.steps).tolist(), desc="DDIM", disable=not progress, leave=False):
            c_t = condition_annealing(c, t / self.schedule.num_train_timesteps, sp, generator)  # CADS (c when off)
            out = self.unet(x.repeat(n, 1, 1, 1), torch.full((n * B,), t, device=dev),
                            torch.cat([c_neg] * cfg_on + [c_t] * (n - cfg_on)), style=style_in,
                            style_scale=style_scale).float().chunk(n)
            pred = out[0] + sp.guidance * (out[1] - out[0]) if cfg_on else out[0]  # classifier-free guidance
            if sg_on:  # style guidance: + w_s * (eps(c, s) - eps(c, no style))
                pred = pred + sp.style_guidance * (out[-1] - out[-2])
            x = sampler.step(pred, t, x, eta=sp.eta, generator=generator)  # DDIM eq. 12
        return x if output == "latent" else self.decode_latents(x)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents z0 (B,4,h,w) -> images in [0, 1]: VAE decoder on z0 / scale_factor, then [-1,1] -> [0,1]."""
        image = self.vae.decode(z / self.cfg.scale_factor).float()
        return (image / 2 + 0.5).clamp(0, 1)

    def fit_style_posterior(self, loader, max_batches: int | None = None, rank: int = 16) -> dict:
        """Fit and keep the per-class Gaussians of the aggregated posterior (style_stats.fit_class_posteriors)."""
        self.style_posterior = style_stats.fit_class_posteriors(self, loader, max_batches, rank)
        return self.style_posterior

    def diagnostics(self, loader, max_batches: int | None = None, seed: int = 0) -> dict:
        """Style-latent health on (held-out) data (style_stats.diagnostics), kept as last_diagnostics."""
        self.last_diagnostics = style_stats.diagnostics(self, loader, max_batches, seed)
        return self.last_diagnostics
