"""Load and save the model components of a diffusers pipeline folder for the Flax models.

Owns the file formats: which files a component folder holds (``config.json``,
diffusers/transformers ``*.safetensors`` plain, variant or sharded, old Flax
``*.msgpack``), reading them into numpy without torch, and writing trained params back
in the diffusers PyTorch layout so ``DiffusionPipeline.from_pretrained(out_dir)`` and
transformers' ``from_pretrained`` load them. The tensor re-layout rules live in
:mod:`jaxbooth.jax_backend.weights`; the model modules supply configs, abstract trees
and rename tables. Imports numpy, safetensors, jax/flax; never torch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from jaxbooth import log as jaxbooth_log
from jaxbooth.errors import JaxboothError
from jaxbooth.hub import WEIGHT_STEMS
from jaxbooth.jax_backend.weights import (
    _format_problems,
    flatten_tree,
    flax_to_torch_state,
    torch_state_to_flax,
    unflatten_tree,
)
from jaxbooth.weight_files import read_safetensors, strict_safetensors_files

MSGPACK_NAMES: tuple[str, ...] = ("diffusion_flax_model.msgpack", "flax_model.msgpack")


@dataclasses.dataclass(frozen=True)
class ComponentKind:
    """How one pipeline component maps to a jaxbooth model module and its file names."""

    module: str
    config_fn: str
    weights_stem: str
    """``diffusion_pytorch_model`` (diffusers models) or ``model`` (transformers models)."""
    msgpack_name: str


_UNET = ComponentKind("jaxbooth.jax_backend.models.unet", "unet_config_from_dict",
                      "diffusion_pytorch_model", "diffusion_flax_model.msgpack")
_VAE = ComponentKind("jaxbooth.jax_backend.models.vae", "vae_config_from_dict",
                     "diffusion_pytorch_model", "diffusion_flax_model.msgpack")
_CLIP = ComponentKind("jaxbooth.jax_backend.models.clip", "clip_config_from_dict",
                      "model", "flax_model.msgpack")
COMPONENTS: dict[str, ComponentKind] = {
    "unet": _UNET, "vae": _VAE, "text_encoder": _CLIP, "text_encoder_2": _CLIP,
}


# ----------------------------------------------------------------------------- configs


def component_kind(component: str) -> ComponentKind:
    try:
        return COMPONENTS[component]
    except KeyError:
        raise JaxboothError(
            f"component {component!r} is not one of {sorted(COMPONENTS)}; jaxbooth has Flax models "
            "for the UNet, the VAE and the CLIP text encoders only."
        ) from None


def _model_module(component: str) -> ModuleType:
    return importlib.import_module(component_kind(component).module)


def uses_projection(component: str, config_dict: Mapping[str, Any]) -> bool:
    """Whether a text encoder is ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``).

    The config's ``architectures`` decides when present, as in transformers' Auto
    classes; without it, ``text_encoder_2`` is SDXL's projection encoder by convention.
    """
    architectures = config_dict.get("architectures") or ()
    if architectures:
        return "CLIPTextModelWithProjection" in architectures
    return component == "text_encoder_2"


def component_dir(model_dir: str | Path, component: str) -> Path:
    """``<model_dir>/<component>``, or ``model_dir`` itself when it is a standalone component (a
    ``config.json`` at its root and no ``model_index.json``: a VAE repo such as
    stabilityai/sd-vae-ft-mse, which diffusers' VAE flags load without a subfolder); else an error
    naming the path and the folders that do exist."""
    component_kind(component)
    folder = Path(model_dir) / component
    root = Path(model_dir)
    if not folder.is_dir() and (root / "config.json").is_file() and not (root / "model_index.json").is_file():
        return root
    if not folder.is_dir():
        parent = Path(model_dir)
        present = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise JaxboothError(
            f"{folder}: component folder not found (present: {present or 'nothing'}). Fix: point "
            "--pretrained_model_name_or_path at a diffusers pipeline folder that has "
            f"'{component}/', e.g. one written by DiffusionPipeline.save_pretrained."
        )
    return folder


def load_config(model_dir: str | Path, component: str) -> tuple[Any, dict]:
    """Read ``<component>/config.json`` and build the model module's config object."""
    path = component_dir(model_dir, component) / "config.json"
    if not path.is_file():
        raise JaxboothError(f"{path}: not found; every model component folder needs its config.json. "
                            "Fix: re-download or re-save the pipeline.")
    try:
        config_dict = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise JaxboothError(f"{path}: cannot be read as JSON ({error}). Fix: re-download the file."
                            ) from error
    config_fn = getattr(_model_module(component), component_kind(component).config_fn)
    if "source" in inspect.signature(config_fn).parameters:
        return config_fn(config_dict, source=str(path)), config_dict
    return config_fn(config_dict), config_dict


def abstract_params_for(component: str, config: Any, config_dict: Mapping[str, Any]) -> dict:
    """The component's ``jax.ShapeDtypeStruct`` tree, picking the CLIP projection variant.

    Cached per (module, config): tracing the UNet under ``jax.eval_shape`` takes seconds,
    and a run loads the same config several times (train, validation, export checks).
    Callers must treat the returned tree as read-only.
    """
    projection = component_kind(component) is _CLIP and uses_projection(component, config_dict)
    module_name = component_kind(component).module
    try:
        hash(config)
    except TypeError:  # an unhashable config object: compute without the cache
        return _cached_abstract_params.__wrapped__(module_name, config, projection)
    return _cached_abstract_params(module_name, config, projection)


@functools.lru_cache(maxsize=16)
def _cached_abstract_params(module_name: str, config: Any, with_projection: bool) -> dict:
    module = importlib.import_module(module_name)
    if with_projection:
        return module.abstract_params(config, with_projection=True)
    return module.abstract_params(config)


# ----------------------------------------------------------------------------- finding files


_VARIANT_FILE = re.compile(
    r"^(?:diffusion_pytorch_model|model)(?:\.(\w+)(?:-\d+-of-\d+)?\.safetensors|\.safetensors\.index\.(\w+)\.json)$"
)


def _missing_weights_error(folder: Path, variant: str | None) -> JaxboothError:
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    variants = sorted({m.group(1) or m.group(2) for n in names if (m := _VARIANT_FILE.match(n))})
    wanted = f"'{variant}' variant or plain " if variant else ""
    if any(n.endswith(".bin") for n in names):
        fix = ("only PyTorch pickles (*.bin) are there, which jaxbooth reads without torch only as "
               "safetensors. Fix: convert once with torch installed, e.g. "
               f"`UNet2DConditionModel.from_pretrained('{folder}').save_pretrained('{folder}')` "
               "(diffusers/transformers write safetensors by default).")
    elif variants and not variant:
        fix = f"only variant weights {variants} are there. Fix: pass --variant {variants[0]}."
    else:
        fix = "Fix: re-download the component or point at the right folder."
    return JaxboothError(
        f"{folder}: no {wanted}weights found (looked for "
        f"{', '.join(f'{s}*.safetensors' for s in WEIGHT_STEMS)}, {', '.join(MSGPACK_NAMES)}; "
        f"found {names}): {fix}"
    )


def find_weight_files(folder: str | Path, *, variant: str | None = None,
                      allow_msgpack: bool = True) -> tuple[str, list[Path]]:
    """``("safetensors", files)`` or ``("msgpack", [file])`` for a component folder.

    Preference order is diffusers': the ``variant`` safetensors, then (with a warning, as
    diffusers does) the plain safetensors, then an old Flax msgpack file.
    """
    folder = Path(folder)
    files = strict_safetensors_files(folder, variant)
    if files:
        return "safetensors", files
    if variant:
        files = strict_safetensors_files(folder, None)
        if files:
            jaxbooth_log.warning(f"{folder}: no '{variant}' variant weights; loading the plain weights "
                          f"{files[0].name} instead (diffusers does the same).")
            return "safetensors", files
    for name in MSGPACK_NAMES if allow_msgpack else ():
        if (folder / name).is_file():
            return "msgpack", [folder / name]
    raise _missing_weights_error(folder, variant)


# ----------------------------------------------------------------------------- reading


def _read_files(files: Sequence[Path]) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for path in files:
        state.update(read_safetensors(path))
    return state


def read_state_dict(folder: str | Path, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """A component's PyTorch-layout state dict as numpy arrays, read without torch.

    Handles ``diffusion_pytorch_model.safetensors`` / ``model.safetensors``, their
    ``variant`` files and sharded checkpoints (``*.safetensors.index[.variant].json``).
    Arrays keep the file's dtype (bf16 as ``ml_dtypes.bfloat16``).
    """
    _, files = find_weight_files(folder, variant=variant, allow_msgpack=False)
    return _read_files(files)


def _unwrap_variables(tree: Mapping, abstract_params: Mapping | None) -> Mapping:
    """Accept ``{"params": tree}`` (a saved linen ``variables`` dict) as well as the bare tree."""
    if abstract_params is not None and set(tree) == {"params"} and "params" not in abstract_params:
        return tree["params"]
    return tree


def check_params_fit(params: Mapping, abstract_params: Mapping, *, source: str,
                     allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = ()) -> None:
    """Raise one JaxboothError listing missing, unexpected and mis-shaped leaves of a Flax tree.

    The Flax-tree counterpart of the check in ``torch_state_to_flax`` (same message
    shape); ``allow_*`` are regexes matched against ``a/b/c`` paths.
    """
    have, want = flatten_tree(params), flatten_tree(abstract_params)
    missing = ["/".join(p) + f" {tuple(want[p].shape)}" for p in want
               if p not in have and not any(re.search(r, "/".join(p)) for r in allow_missing)]
    unexpected = ["/".join(p) + f" {tuple(np.shape(v))}" for p, v in have.items()
                  if p not in want and not any(re.search(r, "/".join(p)) for r in allow_unexpected)]
    misshaped = [f"{'/'.join(p)}: checkpoint {tuple(np.shape(v))}, model {tuple(want[p].shape)}"
                 for p, v in have.items() if p in want and tuple(np.shape(v)) != tuple(want[p].shape)]
    problems = [_format_problems(title, items) for title, items in (
        ("missing from the checkpoint", missing), ("not used by the model", unexpected),
        ("with the wrong shape", misshaped)) if items]
    if problems:
        raise JaxboothError(
            f"{source}: the weights do not fit the model config.\n" + "\n".join(problems)
            + "\nFix: point at the checkpoint that matches this config.json (same model family and sizes)."
        )


def read_flax_msgpack(folder: str | Path, abstract_params: Mapping | None = None, *,
                      filename: str | None = None, allow_missing: Sequence[str] = ()) -> dict:
    """An old diffusers/transformers Flax checkpoint (``flax.serialization.to_bytes``) as a nested dict.

    The Flax models keep the old module names, so the tree is used as is; with
    ``abstract_params`` it is checked leaf by leaf (missing/unexpected/mis-shaped).
    """
    from flax import serialization

    folder = Path(folder)
    names = [filename] if filename else [n for n in MSGPACK_NAMES if (folder / n).is_file()]
    if not names or not (folder / names[0]).is_file():
        raise _missing_weights_error(folder, None)
    path = folder / names[0]
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises its own exception types
        raise JaxboothError(f"{path}: not a readable Flax msgpack checkpoint ({error}). "
                            "Fix: re-download the file.") from error
    tree = _unwrap_variables(tree, abstract_params)
    params = unflatten_tree({p: np.asarray(v) for p, v in flatten_tree(tree).items()})
    if abstract_params is not None:
        check_params_fit(params, abstract_params, source=str(path), allow_missing=allow_missing)
    return params


def cast_floating(params: Mapping, dtype: Any) -> dict:
    """Cast floating leaves to ``dtype`` (``"bfloat16"``, ``np.float16``, ``jnp.float32``...), on the host."""
    import jax.numpy as jnp

    target = jnp.dtype(dtype)
    return unflatten_tree({
        p: v.astype(target) if jnp.issubdtype(v.dtype, jnp.floating) else v
        for p, v in ((p, np.asarray(v)) for p, v in flatten_tree(params).items())
    })


def load_pretrained(model_dir: str | Path, component: str, *, variant: str | None = None,
                    dtype: Any = None, allow_missing: Sequence[str] = ()) -> tuple[Any, dict, dict]:
    """``(config, config_dict, params)`` for one component of a diffusers pipeline folder.

    Reads ``<model_dir>/<component>/config.json`` through the model module, then the
    weights in diffusers' preference order (see :func:`find_weight_files`), converting
    PyTorch-layout tensors with the module's rename table. ``params`` are host numpy
    arrays (place them with ``jax.device_put`` and the mesh shardings), cast to ``dtype``
    when given. ``config_dict`` is the file as read, for :func:`save_diffusers_component`.
    """
    config, config_dict = load_config(model_dir, component)
    abstract = abstract_params_for(component, config, config_dict)
    folder = component_dir(model_dir, component)
    kind, files = find_weight_files(folder, variant=variant)
    if kind == "msgpack":
        params = read_flax_msgpack(folder, abstract, filename=files[0].name, allow_missing=allow_missing)
    else:
        source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
        params = torch_state_to_flax(_read_files(files), abstract,
                                     renames=_model_module(component).TORCH_TO_FLAX_RENAMES,
                                     allow_missing=allow_missing, source=source)
    if dtype is not None:
        params = cast_floating(params, dtype)
    return config, config_dict, params


# ----------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(tmp_path)`` then ``os.replace``: a crash never leaves a half file at ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_weights(folder: Path, stem: str) -> None:
    """Drop earlier plain shards/pickles that ``from_pretrained`` would prefer over the new file."""
    for pattern in (f"{stem}.safetensors.index.json", f"{stem}-*-of-*.safetensors", f"{stem}.bin",
                    f"{stem}.bin.index.json", f"{stem}-*-of-*.bin"):
        for stale in folder.glob(pattern):
            stale.unlink()


def save_diffusers_component(params: Mapping, config_dict: Mapping[str, Any], out_dir: str | Path,
                             component: str, *, dtype: Any = None) -> Path:
    """Write ``<out_dir>/<component>/`` in the PyTorch layout that diffusers/transformers load.

    ``config.json`` is ``config_dict`` unchanged; weights go to
    ``diffusion_pytorch_model.safetensors`` (UNet, VAE) or ``model.safetensors`` (text
    encoders) with ``{"format": "pt"}`` metadata, as ``save_pretrained`` writes them.
    ``params`` may be jax arrays (fetched with ``jax.device_get``, so on multi-host runs
    gather them to one process first and write from it); ``dtype`` casts floats.
    Returns the component folder.
    """
    import jax
    import safetensors.numpy

    kind = component_kind(component)
    host = jax.device_get(params)
    if dtype is not None:
        host = cast_floating(host, dtype)
    state = flax_to_torch_state(host, renames=_model_module(component).FLAX_TO_TORCH_RENAMES)
    state = {key: np.ascontiguousarray(value) for key, value in state.items()}
    folder = Path(out_dir) / component
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(config_dict), indent=2) + "\n"
    _atomic_write(folder / "config.json", lambda tmp: tmp.write_text(text))
    weights = folder / f"{kind.weights_stem}.safetensors"
    _atomic_write(weights, lambda tmp: safetensors.numpy.save_file(state, tmp, metadata={"format": "pt"}))
    _remove_stale_weights(folder, kind.weights_stem)
    return folder


def save_flax_msgpack(params: Mapping, folder: str | Path, filename: str) -> Path:
    """Write params the way old diffusers/transformers Flax ``save_pretrained`` did (``to_bytes``)."""
    import jax
    from flax import serialization

    path = Path(folder) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    data = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, jax.device_get(dict(params))))
    _atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path
