"""Encode once, train many times: the VAE posterior of every image and the text embedding
of every prompt are computed before the loop, so the train step runs the UNet only and
the VAE (and a frozen text encoder) need not stay in device memory.

The VAE posterior (mean, std) is cached rather than one latent sample, so each step still
draws a fresh ``latent_dist.sample()`` as diffusers does. Which crops and orientations of
each image are cached is ``caches.py``'s business; this module encodes pixel arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxbooth import sdxl
from jaxbooth.jax_backend.models.vae import FlaxAutoencoderKL

ENCODE_BATCH = 8  # fixed batch so the encoder compiles once; the last batch is padded


def encode_pixel_stream(vae: FlaxAutoencoderKL, vae_params, pixels: Iterable[np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the VAE posterior of each ``[H, W, 3]`` pixel array, NHWC float32 ``[N, h, w, c]``.

    Consumes ``pixels`` lazily, ``ENCODE_BATCH`` at a time, so host memory holds one batch of
    images, not the data set.
    """

    @jax.jit
    def encode(params, batch):
        posterior = vae.apply({"params": params}, batch, method=FlaxAutoencoderKL.encode)
        return posterior.mean, posterior.std

    means, stds = [], []

    def flush(rows: list[np.ndarray]) -> None:
        padded = np.stack(rows + [rows[-1]] * (ENCODE_BATCH - len(rows)))
        mean, std = jax.device_get(encode(vae_params, jnp.asarray(padded)))
        means.append(mean[: len(rows)])
        stds.append(std[: len(rows)])

    pending: list[np.ndarray] = []
    for image in pixels:
        pending.append(image)
        if len(pending) == ENCODE_BATCH:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    if not means:
        raise ValueError("encode_pixel_stream got no images")
    return np.concatenate(means).astype(np.float32), np.concatenate(stds).astype(np.float32)


def encode_prompts(text_apply: Callable, text_params, tokenize: Callable, prompts: Sequence[str], *,
                   use_attention_mask: bool) -> np.ndarray:
    """Last hidden states ``[P, L, D]`` of each prompt (diffusers' ``encode_prompt``)."""
    input_ids, mask = tokenize(list(prompts))
    hidden = jax.jit(text_apply)({"params": text_params}, jnp.asarray(input_ids),
                                 jnp.asarray(mask) if use_attention_mask else None)
    return np.asarray(jax.device_get(hidden), np.float32)


def encode_sdxl_prompts(text_encoders: tuple, text_params: tuple, tokenize_fns: tuple,
                        prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """SDXL conditioning of each prompt: (prompt_embeds ``[P, L, D1 + D2]``, pooled ``[P, Dproj]``), float32.

    As diffusers' SDXL ``encode_prompt``: each encoder's penultimate hidden states
    (``sdxl.HIDDEN_STATE_INDEX``), concatenated in encoder order, and the projected pooled output
    (``text_embeds``) of the second; no attention mask, as diffusers' SDXL script passes none.
    """
    if not len(text_encoders) == len(text_params) == len(tokenize_fns) == len(sdxl.TEXT_ENCODERS):
        raise ValueError(f"SDXL needs {len(sdxl.TEXT_ENCODERS)} text encoders, params and tokenizers; got "
                         f"{len(text_encoders)}, {len(text_params)}, {len(tokenize_fns)}")
    hidden, pooled = [], None
    for module, params, tokenize in zip(text_encoders, text_params, tokenize_fns, strict=True):

        def forward(variables, ids, module=module):
            out = module.apply(variables, ids, None, output_hidden_states=True)
            return out.hidden_states[sdxl.HIDDEN_STATE_INDEX], out.text_embeds

        input_ids, _ = tokenize(list(prompts))
        states, pooled = jax.device_get(jax.jit(forward)({"params": params}, jnp.asarray(input_ids)))
        hidden.append(np.asarray(states, np.float32))
    if pooled is None:
        raise ValueError("the second SDXL text encoder has no text_projection (text_embeds); it must be "
                         "CLIPTextModelWithProjection")
    return sdxl.concat_prompt_embeds(hidden).astype(np.float32), np.asarray(pooled, np.float32)
