"""Load phase of a JAX run: refuse what this backend cannot train, then load every model once.

Refusals come first and cost nothing: options are checked before any file is read, the
pipeline class is read from ``model_index.json`` before any weight is downloaded or loaded.
:func:`load_models` then fills the :class:`~jaxbooth.jax_backend.loaded.LoadedModels` hand-off
that every later phase (caches, class images, validation, training, export) reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxbooth import capabilities, diffusion, edm, pipelines, sdxl
from jaxbooth import spec as spec_lib
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import pretrained
from jaxbooth.jax_backend.loaded import LoadedModels
from jaxbooth.jax_backend.models import clip as clip_lib
from jaxbooth.jax_backend.models import unet as unet_lib
from jaxbooth.jax_backend.models.vae import FlaxAutoencoderKL
from jaxbooth.text import load_tokenizer

COMPUTE_DTYPES = {None: jnp.float32, "no": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}

@dataclasses.dataclass(frozen=True)
class ModelPaths:
    """Local folders of the base pipeline and of the VAE override (None: the pipeline's own VAE)."""

    model_dir: Path
    vae_dir: Path | None


def refuse_unsupported_options(spec: spec_lib.RunSpec) -> None:
    """Refuse, naming the key, every set option the JAX backend would otherwise ignore; reads no file.

    The capability table covers them all, planned options (LoRA, SDXL, IF) included.
    """
    capabilities.check_backend(spec, capabilities.JAX)


def refuse_untrainable_pipeline(model_dir: Path, model_family: str = "auto") -> None:
    """Refuse a pipeline this backend cannot train, by its model_index.json class, before any weight loads."""
    pipelines.refuse_untrainable_pipeline(model_dir, capabilities.JAX, model_family)


def resolve_model_paths(spec: spec_lib.RunSpec) -> ModelPaths:
    """The base pipeline and VAE folders (Hub ids through the cache), refusing before any weight download.

    A Hub id is first fetched with ``model_index.json`` only, so an SDXL or IF repo is refused
    without downloading its weights.
    """
    from jaxbooth.hub import resolve_model_dir, resolve_vae_dir

    m = spec.model
    if m.pretrained_model_name_or_path is None:
        raise JaxboothError("pretrained_model_name_or_path must be set (the CLI fills in the built-in tiny model; "
                            "call jaxbooth.run_defaults.fill_defaults)")
    hub = {"revision": m.revision, "token": spec.hub.hub_token, "cache_dir": spec.data.cache_dir}
    index_dir = resolve_model_dir(m.pretrained_model_name_or_path, subfolders=[], **hub)
    refuse_untrainable_pipeline(index_dir, m.model_family)
    if sdxl.is_sdxl_pipeline(index_dir):
        refuse_sdxl_options(spec)
    problems = edm.pipeline_problems(index_dir, spec.sdxl.do_edm_style_training, capabilities.JAX,
                                     snr_gamma=spec.optim.snr_gamma)
    if problems:  # an EDM-scheduler pipeline would otherwise train as DDPM here, silently wrong
        raise JaxboothError("\n".join(problems))
    model_dir = resolve_model_dir(m.pretrained_model_name_or_path, variant=m.variant, **hub)
    vae_name = spec_lib.vae_name_or_path(spec)
    vae_dir = resolve_vae_dir(vae_name, variant=m.variant, **hub) if vae_name else None
    return ModelPaths(Path(model_dir), vae_dir)


def refuse_sdxl_options(spec: spec_lib.RunSpec) -> None:
    """Refuse, naming the key and the fix, what an SDXL run on this backend would otherwise ignore.

    Called once ``model_index.json`` names an SDXL pipeline, before any weight loads: the options
    neither backend takes for SDXL (``sdxl.option_problems``). This backend samples SDXL (validation
    images, class images) as the torch one does, so nothing beyond them is refused here.
    """
    problems = sdxl.option_problems(spec)
    if problems:
        raise JaxboothError("SDXL pipeline on the jax backend:\n" + "\n".join(problems))


def remat_setting(spec: spec_lib.RunSpec) -> bool | str:
    """What the modules' ``gradient_checkpointing`` gets: False, True (``--remat_policy=full``, diffusers'
    gradient checkpointing) or the ``--remat_policy`` name (``models.blocks.REMAT_POLICIES``)."""
    if not spec.precision.gradient_checkpointing:
        return False
    return True if spec.precision.remat_policy == "full" else spec.precision.remat_policy


def load_models(spec: spec_lib.RunSpec, paths: ModelPaths) -> LoadedModels:
    """Every module, host param tree, config and the tokenizer(s) of the run, each loaded once.

    The UNet and text encoder(s) load in float32 (trained params; ``mixed_precision`` sets the
    compute dtype); the VAE comes from the override folder when the spec names one. An SDXL
    pipeline also loads ``text_encoder_2`` (CLIP with projection) and ``tokenizer_2``.
    """
    dtype = COMPUTE_DTYPES[spec.precision.mixed_precision]
    kernel, variant = spec.precision.attention, spec.model.variant
    remat = remat_setting(spec)
    model_dir = paths.model_dir
    unet_config, unet_dict, unet_params = pretrained.load_pretrained(model_dir, "unet", variant=variant,
                                                                     dtype=jnp.float32)
    vae_config, _, vae_params = pretrained.load_pretrained(paths.vae_dir or model_dir, "vae", variant=variant)
    text_config, text_dict, text_params = pretrained.load_pretrained(model_dir, "text_encoder", variant=variant,
                                                                     dtype=jnp.float32)
    scheduler_config = diffusion.read_scheduler_config(model_dir)
    hub = {"revision": spec.model.revision, "cache_dir": spec.data.cache_dir, "token": spec.hub.hub_token}
    second = {}
    if sdxl.is_sdxl_pipeline(model_dir):
        config_2, dict_2, params_2 = pretrained.load_pretrained(model_dir, "text_encoder_2", variant=variant,
                                                                dtype=jnp.float32)
        second = dict(text_encoder_2=clip_lib.make_text_encoder(config_2, with_projection=config_2.has_projection,
                                                                dtype=dtype, attention_kernel=kernel,
                                                                gradient_checkpointing=remat),
                      text_config_dict_2=dict_2, text_params_2=params_2,
                      tokenizer_2=load_tokenizer(model_dir, subfolder="tokenizer_2", **hub))
    return LoadedModels(
        model_dir=model_dir,
        unet=unet_lib.FlaxUNet2DConditionModel(unet_config, dtype=dtype, attention_kernel=kernel,
                                               gradient_checkpointing=remat),
        unet_config_dict=unet_dict, unet_params=unet_params,
        vae=FlaxAutoencoderKL(vae_config), vae_config=vae_config, vae_params=vae_params,
        text_encoder=clip_lib.make_text_encoder(text_config, dtype=dtype, attention_kernel=kernel,
                                                gradient_checkpointing=remat),
        text_config_dict=text_dict, text_params=text_params,
        tokenizer=load_tokenizer(model_dir, tokenizer_name=spec.model.tokenizer_name, **hub),
        scheduler_config=scheduler_config,
        noise_schedule=diffusion.schedule_from_config(scheduler_config,
                                                      source=str(model_dir / diffusion.SCHEDULER_CONFIG)),
        vae_dir=paths.vae_dir,
        **second,
    )


def text_apply_fn(text_encoder: Any) -> Any:
    """``(variables, ids, mask) -> last hidden state``: the conditioning diffusers' scripts use."""
    return lambda variables, ids, mask: text_encoder.apply(variables, ids, mask).last_hidden_state
