"""Prior preservation's class images on the torch backend: generate the ones ``class_data_dir`` lacks.

Mirrors diffusers ``train_dreambooth.py``: the base pipeline, loaded at
``prior_generation_precision``, samples the shortfall from ``class_prompt`` in batches of
``sample_batch_size``, at the pipeline's default size (an SDXL pipeline, loaded the same way, samples
at its native size, as diffusers' SDXL script; the data pipeline then resizes and records the
original size for the time ids). The bookkeeping (missing indices, ``{index}-{sha1 of the pixels}.jpg``
names, per-image seeds, atomic writes, the split over processes) is the shared
``jaxbooth.class_images``; this module supplies "these prompts, these per-image seeds": one
``torch.Generator`` per image, which diffusers' pipeline draws that image's noise from alone.
Imports torch and diffusers; never jax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from jaxbooth import class_images as shared
from jaxbooth import log, sdxl
from jaxbooth import spec as spec_lib
from jaxbooth.class_images import ClassImagePlan, class_image_name, plan_class_images

__all__ = ["GENERATION_DTYPES", "ClassImagePlan", "class_image_name", "generate_class_images", "generation_dtype",
           "load_generation_pipeline", "plan_class_images", "plan_for_spec", "sample_with_image_seeds"]

GENERATION_DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def generation_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """``prior_generation_precision``, or fp16 on CUDA and fp32 elsewhere when unset (as diffusers)."""
    if precision is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return GENERATION_DTYPES[precision]


def load_generation_pipeline(model_dir: Path, dtype: torch.dtype, device: torch.device, variant: str | None) -> Any:
    from diffusers import DiffusionPipeline

    from jaxbooth.torch_backend.models import dtype_kwargs, quiet_library_output

    quiet_library_output()
    kwargs: dict[str, Any] = {"variant": variant} if variant else {}
    if not sdxl.is_sdxl_pipeline(model_dir):  # SDXL has no safety checker to turn off
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipeline = DiffusionPipeline.from_pretrained(model_dir, **dtype_kwargs(dtype), **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def sample_with_image_seeds(pipeline: Any, device: torch.device) -> shared.SampleImages:
    """``sample(prompts, seeds)`` for the shared bookkeeping: one generator per image, as diffusers'
    ``randn_tensor`` draws image k's noise from ``generator[k]`` alone."""
    def sample(prompts: list[str], seeds: list[int]) -> list[Any]:
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        return pipeline(prompts, generator=generators).images

    return sample


def plan_for_spec(spec: spec_lib.RunSpec, *, process_index: int = 0, num_processes: int = 1) -> ClassImagePlan:
    """The shared plan for this run's class folder; every process computes it before any writes."""
    prior = spec.prior
    return plan_class_images(prior.class_data_dir, prior.num_class_images, process_index=process_index,
                             process_count=num_processes, skip_bad=spec.data.skip_bad_images)


def generate_class_images(spec: spec_lib.RunSpec, model_dir: Path, *, device: torch.device, seed: int,
                          process_index: int = 0, num_processes: int = 1,
                          plan: ClassImagePlan | None = None) -> list[Path]:
    """Fill ``class_data_dir`` up to ``num_class_images``; returns the files this process wrote.

    ``plan``: made by every process before any of them writes (made here when None: one
    process). The caller synchronises processes afterwards. Loads the pipeline only when this
    process has images to make.
    """
    prior = spec.prior
    if plan is None:
        plan = plan_for_spec(spec, process_index=process_index, num_processes=num_processes)
    if not plan.missing:
        return []
    dtype = generation_dtype(prior.prior_generation_precision, device)
    if process_index == 0:
        log.info(shared.describe(plan, prior.num_class_images, prior.class_prompt)
                 + f" in {str(dtype).removeprefix('torch.')}")
    if not plan.mine:
        return []
    sample = sample_with_image_seeds(load_generation_pipeline(model_dir, dtype, device, spec.model.variant), device)
    written = shared.generate_class_images(plan, sample, prompt=prior.class_prompt,
                                           batch_size=prior.sample_batch_size, seed=seed)
    del sample  # and the pipeline with it
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return written
