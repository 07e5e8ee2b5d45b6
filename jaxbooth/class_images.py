"""Prior preservation's class images, the bookkeeping both backends share.

The behaviour of diffusers' ``train_dreambooth.py`` ("Generate class images if prior
preservation is enabled"): count what ``class_data_dir`` holds, generate only the shortfall
from ``class_prompt``, name each file ``{index}-{sha1 of image.tobytes()}.jpg`` (the hash of the
raw RGB pixels, as diffusers). What jaxbooth adds, the same on both backends:

- Counting uses ``data.scan_image_folder``, so only images the trainer will train on count
  (diffusers counts every directory entry, a stray ``.DS_Store`` included).
- New files are numbered as diffusers numbers them, skipping indices a generated file already
  uses (``missing_indices``), and image ``i`` is drawn from its own seed ``image_seed(seed, i)``:
  a resumed, re-split or re-batched generation makes the same image for the same index.
- Each image is written as soon as it is made, atomically (hidden temporary name, then rename;
  the file gets the usual mode, 0644 under umask 022), so a kill leaves only whole images.
- Processes split the missing indices round-robin (``indices[rank::count]``); no two write the
  same name. Every process plans before any writes (the backend puts a barrier in between).

A backend only supplies ``sample(prompts, seeds) -> PIL images``: one image per prompt, image k
drawn from ``seeds[k]`` alone. Framework-free (PIL, numpy; never jax or torch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth import data, log

GENERATED_NAME = re.compile(r"^(\d+)-([0-9a-f]{40})\.jpg$")
JPEG_QUALITY = 95  # class images are training data: PIL's default 75 leaves blocking the model can learn

SampleImages = Callable[[list[str], list[int]], list[Any]]
"""(prompts, per-image seeds) -> one PIL image per prompt; image k depends only on seeds[k]."""


def existing_class_images(class_data_dir: str | Path, *, skip_bad: bool = False) -> list[Path]:
    """The usable images in ``class_data_dir`` ([] when it is missing or holds no files).

    An empty folder is the normal first run, not an error; any other problem (unreadable files
    without ``skip_bad``) raises ``scan_image_folder``'s error now, before a long generation.
    """
    folder = Path(class_data_dir)
    if not folder.is_dir() or not any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir()):
        return []
    return data.scan_image_folder(folder, skip_bad=skip_bad, role="class")


def missing_indices(existing: Sequence[Path], count: int) -> list[int]:
    """The ``count`` indices new class images get: diffusers' numbering, without collisions.

    diffusers numbers new images from the folder's image count (``cur_class_images + i``). Here
    the numbering starts after the images that are not ``N-<sha1>.jpg`` files (the user's own)
    and skips indices a generated file already uses, so a folder with gaps (a deleted or
    interrupted image) gets them filled instead of a name reused. For a folder diffusers or an
    uninterrupted run filled this is exactly ``range(len(existing), len(existing) + count)``.
    """
    used = {int(m.group(1)) for p in existing if (m := GENERATED_NAME.match(Path(p).name))}
    index = len(existing) - sum(1 for p in existing if GENERATED_NAME.match(Path(p).name))
    out = []
    while len(out) < count:
        if index not in used:
            out.append(index)
        index += 1
    return out


def image_seed(seed: int, index: int) -> int:
    """The 31-bit sampler seed of class image ``index`` in a run seeded with ``seed``
    (31 bits: valid for ``torch.Generator.manual_seed`` and ``jax.random.key`` alike)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1)[0] >> 1)


def class_image_name(index: int, image: Any) -> str:
    """diffusers' file name: the index and the sha1 of the image's raw RGB pixels."""
    return f"{index}-{hashlib.sha1(image.convert('RGB').tobytes()).hexdigest()}.jpg"


def write_class_image(folder: Path, index: int, image: Any) -> Path:
    """Save a PIL image as ``folder/class_image_name(index, image)``, atomically; returns the path."""
    rgb = image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    path = Path(folder) / class_image_name(index, rgb)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # hidden: folder scans skip it
    try:
        tmp.write_bytes(buffer.getvalue())  # created like any file (0666 & ~umask), unlike mkstemp's 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def process_share(indices: Sequence[int], process_index: int, process_count: int) -> list[int]:
    """The indices process ``process_index`` of ``process_count`` generates (round-robin)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return list(indices[process_index::process_count])


@dataclasses.dataclass(frozen=True)
class ClassImagePlan:
    """What one process does: ``folder`` holds ``have`` usable images; ``missing`` are the indices
    to fill (all processes), ``mine`` this process's share of them."""

    folder: Path
    have: int
    missing: tuple[int, ...]
    mine: tuple[int, ...]


def plan_class_images(class_data_dir: str | Path, num_class_images: int, *, process_index: int = 0,
                      process_count: int = 1, skip_bad: bool = False) -> ClassImagePlan:
    """Count the folder and decide the indices; every process computes the same ``missing``.

    Call it on every process before any of them writes (then a barrier), so all count alike.
    """
    folder = Path(class_data_dir)
    existing = existing_class_images(folder, skip_bad=skip_bad)
    missing = missing_indices(existing, max(0, num_class_images - len(existing)))
    return ClassImagePlan(folder, len(existing), tuple(missing),
                          tuple(process_share(missing, process_index, process_count)))


def generate_class_images(plan: ClassImagePlan, sample: SampleImages, *, prompt: str, batch_size: int,
                          seed: int) -> list[Path]:
    """Make and write the images of ``plan.mine``, ``batch_size`` per ``sample`` call; returns the files.

    Image ``i`` is drawn from ``image_seed(seed, i)``, so the images do not depend on the batch
    size, the process count or an interruption.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if not plan.mine:
        return []
    plan.folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for start in range(0, len(plan.mine), batch_size):
        chunk = list(plan.mine[start:start + batch_size])
        images = sample([prompt] * len(chunk), [image_seed(seed, index) for index in chunk])
        if len(images) != len(chunk):
            raise ValueError(f"the sampler returned {len(images)} images for {len(chunk)} prompts")
        written += [write_class_image(plan.folder, index, image) for index, image in zip(chunk, images, strict=True)]
        log.info(f"class images: {len(written)}/{len(plan.mine)} written to {plan.folder}")
    return written


def describe(plan: ClassImagePlan, num_class_images: int, prompt: str) -> str:
    """The one line a run prints before generating."""
    return (f"class images: {plan.have} usable in {plan.folder} (num_class_images={num_class_images}); generating "
            f"{len(plan.missing)} more of {prompt!r}")
