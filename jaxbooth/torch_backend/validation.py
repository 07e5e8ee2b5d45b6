"""Validation images during training: sample the model being trained, save a grid, log it.

Mirrors diffusers ``log_validation``: ``num_validation_images`` images of
``validation_prompt`` with ``validation_scheduler`` (25 steps, generator seeded with the run
seed), from the in-memory models (no reload from disk). Cadence and files
(``validation/step-{N}.png`` grid, ``validation/step-{N}/{k}.png``) are the shared
``jaxbooth.validation_files``; the images also go to the tensorboard tracker. With
``pre_compute_text_embeddings`` the prompt's embeddings were computed before the text
encoder was freed and are passed to the pipeline instead of the prompt. An SDXL run samples a
``StableDiffusionXLPipeline`` of the trained UNet (and both encoders, when trained) and the frozen
parts; its precomputed inputs are
the prompt's embeds and pooled embeds and the negative ones the pipeline would have made itself
(zeros under ``force_zeros_for_empty_prompt``, else the empty prompt's). Never imports jax.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

import torch

from jaxbooth import sdxl, validation_files
from jaxbooth.validation_files import NUM_INFERENCE_STEPS, VALIDATION_DIR, image_grid

__all__ = ["NUM_INFERENCE_STEPS", "VALIDATION_DIR", "generate_images", "image_grid", "make_pipeline",
           "make_sdxl_pipeline", "save_and_log", "sdxl_prompt_inputs", "validation_scheduler"]


def validation_scheduler(name: str, config: Any) -> Any:
    """``validation_scheduler`` from the base scheduler config; a learned variance is sampled as
    fixed_small (the simplified objective trains no variance), as diffusers does."""
    kwargs = {}
    variance = config.get("variance_type") if hasattr(config, "get") else None
    if variance in ("learned", "learned_range"):
        kwargs["variance_type"] = "fixed_small"
    return getattr(importlib.import_module("diffusers"), name).from_config(config, **kwargs)


def make_pipeline(*, unet: Any, vae: Any, text_encoder: Any | None, tokenizer: Any, scheduler: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def make_sdxl_pipeline(*, unet: Any, vae: Any, text_encoders: tuple, tokenizers: tuple, scheduler: Any,
                       model_dir: Path) -> Any:
    """A ``StableDiffusionXLPipeline`` of in-memory parts (encoders may be None once freed), with the base
    pipeline's ``force_zeros_for_empty_prompt``."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=sdxl.force_zeros_for_empty_prompt(model_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sdxl_prompt_inputs(conditioner: Any, prompt: str, pipeline: Any) -> dict[str, torch.Tensor]:
    """The SDXL pipeline's four embedding keywords for ``prompt`` from a conditioner's cache (the encoders
    are freed): the negatives are what ``encode_prompt`` would make for no negative prompt."""
    embeds, pooled = conditioner.embeddings([prompt])
    if pipeline.config.force_zeros_for_empty_prompt:
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = conditioner.embeddings([""])
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled}


def generate_images(pipeline: Any, *, prompt: str, num_images: int, seed: int, device: torch.device,
                    autocast_dtype: torch.dtype | None, prompt_embeds: tuple[Any, Any] | None = None,
                    inputs: dict[str, Any] | None = None) -> list[Any]:
    """``num_images`` PIL images, one pipeline call each, from one seeded generator (as diffusers).

    The prompt reaches the pipeline as text, or as (embeds, negative embeds) ``prompt_embeds``, or as
    ``inputs``: the pipeline's prompt keywords as given (SDXL: ``sdxl_prompt_inputs``).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    if inputs is not None:
        call = dict(inputs)
    elif prompt_embeds is not None:
        call = {"prompt_embeds": prompt_embeds[0], "negative_prompt_embeds": prompt_embeds[1]}
    else:
        call = {"prompt": prompt}
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    images = []
    with autocast, torch.no_grad():
        for _ in range(num_images):
            images.append(pipeline(**call, num_inference_steps=NUM_INFERENCE_STEPS, generator=generator).images[0])
    return images


def save_and_log(images: list[Any], output_dir: Path, step: int, trackers: list[Any]) -> Path:
    """Write the grid and single PNGs and send the images to a tensorboard tracker; returns the grid's path."""
    path = validation_files.save_validation_images(images, output_dir, step)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            validation_files.log_validation_images(tracker.writer, images, step)
    return path
