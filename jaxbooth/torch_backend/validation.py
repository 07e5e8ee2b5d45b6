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
(zeros under ``force_zeros_for_empty_prompt``, else the empty prompt's). A DeepFloyd IF run samples an
``IFPipeline`` (stage I) or ``IFSuperResolutionPipeline`` (stage II: one call per ``validation_images`` file,
which it upscales, as diffusers) of the trained UNet, with ``clean_caption=False`` (``IF_CALL``) so no caption
cleaning (bs4/ftfy) alters the prompt. Never imports jax.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from jaxbooth import deepfloyd, sample_prompts, sdxl, validation_files
from jaxbooth.validation_files import NUM_INFERENCE_STEPS, VALIDATION_DIR, image_grid

__all__ = ["IF_CALL", "NUM_INFERENCE_STEPS", "VALIDATION_DIR", "generate_images", "if_calls", "image_grid",
           "make_if_pipeline", "make_pipeline", "make_sdxl_pipeline", "sample_prompt_images", "save_and_log",
           "save_and_log_samples", "sdxl_prompt_inputs", "validation_scheduler"]

IF_CALL = {"clean_caption": False}
"""Extra keywords of every jaxbooth call of an IF pipeline (``generate_images(extra=IF_CALL)``): sample the
prompt as trained; diffusers' training never cleans captions (the pipeline still lower-cases them)."""


def validation_scheduler(name: str, config: Any) -> Any:
    """``validation_scheduler`` from the base scheduler config; a learned variance is sampled as
    fixed_small (the simplified objective trains no variance), as diffusers does
    (``deepfloyd.fixed_variance_config``, the rule saved pipelines get too)."""
    if hasattr(config, "get"):
        config = deepfloyd.fixed_variance_config(config)
    return getattr(importlib.import_module("diffusers"), name).from_config(config)


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


def make_if_pipeline(*, stage: int, unet: Any, text_encoder: Any | None, tokenizer: Any, scheduler: Any,
                     model_dir: Path) -> Any:
    """A DeepFloyd IF pipeline of in-memory parts: ``IFPipeline`` for stage 1, ``IFSuperResolutionPipeline`` for
    stage 2 (with the base's ``image_noising_scheduler``, which noises the image it upscales). No safety checker
    or watermarker: validation images are training diagnostics, as the SD pipeline's have no safety checker.
    ``text_encoder`` may be None once freed (prompt embeddings are passed instead)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
                 feature_extractor=None, watermarker=None, requires_safety_checker=False)
    if stage == 1:
        pipeline = IFPipeline(**parts)
    elif stage == 2:
        noising = DDPMScheduler.from_pretrained(model_dir, subfolder=deepfloyd.NOISING_SCHEDULER)
        pipeline = IFSuperResolutionPipeline(image_noising_scheduler=noising, **parts)
    else:
        raise ValueError(f"DeepFloyd IF has stages 1 and 2, got {stage!r}")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def if_calls(spec: Any, stage: int) -> list[dict[str, Any]] | None:
    """The per-call inputs of an IF validation: stage II upscales each ``validation_images`` file once (one
    image per file, ``num_validation_images`` unused, as diffusers); None for stage I (``num_validation_images``
    calls of the prompt alone). The files were checked before the run (``deepfloyd.option_problems``)."""
    if stage != 2:
        return None
    from PIL import Image

    calls = []
    for path in spec.validation.validation_images or ():
        with Image.open(path) as image:
            calls.append({"image": image.convert("RGB")})  # the pipeline reads 3 channels (np.array(pil))
    return calls


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
                    inputs: dict[str, Any] | None = None, per_call: Sequence[dict[str, Any]] | None = None,
                    extra: dict[str, Any] | None = None) -> list[Any]:
    """``num_images`` PIL images, one pipeline call each, from one seeded generator (as diffusers).

    The prompt reaches the pipeline as text, or as (embeds, negative embeds) ``prompt_embeds``, or as
    ``inputs``: the pipeline's prompt keywords as given (SDXL: ``sdxl_prompt_inputs``). ``per_call``: one
    call per entry, with that entry's keywords added (IF stage II: ``if_calls``), instead of ``num_images``
    calls; ``extra``: keywords every call gets (IF: ``IF_CALL``).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    if inputs is not None:
        call = dict(inputs)
    elif prompt_embeds is not None:
        call = {"prompt_embeds": prompt_embeds[0], "negative_prompt_embeds": prompt_embeds[1]}
    else:
        call = {"prompt": prompt}
    call.update(extra or {})
    calls = [dict(call, **entry) for entry in per_call] if per_call is not None else [call] * num_images
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    images = []
    with autocast, torch.no_grad():
        for kwargs in calls:
            images.append(pipeline(**kwargs, num_inference_steps=NUM_INFERENCE_STEPS, generator=generator).images[0])
    return images


def save_and_log(images: list[Any], output_dir: Path, step: int, trackers: list[Any]) -> Path:
    """Write the grid and single PNGs and send the images to the trackers (tensorboard, wandb: as diffusers'
    scripts log them); returns the grid's path."""
    path = validation_files.save_validation_images(images, output_dir, step)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            validation_files.log_validation_images(tracker.writer, images, step)
        elif tracker.name == "wandb":
            tracker.log_images({"validation": images}, step=step)
    return path


def sample_prompt_images(pipeline: Any, prompts: Sequence[sample_prompts.SamplePrompt], *,
                         scheduler: Callable[[str | None], Any], device: torch.device,
                         autocast_dtype: torch.dtype | None,
                         prompt_inputs: Callable[[sample_prompts.SamplePrompt], dict[str, Any]] | None = None) -> list:
    """One PIL image per sample prompt (``--sample_prompts``), each with its own size, steps, guidance, negative
    prompt and sampler (``scheduler(name)``: the pipeline scheduler for a ``--ss`` class name, or for None the
    run's), from a generator seeded with its seed (the same seed and settings give the same image).
    ``prompt_inputs``: the pipeline's prompt keywords of a prompt when its text cannot be encoded here
    (precomputed embeddings), else the prompt and negative go in as text."""
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    images = []
    with autocast, torch.no_grad():
        for p in prompts:
            pipeline.scheduler = scheduler(p.sampler)
            text = (prompt_inputs(p) if prompt_inputs is not None
                    else {"prompt": p.prompt, "negative_prompt": p.negative})
            generator = torch.Generator(device=device).manual_seed(p.seed)
            images.append(pipeline(**text, height=p.height, width=p.width, num_inference_steps=p.steps,
                                   guidance_scale=p.guidance, generator=generator).images[0])
    return images


def save_and_log_samples(images: list[Any], output_dir: Path, step: int, trackers: list[Any]) -> Path:
    """``sample_prompts.save_samples`` (grid and one file per prompt), and the grid to tensorboard, the
    images to wandb; returns the grid's path."""
    path = sample_prompts.save_samples(images, output_dir, step)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            from PIL import Image

            with Image.open(path) as grid:
                sample_prompts.log_samples(tracker.writer, grid, step)
        elif tracker.name == "wandb":
            tracker.log_images({sample_prompts.TENSORBOARD_TAG: images}, step=step)
    return path
