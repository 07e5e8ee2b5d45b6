"""Prior preservation's class images: generate the ones ``class_data_dir`` lacks, before training.

Mirrors diffusers ``train_dreambooth.py``: when the folder holds fewer than
``num_class_images`` images, the base pipeline samples the shortfall from ``class_prompt`` in
batches of ``sample_batch_size`` at ``prior_generation_precision``, and each image is saved
as ``{index}-{sha1 of its pixels}.jpg``. Each file is written as soon as it is made (through a
hidden temporary name, so a kill never leaves half a JPEG), so an interrupted generation
resumes where it stopped. Processes split the work. Imports torch and diffusers; never jax.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

from jaxbooth import data
from jaxbooth import spec as spec_lib

GENERATION_DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _log(message: str) -> None:
    print(f"[jaxbooth] {message}", file=sys.stderr, flush=True)


def count_class_images(folder: Path, *, skip_bad: bool) -> int:
    """Usable images in ``folder`` (0 when it is missing or empty); bad files are an error naming them."""
    if not folder.is_dir() or not any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir()):
        return 0
    return len(data.scan_image_folder(folder, skip_bad=skip_bad, role="class"))


def generation_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """``prior_generation_precision``, or fp16 on CUDA and fp32 elsewhere when unset (as diffusers)."""
    if precision is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return GENERATION_DTYPES[precision]


def class_image_name(index: int, image: Any) -> str:
    """diffusers' file name: the running index and the sha1 of the decoded pixels."""
    return f"{index}-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg"


def save_image_atomic(image: Any, folder: Path, name: str) -> Path:
    tmp = folder / f".{name}.tmp{os.getpid()}"
    image.save(tmp, format="JPEG")
    os.replace(tmp, folder / name)
    return folder / name


def my_indices(count: int, process_index: int, num_processes: int) -> list[int]:
    """The image indices (0-based among the missing ones) this process generates."""
    return list(range(process_index, count, num_processes))


def load_generation_pipeline(model_dir: Path, dtype: torch.dtype, device: torch.device, variant: str | None) -> Any:
    from diffusers import DiffusionPipeline

    from jaxbooth.torch_backend.models import dtype_kwargs

    kwargs = {"variant": variant} if variant else {}
    pipeline = DiffusionPipeline.from_pretrained(model_dir, **dtype_kwargs(dtype), safety_checker=None,
                                                 requires_safety_checker=False, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def generate_class_images(spec: spec_lib.RunSpec, model_dir: Path, *, device: torch.device, seed: int,
                          process_index: int = 0, num_processes: int = 1, have: int | None = None) -> list[Path]:
    """Fill ``class_data_dir`` up to ``num_class_images``; returns the files this process wrote.

    ``have``: the images already there, counted by every process before any of them writes
    (counted here when None: one process). The caller synchronises processes afterwards.
    Image ``i`` of the folder is drawn with a generator seeded from (seed, i), so the set does
    not depend on the batch size, the process count or an interruption.
    """
    prior = spec.prior
    folder = Path(prior.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if have is None:
        have = count_class_images(folder, skip_bad=spec.data.skip_bad_images)
    missing = prior.num_class_images - have
    if missing <= 0:
        return []
    dtype = generation_dtype(prior.prior_generation_precision, device)
    if process_index == 0:
        _log(f"generating {missing} class images into {folder} ({have} there, num_class_images="
             f"{prior.num_class_images}) with {prior.class_prompt!r} in {str(dtype).removeprefix('torch.')}")
    indices = my_indices(missing, process_index, num_processes)
    if not indices:
        return []
    pipeline = load_generation_pipeline(model_dir, dtype, device, spec.model.variant)
    written = []
    for start in range(0, len(indices), prior.sample_batch_size):
        batch = indices[start:start + prior.sample_batch_size]
        generators = [torch.Generator(device=device).manual_seed(seed * 100_003 + have + i) for i in batch]
        images = pipeline([prior.class_prompt] * len(batch), generator=generators).images
        for i, image in zip(batch, images, strict=True):
            written.append(save_image_atomic(image, folder, class_image_name(have + i, image)))
    del pipeline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return written
