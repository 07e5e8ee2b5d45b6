"""kohya's LoRA naming (sd-scripts), which AUTOMATIC1111 and ComfyUI load.

One flat name per layer: a component prefix and the module path with ``.`` replaced by ``_``
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``), each with ``.lora_down.weight``
``[rank, in]``, ``.lora_up.weight`` ``[out, rank]`` and ``.alpha``, a 0-d tensor whose value over
the rank is the layer's scale. SD 1.x/2.x keep diffusers' UNet module names, so the UNet part
is diffusers' path flattened; the flattening is undone against the model's module paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from jaxbooth.errors import JaxboothError
from jaxbooth.lora.layers import LoraState

# component -> prefix written; an SDXL state (two text encoders) uses kohya's te1/te2.
_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_SDXL_PREFIX = {**_PREFIX, "text_encoder": "lora_te1_"}
# prefix read -> component
_COMPONENT_OF = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                 "lora_te2_": "text_encoder_2"}
_FIELDS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".dora_scale": "magnitude"}


def kohya_name(component: str, path: str, *, sdxl: bool = False) -> str:
    """The flat kohya name of one layer (no field suffix)."""
    from jaxbooth.lora.files import canonical_path

    prefixes = _SDXL_PREFIX if sdxl else _PREFIX
    if component not in prefixes:
        raise ValueError(f"kohya has no name for component {component!r}; it has {sorted(prefixes)}")
    return prefixes[component] + canonical_path(component, path).replace(".", "_")


def to_kohya(state: LoraState) -> dict[str, np.ndarray]:
    """kohya tensors of ``state``: float32 down/up and a 0-d float32 ``alpha`` per layer.

    DoRA has no place in kohya's LoRA format (spec validation refuses that combination).
    """
    sdxl = "text_encoder_2" in state
    tensors: dict[str, np.ndarray] = {}
    for component, layers in state.items():
        for path, layer in layers.items():
            if layer.magnitude is not None:
                raise ValueError(f"{component}.{path} is a DoRA layer; kohya's LoRA format cannot hold it")
            name = kohya_name(component, path, sdxl=sdxl)
            tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(layer.down, np.float32)
            tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(layer.up, np.float32)
            tensors[f"{name}.alpha"] = np.asarray(layer.alpha, np.float32).reshape(())
    return tensors


def is_kohya(tensors: Iterable[str]) -> bool:
    """Whether every name carries a kohya component prefix (diffusers' own test for the format)."""
    return all(name.startswith(tuple(_COMPONENT_OF)) for name in tensors)


def from_kohya(tensors: Mapping[str, np.ndarray], module_paths: Mapping[str, Iterable[str]], *,
               source: str = "the kohya LoRA") -> LoraState:
    """A ``LoraState`` from kohya tensors, flat names mapped back through ``module_paths``.

    A missing ``.alpha`` means ``alpha = rank`` (kohya's rule). A name that matches no module
    of the model is an error naming ``source`` and the key.
    """
    from jaxbooth.lora.files import canonical_path, make_layer

    lookup: dict[str, tuple[str, str]] = {}
    for component, paths in module_paths.items():
        for path in paths:
            path = canonical_path(component, path)
            flat = path.replace(".", "_")
            for prefix, owner in _COMPONENT_OF.items():
                if owner == component:
                    lookup[prefix + flat] = (component, path)
    slots: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name, field = _split(key, source)
        if name not in lookup:
            prefix = next(p for p in sorted(_COMPONENT_OF, key=len, reverse=True) if name.startswith(p))
            raise JaxboothError(
                f"{source}: kohya key {key!r} names no module of the model's {_COMPONENT_OF[prefix]} "
                f"({sum(1 for c, _ in lookup.values() if c == _COMPONENT_OF[prefix])} modules known). "
                "Fix: load the LoRA onto the base model it was trained from (kohya SDXL UNet names in "
                "the original Stable Diffusion layout are not read).")
        slots.setdefault(lookup[name], {})[field] = value
    state: LoraState = {}
    for (component, path), slot in sorted(slots.items()):
        if "down" not in slot or "up" not in slot:
            raise JaxboothError(f"{source}: kohya layer {kohya_name(component, path)} lacks its "
                                f"{'lora_down' if 'down' not in slot else 'lora_up'}.weight")
        alpha = float(np.asarray(slot["alpha"], np.float64).reshape(())) if "alpha" in slot \
            else float(slot["down"].shape[0])
        state.setdefault(component, {})[path] = make_layer(slot, alpha, f"{source}: {kohya_name(component, path)}")
    return state


def _split(key: str, source: str) -> tuple[str, str]:
    for suffix, field in _FIELDS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], field
    raise JaxboothError(f"{source}: kohya key {key!r} is not a LoRA tensor jaxbooth reads (expected "
                        f"{', '.join(_FIELDS)}; LoHa/LoKr and other LyCORIS types are not supported)")
