"""Framework-neutral image/prompt pipeline: folders -> examples -> numpy batches.

Owns folder scanning and validation, image decoding with diffusers' DreamBooth transforms,
the dataset model (subsets -> examples, shaped for captions, repeats and regularisation
subsets) and a deterministic, resumable, multi-host-aware batch iterator. Imports only
stdlib, numpy and PIL: never jax, torch or transformers (tests enforce this), so both
backends share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from jaxbooth.errors import JaxboothError

EXAMPLE_INSTANCE_PROMPT = "a photo of sks toy"
EXAMPLE_CLASS_PROMPT = "a photo of a toy"
CAPTION_EXTENSION = ".txt"
# OS metadata files that land in image folders and are never training data.
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
SKIP_BAD_HINT = "set skip_bad_images (--skip_bad_images) to skip them with a warning"
_FOLDER_FLAGS = {"instance": "--instance_data_dir", "class": "--class_data_dir"}

Tokenize = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def example_instance_dir() -> Path:
    """Bundled subject images (a red-and-yellow toy robot) for smoke runs and docs."""
    return Path(__file__).resolve().parent / "examples" / "instance"


def example_class_dir() -> Path:
    """Bundled generic toy images, a tiny prior-preservation class set."""
    return Path(__file__).resolve().parent / "examples" / "class"


# ---------------------------------------------------------------------------- hashing

_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def _hash_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


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


# ---------------------------------------------------------------------------- images


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


def _decode_rgb(source: str | Path | io.BytesIO) -> Image.Image:
    """Open, apply the EXIF orientation (phones store portraits sideways), convert to RGB."""
    with Image.open(source) as img:
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def _resize_short_side(img: Image.Image, resolution: int) -> Image.Image:
    """torchvision `Resize(resolution, BILINEAR)` on a PIL image: the short side becomes
    `resolution`, the long side `int(resolution * long / short)` (truncated, as torchvision)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if w <= h else (new_long, resolution)
    return img.resize(size, Image.BILINEAR)


def load_image_with_info(
    path: str | Path,
    resolution: int,
    *,
    center_crop: bool,
    flip: bool = False,
    crop_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """`load_image`, also returning original (h, w) and crop top-left (y, x) for SDXL's time ids.

    Order follows diffusers' SDXL DreamBooth script: resize, flip, crop; the crop offset is
    in the resized (and flipped) image, as SDXL's `crops_coords_top_left` expects.
    """
    if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise JaxboothError(f"resolution must be a positive integer, got {resolution!r}")
    try:
        img = _decode_rgb(path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise JaxboothError(f"cannot load image {path}: {exc}; remove or re-save the file.") from exc
    original = (img.height, img.width)
    img = _resize_short_side(img, int(resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    excess_h, excess_w = img.height - resolution, img.width - resolution
    if center_crop:  # torchvision CenterCrop rounding
        top, left = int(round(excess_h / 2.0)), int(round(excess_w / 2.0))
    else:  # torchvision RandomCrop: offsets uniform over [0, excess] inclusive
        rng = crop_rng if crop_rng is not None else np.random.default_rng()
        top, left = int(rng.integers(0, excess_h + 1)), int(rng.integers(0, excess_w + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    # ToTensor then Normalize([0.5], [0.5]), in float32 like torch.
    pixels = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    pixels = (pixels - np.float32(0.5)) / np.float32(0.5)
    return pixels, original, (top, left)


def load_image(
    path: str | Path,
    resolution: int,
    *,
    center_crop: bool,
    flip: bool = False,
    crop_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Decode one training image to float32 HWC [resolution, resolution, 3] in [-1, 1].

    Matches diffusers' DreamBooth transforms: EXIF orientation, RGB, bilinear resize of the
    short side to `resolution` (PIL's bilinear is antialiased, as torchvision on PIL),
    center or random crop, optional horizontal flip, `(x / 255 - 0.5) / 0.5`.
    A random crop draws its offsets from `crop_rng` (pass one for reproducible runs; a fresh
    unseeded generator is used otherwise).
    """
    return load_image_with_info(path, resolution, center_crop=center_crop, flip=flip, crop_rng=crop_rng)[0]


# ---------------------------------------------------------------------------- folders


def _inspect_image(path: Path) -> str | None:
    """Return why `path` cannot be trained on, or None. Fills the content-hash cache.

    verify() catches bad checksums; the full decode catches truncation that verify misses.
    """
    try:
        key = _hash_key(path)
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or exc})"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Image.UnidentifiedImageError:
        return "not an image PIL can read (unknown format or not an image at all)"
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"corrupt image ({type(exc).__name__}: {exc})"
    try:
        _decode_rgb(io.BytesIO(data))
    except Exception as exc:
        return f"corrupt or truncated image ({type(exc).__name__}: {exc})"
    with _HASH_LOCK:
        _HASH_CACHE[key] = hashlib.sha1(data).hexdigest()
    return None


def _candidate_files(folder: Path, caption_extension: str) -> tuple[list[Path], list[str]]:
    """Files that should be images (sorted), and the names of skipped subfolders."""
    skip_suffixes = {CAPTION_EXTENSION, caption_extension.lower()}
    files, subdirs = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.lower() in _IGNORED_NAMES:
            continue
        if p.is_dir():
            subdirs.append(p.name)
        elif p.suffix.lower() not in skip_suffixes:
            files.append(p)
    return files, subdirs


def scan_image_folder(
    folder: str | Path,
    *,
    skip_bad: bool = False,
    role: str = "instance",
    caption_extension: str = CAPTION_EXTENSION,
) -> list[Path]:
    """List the usable images of `folder`, sorted by name; every one is fully decoded once.

    Like diffusers (`Path(dir).iterdir()`), not recursive; hidden files, OS metadata files,
    subfolders and caption sidecars are ignored. All other files must be images: bad ones
    are reported together in ONE error (or, with `skip_bad`, one warning and skipped), so a
    user fixes a folder in one pass instead of one crash per file. Never writes to `folder`.
    """
    folder = Path(folder)
    flag = _FOLDER_FLAGS.get(role)
    where = f"{role} images folder {folder}" + (f" ({flag})" if flag else "")
    if not folder.exists():
        raise JaxboothError(f"{where} does not exist; check the path.")
    if not folder.is_dir():
        raise JaxboothError(f"{where} is a file, not a folder; pass the folder that holds the images.")
    files, subdirs = _candidate_files(folder, caption_extension)
    problems = {p: _inspect_image(p) for p in files}
    bad = {p: why for p, why in problems.items() if why is not None}
    good = [p for p in files if p not in bad]
    if bad:
        listing = "\n".join(f"  {p.name}: {why}" for p, why in bad.items())
        head = f"{where}: {len(bad)} of {len(files)} files cannot be used as images"
        if not skip_bad:
            raise JaxboothError(f"{head}:\n{listing}\nRemove or re-save them, or {SKIP_BAD_HINT}.")
        warnings.warn(f"{head}; skipping them:\n{listing}", UserWarning, stacklevel=2)
    if not good:
        sub = f" (subfolders are not searched: {', '.join(subdirs)})" if subdirs else ""
        raise JaxboothError(
            f"{where} has no usable images{sub}; put the .png/.jpg/.webp files directly in it."
        )
    return good


# ---------------------------------------------------------------------------- dataset model


@dataclasses.dataclass(frozen=True)
class Subset:
    """One folder of images with how to caption it (the unit kohya/OneTrainer users know).

    `is_class` marks a regularisation (prior-preservation) subset. `repeats` lists each
    image that many times per epoch. Captions come from `prompt`, or with `use_captions`
    from the first line of a sidecar `<image stem><caption_extension>` file, falling back to
    `prompt`. `max_images` keeps the first N sorted images (diffusers' `num_class_images`).
    """

    folder: Path
    prompt: str
    is_class: bool = False
    repeats: int = 1
    use_captions: bool = False
    caption_extension: str = CAPTION_EXTENSION
    max_images: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        role = "class" if self.is_class else "instance"
        if not isinstance(self.prompt, str) or not (self.prompt.strip() or self.use_captions):
            raise JaxboothError(f"{role} subset {self.folder}: the prompt is empty; give a prompt.")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise JaxboothError(
                f"{role} subset {self.folder}: repeats={self.repeats!r}; use an integer >= 1."
            )
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            raise JaxboothError(
                f"{role} subset {self.folder}: max_images (num_class_images)={self.max_images!r}; "
                "use an integer >= 1."
            )
        if not self.caption_extension.startswith("."):
            object.__setattr__(self, "caption_extension", "." + self.caption_extension)

    @property
    def role(self) -> str:
        return "class" if self.is_class else "instance"


@dataclasses.dataclass(frozen=True)
class Example:
    """One training image: file, caption, owning subset index, sha1 of the file bytes."""

    path: Path
    caption: str
    subset: int
    content_hash: str


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Subsets and their examples; instance and class items are example indices with repeats.

    Its length follows diffusers' DreamBoothDataset: max(instance items, class items); item
    i pairs instance item i % n_instance with class item i % n_class.
    """

    subsets: tuple[Subset, ...]
    examples: tuple[Example, ...]

    def __post_init__(self) -> None:
        if not self.instance_items:
            raise JaxboothError("the dataset has no instance images; give at least one instance subset.")

    def _items(self, is_class: bool) -> tuple[int, ...]:
        out: list[int] = []
        for i, ex in enumerate(self.examples):
            if self.subsets[ex.subset].is_class == is_class:
                out.extend([i] * self.subsets[ex.subset].repeats)
        return tuple(out)

    @cached_property
    def instance_items(self) -> tuple[int, ...]:
        return self._items(False)

    @cached_property
    def class_items(self) -> tuple[int, ...]:
        return self._items(True)

    @property
    def with_prior_preservation(self) -> bool:
        return bool(self.class_items)

    def __len__(self) -> int:
        return max(len(self.instance_items), len(self.class_items))

    @cached_property
    def fingerprint(self) -> str:
        """sha1 over examples and subset flags: tells a resumed run whether its data changed."""
        h = hashlib.sha1()
        for ex in self.examples:
            sub = self.subsets[ex.subset]
            h.update(f"{ex.content_hash}|{ex.caption}|{sub.is_class}|{sub.repeats}\n".encode())
        return h.hexdigest()


def _read_caption(image: Path, subset: Subset) -> str | None:
    """First line of the sidecar caption (kohya's rule), or None when absent or empty."""
    side = image.with_suffix(subset.caption_extension)
    if not side.is_file():
        return None
    try:
        lines = side.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise JaxboothError(
            f"caption file {side} cannot be read as UTF-8 text ({exc}); re-save it as UTF-8."
        ) from exc
    return lines[0].strip() if lines and lines[0].strip() else None


def make_dataset(subsets: Sequence[Subset], *, skip_bad: bool = False) -> Dataset:
    """Scan every subset's folder (validating all images) and build the example list."""
    examples: list[Example] = []
    for index, subset in enumerate(subsets):
        paths = scan_image_folder(
            subset.folder, skip_bad=skip_bad, role=subset.role, caption_extension=subset.caption_extension
        )
        if subset.max_images is not None:
            paths = paths[: subset.max_images]
        missing = []
        for p in paths:
            caption = _read_caption(p, subset) if subset.use_captions else None
            if subset.use_captions and caption is None:
                missing.append(p.name)
            examples.append(Example(p, caption or subset.prompt, index, content_hash(p)))
        if missing and subset.prompt.strip():
            warnings.warn(
                f"{subset.folder}: {len(missing)} images have no {subset.caption_extension} caption; "
                f"using the prompt {subset.prompt!r} for them: {', '.join(missing[:10])}",
                UserWarning,
                stacklevel=2,
            )
        elif missing:
            raise JaxboothError(
                f"{subset.folder}: {len(missing)} images have no {subset.caption_extension} caption and the "
                f"subset has no prompt to fall back on ({', '.join(missing[:10])}); add captions or a prompt."
            )
    return Dataset(tuple(subsets), tuple(examples))


def make_dreambooth_dataset(
    instance_dir: str | Path,
    instance_prompt: str,
    class_dir: str | Path | None = None,
    class_prompt: str | None = None,
    num_class_images: int | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """diffusers' DreamBooth flags as the one-instance + optional one-class subset case.

    Uses at most `num_class_images` class images (the first ones by name, where diffusers
    takes the first of an unsorted `iterdir()`). Generating missing class images is the
    caller's job (it needs a model); this only reads what is on disk.
    """
    subsets = [Subset(Path(instance_dir), instance_prompt)]
    if class_dir is not None:
        if not class_prompt:
            raise JaxboothError(
                f"class images folder {class_dir} is given but class_prompt is empty; prior preservation "
                "needs --class_prompt (e.g. 'a photo of a dog')."
            )
        subsets.append(Subset(Path(class_dir), class_prompt, is_class=True, max_images=num_class_images))
    return make_dataset(subsets, skip_bad=skip_bad)


# ---------------------------------------------------------------------------- batches

_STATE_VERSION = 1
_INSTANCE_STREAM, _CLASS_STREAM = 0, 1


class BatchIterator:
    """Endless, deterministic, resumable batches of one host's share of each global batch.

    A global batch holds `batch_size` dataset items. Epoch e visits the items in the order
    `np.random.default_rng([seed, e]).permutation(len(dataset))`. To keep one batch shape
    (one compiled step) the epoch's order is wrapped *within the same epoch's permutation*
    up to a whole number of batches: `num_batches_per_epoch = ceil(len / batch_size)` as
    diffusers' DataLoader (no drop_last), the last batch topped up from the start of the
    permutation; a dataset smaller than one batch is repeated to fill it. `drop_last=True`
    instead drops the tail (at least one batch per epoch). Nothing depends on the next epoch,
    so (epoch, position) alone determines a batch.

    Item i yields instance item i % n_instance and, with prior preservation, class item
    i % n_class (diffusers' DreamBoothDataset). Rows: all local instance rows, then the
    matching class rows (diffusers' collate_fn). On P processes, process p gets global
    slots [p*B/P, (p+1)*B/P), so the global array is [inst_0, cls_0, inst_1, cls_1, ...]:
    split the prior loss with `is_class`, never by halving the batch.

    Random crop offsets and flips of a row come from `default_rng([seed, epoch, slot,
    stream])`, so they do not depend on the host count and are reproduced after a restore.

    Batch dict (R = local rows = B/P, or 2*B/P with prior preservation; L = token length):
      pixel_values   float32 [R, res, res, 3]  NHWC, in [-1, 1]
      input_ids      int32   [R, L]            only when `tokenize` is given
      attention_mask int32   [R, L]            only when `tokenize` is given
      is_class       bool    [R]
      example_index  int32   [R]               index into `dataset.examples`
      original_size  int32   [R, 2]            (h, w) before resizing (SDXL time ids)
      crop_top_left  int32   [R, 2]            (y, x) in the resized image (SDXL time ids)
      flipped        bool    [R]
      content_hash   str     [R]               host-only (numpy unicode), for encoding caches
      caption        str     [R]               host-only (numpy unicode)
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        resolution: int,
        batch_size: int,
        seed: int,
        tokenize: Tokenize | None = None,
        center_crop: bool = False,
        random_flip: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        drop_last: bool = False,
        num_workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
            raise JaxboothError(
                f"batch_size={batch_size}, process_index={process_index}, process_count={process_count}: "
                "need batch_size >= 1 and 0 <= process_index < process_count."
            )
        if batch_size % process_count:
            raise JaxboothError(
                f"train_batch_size={batch_size} is not divisible by the {process_count} processes (hosts); "
                f"use a multiple of {process_count}."
            )
        self.dataset, self.resolution, self.batch_size, self.seed = dataset, int(resolution), batch_size, seed
        self.tokenize, self.center_crop, self.random_flip = tokenize, center_crop, random_flip
        self.process_index, self.process_count, self.drop_last = process_index, process_count, drop_last
        n = len(dataset)
        self.num_batches_per_epoch = max(1, n // batch_size) if drop_last else math.ceil(n / batch_size)
        self.epoch, self.position = 0, 0
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._prefetch = max(1, prefetch)
        self._pool = ThreadPoolExecutor(num_workers, "jaxbooth-data") if num_workers > 0 else None
        self._pending: deque[tuple[tuple[int, int], Future]] = deque()

    @property
    def local_batch_size(self) -> int:
        """Dataset items per host per step (rows are twice this with prior preservation)."""
        return self.batch_size // self.process_count

    def steps_per_epoch(self, gradient_accumulation_steps: int = 1) -> int:
        """Optimizer steps per epoch, as diffusers: ceil(batches / accumulation steps)."""
        return math.ceil(self.num_batches_per_epoch / gradient_accumulation_steps)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset item of every global slot of `epoch` (length num_batches * batch_size)."""
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
                order = np.resize(perm, self.num_batches_per_epoch * self.batch_size)
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = order
            return order

    def _row_plan(self, epoch: int, position: int) -> list[tuple[int, int, int]]:
        """(example index, global slot, stream) per local row: instance rows, then class rows."""
        lo = position * self.batch_size + self.process_index * self.local_batch_size
        return self._plan_for_slots(epoch, range(lo, lo + self.local_batch_size))

    def global_row_plan(self, epoch: int, position: int) -> list[tuple[int, int, int]]:
        """Every process's rows of one global batch: all instance rows, then all class rows.

        For trainers that feed the device mesh from cached encodings by index, where any
        host can build any row (so the global batch keeps diffusers' instance-then-class halves).
        """
        lo = position * self.batch_size
        return self._plan_for_slots(epoch, range(lo, lo + self.batch_size))

    def _plan_for_slots(self, epoch: int, slots: range) -> list[tuple[int, int, int]]:
        order = self.epoch_order(epoch)
        inst, cls = self.dataset.instance_items, self.dataset.class_items
        plan = [(inst[order[s] % len(inst)], s, _INSTANCE_STREAM) for s in slots]
        if cls:
            plan += [(cls[order[s] % len(cls)], s, _CLASS_STREAM) for s in slots]
        return plan

    def row_rng(self, epoch: int, slot: int, stream: int) -> np.random.Generator:
        """The generator behind one row's flip and crop: independent of host count, reproducible."""
        return np.random.default_rng([self.seed, epoch, slot, stream])

    def row_flip(self, epoch: int, slot: int, stream: int) -> bool:
        """Whether a row is flipped (the first draw of its generator, as ``load_batch`` makes it)."""
        return bool(self.random_flip and self.row_rng(epoch, slot, stream).random() < 0.5)

    def load_batch(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """The batch at (epoch, position), without tokens: a pure function of its arguments."""
        pixels, sizes, crops, flips = [], [], [], []
        plan = self._row_plan(epoch, position)
        for example_index, slot, stream in plan:
            rng = self.row_rng(epoch, slot, stream)
            flip = bool(self.random_flip and rng.random() < 0.5)
            px, size, crop = load_image_with_info(
                self.dataset.examples[example_index].path,
                self.resolution,
                center_crop=self.center_crop,
                flip=flip,
                crop_rng=rng,
            )
            pixels.append(px)
            sizes.append(size)
            crops.append(crop)
            flips.append(flip)
        examples = [self.dataset.examples[i] for i, _, _ in plan]
        return {
            "pixel_values": np.stack(pixels),
            "is_class": np.array([stream == _CLASS_STREAM for _, _, stream in plan]),
            "example_index": np.array([i for i, _, _ in plan], np.int32),
            "original_size": np.array(sizes, np.int32).reshape(-1, 2),
            "crop_top_left": np.array(crops, np.int32).reshape(-1, 2),
            "flipped": np.array(flips, bool),
            "content_hash": np.array([e.content_hash for e in examples]),
            "caption": np.array([e.caption for e in examples]),
        }

    def _next_key(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, position = key
        return (epoch, position + 1) if position + 1 < self.num_batches_per_epoch else (epoch + 1, 0)

    def _take(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        """Load `key`, keeping up to `prefetch` following batches in flight on the pool."""
        if self._pool is None:
            return self.load_batch(*key)
        if self._pending and self._pending[0][0] != key:
            self._drop_pending()
        ahead = self._pending[-1][0] if self._pending else None
        while len(self._pending) < self._prefetch + 1:
            ahead = key if ahead is None else self._next_key(ahead)
            self._pending.append((ahead, self._pool.submit(self.load_batch, *ahead)))
        return self._pending.popleft()[1].result()

    def _drop_pending(self) -> None:
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        key = (self.epoch, self.position)
        batch = self._take(key)
        if self.tokenize is not None:
            ids, mask = self.tokenize([str(c) for c in batch["caption"]])
            batch["input_ids"] = np.asarray(ids, np.int32)
            batch["attention_mask"] = np.asarray(mask, np.int32)
        self.epoch, self.position = self._next_key(key)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the *next* batch, plus what defines the order."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "dataset_len": len(self.dataset),
            "fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict()` was taken; warns if the data or order changed."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise JaxboothError(
                f"data iterator state {state!r} lacks an integer epoch/position ({exc})."
            ) from exc
        changed = [
            f"{k}: {state[k]!r} -> {v!r}"
            for k, v in self.state_dict().items()
            if k in ("seed", "batch_size", "dataset_len", "fingerprint") and k in state and state[k] != v
        ]
        if changed:
            warnings.warn(
                "resuming with different data settings, so the batch order differs from the original run ("
                + "; ".join(changed)
                + ")",
                UserWarning,
                stacklevel=2,
            )
        if position >= self.num_batches_per_epoch:
            epoch, position = epoch + 1, 0
        self._drop_pending()
        self.epoch, self.position = epoch, position

    def close(self) -> None:
        """Stop prefetch workers (only needed with num_workers > 0)."""
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
