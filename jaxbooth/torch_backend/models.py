"""Loading the diffusers/transformers torch models of a pipeline folder for training.

Owns which class loads which component (``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel`` or whatever ``model_index.json`` names for the text encoder, and for an
SDXL pipeline also ``text_encoder_2``, ``CLIPTextModelWithProjection``), freezing
and casting the frozen ones, the weight dtype of a mixed-precision run, and which trained module
is which pipeline component (``SdxlTextEncoders``: SDXL's two encoders trained as one module). Trainable
models always load in float32: mixed precision keeps float32 master weights (diffusers
refuses to start otherwise). An SDXL VAE stays float32 whatever the precision, as diffusers'
``train_dreambooth_lora_sdxl.py`` keeps it (against NaN losses). A DeepFloyd IF pipeline
(``IFPipeline`` / ``IFSuperResolutionPipeline``) is pixel space: no VAE loads (``Models.vae`` is None,
as diffusers' scripts set ``vae=None`` when the folder has none) and its T5 text encoder is whatever
``model_index.json`` names. Imports torch, diffusers and transformers; never jax.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from jaxbooth import deepfloyd, diffusion, sdxl
from jaxbooth.errors import JaxboothError
from jaxbooth.hub import vae_component_folder
from jaxbooth.torch_backend.inputs import encode_sdxl_prompt

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Models:
    """The pipeline parts a run uses. The text encoders are None once precomputed embeddings free them;
    ``text_encoder_2`` / ``tokenizer_2``: SDXL's second encoder (``is_sdxl``), None otherwise. ``vae`` and
    ``vae_dir`` are None for a pixel-space DeepFloyd IF pipeline (``if_stage`` 1 or 2, None otherwise)."""

    unet: Any
    vae: Any | None
    text_encoder: Any | None
    tokenizer: Any
    schedule: diffusion.NoiseSchedule
    model_dir: Path
    vae_dir: Path | None
    text_encoder_2: Any | None = None
    tokenizer_2: Any | None = None
    is_sdxl: bool = False
    latent_statistics: tuple[Any, Any] | None = None  # SDXL VAE's latents_mean / latents_std (numpy [C])
    if_stage: int | None = None  # DeepFloyd IF stage (jaxbooth.deepfloyd.stage): 1, 2, or None

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        """The frozen encoders the conditioning runs: (text_encoder,) or SDXL's (text_encoder, text_encoder_2)."""
        return (self.text_encoder, self.text_encoder_2) if self.is_sdxl else (self.text_encoder,)


class SdxlTextEncoders(torch.nn.Module):
    """SDXL's two text encoders as one trained module (``--train_text_encoder``): ``forward(ids, ids_2)`` is
    ``encode_sdxl_prompt``, (prompt embeds, pooled embeds).

    One module, so the loop, ``accelerator.prepare`` (mixed-precision autocast, DDP) and the checkpoint
    hooks treat the pair as the one trained text encoder they already handle. Its outputs are only what
    the UNet uses, so DDP's unused-parameter search (``train.make_accelerator`` turns it on for this)
    finds the first encoder's last layer, which SDXL never reads (it conditions on the penultimate
    hidden states), instead of waiting for its gradients (diffusers' SDXL script fails there on 2+ GPUs).
    """

    def __init__(self, text_encoder: Any, text_encoder_2: Any):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_sdxl_prompt((self.text_encoder, self.text_encoder_2), (input_ids, input_ids_2))

    @property
    def components(self) -> dict[str, Any]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}


def trained_text_encoder(models: Any) -> Any:
    """The text-encoder module a ``--train_text_encoder`` run trains: the encoder, or for SDXL both as one
    ``SdxlTextEncoders``."""
    if getattr(models, "is_sdxl", False):
        return SdxlTextEncoders(models.text_encoder, models.text_encoder_2)
    return models.text_encoder


def trained_components(model: Any) -> dict[str, Any]:
    """Pipeline component name -> model of one (unwrapped) trained module: ``unet``, ``text_encoder``, or SDXL's
    ``text_encoder`` and ``text_encoder_2`` of an ``SdxlTextEncoders``; the subfolders they are saved in."""
    if isinstance(model, SdxlTextEncoders):
        return model.components
    from diffusers import UNet2DConditionModel

    return {"unet" if isinstance(model, UNet2DConditionModel) else "text_encoder": model}


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` dtype argument: diffusers 0.40 renamed ``torch_dtype`` to ``dtype``."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype": dtype}


def text_encoder_class(model_dir: Path, component: str = "text_encoder") -> type:
    """The class ``model_index.json`` names for ``component`` (CLIPTextModel for SD, T5EncoderModel for IF,
    CLIPTextModelWithProjection for SDXL's ``text_encoder_2``)."""
    index_path = model_dir / "model_index.json"
    try:
        library, name = json.loads(index_path.read_text())[component]
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise JaxboothError(f"{index_path}: cannot read the {component} entry ({error}); "
                            "pretrained_model_name_or_path must be a diffusers pipeline folder") from None
    if library != "transformers" or name is None:
        raise JaxboothError(f"{index_path}: {component} is {[library, name]}; DreamBooth needs a transformers "
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
                tokenizer: Any, tokenizer_2: Any | None = None) -> Models:
    """UNet, VAE and text encoder(s) in float32 on the CPU, plus the training noise schedule.

    An SDXL pipeline (``model_index.json``) also loads ``text_encoder_2``; its ``tokenizer_2``
    must then be given (loaded beside ``tokenizer`` before any weights). A DeepFloyd IF pipeline
    loads no VAE (``vae``/``vae_dir`` None; its VAE flags were refused before this).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    quiet_library_output()
    is_sdxl = sdxl.is_sdxl_pipeline(model_dir)
    if is_sdxl and tokenizer_2 is None:
        raise ValueError(f"{model_dir} is an SDXL pipeline: load_models needs its tokenizer_2")
    if_stage = deepfloyd.stage(model_dir)
    vae_dir = None if if_stage is not None else vae_dir or model_dir
    statistics = sdxl_latent_statistics(vae_dir) if is_sdxl else None  # from config.json, before any weight
    kwargs = {"variant": variant} if variant else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **dtype_kwargs(torch.float32),
                                                    **kwargs)
        # a pipeline's vae/, or a standalone VAE folder (config.json at its root), as diffusers' VAE flags
        vae = None if vae_dir is None else AutoencoderKL.from_pretrained(
            vae_component_folder(vae_dir), **dtype_kwargs(torch.float32), **kwargs)
        encoders = [text_encoder_class(model_dir, name).from_pretrained(
            model_dir, subfolder=name, dtype=torch.float32, **kwargs)
            for name in (sdxl.TEXT_ENCODERS if is_sdxl else ("text_encoder",))]
    except (OSError, ValueError) as error:
        raise JaxboothError(f"cannot load the pipeline components from {model_dir}: {error}; check "
                            "--pretrained_model_name_or_path (and --variant)") from None
    return Models(unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
                  schedule=diffusion.load_schedule(model_dir), model_dir=model_dir, vae_dir=vae_dir,
                  text_encoder_2=encoders[1] if is_sdxl else None, tokenizer_2=tokenizer_2, is_sdxl=is_sdxl,
                  latent_statistics=statistics, if_stage=if_stage)


def sdxl_latent_statistics(vae_dir: Path) -> tuple[Any, Any] | None:
    """The VAE's ``latents_mean`` / ``latents_std`` (``sdxl.latent_statistics``), read from its ``config.json``
    before any weight loads, so a malformed pair fails first; None when the VAE sets neither."""
    path = vae_component_folder(vae_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise JaxboothError(f"{path}: cannot read the VAE config ({error}); check --pretrained_model_name_or_path "
                            "or --pretrained_vae_model_name_or_path") from None
    return sdxl.latent_statistics(config.get("latents_mean"), config.get("latents_std"),
                                  int(config.get("latent_channels", 4)), str(path))


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen models (VAE, frozen text encoder) for accelerate's mixed precision."""
    return WEIGHT_DTYPES.get(mixed_precision, torch.float32)


def vae_dtype(models: Models, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype in a run of weight dtype ``dtype``: float32 for SDXL (diffusers' SDXL script), else ``dtype``."""
    return torch.float32 if models.is_sdxl else dtype


def freeze(model: Any, device: torch.device, dtype: torch.dtype) -> None:
    """A frozen model in eval mode on ``device`` in ``dtype``."""
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    if dtype != torch.float32:  # models load in float32; a no-op cast only earns a diffusers warning
        model.to(dtype=dtype)


def prepare_frozen_text_encoders(models: Models, *, device: torch.device, dtype: torch.dtype) -> None:
    """Freeze the (not yet freed) text encoders on ``device`` in ``dtype``, as diffusers casts them."""
    for encoder in models.text_encoders:
        if encoder is not None:
            freeze(encoder, device, dtype)


def prepare_frozen(models: Models, *, train_text_encoder: bool, device: torch.device, dtype: torch.dtype) -> None:
    """Freeze the VAE, if any (and the text encoders unless trained), move them to ``device`` in ``dtype``
    (the VAE in ``vae_dtype``)."""
    if models.vae is not None:
        freeze(models.vae, device, vae_dtype(models, dtype))
    if not train_text_encoder:
        prepare_frozen_text_encoders(models, device=device, dtype=dtype)


def latent_factors(vae: Any | None) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE config; shift is 0 for SD 1.x/2.x/SDXL. Pixel space
    (``vae`` None: DeepFloyd IF) trains on the pixels themselves: (1, 0)."""
    if vae is None:
        return 1.0, 0.0
    config = vae.config
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)
