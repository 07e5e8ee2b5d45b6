"""The memory savers of diffusers' low-VRAM recipes (16 GB / 12 GB / 8 GB), applied to the models.

Owns gradient checkpointing, the attention kernel (xFormers where it can run, PyTorch SDPA
otherwise), TF32 and the DeepSpeed checks. 8-bit Adam and ``set_grads_to_none`` live with the
optimizer in ``optim.py``. Imports torch and diffusers; never jax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from jaxbooth.errors import JaxboothError


def check_xformers(enabled: bool, device: torch.device) -> None:
    """Refuse --enable_xformers_memory_efficient_attention where xFormers cannot run, before any model loads.

    As diffusers does (it raises too): quietly training with another kernel would change the
    memory a recipe was chosen for. ``preflight.check_packages`` has already made sure it is installed.
    """
    if enabled and device.type != "cuda":
        raise JaxboothError(f"--enable_xformers_memory_efficient_attention: xFormers kernels need a CUDA device and "
                            f"this run is on {device.type}; drop the flag (PyTorch SDPA attention is used then, "
                            "which already picks a memory-efficient kernel on GPUs)")


def set_attention(unet: Any, enable_xformers: bool) -> str:
    """Switch the UNet to xFormers attention when asked (``check_xformers`` ran); returns the kernel in use."""
    if not enable_xformers:
        return "sdpa"
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as error:  # diffusers probes a tiny kernel call; broken builds fail there
        raise JaxboothError(f"--enable_xformers_memory_efficient_attention: xformers failed its self-test ({error}); "
                            "reinstall xformers for this torch/CUDA, or drop the flag") from None
    return "xformers"


def enable_gradient_checkpointing(unet: Any, text_encoders: Sequence[Any | None], train_text_encoder: bool) -> None:
    """Recompute activations in the backward pass (diffusers' ``--gradient_checkpointing``): the UNet, and each
    trained text encoder (SDXL: both, as diffusers' SDXL script)."""
    unet.enable_gradient_checkpointing()
    if train_text_encoder:
        for text_encoder in text_encoders:
            if text_encoder is not None:  # transformers 5 renamed it; the old name warns of its removal
                getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)()


def apply_memory_options(spec: Any, unet: Any, text_encoder: Any | None, device: torch.device, *,
                         text_encoder_2: Any | None = None) -> dict[str, Any]:
    """Apply the spec's memory options to the models (``text_encoder_2``: SDXL's second encoder); returns what is
    in effect, for the log."""
    precision = spec.precision
    if precision.gradient_checkpointing:
        enable_gradient_checkpointing(unet, (text_encoder, text_encoder_2), spec.model.train_text_encoder)
    kernel = set_attention(unet, precision.enable_xformers_memory_efficient_attention)
    if precision.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return {"attention": kernel, "gradient_checkpointing": precision.gradient_checkpointing}


def deepspeed_plugin(accelerator: Any) -> Any | None:
    """The DeepSpeed plugin when launched with a DeepSpeed accelerate config, else None."""
    return getattr(accelerator.state, "deepspeed_plugin", None)


def check_deepspeed(spec: Any, plugin: Any) -> None:
    """Reject combinations DeepSpeed cannot run, naming the option and the fix."""
    if plugin is None:
        return
    if spec.optim.use_8bit_adam:
        raise JaxboothError("--use_8bit_adam does not work with DeepSpeed (bitsandbytes' optimizer cannot be "
                            "partitioned); drop --use_8bit_adam: the DeepSpeed config offloads the optimizer instead")
    if spec.model.train_text_encoder:
        raise JaxboothError("--train_text_encoder with DeepSpeed is not supported (accelerate wraps one model per "
                            "DeepSpeed engine, as in diffusers); drop --train_text_encoder or the DeepSpeed config")


def configure_deepspeed(plugin: Any, *, train_batch_size: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config values accelerate takes from a DataLoader (jaxbooth has none)."""
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = train_batch_size
    if config.get("gradient_clipping") in (None, "auto"):
        config["gradient_clipping"] = max_grad_norm


def offloads_optimizer(plugin: Any) -> bool:
    zero = (plugin.deepspeed_config or {}).get("zero_optimization", {})
    return str(zero.get("offload_optimizer", {}).get("device", "none")).lower() == "cpu"
