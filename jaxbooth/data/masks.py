"""``--masked_loss``: each training row's loss mask, from its image's alpha channel (kohya's alpha masks).

A row's mask is its image's alpha taken through the same geometry as its pixels: resized to the size the
pixels were resized to, mirrored when the row is, cropped at the row's crop offset (an offset in the
resized, possibly mirrored, image: what ``BatchIterator`` and the JAX latent cache record), then averaged
over each VAE cell (``factor`` x ``factor`` pixels, torch's ``interpolate(mode="area")``) to the latent
grid, in [0, 1]. An image without alpha is all ones: trained on everywhere, as without the flag. The loss
is multiplied by the mask before its mean (``loss_options.loss_from_prediction``), so transparent regions
teach nothing. numpy and PIL only; both backends build their masks here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from jaxbooth.data.images import resize_filter
from jaxbooth.errors import JaxboothError

LATENT_FACTOR = 8  # the Stable Diffusion VAE's downsampling


def alpha_channel(path: str | Path) -> Image.Image | None:
    """The image's alpha as an 8-bit "L" image after its EXIF orientation, or None when it has none."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if "A" not in img.getbands() and "a" not in img.getbands():
                return None
            if img.mode in ("La", "RGBa"):
                img = img.convert("RGBA")
            return img.getchannel("A").copy()
    except (OSError, ValueError, SyntaxError) as exc:
        raise JaxboothError(f"cannot load image {path}: {exc}; remove or re-save the file.") from exc


def short_side_size(original: Sequence[int], resolution: int) -> tuple[int, int]:
    """(h, w) after the square path's resize (``images._resize_short_side``: short side = resolution, the
    long side truncated as torchvision)."""
    h, w = int(original[0]), int(original[1])
    if w <= h:
        return int(resolution * h / w), int(resolution)
    return int(resolution), int(resolution * w / h)


def loss_mask(alpha: Image.Image | None, resized: Sequence[int], offset: Sequence[int], crop: Sequence[int],
              flipped: bool, *, interpolation: str, factor: int = LATENT_FACTOR) -> np.ndarray:
    """float32 [crop_h / factor, crop_w / factor] mask of one row (ones without alpha)."""
    height, width = int(crop[0]), int(crop[1])
    if height % factor or width % factor:
        raise JaxboothError(f"masked_loss: a {height}x{width} crop is not a multiple of the VAE's {factor} px cells")
    if alpha is None:
        return np.ones((height // factor, width // factor), np.float32)
    size = (int(resized[1]), int(resized[0]))
    if alpha.size != size:
        alpha = alpha.resize(size, resize_filter(interpolation))
    if flipped:
        alpha = alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = int(offset[0]), int(offset[1])
    cropped = np.asarray(alpha.crop((left, top, left + width, top + height)), np.float32) / np.float32(255.0)
    cells = cropped.reshape(height // factor, factor, width // factor, factor)
    return cells.mean(axis=(1, 3), dtype=np.float32)


def batch_loss_masks(paths: Sequence[str | Path], batch: dict[str, np.ndarray], *, resolution: int,
                     interpolation: str, factor: int = LATENT_FACTOR) -> np.ndarray:
    """float32 [R, h/factor, w/factor] masks of a ``BatchIterator`` batch (``paths``: each row's image file)."""
    crop = batch["pixel_values"].shape[1:3]
    resized = batch.get("resized_size")
    masks = []
    for row, path in enumerate(paths):
        size = resized[row] if resized is not None else short_side_size(batch["original_size"][row], resolution)
        masks.append(loss_mask(alpha_channel(path), size, batch["crop_top_left"][row], crop,
                               bool(batch["flipped"][row]), interpolation=interpolation, factor=factor))
    return np.stack(masks)


def cache_loss_masks(paths: Sequence[str | Path], rows: Sequence[tuple[int, bool]], offsets: np.ndarray,
                     crop: Sequence[int], resized_for: Callable[[int], Sequence[int]], *, interpolation: str,
                     factor: int = LATENT_FACTOR) -> np.ndarray:
    """float32 [num_rows, h/factor, w/factor] masks of a latent cache: ``rows`` (example, flipped) per cache row,
    ``offsets`` [num_rows, 2] their crop offsets, ``resized_for(example)`` the size its pixels were resized to."""
    alphas: dict[int, Image.Image | None] = {}
    masks = []
    for (example, flipped), offset in zip(rows, offsets, strict=True):
        if example not in alphas:
            alphas[example] = alpha_channel(paths[example])
        masks.append(loss_mask(alphas[example], resized_for(example), offset, crop, flipped,
                               interpolation=interpolation, factor=factor))
    if not masks:
        return np.zeros((0, int(crop[0]) // factor, int(crop[1]) // factor), np.float32)
    return np.stack(masks)
