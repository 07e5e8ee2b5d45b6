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
Never imports jax.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from jaxbooth import sdxl
from jaxbooth.torch_backend.loss import encode_prompt


def pixels_nchw(batch: dict[str, np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``pixel_values`` NHWC float32 in [-1, 1] -> NCHW tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(batch["pixel_values"].transpose(0, 3, 1, 2))).to(device, dtype)


def row_keys(batch: dict[str, np.ndarray]) -> list[tuple]:
    """What decides a row's pixels: the file's content, its crop offset and its flip."""
    return [(str(h), tuple(int(v) for v in c), bool(f))
            for h, c, f in zip(batch["content_hash"], batch["crop_top_left"], batch["flipped"], strict=True)]


def release_memory() -> None:
    """Return a freed encoder's memory now (host objects, then CUDA's cached blocks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LatentCache:
    """VAE posterior (mean, std) per row, encoded at most once per key when ``enabled``."""

    def __init__(self, vae: Any, device: torch.device, dtype: torch.dtype, *, enabled: bool,
                 statistics: tuple[np.ndarray, np.ndarray] | None = None):
        self.vae, self.device, self.dtype, self.enabled = vae, device, dtype, enabled
        self._store: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # SDXL VAE latents_mean / latents_std (jaxbooth.sdxl.latent_statistics), per channel of NCHW
        self.statistics = None if statistics is None else tuple(
            torch.from_numpy(np.asarray(v, np.float32)).reshape(1, -1, 1, 1).to(device) for v in statistics)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior; with latent statistics, of (latent - latents_mean) / latents_std (linear in the noise)."""
        dist = self.vae.encode(pixels).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        if self.statistics is not None:
            latents_mean, latents_std = self.statistics
            mean, std = (mean - latents_mean) / latents_std, std / latents_std
        return mean, std

    def posterior(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), float32 [R, C, h, w], of every row of ``batch``."""
        if not self.enabled:
            return self._encode(pixels_nchw(batch, self.device, self.dtype))
        keys = row_keys(batch)
        for i, key in enumerate(keys):
            if key not in self._store:  # one image per VAE call: the result never depends on the batch
                mean, std = self._encode(pixels_nchw({"pixel_values": batch["pixel_values"][i:i + 1]},
                                                     self.device, self.dtype))
                self._store[key] = (mean[0], std[0])
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


class TextConditioner:
    """Encoder hidden states for a batch: cached per prompt (frozen encoder) or computed live (trained)."""

    def __init__(self, text_encoder: Any | None, tokenize: Any, device: torch.device, *, trained: bool,
                 use_attention_mask: bool):
        self.text_encoder, self.tokenize, self.device = text_encoder, tokenize, device
        self.trained, self.use_attention_mask = trained, use_attention_mask
        self._cache: dict[str, torch.Tensor] = {}

    def _ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        return torch.from_numpy(ids).long().to(self.device), torch.from_numpy(mask).long().to(self.device)

    @torch.no_grad()
    def precompute(self, prompts: Iterable[str]) -> None:
        """Encode ``prompts`` now (frozen encoder only); each is kept for the rest of the run."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if not todo:
            return
        if self.text_encoder is None:
            raise RuntimeError(f"prompts {todo} were not precomputed before the text encoder was freed")
        for prompt in todo:  # one prompt per call, so a cached row never depends on its batch
            ids, mask = self._ids([prompt])
            self._cache[prompt] = encode_prompt(self.text_encoder, ids, mask, self.use_attention_mask)[0]

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

    def __init__(self, text_encoders: tuple, tokenize_fns: tuple, device: torch.device, *, resolution: int):
        """``tokenize_fns``: one ``jaxbooth.text.make_tokenize_fn`` per encoder (max-length padding, no mask)."""
        self.text_encoders: tuple | None = tuple(text_encoders)
        self.tokenize_fns, self.device, self.resolution = tuple(tokenize_fns), device, resolution
        self.text_encoder: Any | None = None  # the trained encoders' module: set, every call encodes through it
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _ids(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.asarray(tokenize(prompts)[0])).long().to(self.device)
                     for tokenize in self.tokenize_fns)

    @torch.no_grad()
    def precompute(self, prompts: Iterable[str]) -> None:
        """Encode ``prompts`` now; each is kept for the rest of the run."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if not todo:
            return
        if self.text_encoders is None:
            raise RuntimeError(f"prompts {todo} were not precomputed before the text encoders were freed")
        for prompt in todo:  # one prompt per call, so a cached row never depends on its batch
            embeds, pooled = encode_sdxl_prompt(self.text_encoders, self._ids([prompt]))
            self._cache[prompt] = (embeds[0], pooled[0])

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
        ids = sdxl.add_time_ids(batch["original_size"], batch["crop_top_left"], self.resolution)
        return torch.from_numpy(ids).to(self.device)

    def unet_inputs(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(prompt embeds, ``added_cond_kwargs``) of the batch's rows (class rows: the class prompt's, their own
        time ids)."""
        embeds, pooled = self.embeddings([str(caption) for caption in batch["caption"]])
        return embeds, {"text_embeds": pooled, "time_ids": self.time_ids(batch)}
