"""The typed hand-off of a JAX run: every model, tokenizer and config, loaded once.

``train.load_models`` fills it once; training, validation and class-image generation read
from it instead of loading the pipeline again (or popping keys from a dict).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxbooth import diffusion


@dataclasses.dataclass
class LoadedModels:
    """Modules (flax, stateless), host params, diffusers configs and the tokenizer(s) of one pipeline.

    ``vae_params`` become None once latents are cached and validation keeps its own host copy;
    ``unet_params`` / ``text_params`` are the base weights (training moves them into the state, or
    with LoRA into the step's ``frozen["base"]``). SDXL pipelines also fill the ``*_2`` fields
    (``text_encoder_2``: CLIP with projection, and ``tokenizer_2``); they stay None for SD.
    """

    model_dir: Path
    unet: Any
    unet_config_dict: dict
    unet_params: Any
    vae: Any
    vae_config: Any
    vae_params: Any
    text_encoder: Any
    text_config_dict: dict
    text_params: Any
    tokenizer: Any
    scheduler_config: dict
    noise_schedule: diffusion.NoiseSchedule
    vae_dir: Path | None = None  # the VAE override's folder, when the spec names one
    text_encoder_2: Any = None
    text_config_dict_2: dict | None = None
    text_params_2: Any = None
    tokenizer_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        """Whether this is an SDXL pipeline (two text encoders, ``text_time`` added conditioning)."""
        return self.text_encoder_2 is not None
