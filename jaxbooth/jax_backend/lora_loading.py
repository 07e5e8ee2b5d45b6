"""`jaxbooth generate` on a LoRA: find the LoRA file and its base model, merge the adapters in.

diffusers samples a LoRA on its base pipeline (``load_lora_weights``, scaled by
``cross_attention_kwargs={"scale": s}`` or fused with ``fuse_lora(lora_scale=s)``). The Flax
models have no adapter layers at sampling time, so the adapters are merged into the base's
torch-layout state dicts (``jaxbooth.lora.merge``) and those convert to Flax params like any
checkpoint. Merging is exact for what diffusers computes: ``W + s * (alpha/rank) * up @ down``.
Finding the LoRA file and its base is :mod:`jaxbooth.lora.base_model` (torch's IF ``generate`` uses it
too). Never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxbooth import sdxl
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import pretrained
from jaxbooth.jax_backend.weights import flax_to_torch_state, torch_state_to_flax
from jaxbooth.lora import LoraLayer, LoraState
from jaxbooth.lora import files as lora_files
from jaxbooth.lora.base_model import (  # the lookups both backends' generate share
    BASE_FLAG,
    BaseModel,
    _plain_pipeline_errors,
    _resolve_base,
    find_base_model,
    lora_file_of,
    not_a_model_file,
)
from jaxbooth.lora.merge import merge_into_state_dict

ADAPTED = ("unet", "text_encoder")
"""The components a LoRA may adapt on an SD base: the pipeline ``generate`` samples has no others."""
SDXL_ADAPTED = ("unet", *sdxl.TEXT_ENCODERS)
"""The same on an SDXL base, whose LoRAs may adapt both text encoders."""


def adapted_components(base_dir: Path) -> tuple[str, ...]:
    """The components a LoRA on this base may adapt (``ADAPTED``, or ``SDXL_ADAPTED`` for an SDXL base)."""
    return SDXL_ADAPTED if sdxl.is_sdxl_pipeline(base_dir) else ADAPTED

Loader = Callable[..., tuple[Any, dict, dict]]
"""``load_pretrained``'s signature: (model_dir, component, *, variant, dtype) -> (config, config_dict, params)."""


class Source(NamedTuple):
    """What ``generate`` loads: the pipeline folder, its weight variant, how to load a component."""

    model_dir: Path
    variant: str | None
    load: Loader


def _model_module(component: str) -> Any:
    return importlib.import_module(pretrained.component_kind(component).module)


def base_state_dict(base_dir: Path, component: str, variant: str | None) -> dict[str, np.ndarray]:
    """A base component's torch-layout state dict (an old Flax msgpack checkpoint converted back)."""
    folder = pretrained.component_dir(base_dir, component)
    kind, _ = pretrained.find_weight_files(folder, variant=variant)
    if kind == "safetensors":
        return pretrained.read_state_dict(folder, variant=variant)
    _, _, params = pretrained.load_pretrained(base_dir, component, variant=variant)
    return flax_to_torch_state(params, renames=_model_module(component).FLAX_TO_TORCH_RENAMES)


def module_paths(state: Mapping[str, np.ndarray]) -> set[str]:
    """A state dict's torch module paths (its keys without ``.weight``/``.bias``), for kohya's names."""
    return {key.rsplit(".", 1)[0] for key in state if key.endswith((".weight", ".bias"))}


def check_fits(lora_file: Path, base: str, component: str, layers: Mapping[str, LoraLayer],
               state: Mapping[str, np.ndarray]) -> None:
    """Every adapter names a base layer of its shape, or one error naming the file, a key and the fix."""
    fix = f"Fix: pass the base model this LoRA was trained on as {BASE_FLAG}."
    keys = {path: next((key for key in (f"{path}.weight", f"{path.removeprefix('text_model.')}.weight")
                        if key in state), None) for path in layers}  # CLIP files with or without text_model.
    unknown = sorted(path for path, key in keys.items() if key is None)
    if unknown:
        example = next((p for p in sorted(module_paths(state)) if p.rsplit(".", 1)[-1] in {"to_q", "q_proj"}), None)
        raise JaxboothError(
            f"{lora_file}: {len(unknown)} of its {len(layers)} {component} adapters match no layer of the base model "
            f"{base} (e.g. '{component}.{unknown[0]}'" + (f"; the base has e.g. '{example}'" if example else "")
            + f"). {fix}")
    for path, layer in sorted(layers.items()):
        weight = state[keys[path]]
        if tuple(weight.shape) != (layer.up.shape[0], layer.down.shape[1]):
            raise JaxboothError(
                f"{lora_file}: the adapter of '{component}.{path}' is [{layer.up.shape[0]}, {layer.down.shape[1]}] but "
                f"that layer of the base model {base} is {list(weight.shape)}. {fix}")


def read_fitting_lora(lora_file: Path, base: BaseModel, states: Mapping[str, Mapping[str, np.ndarray]]
                      ) -> LoraState:
    """The LoRA file's adapters, checked against the base components' state dicts."""
    try:
        lora = lora_files.read_lora_file(lora_file, module_paths={c: module_paths(s) for c, s in states.items()})
    except JaxboothError as error:
        raise JaxboothError(f"{error}\n(merging into the base model {base.name}, from {base.origin}; pass the "
                            f"right one as {BASE_FLAG})") from None
    other = sorted(c for c, layers in lora.items() if layers and c not in states)
    if other:
        raise JaxboothError(f"{lora_file}: adapts {other}, which the base model {base.name} does not have (a LoRA "
                            f"on it adapts {list(states)} only). Fix: pass the base model this LoRA was trained on "
                            f"as {BASE_FLAG}.")
    if not any(lora.values()):
        raise JaxboothError(f"{lora_file}: holds no LoRA adapters. Fix: pass a LoRA file or output folder.")
    for component, layers in lora.items():
        check_fits(lora_file, base.name, component, layers, states[component])
    return lora


def merged_loader(lora_file: Path, base: BaseModel, scale: float) -> Source:
    """Resolve the base, read and check the LoRA up front, and load UNet/text encoder(s) merged at ``scale``."""
    base_dir = _resolve_base(base)
    adapted = adapted_components(base_dir)
    states = {component: base_state_dict(base_dir, component, base.variant) for component in adapted}
    lora = read_fitting_lora(lora_file, base, states)

    def load(model_dir: Path, component: str, *, variant: str | None = None, dtype: Any = None,
             ) -> tuple[Any, dict, dict]:
        if component not in adapted:
            return pretrained.load_pretrained(model_dir, component, variant=variant, dtype=dtype)
        if component not in states:
            raise RuntimeError(f"merged_loader: {component} loaded twice; its base state dict is already freed")
        config, config_dict = pretrained.load_config(model_dir, component)
        abstract = pretrained.abstract_params_for(component, config, config_dict)
        state = states.pop(component)  # used once: let the torch-layout copy go
        layers = lora.get(component) or {}
        if layers:
            state = merge_into_state_dict(state, layers, multiplier=scale)
        params = torch_state_to_flax(state, abstract, renames=_model_module(component).TORCH_TO_FLAX_RENAMES,
                                     source=f"{model_dir / component} + {lora_file}")
        return config, config_dict, params if dtype is None else pretrained.cast_floating(params, dtype)

    return Source(base_dir, base.variant, load)


def generate_source(name: str, *, base: str | None = None, lora_scale: float | None = None) -> Source:
    """What ``jaxbooth generate NAME`` samples: a pipeline folder (or Hub id) as stored, or a LoRA
    (folder or file) merged into its base at ``lora_scale`` (None: 1.0)."""
    from jaxbooth.hub import resolve_model_dir

    path = Path(name).expanduser()
    lora_file = lora_file_of(path)
    if lora_file is not None:
        return merged_loader(lora_file, find_base_model(lora_file, base), 1.0 if lora_scale is None else lora_scale)
    if path.is_file():
        raise not_a_model_file(name)
    folder = Path(resolve_model_dir(name))
    if base is not None or lora_scale is not None:
        _plain_pipeline_errors(name, folder, base=base, lora_scale=lora_scale)
    return Source(folder, None, pretrained.load_pretrained)

