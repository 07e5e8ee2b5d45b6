"""Rule-based conversion between diffusers/transformers PyTorch state dicts and Flax trees.

The Flax models name their modules like the old diffusers/transformers Flax classes, so
one rule set serves every model:

- torch ``down_blocks.0.resnets.1.conv1.weight`` <-> flax ``down_blocks_0/resnets_1/conv1/kernel``
  (diffusers style: ``name.N`` becomes ``name_N``), or transformers style
  ``encoder.layers.3`` <-> ``encoder/layers/3``; the abstract Flax tree says which one exists.
- leaves: conv kernel OIHW <-> HWIO, linear weight [out, in] <-> kernel [in, out],
  norm weight <-> scale, embedding weight <-> embedding, bias <-> bias.

Model modules add regex renames only where the old Flax names differ from torch's
(e.g. the VAE's attention ``to_q`` <-> ``query``). Imports numpy only; no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from jaxbooth.errors import JaxboothError

FlaxPath = tuple[str, ...]
Renames = Sequence[tuple[str, str]]

# diffusers module names that end in "_<digit>" without being list indices.
_LITERAL_INDEXED_NAMES = frozenset({"linear_1", "linear_2"})
_LEAF_FROM_TORCH = {"weight": ("kernel", "scale", "embedding"), "bias": ("bias",)}
_TORCH_BUFFERS = re.compile(r"(^|\.)(position_ids|num_batches_tracked)$")


def flatten_tree(tree: Mapping) -> dict[FlaxPath, object]:
    """Nested dict -> {path tuple: leaf}."""
    flat: dict[FlaxPath, object] = {}

    def walk(node: Mapping, prefix: FlaxPath) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, (*prefix, str(key)))
            else:
                flat[(*prefix, str(key))] = value

    walk(tree, ())
    return flat


def unflatten_tree(flat: Mapping[FlaxPath, object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _apply_renames(key: str, renames: Renames) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _flax_module_candidates(torch_module: str) -> list[FlaxPath]:
    """Both spellings of a torch module path: diffusers ``a_0`` and transformers ``a/0``."""
    parts = torch_module.split(".") if torch_module else []
    joined: list[str] = []
    for part in parts:
        if part.isdigit() and joined:
            joined[-1] = f"{joined[-1]}_{part}"
        else:
            joined.append(part)
    return [tuple(joined), tuple(parts)]


def flax_path_to_torch_key(path: FlaxPath, leaf_is_bias: bool | None = None) -> str:
    """The torch state-dict key of a Flax leaf (before the inverse renames)."""
    parts: list[str] = []
    for segment in path[:-1]:
        match = re.fullmatch(r"(.+)_(\d+)", segment)
        if match and segment not in _LITERAL_INDEXED_NAMES:
            parts.extend([match.group(1), match.group(2)])
        else:
            parts.append(segment)
    leaf = path[-1]
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts)


def torch_to_flax_array(value: np.ndarray, flax_leaf: str, target_ndim: int) -> np.ndarray:
    """Re-layout one tensor for Flax: conv OIHW->HWIO, linear [out,in]->[in,out]."""
    if flax_leaf == "kernel":
        if value.ndim == 4 and target_ndim == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 4 and target_ndim == 2:  # 1x1 conv stored where Flax uses Dense
            return np.transpose(value[:, :, 0, 0], (1, 0))
        if value.ndim == 2:
            return np.transpose(value, (1, 0))
    return value


def flax_to_torch_array(value: np.ndarray, flax_leaf: str) -> np.ndarray:
    """Inverse of :func:`torch_to_flax_array` for the layouts the models use."""
    if flax_leaf == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (3, 2, 0, 1))
        if value.ndim == 2:
            return np.transpose(value, (1, 0))
    return value


def _match_flax_path(torch_key: str, abstract_flat: Mapping[FlaxPath, object]) -> FlaxPath | None:
    module, _, leaf = torch_key.rpartition(".")
    for module_path in _flax_module_candidates(module):
        for flax_leaf in _LEAF_FROM_TORCH.get(leaf, (leaf,)):
            path = (*module_path, flax_leaf)
            if path in abstract_flat:
                return path
    return None


def _format_problems(title: str, items: Iterable[str], limit: int = 40) -> str:
    items = sorted(items)
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def torch_state_to_flax(
    state: Mapping[str, np.ndarray],
    abstract_params: Mapping,
    *,
    renames: Renames = (),
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    source: str = "checkpoint",
) -> dict:
    """Convert a torch state dict (numpy arrays) into a Flax param tree shaped like ``abstract_params``.

    ``abstract_params`` is the model's tree of ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``)
    or arrays; only ``.shape`` is read. Missing, unexpected and mis-shaped tensors are one
    error listing all of them, unless a regex in ``allow_missing``/``allow_unexpected``
    matches the Flax path (``a/b/c``) or torch key. Arrays keep the checkpoint dtype.
    """
    abstract_flat = flatten_tree(abstract_params)
    converted: dict[FlaxPath, np.ndarray] = {}
    unexpected, misshaped = [], []
    for torch_key, value in state.items():
        if _TORCH_BUFFERS.search(torch_key):
            continue
        path = _match_flax_path(_apply_renames(torch_key, renames), abstract_flat)
        if path is None:
            if not any(re.search(p, torch_key) for p in allow_unexpected):
                unexpected.append(f"{torch_key} {tuple(value.shape)}")
            continue
        want = tuple(abstract_flat[path].shape)
        array = torch_to_flax_array(np.asarray(value), path[-1], len(want))
        if tuple(array.shape) != want:
            misshaped.append(f"{torch_key} -> {'/'.join(path)}: checkpoint {tuple(array.shape)}, model {want}")
            continue
        converted[path] = array
    missing = [
        "/".join(p) + f" {tuple(abstract_flat[p].shape)}"
        for p in abstract_flat
        if p not in converted and not any(re.search(pat, "/".join(p)) for pat in allow_missing)
    ]
    problems = [
        _format_problems(title, items)
        for title, items in (("missing from the checkpoint", missing), ("not used by the model", unexpected),
                             ("with the wrong shape", misshaped))
        if items
    ]
    if problems:
        raise JaxboothError(
            f"{source}: the weights do not fit the model config.\n" + "\n".join(problems)
            + "\nFix: point at the checkpoint that matches this config.json (same model family and sizes)."
        )
    return unflatten_tree(converted)


def flax_to_torch_state(params: Mapping, *, renames: Renames = ()) -> dict[str, np.ndarray]:
    """Flax param tree -> torch-layout state dict of numpy arrays (diffusers key names)."""
    state: dict[str, np.ndarray] = {}
    for path, value in flatten_tree(params).items():
        key = _apply_renames(flax_path_to_torch_key(path), renames)
        state[key] = np.ascontiguousarray(flax_to_torch_array(np.asarray(value), path[-1]))
    return state
