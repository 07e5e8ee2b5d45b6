"""Encode-once caches of a JAX run: VAE posteriors of the training crops, prompt ids or embeddings.

Crops. With ``center_crop`` off diffusers takes a fresh ``RandomCrop`` each time it loads an
image. The latent cache holds a few crops of each image instead (:data:`CROPS_PER_IMAGE`,
offsets drawn once from a generator seeded with (seed, image index)), both orientations with
``random_flip``, and each training row picks one orientation and one crop with its own
generator, ``BatchIterator.row_rng(epoch, slot, stream)``, drawing in the order the iterator's
``load_batch`` draws flip then crop. The pick is a pure function of (seed, epoch, slot, stream),
so a resumed run picks exactly what the uninterrupted run picked. ``center_crop`` caches the
one centre crop, and a square image has one crop (every crop of it is the same).

Buckets (``enable_bucket``). One cache per bucket shape in use (:class:`BucketCache`): the
instance images of that bucket at its shape (resized to cover it, crops only along the overhanging
side) and, with prior preservation, every class image at that shape (class rows take the batch's
bucket); each batch reads the cache of its bucket, so each bucket shape is one compiled step
(``bucket_steps.py``). SDXL's time ids carry the bucket as the target size.

SDXL. Each cache row also records its image's original (h, w) and its crop's top-left in the
resized image, for a mirrored row the mirrored offset (the mirror of a crop is a crop of the
mirrored image, which is what diffusers crops after flipping), so ``frozen["time_ids"]`` holds
per row the time ids diffusers' SDXL script computes for those pixels; both frozen encoders
give ``text_embeddings`` and ``pooled_embeddings`` per prompt (trained encoders: each tokenizer's
ids per prompt, encoded in the step).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth import data, encoding_cache, sdxl
from jaxbooth import spec as spec_lib
from jaxbooth.data import masks
from jaxbooth.data.batches import row_caption, subset_flips
from jaxbooth.data.buckets import BucketPlan, Shape
from jaxbooth.data.images import load_resized_to
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import encode
from jaxbooth.jax_backend.loaded import LoadedModels
from jaxbooth.jax_backend.loading import text_apply_fn
from jaxbooth.jax_backend.train_step import SDXL_INPUT_IDS
from jaxbooth.text import make_tokenize_fn

# Why 4: every cached crop costs one VAE encode (two with random_flip) and one posterior of device
# memory per image (SD at 512 px: 128 KiB for mean + std), so the cache is at most 8x a centre-crop
# one; 4 offsets along the long side already show the model most of what a random crop of a 3:4
# photo shows, and each step still draws a fresh latent sample from the chosen posterior.
CROPS_PER_IMAGE = 4
_CROP_SEED_TAG = 0x63726F70  # "crop": keeps the crop generators apart from the data iterator's


@dataclasses.dataclass(frozen=True)
class LatentIndex:
    """Where each example's posteriors sit in the cache: row ``first[e] + flipped * crops[e] + crop``.

    ``original_sizes`` (h, w) and ``crops_top_left`` (y, x) are per cache row ``[num_rows, 2]``:
    each row's image size before the resize and its crop offset in the resized (and, for a
    flipped row, mirrored) image, as diffusers' SDXL script records them for its time ids.
    """

    first: np.ndarray  # int64 [num_examples]
    crops: np.ndarray  # int64 [num_examples]: distinct crops per orientation
    orientations: int  # 2 with random_flip, else 1
    original_sizes: np.ndarray | None = None  # int64 [num_rows, 2]
    crops_top_left: np.ndarray | None = None  # int64 [num_rows, 2]

    @classmethod
    def from_counts(cls, crops: list[int], orientations: int, **rows: np.ndarray) -> LatentIndex:
        counts = np.asarray(crops, np.int64)
        first = np.concatenate([[0], np.cumsum(counts * orientations)[:-1]]).astype(np.int64)
        return cls(first=first, crops=counts, orientations=orientations, **rows)

    @property
    def num_rows(self) -> int:
        return int((self.crops * self.orientations).sum())

    def row(self, example: int, flipped: bool, crop: int) -> int:
        if not 0 <= crop < self.crops[example] or (flipped and self.orientations == 1):
            raise IndexError(f"example {example} has {self.crops[example]} crop(s) x {self.orientations} "
                             f"orientation(s); asked for crop {crop}, flipped={flipped}")
        return int(self.first[example] + int(flipped) * self.crops[example] + crop)


@dataclasses.dataclass(frozen=True)
class CropSet:
    """The cached crops of one image: pixels ``[res, res, 3]`` and top-left (y, x) in the resized image,
    with the image's original (h, w) and resized width (what a mirrored crop's offset needs)."""

    pixels: list[np.ndarray]
    offsets: list[tuple[int, int]]
    original_size: tuple[int, int]
    resized_width: int

    def flipped_offsets(self, resolution: int) -> list[tuple[int, int]]:
        """Each crop's mirror as a crop of the mirrored image: its offset there (``sdxl.flipped_crop_top_left``;
        ``resolution``: the crop's width)."""
        return [sdxl.flipped_crop_top_left(offset, self.resized_width, resolution) for offset in self.offsets]


def example_crop_set(path: str | Path, resolution: int, *, center_crop: bool, seed: int, index: int,
                     interpolation: str, bucket: tuple[Shape, Shape] | None = None) -> CropSet:
    """The centre crop of one image, or up to CROPS_PER_IMAGE distinct random ones (the loader's
    torchvision RandomCrop offsets) from the generator of (seed, index), with their offsets.

    Offsets are drawn until CROPS_PER_IMAGE distinct ones are found or 2 x CROPS_PER_IMAGE draws
    are spent (an image barely wider than it is high has fewer distinct crops than that).
    ``bucket``: (resized (h, w), bucket (h, w)): the image resized to cover an aspect-ratio bucket
    and the bucket's crops instead of ``resolution`` squares.
    """
    if bucket is None:
        resized, original = data.load_resized(path, resolution, interpolation=interpolation)  # decoded once
        size: int | Shape = resolution
        whole = original[0] == original[1]  # square: one crop, the whole image
    else:
        resized, original = load_resized_to(path, bucket[0], interpolation=interpolation)
        size = bucket[1]
        whole = tuple(bucket[0]) == tuple(bucket[1])  # fits the bucket exactly: one crop
    if center_crop:
        pixels, offset = data.crop_pixels(resized, size, center_crop=True)
        return CropSet([pixels], [offset], original, resized.width)
    rng = np.random.default_rng([seed, _CROP_SEED_TAG, index])
    crops: dict[tuple[int, int], np.ndarray] = {}
    for _ in range(2 * CROPS_PER_IMAGE):
        pixels, offset = data.crop_pixels(resized, size, center_crop=False, crop_rng=rng)
        crops.setdefault(offset, pixels)
        if len(crops) == CROPS_PER_IMAGE or whole:
            break
    return CropSet(list(crops.values()), list(crops), original, resized.width)


def example_crops(path: str | Path, resolution: int, *, center_crop: bool, seed: int, index: int,
                  interpolation: str) -> list[np.ndarray]:
    """The pixels of :func:`example_crop_set`."""
    return example_crop_set(path, resolution, center_crop=center_crop, seed=seed, index=index,
                            interpolation=interpolation).pixels


def decoded_in_order(count: int, decode: Callable[[int], Any], num_workers: int) -> Iterator[Any]:
    """``decode(0), decode(1), ...`` in order; with ``num_workers`` > 0 decoded by that many threads, at most
    2 x num_workers ahead (PIL releases the GIL while decoding and resizing; ``--dataloader_num_workers``)."""
    if num_workers <= 0:
        yield from map(decode, range(count))
        return
    with ThreadPoolExecutor(num_workers, thread_name_prefix="jaxbooth-decode") as pool:
        pending: collections.deque = collections.deque()
        for index in range(count):
            pending.append(pool.submit(decode, index))
            if len(pending) > 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def any_flips(dataset: data.Dataset, random_flip: bool) -> bool:
    """Whether any example is flipped at random (the run's ``random_flip`` or a subset's own)."""
    return any(subset_flips(subset, random_flip) for subset in dataset.subsets)


def encode_latent_cache(models: LoadedModels, dataset: data.Dataset, *, resolution: int, center_crop: bool,
                        random_flip: bool, seed: int, interpolation: str = data.DEFAULT_INTERPOLATION,
                        num_workers: int = 0, buckets: BucketPlan | None = None, shape: Shape | None = None,
                        disk: encoding_cache.EncodingStore | None = None) -> tuple[np.ndarray, np.ndarray, LatentIndex]:
    """(mean, std, index) of the VAE posterior of every cached crop and orientation of every example;
    the index also holds each row's original size and crop offset.

    With ``buckets`` and ``shape``: the cache of that bucket, holding the instance examples of the
    bucket and every class example (zero crops for the others), each resized to cover ``shape``.
    ``disk``: the ``--cache_latents_to_disk`` store; crops it holds are read, not encoded.
    """
    counts: list[int] = []
    sizes: list[tuple[int, int]] = []
    offsets: list[tuple[int, int]] = []
    random_flip = any_flips(dataset, random_flip)
    crop_width = resolution if shape is None else shape[1]

    def member(index: int) -> bool:
        return shape is None or buckets.bucket_of[index] < 0 or buckets.shape_of(index) == shape

    def decode(index: int) -> CropSet | None:
        if not member(index):
            return None
        bucket = None if shape is None else (buckets.resized_for(index, shape), shape)
        return example_crop_set(dataset.examples[index].path, resolution, center_crop=center_crop, seed=seed,
                                index=index, interpolation=interpolation, bucket=bucket)

    def key(index: int, offset: tuple[int, int], flipped: bool) -> str | None:
        if disk is None:
            return None
        resized = None if shape is None else buckets.resized_for(index, shape)
        return encoding_cache.latent_key(dataset.examples[index].content_hash, size=shape or (resolution, resolution),
                                         crop=offset, flip=flipped, interpolation=interpolation, encoder=disk.encoder,
                                         resize=encoding_cache.resize_label(resized))

    def rows() -> Iterator[tuple[str | None, np.ndarray]]:
        for index, crops in enumerate(decoded_in_order(len(dataset.examples), decode, num_workers)):
            if crops is None:
                counts.append(0)
                continue
            counts.append(len(crops.pixels))
            yield from ((key(index, offset, False), crop) for offset, crop in zip(crops.offsets, crops.pixels,
                                                                                  strict=True))
            offsets.extend(crops.offsets)
            if random_flip:  # the mirror of a crop is a crop of the mirrored image
                mirrored = crops.flipped_offsets(crop_width)
                yield from ((key(index, offset, True), crop[:, ::-1]) for offset, crop in zip(mirrored, crops.pixels,
                                                                                              strict=True))
                offsets.extend(mirrored)
            sizes.extend([crops.original_size] * (len(crops.pixels) * (2 if random_flip else 1)))

    if disk is None:
        mean, std = encode.encode_pixel_stream(models.vae, models.vae_params, (pixels for _, pixels in rows()))
    else:
        mean, std = encode.encode_pixel_stream_cached(models.vae, models.vae_params, rows(), disk)
    index = LatentIndex.from_counts(counts, 2 if random_flip else 1, original_sizes=np.asarray(sizes, np.int64),
                                    crops_top_left=np.asarray(offsets, np.int64))
    assert index.num_rows == len(mean) == len(sizes) == len(offsets), (index.num_rows, len(mean), len(offsets))
    return mean, std, index


def sdxl_posterior(mean: np.ndarray, std: np.ndarray, vae_config: Any) -> tuple[np.ndarray, np.ndarray]:
    """The posterior of ``(latent - latents_mean) / latents_std`` when the VAE config sets them (``sdxl.
    latent_statistics``), else as is; the step's ``x * scaling_factor`` then draws what diffusers' SDXL
    script trains on. SDXL never applies ``shift_factor`` (see ``train``)."""
    statistics = sdxl.latent_statistics(getattr(vae_config, "latents_mean", None),
                                        getattr(vae_config, "latents_std", None), mean.shape[-1], "vae/config.json")
    if statistics is None:
        return mean, std
    latents_mean, latents_std = statistics  # per channel, NHWC's last axis
    return ((mean - latents_mean) / latents_std).astype(np.float32), (std / latents_std).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class BucketCache:
    """One aspect-ratio bucket's latent arrays (``latent_mean``, ``latent_std``, SDXL ``time_ids``) and index."""

    arrays: dict[str, np.ndarray]
    latent_index: LatentIndex


@dataclasses.dataclass
class Caches:
    """What the train step reads by index (``frozen``: device-resident, replicated) and the host tables.

    With buckets ``frozen`` holds the text keys only and ``buckets`` each bucket shape's latent arrays
    (a step's frozen tree is ``frozen`` plus its bucket's arrays); ``latent_index`` is then None.
    """

    frozen: dict[str, np.ndarray]
    prompts: list[str]
    latent_index: LatentIndex | None
    buckets: dict[Shape, BucketCache] = dataclasses.field(default_factory=dict)
    row_ids: bool = False  # rows carry their own token ids (``row_tokenizer``); the step encodes them

    @property
    def num_latent_rows(self) -> int:
        indices = [self.latent_index] if self.latent_index is not None else [b.latent_index
                                                                             for b in self.buckets.values()]
        return sum(index.num_rows for index in indices)


# At most this many distinct row captions (every tag order of every shuffled caption, "" with dropout) are
# encoded up front; past it the rows carry token ids and the step encodes them (``row_token_ids``).
MAX_CACHED_CAPTIONS = 4096


def cached_prompts(dataset: data.Dataset) -> list[str] | None:
    """Every caption a row can train on, whose conditioning is cached: the example captions, the empty one
    where captions drop out, every tag order where they are shuffled; None when that passes
    :data:`MAX_CACHED_CAPTIONS` (then the example captions are cached and rows carry token ids)."""
    if not dataset.captions_vary:
        return sorted({example.caption for example in dataset.examples})
    possible = dataset.possible_captions(MAX_CACHED_CAPTIONS)
    return None if possible is None else list(possible)


# The frozen key of the frozen text encoders' params ({component: params}) when rows carry token ids.
ROW_TEXT_PARAMS = "text_encoders"


def row_tokenizer(spec: spec_lib.RunSpec, models: LoadedModels) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """Row captions -> the batch's token-id keys the step encodes (``train_step.row_text_conditioning``):
    SD ``input_ids`` and ``attention_mask``, SDXL each tokenizer's ids (``SDXL_INPUT_IDS``)."""
    if models.is_sdxl:
        fns = (make_tokenize_fn(models.tokenizer), make_tokenize_fn(models.tokenizer_2))
        return lambda captions: {key: np.asarray(fn(captions)[0], np.int32) for key, fn in zip(SDXL_INPUT_IDS, fns,
                                                                                               strict=True)}
    tokenize = make_tokenize_fn(models.tokenizer, spec.model.tokenizer_max_length)

    def ids(captions: list[str]) -> dict[str, np.ndarray]:
        input_ids, mask = tokenize(captions)
        return {"input_ids": np.asarray(input_ids, np.int32), "attention_mask": np.asarray(mask, np.int32)}
    return ids


def _row_text_params(spec: spec_lib.RunSpec, models: LoadedModels, dataset: data.Dataset) -> dict[str, Any]:
    """For rows with their own token ids: the frozen encoders' params (trained ones are in the state), after
    checking the step can encode them."""
    from jaxbooth.jax_backend import train_step

    if not hasattr(train_step, "row_text_conditioning"):
        raise JaxboothError(
            f"shuffle_caption (--shuffle_caption): the captions have more than {MAX_CACHED_CAPTIONS} tag orders, too "
            "many to encode up front, and this JAX step cannot encode per-row captions yet; keep more leading tags "
            "in place (--keep_tokens), use fewer tags, or train with --backend=torch.")
    if spec.model.train_text_encoder:
        return {}
    names = sdxl.TEXT_ENCODERS if models.is_sdxl else ("text_encoder",)
    params = {"text_encoder": models.text_params, "text_encoder_2": models.text_params_2}
    return {ROW_TEXT_PARAMS: {name: params[name] for name in names}}


def latent_arrays(models: LoadedModels, mean: np.ndarray, std: np.ndarray, index: LatentIndex,
                  target: int | Shape) -> dict[str, np.ndarray]:
    """The frozen latent keys of one cache: the posteriors and, for SDXL, every row's time ids (target:
    ``resolution`` or the bucket's (h, w))."""
    if not models.is_sdxl:
        return {"latent_mean": mean, "latent_std": std}
    mean, std = sdxl_posterior(mean, std, models.vae_config)
    return {"latent_mean": mean, "latent_std": std,
            "time_ids": sdxl.add_time_ids(index.original_sizes, index.crops_top_left, target)}


def loss_mask_array(dataset: data.Dataset, index: LatentIndex, crop: Shape,
                    resized_for: Callable[[int], Shape], interpolation: str, factor: int = 8) -> np.ndarray:
    """``--masked_loss``: every cache row's mask ``[num_rows, h/factor, w/factor, 1]`` (``data.masks``; factor: the
    VAE's downsampling), in the rows' order (``LatentIndex.row``: per example, each orientation's crops)."""
    rows = [(example, bool(flipped)) for example in range(len(index.crops))
            for flipped in range(index.orientations) for _ in range(int(index.crops[example]))]
    paths = [example.path for example in dataset.examples]
    found = masks.cache_loss_masks(paths, rows, index.crops_top_left, crop, resized_for, interpolation=interpolation,
                                   factor=factor)
    return found[..., None]


def text_arrays(spec: spec_lib.RunSpec, models: LoadedModels, prompts: list[str],
                disk: encoding_cache.EncodingStore | None = None) -> dict[str, np.ndarray]:
    """Token ids (trained encoders) or embeddings (frozen; read from ``disk`` where it has them) of every
    cached prompt."""
    if models.is_sdxl:
        tokenize_fns = (make_tokenize_fn(models.tokenizer), make_tokenize_fn(models.tokenizer_2))
        if spec.model.train_text_encoder:  # the step encodes through both trained encoders
            return {key: tokenize(prompts)[0] for key, tokenize in zip(SDXL_INPUT_IDS, tokenize_fns, strict=True)}
        embeddings, pooled = encode.encode_sdxl_prompts(
            (models.text_encoder, models.text_encoder_2), (models.text_params, models.text_params_2),
            tokenize_fns, prompts, disk=disk)
        return {"text_embeddings": embeddings, "pooled_embeddings": pooled}
    tokenize = make_tokenize_fn(models.tokenizer, spec.model.tokenizer_max_length)
    if spec.model.train_text_encoder:
        input_ids, mask = tokenize(prompts)
        return {"input_ids": input_ids, "attention_mask": mask}
    return {"text_embeddings": encode.encode_prompts(
        text_apply_fn(models.text_encoder), models.text_params, tokenize, prompts,
        use_attention_mask=spec.model.text_encoder_use_attention_mask, disk=disk)}


def build_caches(spec: spec_lib.RunSpec, models: LoadedModels, dataset: data.Dataset, seed: int,
                 buckets: BucketPlan | None = None) -> Caches:
    """Latent posteriors of the training crops and token ids (trained encoder) or embeddings of every prompt.

    SDXL also caches the time ids of every latent row (``time_ids`` ``[num_rows, 6]``, read by the
    batch's ``example_idx``) and, with both encoders frozen, the pooled embedding of every prompt
    (``pooled_embeddings``); with ``train_text_encoder`` each tokenizer's ids (``train_step.SDXL_INPUT_IDS``).
    With ``buckets``: one latent cache per bucket shape (``Caches.buckets``).
    """
    d = spec.data
    latent_disk, text_disk = encode.disk_stores(spec, models)
    encode_latents = functools.partial(encode_latent_cache, models, dataset, resolution=d.resolution,
                                       center_crop=d.center_crop, random_flip=d.random_flip, seed=seed,
                                       interpolation=d.image_interpolation_mode, num_workers=d.dataloader_num_workers,
                                       disk=latent_disk)
    prompts = cached_prompts(dataset)
    row_ids = prompts is None  # too many tag orders to list: the step encodes each row's ids (``row_tokenizer``)
    text = _row_text_params(spec, models, dataset) if row_ids else {}
    if row_ids:
        prompts = sorted({example.caption for example in dataset.examples} | {""})
    text.update(text_arrays(spec, models, prompts, text_disk))
    masked = spec.optim.masked_loss
    if buckets is None:
        mean, std, latent_index = encode_latents()
        frozen = latent_arrays(models, mean, std, latent_index, d.resolution)
        if masked:
            first = latent_index.first

            def resized(example: int) -> Shape:
                return masks.short_side_size(latent_index.original_sizes[first[example]], d.resolution)

            frozen["loss_mask"] = loss_mask_array(dataset, latent_index, (d.resolution, d.resolution), resized,
                                                  d.image_interpolation_mode, d.resolution // mean.shape[1])
        encode.log_disk_summaries(latent_disk, text_disk)
        return Caches(frozen={**frozen, **text}, prompts=prompts, latent_index=latent_index, row_ids=row_ids)
    per_bucket = {}
    for shape in buckets.shapes:
        mean, std, latent_index = encode_latents(buckets=buckets, shape=shape)
        arrays = latent_arrays(models, mean, std, latent_index, shape)
        if masked:
            arrays["loss_mask"] = loss_mask_array(dataset, latent_index, shape,
                                                  functools.partial(buckets.resized_for, shape=shape),
                                                  d.image_interpolation_mode, shape[0] // mean.shape[1])
        per_bucket[shape] = BucketCache(arrays, latent_index)
    encode.log_disk_summaries(latent_disk, text_disk)
    return Caches(frozen=text, prompts=prompts, latent_index=None, buckets=per_bucket, row_ids=row_ids)


def global_rows(iterator: data.BatchIterator, epoch: int, position: int, prompt_index: dict[str, int],
                latent_index: LatentIndex, tokenize: Callable[[list[str]], dict[str, np.ndarray]] | None = None
                ) -> dict[str, np.ndarray]:
    """Latent-cache row and prompt index of every row of the global batch: instance rows, then class rows.

    Each row draws its flip (where its subset flips), then its crop, then its caption (dropout, shuffle:
    ``batches.row_caption``) from ``iterator.row_rng``. A dropped caption is the cached empty prompt;
    with ``tokenize`` (shuffled captions) the rows' token ids come too, for the step to encode.
    ``latent_index``: the run's, or with buckets the batch's bucket's.
    """
    examples, subsets = iterator.dataset.examples, iterator.dataset.subsets
    rows, prompts, captions = [], [], []
    for example, slot, stream in iterator.global_row_plan(epoch, position):
        rng = iterator.row_rng(epoch, slot, stream)
        flipped = bool(iterator.flips(example) and rng.random() < 0.5)
        count = int(latent_index.crops[example])
        crop = int(rng.integers(count)) if count > 1 else 0
        rows.append(latent_index.row(example, flipped, crop))
        caption = row_caption(examples[example].caption, subsets[examples[example].subset], rng)
        captions.append(caption)
        prompts.append(prompt_index.get(caption, prompt_index.get(examples[example].caption, 0)))
    batch = {"example_idx": np.asarray(rows, np.int32), "prompt_idx": np.asarray(prompts, np.int32)}
    if tokenize is not None:
        batch.update(tokenize(captions))
    return batch
