"""The torch rows of scripts/bench_device.py: diffusers' ``UNet2DConditionModel`` trained by jaxbooth's torch
backend pieces (``torch_backend.memory``, ``optim``, ``loss``, ``lora``), as ``--backend=torch`` trains it.

PyTorch SDPA attention, bf16 autocast over fp32 weights (accelerate's ``mixed_precision="bf16"``; LoRA: the
frozen base in bf16, the adapters fp32), fused AdamW, grad clip 1.0. The memory recipes are the DreamBooth
guide's: ``16gb`` = 8-bit Adam + gradient checkpointing, ``12gb`` = that + ``set_grads_to_none`` (the guide
also names xFormers; SDPA's memory-efficient kernel stands in). Not run on its own: bench_device.py imports it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

RECIPES = {None: {}, "16gb": {"use_8bit_adam": True, "gradient_checkpointing": True},
           "12gb": {"use_8bit_adam": True, "gradient_checkpointing": True, "set_grads_to_none": True}}


def skip_reason(row: Any, device_type: str) -> str | None:
    """Why this machine cannot run the row (8-bit Adam needs bitsandbytes on CUDA; LoRA needs peft), or None."""
    if RECIPES[row.recipe].get("use_8bit_adam"):
        if device_type != "cuda":
            return f"8-bit Adam (bitsandbytes) needs a CUDA device; this run is on {device_type}"
        try:
            import bitsandbytes  # noqa: F401
        except Exception as error:  # ImportError, or a build that fails to load its CUDA library
            return f"bitsandbytes is not importable: {type(error).__name__}: {error}"
    if row.training == "lora" and importlib.util.find_spec("peft") is None:
        return "peft is not installed (the torch backend's LoRA needs it: pip install peft)"
    return None


def make_spec(row: Any, smoke: bool) -> Any:
    """The run spec the torch backend's helpers read (optimizer, memory options), with the row's recipe."""
    from jaxbooth.run_defaults import fill_defaults
    from jaxbooth.spec import load_spec_from_dict

    options = {"gradient_checkpointing": row.remat, **RECIPES[row.recipe]}
    return fill_defaults(load_spec_from_dict({
        **options, "mixed_precision": "no" if smoke else "bf16", "learning_rate": 1e-5,
        "train_batch_size": row.batch, "use_lora": row.training == "lora", "rank": 4,
        "output_dir": "bench-device-unused", "pretrained_model_name_or_path": "bench-device-unused"}))


def run_torch_row(row: Any, shape: Any, *, steps: int, warmup: int, deadline: float, smoke: bool,
                  timed_steps: Callable, host_peak: Callable) -> dict:
    """Build, train ``warmup`` + ``steps`` steps, measure; ``{"status": "skipped", ...}`` when it cannot run.

    ``timed_steps`` and ``host_peak`` are bench_device.py's (one timing rule and one host-memory fallback for
    both backends)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    reason = skip_reason(row, device.type)
    if reason:
        return {"status": "skipped", "reason": reason}
    from diffusers import UNet2DConditionModel

    from jaxbooth import diffusion, tiny
    from jaxbooth.lora import AdapterSettings
    from jaxbooth.loss_options import LossOptions
    from jaxbooth.torch_backend import lora, memory, optim
    from jaxbooth.torch_backend import loss as loss_lib
    spec = make_spec(row, smoke)
    dtype = torch.float32 if smoke else torch.bfloat16
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    with torch.device(device):  # weights drawn on the device: SDXL's CPU init alone takes a minute
        unet = UNet2DConditionModel.from_config({k: v for k, v in shape.unet.items() if not k.startswith("_")})
    in_effect = memory.apply_memory_options(spec, unet, None, device)
    unet.train()
    params = sum(p.numel() for p in unet.parameters())
    if row.training == "lora":
        lora.attach(unet, None, AdapterSettings(rank=4, alpha=4.0), seed=0, dtype=dtype)
    optimizer, optimizer_name = optim.make_optimizer(spec, optim.param_groups(spec, unet, None, 1))
    trained = [p for p in unet.parameters() if p.requires_grad]
    b, lat = row.batch, shape.latent
    gen = torch.Generator(device).manual_seed(0)
    mean = torch.randn(b, 4, lat, lat, generator=gen, device=device)
    std = torch.full_like(mean, 0.1)
    hidden = torch.randn(b, 77, shape.text_dim, generator=gen, device=device)
    added = None
    if shape.pooled:
        ids = [shape.resolution, shape.resolution, 0, 0, shape.resolution, shape.resolution]
        added = {"text_embeds": torch.randn(b, shape.pooled, generator=gen, device=device),
                 "time_ids": torch.tensor([ids] * b, dtype=torch.float32, device=device)}
    tables = diffusion.schedule_from_config(tiny.SCHEDULER_CONFIG).as_tables().map(
        lambda table: torch.from_numpy(table).to(device))
    options = LossOptions()
    timesteps = int(tables.snr.shape[0])

    def step() -> float:
        drawn = loss_lib.draw_inputs(mean, std, gen, timesteps, options)
        with torch.autocast(device.type, dtype=dtype, enabled=not smoke):
            loss, _ = loss_lib.denoising_loss(unet, drawn.latents, drawn.noise, drawn.timesteps, hidden, tables,
                                              options, added_cond_kwargs=added)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, spec.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=spec.precision.set_grads_to_none)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss.detach())

    times, loss = timed_steps(step, warmup, steps, deadline)
    if device.type == "cuda":
        peak = {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_source": "torch.cuda.max_memory_allocated"}
        kind = {"device_kind": torch.cuda.get_device_name(device), "platform": "gpu",
                "device_count": torch.cuda.device_count()}
    else:
        peak = host_peak()
        kind = {"device_kind": "cpu", "platform": "cpu", "device_count": 1}
    return {"device": kind, "attention": "sdpa", "attention_resolved": in_effect["attention"],
            "remat": "full" if in_effect["gradient_checkpointing"] else None, "optimizer": optimizer_name,
            "set_grads_to_none": bool(spec.precision.set_grads_to_none),
            "precision": "fp32" if smoke else ("bf16 autocast, bf16 frozen base, fp32 adapters" if row.training
                                              == "lora" else "bf16 autocast, fp32 params and optimizer state"),
            "unet_params": params, "trained_params": sum(p.numel() for p in trained), "compile_s": None,
            **times, "loss": loss, **peak}
