"""Encode once, train many times: the VAE posterior of every image and the text embedding
of every prompt are computed before the loop, so the train step runs the UNet only and
the VAE (and a frozen text encoder) need not stay in device memory.

The VAE posterior (mean, std) is cached rather than one latent sample, so each step still
draws a fresh ``latent_dist.sample()`` as diffusers does. Which crops and orientations of
each image are cached is ``caches.py``'s business; this module encodes pixel arrays.

SDXL's conditioning (:func:`sdxl_conditioning`) is traceable: the cache encodes with it once when
the encoders are frozen, and the train step calls it on every batch when they are trained.
"""

from __future__ import annotations

import functools
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


def sdxl_conditioning(text_encoders: Sequence, text_params: Sequence,
                      input_ids: Sequence) -> tuple[jax.Array, jax.Array]:
    """SDXL conditioning from token ids, traceable: (prompt_embeds ``[P, L, D1 + D2]``, pooled ``[P, Dproj]``).

    As diffusers' SDXL ``encode_prompt``: each encoder's penultimate hidden states
    (``sdxl.HIDDEN_STATE_INDEX``), concatenated in encoder order on the feature axis, and the projected
    pooled output (``text_embeds``) of the second;
    no attention mask, as diffusers' SDXL script passes none. The frozen-encoder cache
    (:func:`encode_sdxl_prompts`) and the train step of trained encoders both call it, so the two
    cannot drift. ``text_params``: each encoder's param tree (not wrapped in ``{"params": ...}``).
    """
    if not len(text_encoders) == len(text_params) == len(input_ids) == len(sdxl.TEXT_ENCODERS):
        raise ValueError(f"SDXL needs {len(sdxl.TEXT_ENCODERS)} text encoders, params and token ids; got "
                         f"{len(text_encoders)}, {len(text_params)}, {len(input_ids)}")
    hidden, pooled = [], None
    for module, params, ids in zip(text_encoders, text_params, input_ids, strict=True):
        out = module.apply({"params": params}, ids, None, output_hidden_states=True)
        hidden.append(out.hidden_states[sdxl.HIDDEN_STATE_INDEX])
        pooled = out.text_embeds
    if pooled is None:
        raise ValueError("the second SDXL text encoder has no text_projection (text_embeds); it must be "
                         "CLIPTextModelWithProjection")
    return jnp.concatenate(hidden, axis=-1), pooled


def encode_sdxl_prompts(text_encoders: tuple, text_params: tuple, tokenize_fns: tuple,
                        prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sdxl_conditioning` of each prompt, tokenized by each encoder's own tokenizer; float32 numpy."""
    if len(tokenize_fns) != len(sdxl.TOKENIZERS):
        raise ValueError(f"SDXL needs {len(sdxl.TOKENIZERS)} tokenizers; got {len(tokenize_fns)}")
    input_ids = tuple(jnp.asarray(tokenize(list(prompts))[0]) for tokenize in tokenize_fns)
    forward = jax.jit(functools.partial(sdxl_conditioning, tuple(text_encoders)))
    embeds, pooled = jax.device_get(forward(tuple(text_params), input_ids))
    return np.asarray(embeds, np.float32), np.asarray(pooled, np.float32)


def sdxl_trainable_mask(num_hidden_layers: int, component: str = sdxl.TEXT_ENCODERS[0]) -> Callable[[dict], dict]:
    """``params -> bool tree``: False for the leaves of ``params[component]`` that :func:`sdxl_conditioning`
    never reads, True elsewhere; for ``optim.make_optimizer``'s ``trainable_mask``.

    The first encoder conditions through its penultimate hidden states (``sdxl.HIDDEN_STATE_INDEX``), so
    its later layer(s) and ``final_layer_norm`` (or their adapters) never reach the loss: torch leaves them
    without a ``.grad`` and AdamW skips them, no update and no weight decay. Masked, they stay as loaded.
    ``num_hidden_layers``: that encoder's (its config's).
    """
    first_unused = num_hidden_layers + sdxl.HIDDEN_STATE_INDEX + 1  # hidden_states[0] is the embeddings'

    def used(path, _leaf) -> bool:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if keys[:2] != [component, "text_model"]:
            return True
        if keys[2] == "final_layer_norm":
            return False
        return not (keys[2:4] == ["encoder", "layers"] and int(keys[4]) >= first_unused)

    return lambda params: jax.tree_util.tree_map_with_path(used, params)
