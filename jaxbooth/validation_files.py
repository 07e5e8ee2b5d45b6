"""Validation during training, the parts both backends share: when to validate, and the files.

Cadence (diffusers): with ``validation_steps`` every that many optimizer steps
(``train_dreambooth.py``: ``global_step % validation_steps == 0``); with ``validation_epochs``
at the end of an epoch, as the LoRA scripts' ``epoch % validation_epochs == 0`` with their
0-based epoch: after the 1st, (1+n)th, (1+2n)th... epoch (an early look after the first).

Files: ``OUTPUT_DIR/validation/step-{N}.png`` (a grid of the step's images) and
``OUTPUT_DIR/validation/step-{N}/{k}.png`` (image k alone); TensorBoard gets the images under
the tag ``validation``. Framework-free (PIL and numpy; never jax or torch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

VALIDATION_DIR = "validation"
NUM_INFERENCE_STEPS = 25  # diffusers' log_validation
TENSORBOARD_TAG = "validation"


def should_validate(schedule: tuple[str, int] | None, step: int, epochs_done: int | None = None) -> bool:
    """Whether to validate after optimizer ``step`` (see the module docstring).

    ``schedule``: ``spec.validation_schedule(spec)``, ("steps" | "epochs", n), or None (never).
    ``epochs_done``: the number of finished epochs when ``step`` ended one (or more), else None.
    """
    if schedule is None:
        return False
    kind, every = schedule
    if kind == "steps":
        return step > 0 and step % every == 0
    if kind == "epochs":
        return epochs_done is not None and epochs_done >= 1 and (epochs_done - 1) % every == 0
    raise ValueError(f"validation schedule {schedule!r}: expected ('steps' | 'epochs', n)")


def grid_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / VALIDATION_DIR / f"step-{step}.png"


def image_path(output_dir: Path, step: int, k: int) -> Path:
    return Path(output_dir) / VALIDATION_DIR / f"step-{step}" / f"{k}.png"


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images tiled row by row into a ceil(sqrt(n))-column grid; empty cells black (diffusers'
    ``make_image_grid`` shape). Images of different sizes (sample prompts' ``--w`` / ``--h``) each sit
    centred in a cell the size of the largest, on black."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = max(image.size[0] for image in images), max(image.size[1] for image in images)
    grid = Image.new("RGB", (cols * width, rows * height))
    for k, image in enumerate(images):
        left = (k % cols) * width + (width - image.size[0]) // 2
        top = (k // cols) * height + (height - image.size[1]) // 2
        grid.paste(image.convert("RGB"), (left, top))
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    """Through a hidden temporary name, so a reader (or a kill) never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_validation_images(images: Sequence[Image.Image], output_dir: Path, step: int) -> Path:
    """Write the step's grid and each image (names in the module docstring); returns the grid's path."""
    for k, image in enumerate(images):
        save_png(image.convert("RGB"), image_path(output_dir, step, k))
    path = grid_path(output_dir, step)
    save_png(image_grid(images), path)
    return path


def log_validation_images(writer: Any, images: Sequence[Image.Image], step: int) -> None:
    """``writer.add_images("validation", uint8 NHWC, step, dataformats="NHWC")``, as diffusers'
    log_validation; ``writer``: jaxbooth's ``tensorboard.EventWriter`` or a torch SummaryWriter."""
    stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])
    writer.add_images(TENSORBOARD_TAG, stacked, step, dataformats="NHWC")
    if hasattr(writer, "flush"):
        writer.flush()


def save_samples(images: Sequence[Any], out_dir: str | os.PathLike, seed: int) -> list[Path]:
    """``jaxbooth generate``'s files, one naming for both backends: ``sample-seed{seed}-{index:03d}.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = out / f"sample-seed{seed}-{index:03d}.png"
        image.save(path)
        paths.append(path)
    return paths
