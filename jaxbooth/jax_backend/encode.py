"""Encode once, train many times: the VAE posterior of every image and the text embedding
of every prompt are computed before the loop, so the train step runs the UNet only and
the VAE (and a frozen text encoder) need not stay in device memory.

The VAE posterior (mean, std) is cached rather than one latent sample, so each step still
draws a fresh ``latent_dist.sample()`` as diffusers does. Which crops and orientations of
each image are cached is ``caches.py``'s business; this module encodes pixel arrays.

With ``--cache_latents_to_disk`` / ``--cache_text_embeddings_to_disk`` (:func:`disk_stores`) the cached variants
read what ``jaxbooth.encoding_cache`` has stored under their keys (by either backend) and encode only the
rest, in the same fixed-shape padded batches.

SDXL's conditioning (:func:`sdxl_conditioning`) is traceable: the cache encodes with it once when
the encoders are frozen, and the train step calls it on every batch when they are trained.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbooth import encoding_cache, sdxl
from jaxbooth import log as jaxbooth_log
from jaxbooth.hub import vae_component_folder
from jaxbooth.jax_backend.loaded import LoadedModels
from jaxbooth.jax_backend.models.vae import FlaxAutoencoderKL

ENCODE_BATCH = 8  # fixed batch so the encoder compiles once; the last batch is padded


def _posterior_fn(vae: FlaxAutoencoderKL) -> Callable:
    """``(params, pixels [ENCODE_BATCH, H, W, 3]) -> (mean, std)``, jitted: one compile per pixel shape."""

    @jax.jit
    def encode(params, batch):
        posterior = vae.apply({"params": params}, batch, method=FlaxAutoencoderKL.encode)
        return posterior.mean, posterior.std

    return encode


def _padded(rows: list[np.ndarray]) -> np.ndarray:
    """``rows`` stacked and padded to ``ENCODE_BATCH`` with copies of the last, so every call has one shape."""
    return np.stack(rows + [rows[-1]] * (ENCODE_BATCH - len(rows)))


def encode_pixel_stream(vae: FlaxAutoencoderKL, vae_params, pixels: Iterable[np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the VAE posterior of each ``[H, W, 3]`` pixel array, NHWC float32 ``[N, h, w, c]``.

    Consumes ``pixels`` lazily, ``ENCODE_BATCH`` at a time, so host memory holds one batch of
    images, not the data set.
    """
    encode = _posterior_fn(vae)
    means, stds = [], []

    def flush(rows: list[np.ndarray]) -> None:
        mean, std = jax.device_get(encode(vae_params, jnp.asarray(_padded(rows))))
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


def encode_pixel_rows_cached(vae: FlaxAutoencoderKL, vae_params, rows: Iterable[tuple[str, np.ndarray]],
                             store: encoding_cache.EncodingStore) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per ``(key, [H, W, 3] pixels)`` row the VAE posterior (mean, std), NHWC float32 ``[h, w, c]``: read from
    ``store`` (``encoding_cache.latent_key`` keys) where it has the key, else encoded and put there.

    Misses are encoded ``ENCODE_BATCH`` at a time per pixel shape, padded (one compile per shape, whatever the
    number of misses); a key seen twice is encoded once. Reads ``rows`` lazily, a batch of lookups at a time.
    """
    encode = _posterior_fn(vae)
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    first: dict[str, int] = {}  # key -> its first row
    copies: list[tuple[int, int]] = []  # (row, row whose result it repeats)
    pending: dict[tuple, list[tuple[int, str, np.ndarray]]] = {}

    def flush(group: list[tuple[int, str, np.ndarray]]) -> None:
        mean, std = jax.device_get(encode(vae_params, jnp.asarray(_padded([pixels for _, _, pixels in group]))))
        for j, (index, key, _) in enumerate(group):
            out[index] = (np.asarray(mean[j], np.float32), np.asarray(std[j], np.float32))
            store.put(key, {"mean": mean[j].transpose(2, 0, 1), "std": std[j].transpose(2, 0, 1)})

    def look_up(chunk: list[tuple[int, str, np.ndarray]]) -> None:
        found = store.get_many(key for _, key, _ in chunk)
        for index, key, pixels in chunk:
            if key in found:  # stored channel-first
                entry = found[key]
                out[index] = (entry["mean"].transpose(1, 2, 0), entry["std"].transpose(1, 2, 0))
                continue
            group = pending.setdefault(pixels.shape, [])
            group.append((index, key, pixels))
            if len(group) == ENCODE_BATCH:
                flush(group)
                pending[pixels.shape] = []

    chunk: list[tuple[int, str, np.ndarray]] = []
    for index, (key, pixels) in enumerate(rows):
        out.append(None)
        if key in first:
            copies.append((index, first[key]))
            continue
        first[key] = index
        chunk.append((index, key, np.asarray(pixels)))
        if len(chunk) == ENCODE_BATCH:
            look_up(chunk)
            chunk = []
    if chunk:
        look_up(chunk)
    for group in pending.values():
        if group:
            flush(group)
    for index, source in copies:
        out[index] = out[source]
    return out  # type: ignore[return-value]


def encode_pixel_stream_cached(vae: FlaxAutoencoderKL, vae_params, rows: Iterable[tuple[str, np.ndarray]],
                               store: encoding_cache.EncodingStore) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_pixel_stream` through the disk cache: ``rows`` are ``(latent key, pixels)`` of one shape."""
    posteriors = encode_pixel_rows_cached(vae, vae_params, rows, store)
    if not posteriors:
        raise ValueError("encode_pixel_stream_cached got no images")
    return (np.stack([mean for mean, _ in posteriors]).astype(np.float32),
            np.stack([std for _, std in posteriors]).astype(np.float32))


def log_disk_summaries(*stores: encoding_cache.EncodingStore | None) -> None:
    """Log each store's "encoded N, read M from the disk cache" line (process 0; None: cache off)."""
    for store in stores:
        if store is not None and jax.process_index() == 0:
            jaxbooth_log.info(store.summary())


def _through_store(keys: list[str], store: encoding_cache.EncodingStore,
                   encode_rows: Callable[[np.ndarray], dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per name, the stacked arrays of each key's entry: stored ones read, the rest encoded by
    ``encode_rows(row indices [ENCODE_BATCH])`` (padded with the last miss, so one shape) and put."""
    found = store.get_many(keys)
    first_row = {key: row for row, key in reversed(list(enumerate(keys)))}
    misses = [key for key in first_row if key not in found]
    for start in range(0, len(misses), ENCODE_BATCH):
        batch = misses[start:start + ENCODE_BATCH]
        rows = np.asarray([first_row[key] for key in batch] + [first_row[batch[-1]]] * (ENCODE_BATCH - len(batch)))
        encoded = {name: np.asarray(value, np.float32) for name, value in jax.device_get(encode_rows(rows)).items()}
        for j, key in enumerate(batch):
            found[key] = {name: value[j] for name, value in encoded.items()}
            store.put(key, found[key])
    names = found[keys[0]].keys() if keys else ()
    return {name: np.stack([found[key][name] for key in keys]).astype(np.float32) for name in names}


def encode_prompts(text_apply: Callable, text_params, tokenize: Callable, prompts: Sequence[str], *,
                   use_attention_mask: bool, disk: encoding_cache.EncodingStore | None = None) -> np.ndarray:
    """Last hidden states ``[P, L, D]`` of each prompt (diffusers' ``encode_prompt``).

    ``disk``: a text-embedding store (``--cache_text_embeddings_to_disk``); stored prompts are read and only
    the rest encoded, ``ENCODE_BATCH`` at a time.
    """
    input_ids, mask = tokenize(list(prompts))
    forward = jax.jit(text_apply)
    if disk is not None:
        keys = [encoding_cache.text_key(ids, encoder=disk.encoder, attention_mask=m if use_attention_mask else None)
                for ids, m in zip(input_ids, mask, strict=True)]
        return _through_store(keys, disk, lambda rows: {"embeds": forward(
            {"params": text_params}, jnp.asarray(input_ids[rows]),
            jnp.asarray(mask[rows]) if use_attention_mask else None)})["embeds"]
    hidden = forward({"params": text_params}, jnp.asarray(input_ids),
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


def encode_sdxl_prompts(text_encoders: tuple, text_params: tuple, tokenize_fns: tuple, prompts: Sequence[str], *,
                        disk: encoding_cache.EncodingStore | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sdxl_conditioning` of each prompt, tokenized by each encoder's own tokenizer; float32 numpy.

    ``disk``: as :func:`encode_prompts`', keyed by both tokenizers' ids."""
    if len(tokenize_fns) != len(sdxl.TOKENIZERS):
        raise ValueError(f"SDXL needs {len(sdxl.TOKENIZERS)} tokenizers; got {len(tokenize_fns)}")
    ids = tuple(np.asarray(tokenize(list(prompts))[0]) for tokenize in tokenize_fns)
    forward = jax.jit(functools.partial(sdxl_conditioning, tuple(text_encoders)))
    if disk is not None:
        keys = [encoding_cache.text_key(rows, encoder=disk.encoder, output="sdxl") for rows in zip(*ids, strict=True)]
        found = _through_store(keys, disk, lambda rows: dict(zip(
            ("embeds", "pooled"), forward(tuple(text_params), tuple(jnp.asarray(i[rows]) for i in ids)), strict=True)))
        return found["embeds"], found["pooled"]
    embeds, pooled = jax.device_get(forward(tuple(text_params), tuple(jnp.asarray(i) for i in ids)))
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


def disk_stores(spec: Any, models: LoadedModels
                ) -> tuple[encoding_cache.EncodingStore | None, encoding_cache.EncodingStore | None]:
    """(latent store, text store) of a run's ``--cache_latents_to_disk`` / ``--cache_text_embeddings_to_disk``,
    None where off (text also with ``train_text_encoder``: a trained encoder's embeddings are never cached).

    The VAE computes in float32 here (its module's dtype), the text encoders in the run's compute dtype.
    """
    p = spec.precision
    latents = text = None
    if p.cache_latents_to_disk:
        latents = encoding_cache.open_store(
            encoding_cache.LATENTS, enabled=True, encoding_cache_dir=p.encoding_cache_dir,
            folders=[vae_component_folder(models.vae_dir or models.model_dir)],
            precision=encoding_cache.precision_tag(jnp.dtype(models.vae.dtype).name, "compute"))
    if p.cache_text_embeddings_to_disk and not spec.model.train_text_encoder:
        encoders = ["text_encoder", "text_encoder_2"] if models.is_sdxl else ["text_encoder"]
        text = encoding_cache.open_store(
            encoding_cache.TEXT, enabled=True, encoding_cache_dir=p.encoding_cache_dir,
            folders=[models.model_dir / name for name in encoders],
            precision=encoding_cache.precision_tag(jnp.dtype(models.text_encoder.dtype).name, "compute"))
    return latents, text
