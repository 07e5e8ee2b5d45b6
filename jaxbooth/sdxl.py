"""SDXL conditioning, shared by both backends and framework-free (numpy only).

SDXL conditions its UNet on three things beyond the timestep, as diffusers'
``train_dreambooth_lora_sdxl.py`` computes them:

- ``prompt_embeds``: the penultimate hidden states (``hidden_states[-2]``, before the final
  layer norm) of both text encoders, concatenated on the feature axis in encoder order;
- ``text_embeds``: the pooled projection (``text_embeds``) of the second encoder,
  ``CLIPTextModelWithProjection``;
- ``time_ids``: original (h, w) + crop top-left (y, x) + target (h, w) of each training row
  (:func:`add_time_ids`), the crop as actually taken, so random crops and flips are honest.

Each backend runs its own encoders; this module owns the arithmetic and the layout both
must agree on, so the two cannot drift (``tests/test_sdxl.py`` checks it against diffusers'
pipeline ``encode_prompt`` and ``_get_add_time_ids``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth.errors import JaxboothError

PIPELINE_CLASS = "StableDiffusionXLPipeline"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
HIDDEN_STATE_INDEX = -2  # the penultimate layer's output, as diffusers' SDXL scripts and pipelines use


def is_sdxl_pipeline(model_dir: str | Path) -> bool:
    """Whether ``model_dir/model_index.json`` names ``StableDiffusionXLPipeline`` (False if unreadable)."""
    try:
        index = json.loads((Path(model_dir) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == PIPELINE_CLASS


def add_time_ids(original_sizes: np.ndarray | Sequence, crops_top_left: np.ndarray | Sequence,
                 resolution: int | np.ndarray | Sequence) -> np.ndarray:
    """``[R, 6]`` float32: (orig_h, orig_w, crop_y, crop_x, target_h, target_w) per row.

    diffusers' ``compute_time_ids``: ``original_size + crops_coords_top_left + target_size``
    with target (resolution, resolution), the square the DreamBooth scripts train on; or, with
    aspect-ratio buckets, ``resolution`` as one (h, w) or per-row ``[R, 2]`` target sizes (the
    rows' bucket, what the pixels are, as kohya's SDXL trainer records it).
    """
    original = np.asarray(original_sizes, np.float32).reshape(-1, 2)
    crops = np.asarray(crops_top_left, np.float32).reshape(-1, 2)
    if len(original) != len(crops):
        raise ValueError(f"add_time_ids: {len(original)} original sizes but {len(crops)} crop offsets")
    target = np.asarray(resolution, np.float32)
    target = np.broadcast_to(target if target.ndim else np.stack([target, target]), (len(original), 2))
    return np.concatenate([original, crops, target.astype(np.float32)], axis=1)


def flipped_crop_top_left(crop_top_left: tuple[int, int], resized_width: int, resolution: int) -> tuple[int, int]:
    """The crop offset of a mirrored crop, in the mirrored image (what diffusers records: it flips, then crops).

    The mirror of the crop at x in the resized image is the crop at ``width - resolution - x``
    of the mirrored image (``resolution``: the crop's width, a bucket's width with buckets); the row
    offset is unchanged.
    """
    top, left = crop_top_left
    return int(top), int(resized_width - resolution - left)


def latent_statistics(latents_mean, latents_std, channels: int, source: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The VAE config's per-channel ``latents_mean`` / ``latents_std`` as float32 ``[channels]``, or None without them.

    diffusers' SDXL script trains on ``(x - latents_mean) * scaling_factor / latents_std`` when the VAE
    sets both (Playground v2.5's does). x is linear in the posterior's noise, so a backend applies it to
    the posterior: mean -> (mean - latents_mean) / latents_std, std -> std / latents_std.
    """
    if latents_mean is None and latents_std is None:
        return None
    if latents_mean is None or latents_std is None:
        raise JaxboothError(f"{source}: the VAE sets only one of latents_mean ({latents_mean}) and latents_std "
                            f"({latents_std}); SDXL normalises latents with both. Set both, or neither")
    mean, std = (np.asarray(v, np.float32).reshape(-1) for v in (latents_mean, latents_std))
    if mean.shape != (channels,) or std.shape != (channels,) or not (std > 0).all():
        raise JaxboothError(f"{source}: latents_mean and latents_std need {channels} values (the latent channels), "
                            f"latents_std all positive; got {mean.tolist()} and {std.tolist()}. Fix the VAE config")
    return mean, std


# The run-spec options diffusers' SDXL script lacks and that would reach only the first of SDXL's two
# encoders and tokenizers.
_FIRST_ENCODER_ONLY = ("tokenizer_name", "tokenizer_max_length", "text_encoder_use_attention_mask",
                       "skip_save_text_encoder")


def option_problems(spec: Any) -> list[str]:
    """One line per set option an SDXL run refuses on both backends, each naming the key and the fix."""
    problems = []
    given = {"tokenizer_name": spec.model.tokenizer_name is not None,
             "tokenizer_max_length": spec.model.tokenizer_max_length is not None,
             "text_encoder_use_attention_mask": spec.model.text_encoder_use_attention_mask,
             "skip_save_text_encoder": spec.checkpointing.skip_save_text_encoder}
    for key in (key for key in _FIRST_ENCODER_ONLY if given[key]):
        problems.append(f"--{key}: diffusers' SDXL DreamBooth script has no such option, and it would apply to "
                        "only the first of SDXL's two text encoders and tokenizers (SDXL runs use both as the "
                        "pipeline has them: each tokenizer's own model_max_length, no attention mask, both "
                        f"encoders saved). Drop --{key}")
    return problems


def force_zeros_for_empty_prompt(model_dir: str | Path) -> bool:
    """The pipeline's ``force_zeros_for_empty_prompt`` (model_index.json): with no negative prompt, SDXL's
    unconditional embeddings are zeros. True, diffusers' default, when unset or unreadable."""
    try:
        index = json.loads((Path(model_dir) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True)) if isinstance(index, dict) else True


def latent_shift(shift_factor: float | None, is_sdxl: bool) -> float:
    """The latent shift both backends subtract before scaling: the VAE's ``shift_factor``, but never for SDXL,
    whose script and pipeline do not apply it (they use ``latents_mean``, :func:`latent_statistics`)."""
    return 0.0 if is_sdxl else float(shift_factor or 0.0)
