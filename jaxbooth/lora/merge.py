"""Adapters folded into base weights, in numpy: the merged pipeline and any backend that merges.

``W' = W + multiplier * (alpha / rank) * up @ down`` on torch-layout ``[out, in]`` weights; DoRA
then rescales each output row to ``magnitude / ||W'||_row``, as peft's merge does. Also reads
a diffusers component folder's weights and module paths without torch (safetensors headers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from jaxbooth.errors import JaxboothError
from jaxbooth.hub import WEIGHT_STEMS
from jaxbooth.lora.layers import LoraLayer
from jaxbooth.weight_files import read_header, read_safetensors, strict_safetensors_files

WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model"}


def merge_layer(weight: np.ndarray, layer: LoraLayer, multiplier: float = 1.0) -> np.ndarray:
    """One merged weight ``[out, in]`` in float64 (see the module docstring); computed in float64 so
    the cast back to the base dtype rounds once."""
    delta = (multiplier * layer.scale) * (layer.up.astype(np.float64) @ layer.down.astype(np.float64))
    merged = np.asarray(weight, np.float64) + delta
    if layer.magnitude is not None:
        norm = np.linalg.norm(merged, axis=1, keepdims=True)
        merged = merged * (layer.magnitude.astype(np.float64)[:, None] / norm)
    return merged


def merge_into_state_dict(state_dict: Mapping[str, np.ndarray], layers: Mapping[str, LoraLayer],
                          multiplier: float = 1.0) -> dict[str, np.ndarray]:
    """A copy of a component's torch-layout state dict with every layer's adapter merged into
    ``<path>.weight``, cast back to that weight's dtype. Unadapted entries are shared, not copied."""
    from jaxbooth.lora.files import canonical_path

    merged = dict(state_dict)
    for path, layer in layers.items():
        key = next((k for k in (f"{path}.weight", f"{canonical_path('text_encoder', path)}.weight",
                                f"{path.removeprefix('text_model.')}.weight") if k in merged), None)
        if key is None:
            raise JaxboothError(f"LoRA layer {path}: the base weights have no {path}.weight. Fix: apply the "
                                "LoRA to the base model it was trained from.")
        weight = merged[key]
        if weight.shape != (layer.up.shape[0], layer.down.shape[1]):
            raise JaxboothError(f"LoRA layer {path}: up {layer.up.shape} @ down {layer.down.shape} does not fit "
                                f"the base weight {key} {weight.shape}. Fix: apply the LoRA to the base model "
                                "it was trained from.")
        merged[key] = merge_layer(weight, layer, multiplier).astype(weight.dtype)
    return merged


def weight_files(folder: str | Path, variant: str | None = None) -> list[Path]:
    """A diffusers component folder's safetensors files (the ``variant``'s when there, else the plain ones)."""
    folder = Path(folder)
    files = (variant and strict_safetensors_files(folder, variant)) or strict_safetensors_files(folder, None)
    if files:
        return files
    raise JaxboothError(f"{folder}: no safetensors weights ({', '.join(s + '.safetensors' for s in WEIGHT_STEMS)} "
                        "or a sharded index). Fix: point at a diffusers pipeline folder saved with safetensors.")


def read_component_weights(folder: str | Path, variant: str | None = None) -> dict[str, np.ndarray]:
    """A component's torch-layout state dict as numpy arrays (file dtypes kept; bf16 via ml_dtypes)."""
    state: dict[str, np.ndarray] = {}
    for path in weight_files(folder, variant):
        state.update(read_safetensors(path))
    return state


def component_module_paths(base_dir: str | Path, components: Iterable[str] = ("unet", "text_encoder"),
                           variant: str | None = None) -> dict[str, list[str]]:
    """Each component's linear/conv module paths (keys of 2-D+ ``.weight`` tensors), read from the
    safetensors headers only: what ``read_lora_file`` needs for kohya names."""
    paths: dict[str, list[str]] = {}
    for component in components:
        folder = Path(base_dir) / component
        if not folder.is_dir():
            continue
        names = []
        for file in weight_files(folder, variant):
            header = read_header(file)
            names += [key[: -len(".weight")] for key, info in header.items()
                      if key.endswith(".weight") and isinstance(info, dict) and len(info.get("shape", ())) >= 2]
        paths[component] = sorted(names)
    return paths
