"""Prior-preservation class images on the JAX backend: top up `class_data_dir` with the JAX sampler.

The bookkeeping (which indices are missing, file names `{index}-{sha1 of the pixels}.jpg`,
per-image seeds, atomic writes, the split over processes) is `jaxbooth.class_images`, shared
with the torch backend; this module only supplies the sampler: "these prompts, these per-image
seeds" -> PIL images, from the run's already loaded models (`LoadedModels`) or, alone, from
the pipeline folder.

Image k's noise comes from its own seed: `StableDiffusionSampler.generate(prompts, seed=seeds)`
draws example k from `fold_in(key(seeds[k]), 0)`, the noise of a batch of one with that seed, so
one sampler call makes a whole batch (`sample_batch_size` per local device) and the images still
do not depend on the batch size (see `sample_with_image_seeds`). An SDXL pipeline samples as
`StableDiffusionXLPipeline(class_prompt)`: both text encoders, its native size, guidance 5.0.

Differences from diffusers: with `LoadedModels` the images are decoded with the run's VAE (the
`pretrained_vae_name_or_path` override when given; diffusers' script loads the base pipeline
again, base VAE included). Multi-host: every process computes the same plan and writes only
its share; the folder must be on a filesystem every process sees. Never imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxbooth import class_images as shared
from jaxbooth import log as jaxbooth_log
from jaxbooth import sdxl
from jaxbooth.class_images import existing_class_images, missing_indices, write_class_image
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import mesh as mesh_lib
from jaxbooth.jax_backend import pretrained
from jaxbooth.jax_backend.loaded import LoadedModels
from jaxbooth.jax_backend.schedulers import canonical_sampler_name

__all__ = ["ensure_class_images", "existing_class_images", "generation_dtype", "load_generation_sampler",
           "missing_indices", "sample_with_image_seeds", "sampler_from_loaded", "write_class_image"]

DEFAULT_NUM_INFERENCE_STEPS = 50  # StableDiffusionPipeline.__call__'s default, which diffusers' script uses
DEFAULT_GUIDANCE_SCALE = 7.5  # likewise
SDXL_GUIDANCE_SCALE = 5.0  # StableDiffusionXLPipeline.__call__'s, which diffusers' SDXL script uses
FALLBACK_SAMPLER = "DPMSolverMultistepScheduler"
_PRECISIONS = {"no": jnp.float32, "fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}


def generation_dtype(precision: str | None, platform: str | None = None) -> Any:
    """The compute/param dtype for `prior_generation_precision`; None follows diffusers
    (fp16 on a GPU, fp32 elsewhere, TPU included)."""
    if precision is None:
        platform = platform or jax.devices()[0].platform
        return jnp.float16 if platform == "gpu" else jnp.float32
    if precision not in _PRECISIONS:
        raise JaxboothError(f"prior_generation_precision={precision!r} is not one of {sorted(_PRECISIONS)}")
    return _PRECISIONS[precision]


def default_sampler_name(scheduler_config: dict) -> str:
    """The pipeline's own scheduler when we have it as a JAX sampler (SD 1.5: PNDM; DDPM), as diffusers
    samples class images with `pipeline.scheduler`; else DPM-Solver++ (e.g. an LCM config)."""
    name = scheduler_config.get("_class_name", "")
    try:
        canonical_sampler_name(name)
    except JaxboothError:
        return FALLBACK_SAMPLER
    return name


def load_generation_sampler(model_dir: Path, *, dtype: Any, sampler_name: str | None = None,
                            variant: str | None = None, mesh: Any = None) -> Any:
    """A `StableDiffusionSampler` over the base pipeline with UNet and text encoder(s) in `dtype`.

    The VAE stays float32 (diffusers' `force_upcast`: SD VAEs overflow in fp16).
    """
    from jaxbooth.jax_backend.generate import read_scheduler_config, sampler_from_models
    from jaxbooth.jax_backend.models import clip as clip_lib
    from jaxbooth.jax_backend.models.unet import FlaxUNet2DConditionModel
    from jaxbooth.text import load_tokenizer

    unet_config, _, unet_params = pretrained.load_pretrained(model_dir, "unet", variant=variant, dtype=dtype)
    text_config, _, text_params = pretrained.load_pretrained(model_dir, "text_encoder", variant=variant, dtype=dtype)
    vae_config, _, vae_params = pretrained.load_pretrained(model_dir, "vae", variant=variant, dtype=jnp.float32)
    scheduler_config = read_scheduler_config(model_dir)
    extra: dict[str, Any] = {}
    if sdxl.is_sdxl_pipeline(model_dir):
        config_2, _, params_2 = pretrained.load_pretrained(model_dir, "text_encoder_2", variant=variant, dtype=dtype)
        text_params = (text_params, params_2)
        extra = dict(tokenizer_2=load_tokenizer(model_dir, subfolder="tokenizer_2"), text_encoder_2=clip_lib.
                     make_text_encoder(config_2, with_projection=config_2.has_projection, dtype=dtype))
    return sampler_from_models(
        model_dir=model_dir, tokenizer=load_tokenizer(model_dir),
        unet=FlaxUNet2DConditionModel(unet_config, dtype=dtype), unet_params=unet_params,
        text_encoder=clip_lib.make_text_encoder(text_config, dtype=dtype), text_params=text_params,
        vae_config=vae_config, vae_params=vae_params, scheduler_config=scheduler_config,
        sampler_name=sampler_name or default_sampler_name(scheduler_config), mesh=mesh, **extra)


def local_mesh(mesh: Any) -> Any:
    """The mesh to sample on: the given one (it must hold only this process's devices, since
    each process samples its own prompts), or one over the local devices when there are several."""
    if mesh is not None:
        foreign = [d for d in mesh.devices.flat if d.process_index != jax.process_index()]
        if foreign:
            raise JaxboothError(f"class-image generation got a mesh with {len(foreign)} devices of other processes; "
                                "each process samples its own images, so pass a mesh over jax.local_devices()")
        return mesh
    if jax.local_device_count() > 1:
        return mesh_lib.make_mesh((jax.local_device_count(), 1), jax.local_devices())
    return None


def _barrier(name: str) -> None:
    """Wait for every process (multi-host runs), so no process scans while another writes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _in_dtype(params: Any, dtype: Any) -> Any:
    """Floating leaves cast to ``dtype``; leaves already in it are kept (no copy)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype
                        else x, params)


def sampler_from_loaded(models: LoadedModels, *, dtype: Any, sampler_name: str | None = None,
                        mesh: Any = None) -> Any:
    """A `StableDiffusionSampler` over the run's loaded models, UNet and text encoder in `dtype`
    (as diffusers loads the class-image pipeline in `prior_generation_precision`).

    The modules are the run's with only dtype and remat changed (same attention kernel); the
    VAE stays float32 (diffusers' `force_upcast`). Nothing is read from disk: the scheduler
    config is the models' too.
    """
    from jaxbooth.jax_backend.generate import sampler_from_models

    if models.vae_params is None:
        raise ValueError("class images need LoadedModels.vae_params; generate them before the VAE params are dropped")
    for_sampling = {"dtype": dtype, "gradient_checkpointing": False}
    text_params, extra = _in_dtype(models.text_params, dtype), {}
    if models.is_sdxl:
        text_params = (text_params, _in_dtype(models.text_params_2, dtype))
        extra = dict(tokenizer_2=models.tokenizer_2, text_encoder_2=models.text_encoder_2.clone(**for_sampling))
    return sampler_from_models(
        model_dir=Path(models.model_dir), tokenizer=models.tokenizer, unet=models.unet.clone(**for_sampling),
        unet_params=_in_dtype(models.unet_params, dtype), text_encoder=models.text_encoder.clone(**for_sampling),
        text_params=text_params, vae_config=models.vae_config,
        vae_params=_in_dtype(models.vae_params, jnp.float32),
        sampler_name=sampler_name or default_sampler_name(models.scheduler_config), mesh=mesh,
        scheduler_config=models.scheduler_config, **extra)


def sample_with_image_seeds(sampler: Any, *, num_inference_steps: int, guidance_scale: float,
                            negative_prompt: str | None = None, height: int | None = None,
                            width: int | None = None, batch_size: int | None = None) -> shared.SampleImages:
    """The `sample(prompts, seeds)` the shared bookkeeping calls: image k drawn from `seeds[k]` alone.

    One `sampler.generate` call per `sample` call, with the per-image seeds. `batch_size`: pad
    shorter calls (the last batch) to it by repeating the last prompt and seed, so every call
    reuses one compiled loop; the padding's images are dropped.
    """
    def sample(prompts: list[str], seeds: list[int]) -> list[Any]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        pad = max(0, (batch_size or 0) - len(prompts))
        images = sampler.generate(prompts + prompts[-1:] * pad, negative_prompt=negative_prompt,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  seed=seeds + seeds[-1:] * pad, height=height, width=width)
        return list(images[: len(prompts)])

    return sample


def ensure_class_images(model_dir: str | Path | None, class_data_dir: str | Path, class_prompt: str,
                        num_class_images: int, *, sample_batch_size: int = 4, precision: str | None = None,
                        seed: int = 0, mesh: Any = None, process_index: int | None = None,
                        process_count: int | None = None, num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
                        guidance_scale: float | None = None, sampler_name: str | None = None,
                        negative_prompt: str | None = None, variant: str | None = None,
                        skip_bad: bool = False, height: int | None = None, width: int | None = None,
                        sampler: Any = None, models: LoadedModels | None = None) -> int:
    """Top `class_data_dir` up to `num_class_images` images; returns how many THIS process wrote.

    When the folder already has enough images, returns 0 without building a sampler. Otherwise
    samples `class_prompt` with the run's loaded `models` (`sampler_from_loaded`), or, without
    them, loads the pipeline at `model_dir` (`load_generation_sampler`), `sample_batch_size`
    images per device per progress step (the shared module docstring: names, seeds, resume,
    split). Sizes default to the pipeline's (unet sample_size x VAE scale), and `guidance_scale` to
    its pipeline's (`pipeline_guidance_scale`), as diffusers' pipeline call does.

    Every process of a multi-host run must call this (there are barriers); `process_index` /
    `process_count` default to JAX's and exist so tests can play several hosts in one process.
    `sampler`: an already built `StableDiffusionSampler` (then `precision`, `sampler_name`,
    `variant`, `mesh` and `models` are unused): tests reuse one compiled sampler across calls.
    """
    if not class_prompt:
        raise JaxboothError("with_prior_preservation needs class_prompt (--class_prompt), e.g. 'a photo of dog'")
    if sample_batch_size < 1:
        raise JaxboothError(f"sample_batch_size={sample_batch_size} must be at least 1")
    rank = jax.process_index() if process_index is None else process_index
    world = jax.process_count() if process_count is None else process_count
    if not 0 <= rank < world:
        raise JaxboothError(f"process_index={rank} must be in [0, process_count={world})")
    plan = shared.plan_class_images(class_data_dir, num_class_images, process_index=rank, process_count=world,
                                    skip_bad=skip_bad)
    _barrier("jaxbooth_class_images_counted")
    if not plan.missing:
        return 0
    if rank == 0:
        jaxbooth_log.info(shared.describe(plan, num_class_images, class_prompt))
    written = []
    if plan.mine:
        if sampler is None:
            dtype, where = generation_dtype(precision), local_mesh(mesh)
            sampler = (sampler_from_loaded(models, dtype=dtype, sampler_name=sampler_name, mesh=where)
                       if models is not None else
                       load_generation_sampler(Path(model_dir), dtype=dtype, sampler_name=sampler_name,
                                               variant=variant, mesh=where))
        batch_size = sample_batch_size * _batch_shards(sampler.mesh)
        if guidance_scale is None:
            guidance_scale = pipeline_guidance_scale(sampler)
        sample = sample_with_image_seeds(sampler, num_inference_steps=num_inference_steps,
                                         guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                         height=height, width=width, batch_size=batch_size)
        written = shared.generate_class_images(plan, sample, prompt=class_prompt, batch_size=batch_size, seed=seed)
    _barrier("jaxbooth_class_images_written")
    return len(written)


def pipeline_guidance_scale(sampler: Any) -> float:
    """The sampled pipeline's default guidance: StableDiffusionXLPipeline's 5.0 (a sampler with SDXL's size
    conditioning), else StableDiffusionPipeline's 7.5."""
    return SDXL_GUIDANCE_SCALE if getattr(sampler, "size_conditioning", False) else DEFAULT_GUIDANCE_SCALE


def _batch_shards(mesh: Any) -> int:
    return math.prod(mesh.shape[a] for a in mesh_lib.BATCH_AXES if a in mesh.axis_names) if mesh else 1
