"""LoRA (and DoRA) on the JAX backend: adapters as a param-tree transform.

The adapters are their own small pytree in Flax layout, nested like the model's params and
keyed by the Flax module path of each adapted Dense (``down_blocks_0/attentions_0/
transformer_blocks_0/attn1/to_out_0`` for diffusers' ``to_out.0``, CLIP ``text_model/encoder/
layers/0/self_attn/q_proj``): ``{"down": [in, rank], "up": [rank, out]}``, plus
``"magnitude": [out]`` with DoRA. Inside the jitted step :func:`merge` returns the base tree
with each target kernel replaced by ``kernel + scale * down @ up``; DoRA then rescales the
merged kernel's columns (torch's rows) to ``magnitude / stop_gradient(|column|)``, peft's
detached norm. The unchanged UNet / CLIP ``apply`` runs on that tree.

Why a transform of the params and not LoRA modules in the models:

- no model code changes, and one ``apply`` serves training, validation and sampling;
- the base params stay a frozen argument of the step: they keep their fsdp ``NamedSharding``,
  get no gradient and no optimizer state; only the adapters are differentiated and updated;
- the merge costs one ``[in, rank] @ [rank, out]`` product per adapted layer per step, small
  next to the UNet, and XLA places it under the kernel's sharding.

The merge makes the backward pass form each adapted kernel's ``[in, out]`` gradient, which a
branch beside each Dense (``x @ W + scale * (x @ down) @ up``, e.g. via ``nn.intercept_methods``)
would not. Measured on the ``small`` bench UNet at 128 px (XLA cost analysis and wall time of
the adapter gradient): the branch saves 2.7% of the FLOPs and no time, so the simpler merge stays.

The cost of the choice: dropout on the adapter's input has no place in a merged weight, so
``lora_dropout`` is torch-only (the capability table refuses it on JAX before loading).
Targets are matched on the torch module path of each Flax Dense (``jaxbooth.lora.is_target``,
peft's rule) and must be linear layers (peft would give a conv its own conv adapter, which a
merged Dense kernel cannot express). The starting adapters come from the shared
``AdapterSettings.initial_layer`` (torch layout, transposed here), so a JAX and a torch run of
one spec start identically; :func:`to_lora_state` / :func:`adapters_from_state` convert to and
from the shared ``LoraState`` that the LoRA files hold.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.weights import FlaxPath, flatten_tree, flax_path_to_torch_key, unflatten_tree
from jaxbooth.lora import AdapterSettings, LoraLayer, LoraState, is_target

__all__ = ["adapters_from_state", "count_adapter_params", "init_adapters", "make_merger", "merge",
           "merge_components", "merge_frozen", "merged_kernel", "step_merge", "target_paths", "to_lora_state",
           "torch_module_path"]

Adapters = dict  # nested like the model's params; each adapted Dense: {"down", "up"[, "magnitude"]}
LAYER_KEYS = ("down", "up", "magnitude")
_TARGET_OPTIONS = {"unet": "lora_target_modules", "text_encoder": "lora_text_encoder_target_modules",
                   "text_encoder_2": "lora_text_encoder_target_modules"}


def torch_module_path(flax_module: FlaxPath) -> str:
    """``("down_blocks_0", ..., "to_out_0")`` -> ``"down_blocks.0....to_out.0"`` (the torch/peft name)."""
    return flax_path_to_torch_key((*flax_module, "kernel")).removesuffix(".weight")


def _dense_modules(base: Mapping) -> dict[FlaxPath, Any]:
    """Flax module path -> kernel of every Dense (2-D kernel) in a param tree."""
    return {path[:-1]: leaf for path, leaf in flatten_tree(base).items()
            if path[-1] == "kernel" and len(getattr(leaf, "shape", ())) == 2}


def target_paths(base: Mapping, targets: tuple[str, ...], component: str) -> dict[FlaxPath, str]:
    """Flax module path -> torch module path of every Dense the target names select.

    Names that select nothing are skipped (as peft does while another name matches); none
    matching at all, or a name that selects a module that is not a linear layer (a conv, a
    norm, a whole attention block), is an error naming the spec key.
    """
    option = _TARGET_OPTIONS.get(component, "lora_target_modules")
    dense = {torch_module_path(path): path for path in _dense_modules(base)}
    modules = {torch_module_path(path[:i]) for path in flatten_tree(base) for i in range(1, len(path))}
    for name in targets:
        other = sorted(m for m in modules - set(dense) if is_target(m, [name]))
        if other:
            raise JaxboothError(f"{option}: {name!r} selects {other[0]!r}{' and more' if len(other) > 1 else ''} in "
                                f"the {component}, which is not a linear layer; JAX LoRA adapts linear layers only "
                                "(name linear layers, e.g. to_q, to_k, to_v, to_out.0)")
    found = {flax: torch for torch, flax in dense.items() if is_target(torch, targets)}
    if not found:
        raise JaxboothError(f"{option}: none of {list(targets)} names a linear layer of the {component}; "
                            "name its linear layers (e.g. to_q, to_k, to_v, to_out.0 in a UNet; q_proj, k_proj, "
                            "v_proj, out_proj in CLIP)")
    return dict(sorted(found.items()))


def init_adapters(base: Mapping[str, Mapping], settings: AdapterSettings, seed: int) -> dict[str, Adapters]:
    """The starting adapters (host numpy, float32) of every component in ``settings.components``.

    ``base``: component -> its Flax param tree. Each layer is ``settings.initial_layer`` of the
    torch-layout base weight, transposed to Flax layout: ``up`` is zero, so the merged model is
    the base model exactly (DoRA: up to the rounding of the column norms).
    """
    adapters = {}
    for component in settings.components:
        kernels = _dense_modules(base[component])
        flat = {}
        for flax_path, torch_path in target_paths(base[component], settings.targets(component), component).items():
            kernel = np.asarray(kernels[flax_path], np.float32)
            layer = settings.initial_layer(component, torch_path, kernel.T, seed)
            flat.update(_flax_layer(flax_path, layer))
        adapters[component] = unflatten_tree(flat)
    return adapters


def _flax_layer(flax_path: FlaxPath, layer: LoraLayer, up_factor: float = 1.0) -> dict[FlaxPath, np.ndarray]:
    leaves = {(*flax_path, "down"): np.ascontiguousarray(layer.down.T, np.float32),
              (*flax_path, "up"): np.ascontiguousarray(layer.up.T * np.float32(up_factor), np.float32)}
    if layer.magnitude is not None:
        leaves[(*flax_path, "magnitude")] = np.asarray(layer.magnitude, np.float32)
    return leaves


def _layers(adapters: Mapping) -> dict[FlaxPath, dict[str, Any]]:
    """Flax module path -> {"down", "up"[, "magnitude"]} of every adapted layer."""
    layers: dict[FlaxPath, dict[str, Any]] = {}
    for path, leaf in flatten_tree(adapters).items():
        if path[-1] not in LAYER_KEYS:
            raise ValueError(f"adapter leaf {'/'.join(path)} is not one of {LAYER_KEYS}")
        layers.setdefault(path[:-1], {})[path[-1]] = leaf
    return layers


def merged_kernel(kernel: jax.Array, layer: Mapping[str, jax.Array], scale: float) -> jax.Array:
    """``kernel + scale * down @ up`` ([in, out], the kernel's dtype); DoRA rescales each output column
    to ``magnitude / |column|``, the norm detached from the gradient as peft's."""
    delta = jnp.matmul(layer["down"].astype(jnp.float32), layer["up"].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    merged = kernel.astype(jnp.float32) + scale * delta
    if "magnitude" in layer:
        norm = jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=0))
        merged = merged * (layer["magnitude"].astype(jnp.float32) / norm)[None, :]
    return merged.astype(kernel.dtype)


def _splice(base: Mapping, kernels: Mapping[FlaxPath, Any]) -> dict:
    """A copy of ``base`` with ``kernels`` (module path -> new kernel) in place; other leaves shared."""
    out = dict(base)
    children: dict[str, dict[FlaxPath, Any]] = {}
    for path, kernel in kernels.items():
        children.setdefault(path[0], {})[path[1:]] = kernel
    for key, sub in children.items():
        if () in sub:
            out[key] = {**base[key], "kernel": sub[()]}
        else:
            out[key] = _splice(base[key], sub)
    return out


def merge(base: Mapping, adapters: Mapping, scale: float) -> dict:
    """One model's params with its adapters merged into the target kernels (traceable; the step calls it)."""
    flat = flatten_tree(base)
    kernels = {path: merged_kernel(flat[(*path, "kernel")], layer, scale) for path, layer in _layers(adapters).items()}
    return _splice(base, kernels)


def merge_components(base: Mapping[str, Mapping], adapters: Mapping[str, Mapping], scale: float) -> dict:
    """component -> merged params for every component of ``adapters`` (``base`` holds them all)."""
    return {component: merge(base[component], sub, scale) for component, sub in adapters.items()}


def make_merger(scale: float) -> Callable[[Mapping, Mapping], dict]:
    """``(base, adapters) -> merged`` for use outside the step (validation, sampling): only the new
    kernels are computed, in one jitted call; every other leaf is the base's own array."""

    @jax.jit
    def kernels(targets: dict, adapters: dict) -> dict:
        return {component: {key: merged_kernel(targets[component][key], layer, scale)
                            for key, layer in layers.items()} for component, layers in adapters.items()}

    def merger(base: Mapping, adapters: Mapping) -> dict:
        by_key = {component: {"/".join(path): layer for path, layer in _layers(sub).items()}
                  for component, sub in adapters.items()}
        targets = {}
        for component, layers in by_key.items():
            flat = flatten_tree(base[component])
            targets[component] = {key: flat[(*key.split("/"), "kernel")] for key in layers}
        new = kernels(targets, by_key)
        return {component: _splice(base[component], {tuple(key.split("/")): kernel for key, kernel in sub.items()})
                for component, sub in new.items()}

    return merger


def to_lora_state(adapters: Mapping[str, Mapping], settings: AdapterSettings) -> LoraState:
    """Host adapters (component -> tree) -> the shared ``LoraState`` (torch layout, torch module paths)."""
    state: LoraState = {}
    for component, sub in adapters.items():
        state[component] = {}
        for path, layer in _layers(sub).items():
            magnitude = layer.get("magnitude")
            state[component][torch_module_path(path)] = LoraLayer(
                down=np.ascontiguousarray(np.asarray(layer["down"], np.float32).T),
                up=np.ascontiguousarray(np.asarray(layer["up"], np.float32).T), alpha=settings.alpha,
                magnitude=None if magnitude is None else np.asarray(magnitude, np.float32))
    return state


def adapters_from_state(state: LoraState, base: Mapping[str, Mapping], scale: float) -> dict[str, Adapters]:
    """``LoraState`` -> adapters for :func:`merge` at ``scale``; ``base`` (component -> params) gives the
    Flax paths. Each layer's own ``alpha / rank`` is folded into ``up`` (times ``1 / scale``), so files
    whose layers differ in alpha (kohya) merge right."""
    adapters = {}
    for component, layers in state.items():
        if component not in base:
            raise JaxboothError(f"LoRA component {component!r} has no model here (expected one of {sorted(base)})")
        dense = {torch_module_path(path): (path, kernel) for path, kernel in _dense_modules(base[component]).items()}
        flat = {}
        for torch_path, layer in layers.items():
            if torch_path not in dense:
                raise JaxboothError(f"LoRA layer {component}.{torch_path} names no linear layer of this {component}; "
                                    "the LoRA file was trained for another model")
            flax_path, kernel = dense[torch_path]
            if tuple(kernel.shape) != (layer.down.shape[1], layer.up.shape[0]):
                shape = [layer.down.shape[1], layer.up.shape[0]]
                raise JaxboothError(f"LoRA layer {component}.{torch_path}: [in, out] = {shape} but the model's is "
                                    f"{list(kernel.shape)}; the LoRA file was trained for another model")
            flat.update(_flax_layer(flax_path, layer, up_factor=layer.scale / scale))
        adapters[component] = unflatten_tree(flat)
    return adapters


def count_adapter_params(adapters: Mapping) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(adapters))


def merge_frozen(adapters: Mapping[str, Mapping], frozen: Mapping, *, scale: float) -> dict:
    """The train step's ``merge``: the adapters merged into ``frozen["base"]``."""
    return merge_components(frozen["base"], adapters, scale)


def step_merge(scale: float) -> Callable[[Mapping, Mapping], dict]:
    """``merge(adapters, frozen)`` for ``train_step.make_train_step``."""
    return functools.partial(merge_frozen, scale=scale)
