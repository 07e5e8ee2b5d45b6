"""Encode-once caches of a JAX run: VAE posteriors of the training crops, prompt ids or embeddings.

Crops. With ``center_crop`` off diffusers takes a fresh ``RandomCrop`` each time it loads an
image. The latent cache holds a few crops of each image instead (:data:`CROPS_PER_IMAGE`,
offsets drawn once from a generator seeded with (seed, image index)), both orientations with
``random_flip``, and each training row picks one orientation and one crop with its own
generator, ``BatchIterator.row_rng(epoch, slot, stream)``, drawing in the order the iterator's
``load_batch`` draws flip then crop. The pick is a pure function of (seed, epoch, slot, stream),
so a resumed run picks exactly what the uninterrupted run picked. ``center_crop`` caches the
one centre crop, and a square image has one crop (every crop of it is the same).

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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth import data, sdxl
from jaxbooth import spec as spec_lib
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
        """Each crop's mirror as a crop of the mirrored image: its offset there (``sdxl.flipped_crop_top_left``)."""
        return [sdxl.flipped_crop_top_left(offset, self.resized_width, resolution) for offset in self.offsets]


def example_crop_set(path: str | Path, resolution: int, *, center_crop: bool, seed: int, index: int,
                     interpolation: str) -> CropSet:
    """The centre crop of one image, or up to CROPS_PER_IMAGE distinct random ones (the loader's
    torchvision RandomCrop offsets) from the generator of (seed, index), with their offsets.

    Offsets are drawn until CROPS_PER_IMAGE distinct ones are found or 2 x CROPS_PER_IMAGE draws
    are spent (an image barely wider than it is high has fewer distinct crops than that).
    """
    resized, original = data.load_resized(path, resolution, interpolation=interpolation)  # decoded once
    if center_crop:
        pixels, offset = data.crop_pixels(resized, resolution, center_crop=True)
        return CropSet([pixels], [offset], original, resized.width)
    rng = np.random.default_rng([seed, _CROP_SEED_TAG, index])
    crops: dict[tuple[int, int], np.ndarray] = {}
    for _ in range(2 * CROPS_PER_IMAGE):
        pixels, offset = data.crop_pixels(resized, resolution, center_crop=False, crop_rng=rng)
        crops.setdefault(offset, pixels)
        if len(crops) == CROPS_PER_IMAGE or original[0] == original[1]:  # square: one crop, the whole image
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


def encode_latent_cache(models: LoadedModels, dataset: data.Dataset, *, resolution: int, center_crop: bool,
                        random_flip: bool, seed: int, interpolation: str = data.DEFAULT_INTERPOLATION,
                        num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, LatentIndex]:
    """(mean, std, index) of the VAE posterior of every cached crop and orientation of every example;
    the index also holds each row's original size and crop offset."""
    counts: list[int] = []
    sizes: list[tuple[int, int]] = []
    offsets: list[tuple[int, int]] = []

    def decode(index: int) -> CropSet:
        return example_crop_set(dataset.examples[index].path, resolution, center_crop=center_crop, seed=seed,
                                index=index, interpolation=interpolation)

    def pixels() -> Iterator[np.ndarray]:
        for crops in decoded_in_order(len(dataset.examples), decode, num_workers):
            counts.append(len(crops.pixels))
            yield from crops.pixels
            offsets.extend(crops.offsets)
            if random_flip:  # the mirror of a crop is a crop of the mirrored image
                yield from (crop[:, ::-1] for crop in crops.pixels)
                offsets.extend(crops.flipped_offsets(resolution))
            sizes.extend([crops.original_size] * (len(crops.pixels) * (2 if random_flip else 1)))

    mean, std = encode.encode_pixel_stream(models.vae, models.vae_params, pixels())
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


@dataclasses.dataclass
class Caches:
    """What the train step reads by index (``frozen``: device-resident, replicated) and the host tables."""

    frozen: dict[str, np.ndarray]
    prompts: list[str]
    latent_index: LatentIndex


def build_caches(spec: spec_lib.RunSpec, models: LoadedModels, dataset: data.Dataset, seed: int) -> Caches:
    """Latent posteriors of the training crops and token ids (trained encoder) or embeddings of every prompt.

    SDXL also caches the time ids of every latent row (``time_ids`` ``[num_rows, 6]``, read by the
    batch's ``example_idx``) and, with both encoders frozen, the pooled embedding of every prompt
    (``pooled_embeddings``); with ``train_text_encoder`` each tokenizer's ids (``train_step.SDXL_INPUT_IDS``).
    """
    d = spec.data
    mean, std, latent_index = encode_latent_cache(models, dataset, resolution=d.resolution,
                                                  center_crop=d.center_crop, random_flip=d.random_flip, seed=seed,
                                                  interpolation=d.image_interpolation_mode,
                                                  num_workers=d.dataloader_num_workers)
    prompts = sorted({example.caption for example in dataset.examples})
    if models.is_sdxl:
        mean, std = sdxl_posterior(mean, std, models.vae_config)
        time_ids = sdxl.add_time_ids(latent_index.original_sizes, latent_index.crops_top_left, d.resolution)
        frozen = {"latent_mean": mean, "latent_std": std, "time_ids": time_ids}
        tokenize_fns = (make_tokenize_fn(models.tokenizer), make_tokenize_fn(models.tokenizer_2))
        if spec.model.train_text_encoder:  # the step encodes through both trained encoders
            frozen.update({key: tokenize(prompts)[0] for key, tokenize in zip(SDXL_INPUT_IDS, tokenize_fns,
                                                                               strict=True)})
        else:
            frozen["text_embeddings"], frozen["pooled_embeddings"] = encode.encode_sdxl_prompts(
                (models.text_encoder, models.text_encoder_2), (models.text_params, models.text_params_2),
                tokenize_fns, prompts)
        return Caches(frozen=frozen, prompts=prompts, latent_index=latent_index)
    tokenize = make_tokenize_fn(models.tokenizer, spec.model.tokenizer_max_length)
    frozen = {"latent_mean": mean, "latent_std": std}
    if spec.model.train_text_encoder:
        input_ids, mask = tokenize(prompts)
        frozen.update(input_ids=input_ids, attention_mask=mask)
    else:
        frozen["text_embeddings"] = encode.encode_prompts(
            text_apply_fn(models.text_encoder), models.text_params, tokenize, prompts,
            use_attention_mask=spec.model.text_encoder_use_attention_mask)
    return Caches(frozen=frozen, prompts=prompts, latent_index=latent_index)


def global_rows(iterator: data.BatchIterator, epoch: int, position: int, prompt_index: dict[str, int],
                latent_index: LatentIndex) -> dict[str, np.ndarray]:
    """Latent-cache row and prompt index of every row of the global batch: instance rows, then class rows.

    Each row draws its flip (with ``random_flip``), then its crop, from ``iterator.row_rng``.
    """
    examples = iterator.dataset.examples
    rows, prompts = [], []
    for example, slot, stream in iterator.global_row_plan(epoch, position):
        rng = iterator.row_rng(epoch, slot, stream)
        flipped = bool(iterator.random_flip and rng.random() < 0.5)
        count = int(latent_index.crops[example])
        crop = int(rng.integers(count)) if count > 1 else 0
        rows.append(latent_index.row(example, flipped, crop))
        prompts.append(prompt_index[examples[example].caption])
    return {"example_idx": np.asarray(rows, np.int32), "prompt_idx": np.asarray(prompts, np.int32)}
