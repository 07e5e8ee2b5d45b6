"""The LoRA weights file: diffusers' ``pytorch_lora_weights.safetensors``, written and read without a framework.

Written as diffusers' ``train_dreambooth_lora.py`` writes it (peft's adapter state dict in
diffusers' naming, ``unet.`` / ``text_encoder.`` prefixes), with diffusers'
``lora_adapter_metadata`` (the ``LoraConfig`` of each component) in the safetensors header,
so ``pipe.load_lora_weights(folder)`` rebuilds the adapters with their own alpha and DoRA
instead of guessing ``alpha = rank``. Read back: diffusers, plain peft and kohya files
(``read_lora_file``), into a ``LoraState``. numpy + safetensors.numpy only.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth import weight_files
from jaxbooth.errors import JaxboothError
from jaxbooth.lora.layers import LoraLayer, LoraState
from jaxbooth.lora.settings import AdapterSettings, is_target
from jaxbooth.weight_files import read_header

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the adapter configs in ``__metadata__``
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# A component's file naming, as diffusers writes and reads it back: the UNet's ``.lora.down`` /
# ``.lora.up`` and the text encoders' ``.lora_linear_layer.down`` / ``.up``. diffusers' writer keeps
# peft's ``lora_A`` / ``lora_B`` for names outside its attention-projection table, but its reader
# picks one naming per UNet from the first key and cannot map a text encoder that has no
# ``lora_linear_layer`` key at all; the generic spelling loads for every module name. For the
# default targets it is exactly what the diffusers script writes.
_NAMING = {"unet": ("lora.down", "lora.up")}
_TEXT_NAMING = ("lora_linear_layer.down", "lora_linear_layer.up")
# DoRA magnitudes: peft's ``lora_magnitude_vector`` for the UNet (as diffusers writes it); the text
# encoders' ``.weight`` spelling is the one transformers' adapter loader maps onto the parameter
# (it drops the bare name as unexpected and leaves the magnitude at its initial value).
_MAGNITUDE = {"unet": "lora_magnitude_vector"}
# Suffixes read back: (suffix, field). Ordered longest first where one ends another.
_READ_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude"),
    (".alpha", "alpha"),
)
# Old diffusers attention-processor names: ``attn1.processor.to_q_lora.down.weight``.
_OLD_NAME = re.compile(r"^(?P<module>.*)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<field>down|up)\.weight$")
_OLD_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_CLIP_TOP = ("encoder.", "embeddings.", "final_layer_norm.")


def canonical_path(component: str, path: str) -> str:
    """A module path as the component's weight files name it: CLIP paths under ``text_model.``.

    transformers 5 flattens ``CLIPTextModel`` (modules ``encoder.layers.0...``) while its weight
    files, diffusers' LoRA files and kohya's names keep ``text_model.``; both spellings map here.
    """
    if component.startswith("text_encoder") and path.startswith(_CLIP_TOP):
        return "text_model." + path
    return path


def diffusers_tensors(state: LoraState) -> dict[str, np.ndarray]:
    """The file's tensors: ``<component>.<path>.<naming>.weight`` in float32, DoRA magnitudes included."""
    tensors: dict[str, np.ndarray] = {}
    for component, layers in state.items():
        down_name, up_name = _NAMING.get(component, _TEXT_NAMING)
        for path, layer in layers.items():
            key = f"{component}.{canonical_path(component, path)}"
            tensors[f"{key}.{down_name}.weight"] = _f32(layer.down)
            tensors[f"{key}.{up_name}.weight"] = _f32(layer.up)
            if layer.magnitude is not None:
                tensors[f"{key}.{_MAGNITUDE.get(component, 'lora_magnitude_vector.weight')}"] = _f32(layer.magnitude)
    return tensors


def adapter_metadata(state: LoraState, settings: AdapterSettings) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata``: ``{"<component>.<LoraConfig kwarg>": value}``.

    From ``settings.peft_config`` (targets that match no adapted layer dropped); a layer whose
    rank or alpha differs from the settings' (a file read from elsewhere) gets a
    ``rank_pattern`` / ``alpha_pattern`` entry, as peft names per-module exceptions.
    """
    metadata: dict[str, Any] = {}
    for component, layers in state.items():
        if not layers:
            continue
        config = settings.peft_config(component, present=layers)
        config["use_dora"] = any(layer.magnitude is not None for layer in layers.values())
        # layers outside the settings' targets (a file read from elsewhere): named by full path
        config["target_modules"] = list(config["target_modules"]) + sorted(
            _pattern(component, p) for p in layers if not is_target(p, config["target_modules"]))
        rank_pattern = {_pattern(component, p): layer.rank for p, layer in layers.items() if layer.rank != config["r"]}
        alpha_pattern = {_pattern(component, p): float(layer.alpha) for p, layer in layers.items()
                         if float(layer.alpha) != float(config["lora_alpha"])}
        if rank_pattern:
            config["rank_pattern"] = rank_pattern
        if alpha_pattern:
            config["alpha_pattern"] = alpha_pattern
        metadata.update({f"{component}.{name}": value for name, value in config.items()})
    return metadata


def write_lora_file(path: str | Path, state: LoraState, settings: AdapterSettings) -> Path:
    """Write ``state`` as diffusers' LoRA file (keys, ``format: pt`` and adapter metadata); atomic."""
    metadata = {"format": "pt", METADATA_KEY: json.dumps(adapter_metadata(state, settings), indent=2, sort_keys=True)}
    return save_safetensors(path, diffusers_tensors(state), metadata)


def save_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
    """safetensors.numpy.save_file via a temporary file and a rename: readers never see half a file."""
    import safetensors.numpy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        # ascontiguousarray would turn kohya's 0-d alphas into shape (1,), which diffusers' loader rejects
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) if np.ndim(v) else np.asarray(v)
                                     for k, v in tensors.items()}, str(tmp),
                                    metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_lora_file(path: str | Path, module_paths: Mapping[str, Iterable[str]] | None = None) -> LoraState:
    """A LoRA file (diffusers, peft or kohya naming) as a ``LoraState``, float32.

    ``path``: the file, or a folder holding ``pytorch_lora_weights.safetensors`` (as
    ``load_lora_weights`` takes one).
    ``module_paths``: each component's module paths (e.g. ``merge.component_module_paths``);
    kohya files need them to undo the ``.`` -> ``_`` flattening of their names, and with them
    every other file is checked to fit the model. Alpha comes from the file's adapter metadata,
    else its ``.alpha`` tensors, else equals the rank (diffusers' rule for files without one).
    """
    from jaxbooth.lora import kohya

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    tensors, file_metadata = read_safetensors(path)
    paths = _canonical_module_paths(module_paths)
    if tensors and kohya.is_kohya(tensors):
        if paths is None:
            raise JaxboothError(f"{path}: a kohya LoRA file; reading it needs the model's module paths "
                                "(pass module_paths, e.g. merge.component_module_paths(base_model_dir))")
        return kohya.from_kohya(tensors, paths, source=str(path))
    raw = file_metadata.get(METADATA_KEY)
    try:
        adapter_config = json.loads(raw) if raw else {}
    except json.JSONDecodeError as error:
        raise JaxboothError(f"{path}: the {METADATA_KEY} header is not JSON ({error}). "
                            "Fix: re-save the file.") from None
    return _state_from_diffusers(tensors, adapter_config, paths, source=str(path))


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors file's tensors and ``__metadata__``; an error naming the file when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise JaxboothError(f"{path}: no such LoRA file. Fix: point at the folder or file a LoRA run wrote "
                            f"({LORA_WEIGHTS_NAME})")
    try:
        header = read_header(path)
    except (OSError, ValueError, struct.error) as error:
        raise JaxboothError(f"{path}: not a readable safetensors file ({error}). Fix: re-download or re-save it.") \
            from None
    return weight_files.read_safetensors(path), dict(header.get("__metadata__") or {})


def _state_from_diffusers(tensors: Mapping[str, np.ndarray], adapter_config: Mapping[str, Any],
                          module_paths: Mapping[str, set[str]] | None, *, source: str) -> LoraState:
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        component, path, field = _parse_key(key, module_paths, source)
        slot = parts.setdefault((component, path), {})
        if field in slot:
            raise JaxboothError(f"{source}: key {key!r} names the {field} of {component}.{path} a second time "
                                "(two namings of one layer). Fix: re-save the file with one naming.")
        slot[field] = value
    state: LoraState = {}
    for (component, path), slot in sorted(parts.items()):
        if "down" not in slot or "up" not in slot:
            have = sorted(slot)
            raise JaxboothError(f"{source}: layer {component}.{path} has {have} but not both down (lora_A) and up "
                                "(lora_B) weights. Fix: re-save the file from the training run.")
        rank = int(slot["down"].shape[0])
        alpha = _alpha(component, path, rank, adapter_config, slot.get("alpha"))
        state.setdefault(component, {})[path] = make_layer(slot, alpha, f"{source}: {component}.{path}")
    return state


def make_layer(slot: Mapping[str, np.ndarray], alpha: float, where: str) -> LoraLayer:
    """A float32 ``LoraLayer`` from read tensors; shapes checked with an error naming ``where``."""
    down, up = np.asarray(slot["down"], np.float32), np.asarray(slot["up"], np.float32)
    magnitude = slot.get("magnitude")
    if down.ndim != 2 or up.ndim != 2:
        raise JaxboothError(f"{where}: down {down.shape} / up {up.shape} are not matrices (a convolution LoRA?); "
                            "jaxbooth reads LoRA on linear layers only")
    if magnitude is not None:
        magnitude = np.asarray(magnitude, np.float32)
        if magnitude.size == up.shape[0]:
            magnitude = magnitude.reshape(up.shape[0])
    try:
        return LoraLayer(down=down, up=up, alpha=float(alpha), magnitude=magnitude)
    except ValueError as error:
        raise JaxboothError(f"{where}: {error}") from None


def _parse_key(key: str, module_paths: Mapping[str, set[str]] | None, source: str) -> tuple[str, str, str]:
    """``(component, module path, field)`` of one diffusers / peft key."""
    name = key.removeprefix("base_model.model.")
    component = next((c for c in COMPONENTS if name.startswith(c + ".")), None)
    if component is not None:
        name = name[len(component) + 1:]
    name = name.replace(".processor.", ".")
    old = _OLD_NAME.match(name)
    if old:
        path, field = old["module"] + "." + old["proj"], old["field"]
    else:
        found = next(((name[: -len(suffix)], field) for suffix, field in _READ_SUFFIXES if name.endswith(suffix)), None)
        if found is None:
            raise JaxboothError(f"{source}: key {key!r} is not a LoRA weight jaxbooth reads (expected "
                                "<module>.lora.down/up.weight, .lora_linear_layer.down/up.weight, .lora_A/B.weight, "
                                ".lora_magnitude_vector or .alpha; LoRA biases and LyCORIS types are not supported)")
        path, field = found
    if component is None:
        component = _guess_component(path, module_paths)
    if old:
        if component.startswith("text_encoder"):
            path = path.rsplit(".", 1)[0] + "." + _OLD_TEXT_PROJ[old["proj"]]
        elif old["proj"] == "to_out":
            path += ".0"
    path = canonical_path(component, path)
    if module_paths is not None and path not in module_paths.get(component, ()):
        raise JaxboothError(f"{source}: key {key!r} adapts {component}.{path}, which the model does not have. "
                            "Fix: load the LoRA onto the base model it was trained from.")
    return component, path, field


def _guess_component(path: str, module_paths: Mapping[str, set[str]] | None) -> str:
    """The component of an unprefixed (plain peft) key: the one whose modules hold it, else by its name."""
    if module_paths is not None:
        for component in COMPONENTS:
            if canonical_path(component, path) in module_paths.get(component, ()):
                return component
    return "text_encoder" if path.startswith(("text_model.", *_CLIP_TOP)) else "unet"


def _alpha(component: str, path: str, rank: int, config: Mapping[str, Any], alpha_tensor: np.ndarray | None) -> float:
    pattern = config.get(f"{component}.alpha_pattern") or {}
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(value)
    if f"{component}.lora_alpha" in config:
        return float(config[f"{component}.lora_alpha"])
    if alpha_tensor is not None:
        return float(np.asarray(alpha_tensor, np.float64).reshape(()))
    return float(rank)


def _pattern(component: str, path: str) -> str:
    """A peft rank/alpha pattern for one module: its path, without ``text_model.`` (which the
    loading model may not have; peft matches patterns as a suffix)."""
    return path.removeprefix("text_model.") if component.startswith("text_encoder") else path


def _canonical_module_paths(module_paths: Mapping[str, Iterable[str]] | None) -> dict[str, set[str]] | None:
    if module_paths is None:
        return None
    return {component: {canonical_path(component, p) for p in paths} for component, paths in module_paths.items()}


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))
