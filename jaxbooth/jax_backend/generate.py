"""`jaxbooth generate`: a diffusers SD pipeline folder, or a LoRA on its base -> PNG files, on the Flax models.

Works on any SD 1.x/2.x or SDXL pipeline folder in the PyTorch (safetensors) or old Flax
(msgpack) layout, including what `jaxbooth train` writes; a LoRA output folder or LoRA
file is merged into its base first (:mod:`jaxbooth.jax_backend.lora_loading`). An SDXL
pipeline samples as diffusers' `StableDiffusionXLPipeline` (see `sample.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxbooth import sdxl, validation_files
from jaxbooth.diffusion import read_scheduler_config
from jaxbooth.jax_backend import pretrained
from jaxbooth.jax_backend.models import clip as clip_lib
from jaxbooth.jax_backend.models.unet import FlaxUNet2DConditionModel
from jaxbooth.jax_backend.models.vae import FlaxAutoencoderKL
from jaxbooth.jax_backend.sample import StableDiffusionSampler, make_pipeline_sampler
from jaxbooth.text import load_tokenizer


def vae_scale_factor(vae_config: Any) -> int:
    """Pixels per latent, as diffusers' pipelines derive it from the VAE's block count."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def sdxl_sampling_options(model_dir: Path, vae_config: Any) -> dict[str, Any]:
    """What an SDXL sampler takes from the pipeline beyond the models: the empty-negative rule and the VAE's
    latents_mean/std (None without them)."""
    statistics = sdxl.latent_statistics(getattr(vae_config, "latents_mean", None),
                                        getattr(vae_config, "latents_std", None), int(vae_config.latent_channels),
                                        "vae/config.json")
    return {"force_zeros_for_empty_prompt": sdxl.force_zeros_for_empty_prompt(model_dir),
            "latent_statistics": statistics}


def sampler_from_models(*, model_dir: Path, tokenizer: Any, unet: FlaxUNet2DConditionModel, unet_params: Any,
                        text_encoder: Any, text_params: Any, vae_config: Any, vae_params: Any,
                        sampler_name: str, use_attention_mask: bool = False, mesh=None,
                        scheduler_config: dict | None = None, tokenizer_2: Any = None,
                        text_encoder_2: Any = None) -> StableDiffusionSampler:
    """Bind loaded (or in-training) models into a sampler; shared by `generate`, validation and
    class images. `scheduler_config`: the one already in hand (a run's `LoadedModels`, validation's
    adjusted copy); None reads `model_dir`'s scheduler/scheduler_config.json. SDXL: also
    `tokenizer_2` and `text_encoder_2`, and `text_params` = (params_1, params_2) (None: given per call)."""
    scale = vae_scale_factor(vae_config)
    if scheduler_config is None:
        scheduler_config = read_scheduler_config(model_dir)
    extra = {}
    if text_encoder_2 is not None:
        extra = dict(tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
                     **sdxl_sampling_options(model_dir, vae_config))
    return make_pipeline_sampler(
        tokenizer=tokenizer, text_encoder=text_encoder, text_params=text_params, unet=unet, unet_params=unet_params,
        vae=FlaxAutoencoderKL(vae_config), vae_params=vae_params, scheduler_config=scheduler_config,
        sampler_name=sampler_name, scaling_factor=float(vae_config.scaling_factor), vae_scale_factor=scale,
        latent_channels=int(vae_config.latent_channels), default_size=int(unet.config.sample_size) * scale,
        use_attention_mask=use_attention_mask, mesh=mesh, **extra)


def load_pipeline_sampler(model_dir: Path, *, sampler_name: str, variant: str | None = None,
                          mesh=None, load: Callable[..., tuple[Any, dict, dict]] | None = None
                          ) -> StableDiffusionSampler:
    """Load tokenizer(s), text encoder(s), UNet and VAE of a pipeline folder into a sampler (fp32).
    ``load``: how one component loads (``pretrained.load_pretrained``'s signature; default it)."""
    load = pretrained.load_pretrained if load is None else load
    unet_config, _, unet_params = load(model_dir, "unet", variant=variant, dtype=jnp.float32)
    text_config, _, text_params = load(model_dir, "text_encoder", variant=variant, dtype=jnp.float32)
    vae_config, _, vae_params = load(model_dir, "vae", variant=variant, dtype=jnp.float32)
    extra: dict[str, Any] = {}
    if sdxl.is_sdxl_pipeline(model_dir):
        config_2, _, params_2 = load(model_dir, "text_encoder_2", variant=variant, dtype=jnp.float32)
        text_params = (text_params, params_2)
        extra = dict(tokenizer_2=load_tokenizer(model_dir, subfolder="tokenizer_2"),
                     text_encoder_2=clip_lib.make_text_encoder(config_2, with_projection=config_2.has_projection))
    return sampler_from_models(
        model_dir=model_dir, tokenizer=load_tokenizer(model_dir), unet=FlaxUNet2DConditionModel(unet_config),
        unet_params=unet_params, text_encoder=clip_lib.make_text_encoder(text_config), text_params=text_params,
        vae_config=vae_config, vae_params=vae_params, sampler_name=sampler_name, mesh=mesh, **extra)


def generate_to_dir(model_dir: str, prompt: str, *, num_images: int, steps: int, guidance_scale: float | None,
                    negative_prompt: str | None, scheduler: str, seed: int, resolution: int | None,
                    out_dir: str, pretrained_model_name_or_path: str | None = None,
                    lora_scale: float | None = None) -> list[Path]:
    """Sample ``num_images`` images of ``prompt`` and write them as PNG files; returns their paths.

    ``model_dir``: a pipeline folder or Hub id, or a LoRA output folder / LoRA file, merged into
    its base (``pretrained_model_name_or_path``, else the one its folder records) at ``lora_scale``
    (None: 1.0, diffusers' default scale). ``guidance_scale`` None: the pipeline's default (SDXL 5.0, SD 7.5)."""
    from jaxbooth.jax_backend.class_images import pipeline_guidance_scale
    from jaxbooth.jax_backend.lora_loading import generate_source

    source = generate_source(model_dir, base=pretrained_model_name_or_path, lora_scale=lora_scale)
    sampler = load_pipeline_sampler(source.model_dir, sampler_name=scheduler, variant=source.variant,
                                    load=source.load)
    if guidance_scale is None:
        guidance_scale = pipeline_guidance_scale(sampler)
    images = sampler.generate([prompt] * num_images, negative_prompt=negative_prompt, num_inference_steps=steps,
                              guidance_scale=guidance_scale, seed=seed, height=resolution, width=resolution)
    return validation_files.save_samples(images, out_dir, seed)
