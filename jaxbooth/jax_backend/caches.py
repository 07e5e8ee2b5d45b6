"""Encode-once caches of a JAX run: VAE posteriors of the training crops, prompt ids or embeddings.

Crops. With ``center_crop`` off diffusers takes a fresh ``RandomCrop`` each time it loads an
image. The latent cache holds a few crops of each image instead (:data:`CROPS_PER_IMAGE`,
offsets drawn once from a generator seeded with (seed, image index)), both orientations with
``random_flip``, and each training row picks one orientation and one crop with its own
generator, ``BatchIterator.row_rng(epoch, slot, stream)``, drawing in the order the iterator's
``load_batch`` draws flip then crop. The pick is a pure function of (seed, epoch, slot, stream),
so a resumed run picks exactly what the uninterrupted run picked. ``center_crop`` caches the
one centre crop, and a square image has one crop (every crop of it is the same).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth import data
from jaxbooth import spec as spec_lib
from jaxbooth.jax_backend import encode
from jaxbooth.jax_backend.loaded import LoadedModels
from jaxbooth.jax_backend.loading import text_apply_fn
from jaxbooth.text import make_tokenize_fn

# Why 4: every cached crop costs one VAE encode (two with random_flip) and one posterior of device
# memory per image (SD at 512 px: 128 KiB for mean + std), so the cache is at most 8x a centre-crop
# one; 4 offsets along the long side already show the model most of what a random crop of a 3:4
# photo shows, and each step still draws a fresh latent sample from the chosen posterior.
CROPS_PER_IMAGE = 4
_CROP_SEED_TAG = 0x63726F70  # "crop": keeps the crop generators apart from the data iterator's


@dataclasses.dataclass(frozen=True)
class LatentIndex:
    """Where each example's posteriors sit in the cache: row ``first[e] + flipped * crops[e] + crop``."""

    first: np.ndarray  # int64 [num_examples]
    crops: np.ndarray  # int64 [num_examples]: distinct crops per orientation
    orientations: int  # 2 with random_flip, else 1

    @classmethod
    def from_counts(cls, crops: list[int], orientations: int) -> LatentIndex:
        counts = np.asarray(crops, np.int64)
        first = np.concatenate([[0], np.cumsum(counts * orientations)[:-1]]).astype(np.int64)
        return cls(first=first, crops=counts, orientations=orientations)

    @property
    def num_rows(self) -> int:
        return int((self.crops * self.orientations).sum())

    def row(self, example: int, flipped: bool, crop: int) -> int:
        if not 0 <= crop < self.crops[example] or (flipped and self.orientations == 1):
            raise IndexError(f"example {example} has {self.crops[example]} crop(s) x {self.orientations} "
                             f"orientation(s); asked for crop {crop}, flipped={flipped}")
        return int(self.first[example] + int(flipped) * self.crops[example] + crop)


def example_crops(path: str | Path, resolution: int, *, center_crop: bool, seed: int, index: int,
                  interpolation: str) -> list[np.ndarray]:
    """Pixel crops ``[res, res, 3]`` of one image: the centre crop, or up to CROPS_PER_IMAGE distinct
    random ones (the loader's torchvision RandomCrop offsets) from the generator of (seed, index).

    Offsets are drawn until CROPS_PER_IMAGE distinct ones are found or 2 x CROPS_PER_IMAGE draws
    are spent (an image barely wider than it is high has fewer distinct crops than that).
    """
    if center_crop:
        return [data.load_image(path, resolution, center_crop=True, interpolation=interpolation)]
    rng = np.random.default_rng([seed, _CROP_SEED_TAG, index])
    resized, original = data.load_resized(path, resolution, interpolation=interpolation)  # decoded once
    crops: dict[tuple[int, int], np.ndarray] = {}
    for _ in range(2 * CROPS_PER_IMAGE):
        pixels, offset = data.crop_pixels(resized, resolution, center_crop=False, crop_rng=rng)
        crops.setdefault(offset, pixels)
        if len(crops) == CROPS_PER_IMAGE or original[0] == original[1]:  # square: one crop, the whole image
            break
    return list(crops.values())


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
    """(mean, std, index) of the VAE posterior of every cached crop and orientation of every example."""
    counts: list[int] = []

    def decode(index: int) -> list[np.ndarray]:
        return example_crops(dataset.examples[index].path, resolution, center_crop=center_crop, seed=seed,
                             index=index, interpolation=interpolation)

    def pixels() -> Iterator[np.ndarray]:
        for crops in decoded_in_order(len(dataset.examples), decode, num_workers):
            counts.append(len(crops))
            yield from crops
            if random_flip:  # the mirror of a crop is a crop of the mirrored image
                yield from (crop[:, ::-1] for crop in crops)

    mean, std = encode.encode_pixel_stream(models.vae, models.vae_params, pixels())
    index = LatentIndex.from_counts(counts, 2 if random_flip else 1)
    assert index.num_rows == len(mean), (index.num_rows, len(mean))
    return mean, std, index


@dataclasses.dataclass
class Caches:
    """What the train step reads by index (``frozen``: device-resident, replicated) and the host tables."""

    frozen: dict[str, np.ndarray]
    prompts: list[str]
    latent_index: LatentIndex


def build_caches(spec: spec_lib.RunSpec, models: LoadedModels, dataset: data.Dataset, seed: int) -> Caches:
    """Latent posteriors of the training crops and token ids (trained encoder) or embeddings of every prompt."""
    d = spec.data
    mean, std, latent_index = encode_latent_cache(models, dataset, resolution=d.resolution,
                                                  center_crop=d.center_crop, random_flip=d.random_flip, seed=seed,
                                                  interpolation=d.image_interpolation_mode,
                                                  num_workers=d.dataloader_num_workers)
    prompts = sorted({example.caption for example in dataset.examples})
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
