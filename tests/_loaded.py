"""The JAX backend's ``LoadedModels`` hand-off for tests, built straight from a pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def loaded_models(model_dir: Path) -> Any:
    """float32 modules, host params, tokenizer and scheduler config of ``model_dir``, as the
    trainer's load phase hands them over (no mixed precision, no remat)."""
    from jaxbooth import diffusion
    from jaxbooth.jax_backend import pretrained
    from jaxbooth.jax_backend.loaded import LoadedModels
    from jaxbooth.jax_backend.models import clip as clip_lib
    from jaxbooth.jax_backend.models.unet import FlaxUNet2DConditionModel
    from jaxbooth.jax_backend.models.vae import FlaxAutoencoderKL
    from jaxbooth.text import load_tokenizer

    unet_config, unet_dict, unet_params = pretrained.load_pretrained(model_dir, "unet")
    text_config, text_dict, text_params = pretrained.load_pretrained(model_dir, "text_encoder")
    vae_config, _, vae_params = pretrained.load_pretrained(model_dir, "vae")
    return LoadedModels(
        model_dir=Path(model_dir), unet=FlaxUNet2DConditionModel(unet_config), unet_config_dict=unet_dict,
        unet_params=unet_params, vae=FlaxAutoencoderKL(vae_config), vae_config=vae_config, vae_params=vae_params,
        text_encoder=clip_lib.make_text_encoder(text_config), text_config_dict=text_dict, text_params=text_params,
        tokenizer=load_tokenizer(model_dir),
        scheduler_config=json.loads((Path(model_dir) / diffusion.SCHEDULER_CONFIG).read_text()),
        noise_schedule=diffusion.load_schedule(model_dir))
