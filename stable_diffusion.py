"""`StableDiffusion`, what every loader returns, and the SD 1.x / 2.x facts and checks the loaders share.

StableDiffusion bundles the three networks (unet.py, vae.py, text_encoder.py) with what sampling needs besides
them: the training noise schedule and prediction type (schedulers.py), the latent scale factor, the native image
size and the DDIM settings, plus a conversion report (`notes`). convert.py and convert_ldm.py build it; clue.py
builds CLUE on top of it.

Every SD 1.x / 2.x release trains with 1000 steps of the "scaled_linear" beta schedule from 0.00085 to 0.012
(SD_SCHEDULE) and samples with DDIM's steps_offset=1, set_alpha_to_one=False (SD_SAMPLER). The two checks run on
diffusers folders and single files alike: a U-Net with 4 input channels (text-to-image, not inpainting or the
other variants) and a text encoder as wide as the U-Net's cross-attention context.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from checkpoint import CheckpointError
from schedulers import NoiseSchedule
from text_encoder import TextConfig, TextEncoder
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

PREDICTION_TYPES = ("epsilon", "v_prediction")
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_SAMPLER = dict(steps_offset=1, set_alpha_to_one=False)  # DDIM settings of every SD 1.x / 2.x release


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

    @property
    def unet_config(self) -> UNetConfig:
        return self.unet.cfg

    @property
    def vae_config(self) -> VAEConfig:
        return self.vae.cfg

    @property
    def text_config(self) -> TextConfig:
        return self.text_encoder.cfg


def _refuse_unet_variant(in_channels: int, where: str) -> None:
    if in_channels != 4:
        kinds = {9: "an inpainting model", 8: "an instruct-pix2pix model", 7: "an x4 upscaler"}
        kind = kinds.get(in_channels, "not SD")
        raise CheckpointError(f"{where}: the U-Net takes {in_channels} input channels ({kind}); only text-to-image "
                              "SD 1.x / 2.x (4 latent channels) is supported")


def _check_context(unet_cfg: UNetConfig, text_cfg: TextConfig, where) -> None:
    if unet_cfg.context_dim != text_cfg.width:
        raise CheckpointError(f"{where}: the U-Net attends to {unet_cfg.context_dim}-wide text tokens but the text "
                              f"encoder is {text_cfg.width} wide; the parts do not belong together")
