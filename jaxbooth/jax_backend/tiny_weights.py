"""Random weights for jaxbooth's built-in tiny pipelines, from the Flax models' own initialisers.

``jaxbooth.tiny`` (shared, framework-free) owns the configs, the folder layout and the atomic
write; it calls :func:`write_random_components` lazily for the only step that needs a framework.
Keeping the JAX initialisers here leaves the shared layer free of jax imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax

from jaxbooth.jax_backend.models import clip, unet, vae
from jaxbooth.jax_backend.pretrained import save_diffusers_component

COMPONENTS = ("unet", "vae", "text_encoder")
OPTIONAL = ("text_encoder_2",)  # SDXL's second encoder (with projection)


def random_params(configs: Mapping[str, dict], seed: int) -> dict[str, dict]:
    """Host params of every component, initialised from ``PRNGKey(seed)``.

    ``configs`` holds the diffusers config dicts of ``unet``, ``vae`` and ``text_encoder`` (and
    ``text_encoder_2`` for SDXL); the split order is fixed, so a (configs, seed) pair always gives
    the same weights, and an SD pipeline's weights do not change with the optional components.
    """
    missing = [name for name in COMPONENTS if name not in configs]
    if missing:
        raise ValueError(f"random_params needs configs for {list(COMPONENTS)}; missing {missing}")
    keys = jax.random.split(jax.random.PRNGKey(seed), len(COMPONENTS))
    params = {
        "unet": unet.init_params(unet.unet_config_from_dict(configs["unet"]), keys[0]),
        "vae": vae.init_params(vae.vae_config_from_dict(configs["vae"]), keys[1]),
        "text_encoder": clip.init_params(clip.clip_config_from_dict(configs["text_encoder"]), keys[2]),
    }
    if "text_encoder_2" in configs:
        config = clip.clip_config_from_dict(configs["text_encoder_2"])
        params["text_encoder_2"] = clip.init_params(config, jax.random.fold_in(keys[2], 2),
                                                    with_projection=config.has_projection)
    return jax.device_get(params)


def write_random_components(out_dir: str | Path, configs: Mapping[str, dict], seed: int) -> None:
    """Write each component's folder (config + random weights) in diffusers layout."""
    params = random_params(configs, seed)
    for component in (*COMPONENTS, *(name for name in OPTIONAL if name in configs)):
        save_diffusers_component(params[component], configs[component], Path(out_dir), component)
