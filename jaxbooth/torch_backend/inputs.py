"""From a numpy batch of ``jaxbooth.data.BatchIterator`` to what the UNet step needs.

``LatentCache`` memoises the VAE posterior (mean, std) of each decoded image, keyed by the
file's content hash plus its crop and flip (``cache_latents``): the encoder is deterministic,
so training on cached posteriors equals encoding every step (up to the ~1e-5 rounding a
batched VAE call differs by), minus the VAE passes. Each image is encoded alone, so a cached
value never depends on the batch it first appeared in and a resumed run sees the same one.
``PixelSource`` is its pixel-space twin (DeepFloyd IF): the batch's pixels are the training input.

``TextConditioner`` returns encoder hidden states: per prompt, computed once, for a frozen text
encoder (all prompts up front and the encoder freed with
``pre_compute_text_embeddings``), or a forward pass of the trained encoder.
``SdxlTextConditioner`` is its SDXL twin: per prompt the prompt embeds and pooled embeds of
``encode_sdxl_prompt`` (cached for frozen encoders, a forward pass of both trained encoders every
step with ``--train_text_encoder``), and per row the time ids of the crop actually taken.
``unet_inputs(conditioner, batch)`` is what the UNet call needs beyond latents and timesteps.

With ``--cache_latents_to_disk`` / ``--cache_text_embeddings_to_disk`` (``disk_stores``) both caches consult
``jaxbooth.encoding_cache`` before encoding and store what they encode, so a later run (of either backend)
encodes nothing it has seen. Never imports jax.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jaxbooth import data, encoding_cache, sdxl
from jaxbooth.hub import vae_component_folder
from jaxbooth.torch_backend.loss import encode_prompt


def pixels_nchw(batch: dict[str, np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``pixel_values`` NHWC float32 in [-1, 1] -> NCHW tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(batch["pixel_values"].transpose(0, 3, 1, 2))).to(device, dtype)


def row_keys(batch: dict[str, np.ndarray]) -> list[tuple]:
    """What decides a row's pixels: the file's content, its crop offset and its flip."""
    shape = tuple(int(v) for v in batch["pixel_values"].shape[1:3])  # a class image differs per bucket
    return [(str(h), tuple(int(v) for v in c), bool(f), shape)
            for h, c, f in zip(batch["content_hash"], batch["crop_top_left"], batch["flipped"], strict=True)]


def release_memory() -> None:
    """Return a freed encoder's memory now (host objects, then CUDA's cached blocks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LatentCache:
    """VAE posterior (mean, std) per row, encoded at most once per key when ``enabled``; with ``disk``
    (``--cache_latents_to_disk``) read from that store when there and put there when encoded, keyed with the
    resize filter ``interpolation`` too."""

    def __init__(self, vae: Any, device: torch.device, dtype: torch.dtype, *, enabled: bool,
                 statistics: tuple[np.ndarray, np.ndarray] | None = None,
                 disk: encoding_cache.EncodingStore | None = None, interpolation: str = data.DEFAULT_INTERPOLATION):
        self.vae, self.device, self.dtype, self.enabled = vae, device, dtype, enabled
        self.disk, self.interpolation = disk if enabled else None, interpolation
        self._store: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # SDXL VAE latents_mean / latents_std (jaxbooth.sdxl.latent_statistics), per channel of NCHW
        self.statistics = None if statistics is None else tuple(
            torch.from_numpy(np.asarray(v, np.float32)).reshape(1, -1, 1, 1).to(device) for v in statistics)

    @torch.no_grad()
    def _encode_raw(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels).latent_dist
        return dist.mean.float(), dist.std.float()

    def _normalised(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With latent statistics, the posterior of (latent - latents_mean) / latents_std (linear in the noise)."""
        if self.statistics is not None:
            latents_mean, latents_std = self.statistics
            mean, std = (mean - latents_mean) / latents_std, std / latents_std
        return mean, std

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._normalised(*self._encode_raw(pixels))

    def _disk_keys(self, batch: dict[str, np.ndarray], rows: list[int]) -> dict[int, str]:
        """``encoding_cache.latent_key`` of ``rows``: the crop is the pixels' shape; a bucketed batch's
        ``resized_size`` (each row's exact resize) keys its resize, else the ``resolution`` squares' rule."""
        size, resized = batch["pixel_values"].shape[1:3], batch.get("resized_size")
        return {i: encoding_cache.latent_key(
            str(batch["content_hash"][i]), size=size, crop=batch["crop_top_left"][i], flip=bool(batch["flipped"][i]),
            interpolation=self.interpolation, encoder=self.disk.encoder,
            resize=encoding_cache.resize_label(None if resized is None else resized[i])) for i in rows}

    def posterior(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), float32 [R, C, h, w], of every row of ``batch``."""
        if not self.enabled:
            return self._encode(pixels_nchw(batch, self.device, self.dtype))
        keys = row_keys(batch)
        first: dict[tuple, int] = {}  # each key not yet in memory -> its first row
        for i, key in enumerate(keys):
            if key not in self._store:
                first.setdefault(key, i)
        new = list(first.values())
        disk_keys = self._disk_keys(batch, new) if self.disk is not None and new else {}
        found = self.disk.get_many(disk_keys.values()) if disk_keys else {}
        for i in new:
            entry = found.get(disk_keys.get(i, ""))
            if entry is not None:  # stored [C, h, w] float32, before latent statistics
                raw = tuple(torch.from_numpy(entry[name][None]).to(self.device) for name in ("mean", "std"))
            else:  # one image per VAE call: the result never depends on the batch
                raw = self._encode_raw(pixels_nchw({"pixel_values": batch["pixel_values"][i:i + 1]},
                                                   self.device, self.dtype))
                if i in disk_keys:
                    self.disk.put(disk_keys[i], {"mean": raw[0][0].cpu().numpy(), "std": raw[1][0].cpu().numpy()})
            mean, std = self._normalised(*raw)
            self._store[keys[i]] = (mean[0], std[0])
        return (torch.stack([self._store[k][0] for k in keys]), torch.stack([self._store[k][1] for k in keys]))

    def __len__(self) -> int:
        return len(self._store)


class PixelSource:
    """A pixel-space model's training inputs (DeepFloyd IF): the batch's pixels themselves, in the
    ``LatentCache.posterior`` shape with no std (nothing to sample, nothing to encode or cache)."""

    enabled = False  # cache_latents has nothing to cache here

    def __init__(self, device: torch.device):
        self.device = device

    def posterior(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, None]:
        """(pixels float32 [R, C, H, W] in [-1, 1], None)."""
        return pixels_nchw(batch, self.device, torch.float32), None

    def __len__(self) -> int:
        return 0


def _encoder_dtype(encoder: Any | None) -> torch.dtype:
    return next(encoder.parameters()).dtype if encoder is not None else torch.float32


def _from_disk(disk: encoding_cache.EncodingStore | None, keys: dict[str, str]) -> dict[str, dict[str, np.ndarray]]:
    """prompt -> stored arrays, for the prompts (of ``keys``: prompt -> disk key) the store has."""
    if disk is None or not keys:
        return {}
    found = disk.get_many(keys.values())
    return {prompt: found[key] for prompt, key in keys.items() if key in found}


class TextConditioner:
    """Encoder hidden states for a batch: cached per prompt (frozen encoder) or computed live (trained).

    ``disk`` (``--cache_text_embeddings_to_disk``, frozen encoder): prompts are read from that store when there
    (keyed by token ids, the mask when the encoder sees it, and the encoder) and put there when encoded."""

    def __init__(self, text_encoder: Any | None, tokenize: Any, device: torch.device, *, trained: bool,
                 use_attention_mask: bool, disk: encoding_cache.EncodingStore | None = None):
        self.text_encoder, self.tokenize, self.device = text_encoder, tokenize, device
        self.trained, self.use_attention_mask = trained, use_attention_mask
        self.disk = None if trained else disk
        self.dtype = _encoder_dtype(text_encoder)  # a stored row comes back in the dtype the encoder gives
        self._cache: dict[str, torch.Tensor] = {}

    def _ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        return torch.from_numpy(ids).long().to(self.device), torch.from_numpy(mask).long().to(self.device)

    def _disk_keys(self, prompts: list[str]) -> dict[str, str]:
        if self.disk is None:
            return {}
        ids, mask = self.tokenize(prompts)
        return {p: encoding_cache.text_key(ids[i], encoder=self.disk.encoder,
                                           attention_mask=mask[i] if self.use_attention_mask else None)
                for i, p in enumerate(prompts)}

    @torch.no_grad()
    def precompute(self, prompts: Iterable[str]) -> None:
        """Encode ``prompts`` now (frozen encoder only), or read them from ``disk``; each is kept for the rest of
        the run."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if not todo:
            return
        keys = self._disk_keys(todo)
        for prompt, entry in _from_disk(self.disk, keys).items():
            self._cache[prompt] = torch.from_numpy(entry["embeds"]).to(self.device, self.dtype)
        todo = [p for p in todo if p not in self._cache]
        if todo and self.text_encoder is None:
            raise RuntimeError(f"prompts {todo} were not precomputed before the text encoder was freed")
        for prompt in todo:  # one prompt per call, so a cached row never depends on its batch
            ids, mask = self._ids([prompt])
            self._cache[prompt] = encode_prompt(self.text_encoder, ids, mask, self.use_attention_mask)[0]
            if self.disk is not None:
                self.disk.put(keys[prompt], {"embeds": self._cache[prompt].float().cpu().numpy()})

    def free_encoder(self) -> None:
        """Drop the text encoder (``pre_compute_text_embeddings``): only cached prompts remain."""
        self.text_encoder = None
        release_memory()

    def embeddings(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), L, D] hidden states; for a cached prompt, the stored (weight-dtype) rows."""
        if self.trained:
            ids, mask = self._ids(prompts)
            return encode_prompt(self.text_encoder, ids, mask, self.use_attention_mask)
        self.precompute(prompts)
        return torch.stack([self._cache[p] for p in prompts])


def unet_inputs(conditioner: Any, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """(encoder hidden states, ``added_cond_kwargs``) of the batch's rows: SDXL's pooled embeds and time ids,
    None for an SD conditioner (anything with ``embeddings(prompts)``), whose UNet takes no added conditioning."""
    if isinstance(conditioner, SdxlTextConditioner):
        return conditioner.unet_inputs(batch)
    return conditioner.embeddings([str(caption) for caption in batch["caption"]]), None


def encode_sdxl_prompt(text_encoders: tuple, input_ids: tuple[torch.Tensor, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning of token ids, as diffusers' SDXL script and pipeline compute it.

    ``text_encoders``: (CLIPTextModel, CLIPTextModelWithProjection); ``input_ids``: one [B, L] tensor
    per encoder (padded to max length, no attention mask). Returns (prompt_embeds [B, L, D1 + D2]: each
    encoder's ``hidden_states[sdxl.HIDDEN_STATE_INDEX]`` concatenated in encoder order, pooled [B, P]:
    the second encoder's projected ``text_embeds``).
    """
    if len(text_encoders) != len(sdxl.TEXT_ENCODERS) or len(input_ids) != len(sdxl.TEXT_ENCODERS):
        raise ValueError(f"SDXL conditions on {len(sdxl.TEXT_ENCODERS)} text encoders, got {len(text_encoders)} "
                         f"encoders and {len(input_ids)} id tensors")
    hidden, output = [], None
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        output = encoder(ids.to(encoder.device), output_hidden_states=True, return_dict=True)
        hidden.append(output.hidden_states[sdxl.HIDDEN_STATE_INDEX])
    pooled = getattr(output, "text_embeds", None)
    if pooled is None:
        raise ValueError(f"the second SDXL text encoder ({type(text_encoders[-1]).__name__}) returned no text_embeds; "
                         "it must be a CLIPTextModelWithProjection")
    return torch.cat(hidden, dim=-1), pooled


class SdxlTextConditioner:
    """SDXL conditioning for a batch: (prompt embeds, pooled) cached per prompt while both encoders are frozen,
    or encoded live by ``text_encoder`` (the trained ``models.SdxlTextEncoders``, as prepared) once it is set;
    time ids per row from the batch's ``original_size`` and ``crop_top_left`` (``sdxl.add_time_ids``)."""

    def __init__(self, text_encoders: tuple, tokenize_fns: tuple, device: torch.device, *, resolution: int,
                 disk: encoding_cache.EncodingStore | None = None):
        """``tokenize_fns``: one ``jaxbooth.text.make_tokenize_fn`` per encoder (max-length padding, no mask);
        ``disk``: as ``TextConditioner``'s, keyed by both tokenizers' ids (frozen encoders only)."""
        self.text_encoders: tuple | None = tuple(text_encoders)
        self.tokenize_fns, self.device, self.resolution = tuple(tokenize_fns), device, resolution
        self.text_encoder: Any | None = None  # the trained encoders' module: set, every call encodes through it
        self.disk = disk
        self.dtype = _encoder_dtype(self.text_encoders[0] if self.text_encoders else None)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _ids(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.asarray(tokenize(prompts)[0])).long().to(self.device)
                     for tokenize in self.tokenize_fns)

    def _disk_keys(self, prompts: list[str]) -> dict[str, str]:
        if self.disk is None:
            return {}
        ids = [np.asarray(tokenize(prompts)[0]) for tokenize in self.tokenize_fns]
        return {p: encoding_cache.text_key([rows[i] for rows in ids], encoder=self.disk.encoder, output="sdxl")
                for i, p in enumerate(prompts)}

    @torch.no_grad()
    def precompute(self, prompts: Iterable[str]) -> None:
        """Encode ``prompts`` now, or read them from ``disk``; each is kept for the rest of the run."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if not todo:
            return
        keys = self._disk_keys(todo)
        for prompt, entry in _from_disk(self.disk, keys).items():
            self._cache[prompt] = tuple(torch.from_numpy(entry[name]).to(self.device, self.dtype)
                                        for name in ("embeds", "pooled"))
        todo = [p for p in todo if p not in self._cache]
        if todo and self.text_encoders is None:
            raise RuntimeError(f"prompts {todo} were not precomputed before the text encoders were freed")
        for prompt in todo:  # one prompt per call, so a cached row never depends on its batch
            embeds, pooled = encode_sdxl_prompt(self.text_encoders, self._ids([prompt]))
            self._cache[prompt] = (embeds[0], pooled[0])
            if self.disk is not None:
                self.disk.put(keys[prompt], {"embeds": embeds[0].float().cpu().numpy(),
                                             "pooled": pooled[0].float().cpu().numpy()})

    def free_encoder(self) -> None:
        """Drop both text encoders (``pre_compute_text_embeddings``): only cached prompts remain."""
        self.text_encoders = None
        release_memory()

    def embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeds [N, L, D1 + D2], pooled [N, P]) of ``prompts``: cached ones in the encoders' dtype,
        trained ones as the encoders' forward returns them (with gradients)."""
        if self.text_encoder is not None:
            return self.text_encoder(*self._ids(prompts))
        self.precompute(prompts)
        return (torch.stack([self._cache[p][0] for p in prompts]), torch.stack([self._cache[p][1] for p in prompts]))

    def time_ids(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        """[R, 6] float32: each row's (original h, w, crop y, x, resolution, resolution)."""
        ids = sdxl.add_time_ids(batch["original_size"], batch["crop_top_left"],
                                batch.get("target_size", self.resolution))
        return torch.from_numpy(ids).to(self.device)

    def unet_inputs(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(prompt embeds, ``added_cond_kwargs``) of the batch's rows (class rows: the class prompt's, their own
        time ids)."""
        embeds, pooled = self.embeddings([str(caption) for caption in batch["caption"]])
        return embeds, {"text_embeds": pooled, "time_ids": self.time_ids(batch)}


def disk_stores(spec: Any, *, model_dir: Path, vae_dir: Path | None, vae_dtype: torch.dtype, text_dtype: torch.dtype,
                is_sdxl: bool) -> tuple[encoding_cache.EncodingStore | None, encoding_cache.EncodingStore | None]:
    """(latent store, text store) of a run's ``--cache_latents_to_disk`` / ``--cache_text_embeddings_to_disk``,
    None where off: latents also without ``cache_latents`` or a VAE (pixel space), text with
    ``train_text_encoder``. The frozen models run in the dtype their weights are cast to (``models.freeze``)."""
    p = spec.precision

    def tag(dtype: torch.dtype) -> str:
        return encoding_cache.precision_tag(str(dtype).removeprefix("torch."), "weights")

    latents = text = None
    if vae_dir is not None and p.cache_latents_to_disk and p.cache_latents:
        latents = encoding_cache.open_store(
            encoding_cache.LATENTS, enabled=True, encoding_cache_dir=p.encoding_cache_dir,
            folders=[vae_component_folder(vae_dir)], precision=tag(vae_dtype))
    if p.cache_text_embeddings_to_disk and not spec.model.train_text_encoder:
        encoders = ["text_encoder", "text_encoder_2"] if is_sdxl else ["text_encoder"]
        text = encoding_cache.open_store(
            encoding_cache.TEXT, enabled=True, encoding_cache_dir=p.encoding_cache_dir,
            folders=[Path(model_dir) / name for name in encoders], precision=tag(text_dtype))
    return latents, text
