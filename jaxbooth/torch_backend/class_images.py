"""Prior preservation's class images on the torch backend: generate the ones ``class_data_dir`` lacks.

Mirrors diffusers ``train_dreambooth.py``: the base pipeline, loaded at
``prior_generation_precision``, samples the shortfall from ``class_prompt`` in batches of
``sample_batch_size``, at the pipeline's default size (an SDXL pipeline, loaded the same way, samples
at its native size, as diffusers' SDXL script; the data pipeline then resizes and records the
original size for the time ids). The bookkeeping (missing indices, ``{index}-{sha1 of the pixels}.jpg``
names, per-image seeds, atomic writes, the split over processes) is the shared
``jaxbooth.class_images``; this module supplies "these prompts, these per-image seeds": one
``torch.Generator`` per image, which diffusers' pipeline draws that image's noise from alone.

DeepFloyd IF: stage I samples like SD (with ``clean_caption=False``, as every jaxbooth IF call). Stage II
upscales an image, which diffusers' script never passes (its class-image call fails); here it upscales the
images already in ``class_data_dir``, each downsized to the 64 px stage I makes (box filter, 8-bit grid:
``low_res_source``), image ``i`` from source ``i mod len(sources)`` (sorted) and its own seed. No source
images -> an error naming ``--class_data_dir`` and the fix, before the pipeline loads.
Imports torch and diffusers; never jax.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jaxbooth import class_images as shared
from jaxbooth import deepfloyd, log, sdxl
from jaxbooth import spec as spec_lib
from jaxbooth.class_images import ClassImagePlan, class_image_name, image_seed, plan_class_images
from jaxbooth.data import images as data_images
from jaxbooth.errors import JaxboothError
from jaxbooth.torch_backend.validation import IF_CALL

__all__ = ["GENERATION_DTYPES", "ClassImagePlan", "class_image_name", "generate_class_images", "generation_dtype",
           "load_generation_pipeline", "low_res_source", "plan_class_images", "plan_for_spec",
           "sample_with_image_seeds", "upscale_sampler", "upscale_sources"]

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


def sample_with_image_seeds(pipeline: Any, device: torch.device, extra: dict[str, Any] | None = None
                            ) -> shared.SampleImages:
    """``sample(prompts, seeds)`` for the shared bookkeeping: one generator per image, as diffusers'
    ``randn_tensor`` draws image k's noise from ``generator[k]`` alone. ``extra``: keywords of every call."""
    def sample(prompts: list[str], seeds: list[int]) -> list[Any]:
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        return pipeline(prompts, generator=generators, **(extra or {})).images

    return sample


def upscale_sources(spec: spec_lib.RunSpec, plan: ClassImagePlan) -> list[Path]:
    """The images stage II class images are upscaled from: the folder's images at planning time, sorted.

    Left out: files this generation writes (generated names with an index in ``plan.missing``, which another
    process may be writing now) and earlier stage II outputs (generated names at ``resolution`` px square,
    themselves upscales), so an interrupted or split generation cycles the same sources. None -> an error.
    """
    from PIL import Image

    resolution = spec.data.resolution
    sources = []
    for path in shared.existing_class_images(plan.folder, skip_bad=spec.data.skip_bad_images):
        match = shared.GENERATED_NAME.match(path.name)
        if match and int(match.group(1)) in plan.missing:
            continue
        if match:
            with Image.open(path) as image:
                if image.size == (resolution, resolution):
                    continue
        sources.append(path)
    if not sources:
        raise JaxboothError(
            f"--class_data_dir {plan.folder}: holds no images to make DeepFloyd IF stage II class images from. "
            f"Stage II upscales an image, so its class images are the folder's images downsized to "
            f"{deepfloyd.LOW_RESOLUTION} px and upscaled. Fix: first run stage I with --with_prior_preservation, the "
            "same --class_prompt and this --class_data_dir (it generates class images there), or put class photos "
            "in the folder; then set --num_class_images above their count for stage II to add its upscales")
    return sorted(sources)


def low_res_source(path: Path, resolution: int, interpolation: str = data_images.DEFAULT_INTERPOLATION) -> Any:
    """``path`` as the 64 px RGB image stage II upscales: box-downsampled and on the 8-bit grid, as training
    conditions on the low-resolution version of its crops (``deepfloyd.downsample_box`` + ``quantize_8bit``).

    A square whose side is a multiple of 64 (a stage I output, 64 px, is kept exactly) is box-downsampled as is;
    any other image is first resized and center-cropped to ``resolution`` as the training data is.
    """
    from PIL import Image

    image = data_images.decode_rgb(path)
    low = deepfloyd.LOW_RESOLUTION
    if image.width == image.height and image.width % low == 0:
        pixels, factor = np.asarray(image, np.float32) / np.float32(127.5) - 1, image.width // low
    else:
        pixels = data_images.load_image(path, resolution, center_crop=True, interpolation=interpolation)
        factor = deepfloyd.low_res_factor(resolution)
    small = deepfloyd.quantize_8bit(deepfloyd.downsample_box(pixels, factor, channel_axis=-1))
    return Image.fromarray(np.rint((small + 1) * 127.5).astype(np.uint8), "RGB")


def upscale_sampler(pipeline: Any, sources: Sequence[Path], plan: ClassImagePlan, seed: int, resolution: int,
                    device: torch.device, interpolation: str = data_images.DEFAULT_INTERPOLATION
                    ) -> shared.SampleImages:
    """``sample(prompts, seeds)`` of a stage II pipeline: image ``i`` (found from its seed ``image_seed(seed, i)``)
    upscales ``sources[i % len(sources)]`` (``low_res_source``) to ``resolution`` px, from its own generator."""
    index_of = {image_seed(seed, index): index for index in plan.mine}

    def sample(prompts: list[str], seeds: list[int]) -> list[Any]:
        low = [low_res_source(sources[index_of[s] % len(sources)], resolution, interpolation) for s in seeds]
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        return pipeline(prompts, image=low, generator=generators, height=resolution, width=resolution,
                        **IF_CALL).images

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
    stage = deepfloyd.stage(model_dir)
    sources = upscale_sources(spec, plan) if stage == 2 else []  # refused here, before any pipeline loads
    dtype = generation_dtype(prior.prior_generation_precision, device)
    if process_index == 0:
        log.info(shared.describe(plan, prior.num_class_images, prior.class_prompt)
                 + f" in {str(dtype).removeprefix('torch.')}"
                 + (f", upscaling {len(sources)} source image(s) of {plan.folder}" if sources else ""))
    if not plan.mine:
        return []
    pipeline = load_generation_pipeline(model_dir, dtype, device, spec.model.variant)
    if stage == 2:
        sample = upscale_sampler(pipeline, sources, plan, seed, spec.data.resolution, device,
                                 spec.data.image_interpolation_mode)
    else:
        sample = sample_with_image_seeds(pipeline, device, IF_CALL if stage == 1 else None)
    del pipeline  # the sampler holds it; freed with it below
    written = shared.generate_class_images(plan, sample, prompt=prior.class_prompt,
                                           batch_size=prior.sample_batch_size, seed=seed)
    del sample  # and the pipeline with it
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return written
