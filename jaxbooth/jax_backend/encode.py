"""Encode once, train many times: the VAE posterior of every image and the text embedding
of every prompt are computed before the loop, so the train step runs the UNet only and
the VAE (and a frozen text encoder) need not stay in device memory.

The VAE posterior (mean, std) is cached rather than one latent sample, so each step still
draws a fresh ``latent_dist.sample()`` as diffusers does. With ``random_flip`` both
orientations are cached and each row picks one. Cached images use the centre crop: with
random crops of non-square images the crop is fixed (kohya does the same when caching
latents), which the trainer reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxbooth.data import Dataset, load_image
from jaxbooth.jax_backend.models.vae import FlaxAutoencoderKL

ENCODE_BATCH = 8  # fixed batch so the encoder compiles once; the last batch is padded


def _padded_batches(count: int, batch: int) -> list[np.ndarray]:
    return [np.arange(start, min(start + batch, count)) for start in range(0, count, batch)]


def encode_latent_posteriors(vae: FlaxAutoencoderKL, vae_params, dataset: Dataset, *, resolution: int,
                             center_crop: bool = True, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the VAE posterior for every example, NHWC float32 ``[N, h, w, c]``.

    ``flip`` encodes the horizontally flipped images (``random_flip`` caches both orientations).
    """

    @jax.jit
    def encode(params, pixels):
        posterior = vae.apply({"params": params}, pixels, method=FlaxAutoencoderKL.encode)
        return posterior.mean, posterior.std

    means, stds = [], []
    examples = dataset.examples
    for rows in _padded_batches(len(examples), ENCODE_BATCH):
        pixels = np.stack([load_image(examples[i].path, resolution, center_crop=center_crop, flip=flip,
                                      crop_rng=np.random.default_rng(0)) for i in rows])
        padded = np.concatenate([pixels, np.repeat(pixels[-1:], ENCODE_BATCH - len(rows), axis=0)])
        mean, std = jax.device_get(encode(vae_params, jnp.asarray(padded)))
        means.append(mean[: len(rows)])
        stds.append(std[: len(rows)])
    return np.concatenate(means).astype(np.float32), np.concatenate(stds).astype(np.float32)


def encode_prompts(text_apply: Callable, text_params, tokenize: Callable, prompts: Sequence[str], *,
                   use_attention_mask: bool) -> np.ndarray:
    """Last hidden states ``[P, L, D]`` of each prompt (diffusers' ``encode_prompt``)."""
    input_ids, mask = tokenize(list(prompts))
    hidden = jax.jit(text_apply)({"params": text_params}, jnp.asarray(input_ids),
                                 jnp.asarray(mask) if use_attention_mask else None)
    return np.asarray(jax.device_get(hidden), np.float32)
