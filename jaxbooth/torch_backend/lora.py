"""LoRA on the torch backend: peft adapters on the frozen UNet (and text encoder, or SDXL's two), as
diffusers' ``train_dreambooth_lora.py`` / ``train_dreambooth_lora_sdxl.py`` add them, started from the
shared init so a torch and a JAX run of one spec begin from the same adapters.

Only the adapters train: the base weights are frozen and, under mixed precision, kept in the
weight dtype (they are only read), while the adapter parameters stay float32 (diffusers'
``cast_training_params``). ``export_lora_state`` / ``load_lora_state`` move adapters between
the peft layers and the framework-free ``jaxbooth.lora.LoraState`` that the LoRA files, the
checkpoints and the JAX backend use. Never imports jax.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from jaxbooth.errors import JaxboothError
from jaxbooth.lora import AdapterSettings, LoraLayer, LoraState

ADAPTER = "default"  # peft's adapter name; one adapter per model


def require_peft() -> Any:
    """The peft module, or a JaxboothError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise JaxboothError("LoRA training on the torch backend (--use_lora, train_dreambooth_lora.py) needs the peft "
                            "package: pip install peft (or --backend=jax)") from None
    return peft


def path_prefix(model: Any) -> str:
    """What turns ``model``'s module paths into the checkpoint's (``LoraState``'s) paths.

    transformers 5 flattens ``CLIPTextModel`` (``encoder.layers...``, no ``text_model`` child)
    but still saves and loads ``text_model.encoder.layers...``: the shared paths are the saved ones.
    """
    from transformers import CLIPTextModel

    return "text_model." if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model") else ""


def adapted_layers(model: Any) -> dict[str, Any]:
    """Shared module path (``LoraState``'s) -> peft LoRA layer of every adapted linear layer of ``model``."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    prefix = path_prefix(model)
    return {prefix + name: module for name, module in model.named_modules() if isinstance(module, PeftLoraLayer)}


def add_adapters(model: Any, component: str, settings: AdapterSettings, seed: int) -> None:
    """Freeze ``model``, add peft LoRA adapters to its target layers, start them from the shared init.

    The shared init (``AdapterSettings.initial_layer``) is peft's "gaussian" distribution drawn
    from numpy, so it replaces peft's own draw; DoRA magnitudes start at the base rows' norms.
    """
    peft = require_peft()
    model.requires_grad_(False)
    prefix = path_prefix(model)
    present = [prefix + name for name, _ in model.named_modules()]
    config = settings.peft_config(component, present=present)
    if not config["target_modules"]:
        raise JaxboothError(f"{component}: none of the LoRA target modules {list(settings.targets(component))} is a "
                            f"layer of this model; check --lora_target_modules / --lora_text_encoder_target_modules")
    if component == "unet":
        model.add_adapter(peft.LoraConfig(**config))  # diffusers' PeftAdapterMixin, as the LoRA script
    else:  # what transformers' add_adapter does, without its peft version gate (it may want a newer peft)
        peft.inject_adapter_in_model(peft.LoraConfig(**config), model, adapter_name=ADAPTER)
    layers = adapted_layers(model)
    initial = {path: settings.initial_layer(component, path, base_weight(layer), seed)
               for path, layer in layers.items()}
    load_layers(model, initial, component=component)


def base_weight(layer: Any) -> np.ndarray:
    """The frozen base weight of a peft layer, float32 ``[out, in]``."""
    return layer.get_base_layer().weight.detach().float().cpu().numpy()


def adapter_parameters(layer: Any) -> tuple[torch.nn.Parameter, torch.nn.Parameter, torch.nn.Parameter | None]:
    """(lora_A, lora_B, DoRA magnitude or None) parameters of one peft layer."""
    magnitude = layer.lora_magnitude_vector[ADAPTER].weight if ADAPTER in layer.lora_magnitude_vector else None
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, magnitude


def load_layers(model: Any, layers: Mapping[str, LoraLayer], *, component: str, source: str = "") -> None:
    """Copy ``layers`` into the peft adapters of ``model``; every adapted layer must be given, with its shapes."""
    peft_layers = adapted_layers(model)
    where = f" from {source}" if source else ""
    missing, extra = sorted(peft_layers.keys() - layers.keys()), sorted(layers.keys() - peft_layers.keys())
    if missing or extra:
        raise JaxboothError(f"{component} adapters{where} do not match this run's LoRA layers (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); resume with the same --rank, target modules and "
                            "--train_text_encoder, or start a new output_dir")
    with torch.no_grad():
        for path, layer in peft_layers.items():
            given = layers[path]
            down, up, magnitude = adapter_parameters(layer)
            pairs = [(down, given.down, "down"), (up, given.up, "up")]
            if (magnitude is None) != (given.magnitude is None):
                raise JaxboothError(f"{component} adapter {path}{where}: DoRA magnitude "
                                    f"{'missing' if magnitude is not None else 'unexpected'}; resume with the same "
                                    "--use_dora, or start a new output_dir")
            if magnitude is not None:
                pairs.append((magnitude, given.magnitude, "magnitude"))
            if not np.isclose(given.alpha, layer.lora_alpha[ADAPTER]):
                raise JaxboothError(f"{component} adapter {path}{where}: alpha {given.alpha:g}, this run's is "
                                    f"{layer.lora_alpha[ADAPTER]:g}; resume with the same --lora_alpha, or start a new "
                                    "output_dir")
            for param, value, name in pairs:
                if tuple(param.shape) != tuple(value.shape):
                    raise JaxboothError(f"{component} adapter {path}{where}: {name} is {tuple(value.shape)}, this "
                                        f"run's is {tuple(param.shape)}; resume with the same --rank, or start a new "
                                        "output_dir")
                param.copy_(torch.from_numpy(np.asarray(value, np.float32)).to(param.device, param.dtype))


def export_layers(model: Any, settings: AdapterSettings) -> dict[str, LoraLayer]:
    """The adapters of one model as ``LoraLayer`` (float32 numpy, torch layout): a copy, never a view of float32
    CPU parameters that later optimizer steps would change under it."""
    out = {}
    for path, layer in adapted_layers(model).items():
        down, up, magnitude = (None if p is None else p.detach().float().cpu().numpy().copy()
                               for p in adapter_parameters(layer))
        out[path] = LoraLayer(down=down, up=up, alpha=settings.alpha, magnitude=magnitude)
    return out


def export_lora_state(unet: Any, text_encoder: Any | None, settings: AdapterSettings, *,
                      text_encoder_2: Any | None = None) -> LoraState:
    """The trained adapters as the shared ``LoraState`` (each text encoder only when it has adapters;
    ``text_encoder_2``: SDXL's second)."""
    state: LoraState = {"unet": export_layers(unet, settings)}
    for component, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None and adapted_layers(model):
            state[component] = export_layers(model, settings)
    return state


def load_lora_state(state: LoraState, models: Mapping[str, Any], *, source: str = "") -> None:
    """Copy a ``LoraState`` into the peft adapters of ``models`` (component -> model)."""
    for component, model in models.items():
        if component not in state:
            raise JaxboothError(f"{source or 'the LoRA state'} holds no {component} adapters; resume with the same "
                                "--train_text_encoder, or start a new output_dir")
        load_layers(model, state[component], component=component, source=source)


def cast_base(model: Any, dtype: torch.dtype) -> None:
    """Frozen weights to ``dtype`` (memory), trainable ones (the adapters) float32."""
    if dtype != torch.float32:
        model.to(dtype=dtype)
    keep_trainable_float32([model])


def keep_trainable_float32(models: Iterable[Any]) -> None:
    """Trainable parameters back to float32 in place (the optimizer must see float32 master weights)."""
    for model in models:
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()


def attach(unet: Any, text_encoder: Any | None, settings: AdapterSettings, *, seed: int,
           dtype: torch.dtype, text_encoder_2: Any | None = None) -> None:
    """Adapters on the UNet and, when trained, on each text encoder of ``settings.components`` (SDXL:
    ``text_encoder`` and ``text_encoder_2``, with the same targets, as diffusers' SDXL script);
    base weights frozen in ``dtype``."""
    given = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for component in settings.components:
        model = given.get(component)
        if model is None:
            raise JaxboothError(f"--train_text_encoder needs the {component} model, which was freed or not loaded; "
                                "drop --pre_compute_text_embeddings")
        add_adapters(model, component, settings, seed)
        cast_base(model, dtype)

