"""One image file -> float32 training pixels, as diffusers' DreamBooth transforms make them.

Owns decoding (EXIF orientation, any PIL mode -> 8-bit RGB), the short-side resize with a
chosen filter (``--image_interpolation_mode``), the center/random crop, the flip and the
[-1, 1] normalisation, plus the content hash that keys encoding caches. numpy and PIL only.
"""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from jaxbooth.errors import JaxboothError

# torchvision InterpolationMode names, lowercased (the LoRA scripts' --image_interpolation_mode
# choices), mapped as torchvision maps them for PIL images (``pil_modes_mapping``). torchvision
# sends NEAREST and NEAREST_EXACT alike to PIL's NEAREST, which samples at pixel centres: on PIL
# images the two names give the same pixels there, so they do here.
INTERPOLATION_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_INTERPOLATION = "bilinear"  # train_dreambooth.py's fixed filter; the LoRA scripts default to lanczos


def resize_filter(interpolation: str) -> Image.Resampling:
    """The PIL filter for an ``--image_interpolation_mode`` name (case-insensitive, '-' or '_')."""
    key = str(interpolation).lower().replace("-", "_")
    if key not in INTERPOLATION_FILTERS:
        raise JaxboothError(
            f"image_interpolation_mode (--image_interpolation_mode) {interpolation!r} is not a resize filter; "
            f"use one of {', '.join(INTERPOLATION_FILTERS)}."
        )
    return INTERPOLATION_FILTERS[key]


# ---------------------------------------------------------------------------- hashing

_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def _hash_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def remember_hash(key: tuple[str, int, int], data: bytes) -> None:
    """Record the sha1 of bytes already read (folder inspection reads every file once anyway)."""
    digest = hashlib.sha1(data).hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest


def content_hash(path: str | Path) -> str:
    """sha1 of the file's bytes: the key of the latent / embedding cache.

    Cached by (resolved path, size, mtime), so it is computed once per file per process and
    recomputed when the file changes. The content, not the name, keys encodings: renaming
    or copying an image never re-encodes it.
    """
    path = Path(path)
    key = _hash_key(path)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    return digest


# ---------------------------------------------------------------------------- decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, as diffusers' `.convert("RGB")` but without its pitfalls.

    Alpha is dropped, not composited, exactly like diffusers (so training sees the same
    pixels). 16-bit grayscale is rescaled (PIL's convert clips everything above 255 to
    white); 32-bit "I"/"F" images are read as 8-bit if they fit, else as 16-bit.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = float(arr.max()) if arr.size else 0.0
        wide = img.mode.startswith("I;16") or top > 255
        scale = 257.0 if wide and top <= 65535 else (top / 255.0 if wide else 1.0)
        arr8 = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; same RGB
    if img.mode in ("La", "RGBa"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_rgb(source: str | Path | io.BytesIO) -> Image.Image:
    """Open, apply the EXIF orientation (phones store portraits sideways), convert to RGB."""
    with Image.open(source) as img:
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def _resize_short_side(img: Image.Image, resolution: int, resample: Image.Resampling) -> Image.Image:
    """torchvision `Resize(resolution, interpolation)` on a PIL image: the short side becomes
    `resolution`, the long side `int(resolution * long / short)` (truncated, as torchvision)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if w <= h else (new_long, resolution)
    return img.resize(size, resample)


def load_image_with_info(
    path: str | Path,
    resolution: int,
    *,
    center_crop: bool,
    flip: bool = False,
    crop_rng: np.random.Generator | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """`load_image`, also returning original (h, w) and crop top-left (y, x) for SDXL's time ids.

    Order follows diffusers' SDXL DreamBooth script: resize, flip, crop; the crop offset is
    in the resized (and flipped) image, as SDXL's `crops_coords_top_left` expects.
    """
    img, original = load_resized(path, resolution, interpolation=interpolation)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels, offset = crop_pixels(img, resolution, center_crop=center_crop, crop_rng=crop_rng)
    return pixels, original, offset


def load_resized(path: str | Path, resolution: int, *,
                 interpolation: str = DEFAULT_INTERPOLATION) -> tuple[Image.Image, tuple[int, int]]:
    """Decoded RGB image with its short side resized to ``resolution``, and its original (h, w);
    decode once with this, then ``crop_pixels`` as often as needed."""
    if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise JaxboothError(f"resolution must be a positive integer, got {resolution!r}")
    resample = resize_filter(interpolation)
    try:
        img = decode_rgb(path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise JaxboothError(f"cannot load image {path}: {exc}; remove or re-save the file.") from exc
    return _resize_short_side(img, int(resolution), resample), (img.height, img.width)


def crop_pixels(img: Image.Image, resolution: int | tuple[int, int], *, center_crop: bool,
                crop_rng: np.random.Generator | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """A ``resolution`` square (or an (h, w) bucket) of a resized image as float32 HWC in [-1, 1], and its
    top-left (y, x): torchvision's CenterCrop or RandomCrop (offsets from ``crop_rng``, top then left),
    ToTensor, Normalize(0.5, 0.5)."""
    height, width = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else resolution
    excess_h, excess_w = img.height - height, img.width - width
    if center_crop:  # torchvision CenterCrop rounding
        top, left = int(round(excess_h / 2.0)), int(round(excess_w / 2.0))
    else:  # torchvision RandomCrop: offsets uniform over [0, excess] inclusive
        rng = crop_rng if crop_rng is not None else np.random.default_rng()
        top, left = int(rng.integers(0, excess_h + 1)), int(rng.integers(0, excess_w + 1))
    img = img.crop((left, top, left + width, top + height))
    # ToTensor then Normalize([0.5], [0.5]), in float32 like torch.
    pixels = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    pixels = (pixels - np.float32(0.5)) / np.float32(0.5)
    return pixels, (top, left)


def image_size(path: str | Path) -> tuple[int, int]:
    """(h, w) of an image as training sees it (after its EXIF orientation), read from the header only:
    what aspect-ratio buckets assign by, without decoding every image."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation; 5-8 turn the image by 90 degrees
    except (OSError, ValueError, SyntaxError) as exc:
        raise JaxboothError(f"cannot load image {path}: {exc}; remove or re-save the file.") from exc
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def load_resized_to(path: str | Path, size: tuple[int, int], *,
                    interpolation: str = DEFAULT_INTERPOLATION) -> tuple[Image.Image, tuple[int, int]]:
    """Decoded RGB image resized to exactly ``size`` (h, w) (an aspect-ratio bucket's cover size), and its
    original (h, w); ``crop_pixels(img, bucket)`` then takes the bucket out of it."""
    resample = resize_filter(interpolation)
    try:
        img = decode_rgb(path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise JaxboothError(f"cannot load image {path}: {exc}; remove or re-save the file.") from exc
    original = (img.height, img.width)
    height, width = int(size[0]), int(size[1])
    if (img.height, img.width) != (height, width):
        img = img.resize((width, height), resample)
    return img, original


def load_bucketed(path: str | Path, resized: tuple[int, int], bucket: tuple[int, int], *, center_crop: bool,
                  flip: bool = False, crop_rng: np.random.Generator | None = None,
                  interpolation: str = DEFAULT_INTERPOLATION
                  ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """``load_image_with_info`` for an aspect-ratio bucket: resize to ``resized`` (h, w, covering the bucket),
    flip, crop the (h, w) ``bucket`` (centre, or random from ``crop_rng``); pixels, original (h, w), crop (y, x)."""
    img, original = load_resized_to(path, resized, interpolation=interpolation)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels, offset = crop_pixels(img, bucket, center_crop=center_crop, crop_rng=crop_rng)
    return pixels, original, offset


def load_image(
    path: str | Path,
    resolution: int,
    *,
    center_crop: bool,
    flip: bool = False,
    crop_rng: np.random.Generator | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> np.ndarray:
    """Decode one training image to float32 HWC [resolution, resolution, 3] in [-1, 1].

    Matches diffusers' DreamBooth transforms: EXIF orientation, RGB, resize of the short side
    to `resolution` with the `interpolation` filter (bilinear by default, as
    train_dreambooth.py; PIL's filters are antialiased, as torchvision on PIL), center or
    random crop, optional horizontal flip, `(x / 255 - 0.5) / 0.5`. A random crop draws its
    offsets from `crop_rng` (pass one for reproducible runs; a fresh unseeded generator is
    used otherwise).
    """
    return load_image_with_info(
        path, resolution, center_crop=center_crop, flip=flip, crop_rng=crop_rng, interpolation=interpolation
    )[0]
