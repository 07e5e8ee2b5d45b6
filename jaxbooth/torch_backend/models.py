"""Loading the diffusers/transformers torch models of a pipeline folder for training.

Owns which class loads which component (``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel`` or whatever ``model_index.json`` names for the text encoder), freezing
and casting the frozen ones, and the weight dtype of a mixed-precision run. Trainable
models always load in float32: mixed precision keeps float32 master weights (diffusers
refuses to start otherwise). Imports torch, diffusers and transformers; never jax.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from jaxbooth import diffusion
from jaxbooth.errors import JaxboothError
from jaxbooth.hub import vae_component_folder

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Models:
    """The pipeline parts a run uses. ``text_encoder`` is None once precomputed embeddings free it."""

    unet: Any
    vae: Any
    text_encoder: Any | None
    tokenizer: Any
    schedule: diffusion.NoiseSchedule
    model_dir: Path
    vae_dir: Path


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` dtype argument: diffusers 0.40 renamed ``torch_dtype`` to ``dtype``."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype": dtype}


def text_encoder_class(model_dir: Path) -> type:
    """The text-encoder class ``model_index.json`` names (CLIPTextModel for SD, T5EncoderModel for IF)."""
    index_path = model_dir / "model_index.json"
    try:
        library, name = json.loads(index_path.read_text())["text_encoder"]
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise JaxboothError(f"{index_path}: cannot read the text_encoder entry ({error}); "
                            "pretrained_model_name_or_path must be a diffusers pipeline folder") from None
    if library != "transformers" or name is None:
        raise JaxboothError(f"{index_path}: text_encoder is {[library, name]}; DreamBooth needs a transformers "
                            "text encoder (e.g. ['transformers', 'CLIPTextModel'])")
    return getattr(importlib.import_module("transformers"), name)


def quiet_library_output() -> None:
    """No loading bars and no advisory warnings from diffusers and transformers in a run's log.

    Loading local weights takes well under a second, so their "Loading weights" bars are noise;
    transformers' advisory warnings (e.g. that torchvision is absent, which jaxbooth never needs)
    would read like problems. Errors still surface.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()


def load_models(model_dir: Path, *, vae_dir: Path | None = None, variant: str | None = None,
                tokenizer: Any) -> Models:
    """UNet, VAE and text encoder in float32 on the CPU, plus the training noise schedule."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    quiet_library_output()
    vae_dir = vae_dir or model_dir
    kwargs = {"variant": variant} if variant else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **dtype_kwargs(torch.float32),
                                                    **kwargs)
        # a pipeline's vae/, or a standalone VAE folder (config.json at its root), as diffusers' VAE flags
        vae = AutoencoderKL.from_pretrained(vae_component_folder(vae_dir), **dtype_kwargs(torch.float32), **kwargs)
        text_encoder = text_encoder_class(model_dir).from_pretrained(
            model_dir, subfolder="text_encoder", dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as error:
        raise JaxboothError(f"cannot load the pipeline components from {model_dir}: {error}; check "
                            "--pretrained_model_name_or_path (and --variant)") from None
    return Models(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                  schedule=diffusion.load_schedule(model_dir), model_dir=model_dir, vae_dir=vae_dir)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen models (VAE, frozen text encoder) for accelerate's mixed precision."""
    return WEIGHT_DTYPES.get(mixed_precision, torch.float32)


def prepare_frozen(models: Models, *, train_text_encoder: bool, device: torch.device, dtype: torch.dtype) -> None:
    """Freeze the VAE (and the text encoder unless trained), move them to ``device`` in ``dtype``."""
    frozen = [models.vae] + ([models.text_encoder] if models.text_encoder is not None and not train_text_encoder
                             else [])
    for model in frozen:
        model.requires_grad_(False)
        model.eval()
        model.to(device)
        if dtype != torch.float32:  # they load in float32; a no-op cast only earns a diffusers warning
            model.to(dtype=dtype)


def latent_factors(vae: Any) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE config; shift is 0 for SD 1.x/2.x/SDXL."""
    config = vae.config
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)
