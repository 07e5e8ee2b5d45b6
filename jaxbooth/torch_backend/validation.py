"""Validation images during training: sample the model being trained, save a grid, log it.

Mirrors diffusers ``log_validation``: ``num_validation_images`` images of
``validation_prompt`` with ``validation_scheduler`` (25 steps, generator seeded with the run
seed), from the in-memory models (no reload from disk). Cadence and files
(``validation/step-{N}.png`` grid, ``validation/step-{N}/{k}.png``) are the shared
``jaxbooth.validation_files``; the images also go to the tensorboard tracker. With
``pre_compute_text_embeddings`` the prompt's embeddings were computed before the text
encoder was freed and are passed to the pipeline instead of the prompt. Never imports jax.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

import torch

from jaxbooth import validation_files
from jaxbooth.validation_files import NUM_INFERENCE_STEPS, VALIDATION_DIR, image_grid

__all__ = ["NUM_INFERENCE_STEPS", "VALIDATION_DIR", "generate_images", "image_grid", "make_pipeline",
           "save_and_log", "validation_scheduler"]


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


def generate_images(pipeline: Any, *, prompt: str, num_images: int, seed: int, device: torch.device,
                    autocast_dtype: torch.dtype | None, prompt_embeds: tuple[Any, Any] | None = None) -> list[Any]:
    """``num_images`` PIL images, one pipeline call each, from one seeded generator (as diffusers)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    call = ({"prompt_embeds": prompt_embeds[0], "negative_prompt_embeds": prompt_embeds[1]}
            if prompt_embeds is not None else {"prompt": prompt})
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
