"""Values computed from a RunSpec and never written back into it.

Scaled learning rates, step and epoch counts as diffusers counts them, the device mesh shape,
and which of two synonymous keys wins. Pure functions of the spec (and device or dataset
sizes); standard library only.
"""

from __future__ import annotations

import math

from jaxbooth.errors import JaxboothError
from jaxbooth.spec.schema import RunSpec


def effective_learning_rate(spec: RunSpec, num_processes: int) -> float:
    """UNet LR after ``scale_lr``: lr x grad accumulation x per-device batch x processes (diffusers)."""
    o = spec.optim
    if not o.scale_lr:
        return o.learning_rate
    return o.learning_rate * o.gradient_accumulation_steps * o.train_batch_size * num_processes


def effective_text_encoder_learning_rate(spec: RunSpec, num_processes: int) -> float:
    """Text-encoder LR: ``text_encoder_lr`` as given (the SDXL script does not scale it), else the UNet's."""
    if spec.optim.text_encoder_lr is not None:
        return spec.optim.text_encoder_lr
    return effective_learning_rate(spec, num_processes)


def effective_batch_size(spec: RunSpec, num_processes: int) -> int:
    """Instance examples per optimizer step over all replicas (diffusers' 'total train batch size')."""
    return spec.optim.train_batch_size * num_processes * spec.optim.gradient_accumulation_steps


def num_update_steps_per_epoch(spec: RunSpec, num_examples: int, num_processes: int) -> int:
    """Optimizer steps per epoch as diffusers counts them: batches (last partial kept), split
    over processes, divided by gradient accumulation, each rounded up.

    ``num_examples`` is the dataset length: the instance image count, or with prior
    preservation max(instance images, class images), as diffusers' DreamBoothDataset.
    """
    if num_examples < 1:
        raise JaxboothError(f"the training set is empty (num_examples={num_examples}); "
                            "check --instance_data_dir")
    batches = math.ceil(num_examples / spec.optim.train_batch_size)
    per_process = math.ceil(batches / num_processes)
    return math.ceil(per_process / spec.optim.gradient_accumulation_steps)


def total_train_steps(spec: RunSpec, num_examples: int, num_processes: int) -> int:
    """``max_train_steps`` if set, else epochs x update steps per epoch (diffusers' rule)."""
    if spec.optim.max_train_steps is not None:
        return spec.optim.max_train_steps
    return spec.optim.num_train_epochs * num_update_steps_per_epoch(spec, num_examples, num_processes)


def total_train_epochs(spec: RunSpec, num_examples: int, num_processes: int) -> int:
    """Epochs the loop runs: diffusers recomputes them from the total steps, rounding up."""
    per_epoch = num_update_steps_per_epoch(spec, num_examples, num_processes)
    return math.ceil(total_train_steps(spec, num_examples, num_processes) / per_epoch)


def mesh_shape(spec: RunSpec, device_count: int) -> tuple[int, int]:
    """(data, fsdp) axis sizes for ``device_count`` devices; -1 data means all that remain."""
    par = spec.parallelism
    fsdp, data = par.fsdp_parallelism, par.data_parallelism
    if device_count % fsdp:
        raise JaxboothError(f"--fsdp_parallelism={fsdp} does not divide the {device_count} devices; "
                            f"use a divisor of {device_count}")
    if data == -1:
        data = device_count // fsdp
    if data * fsdp != device_count:
        raise JaxboothError(f"--data_parallelism={data} x --fsdp_parallelism={fsdp} = {data * fsdp}, "
                            f"but there are {device_count} devices; use --data_parallelism=-1")
    return data, fsdp


def vae_name_or_path(spec: RunSpec) -> str | None:
    """The VAE override, whichever of the flax or SDXL flag names gave it (validation forbids both)."""
    return spec.model.pretrained_vae_name_or_path or spec.sdxl.pretrained_vae_model_name_or_path


def checkpoint_every_steps(spec: RunSpec) -> int:
    """Checkpoint cadence in optimizer steps; the flax script's ``save_steps`` wins when given."""
    c = spec.checkpointing
    return c.save_steps if c.save_steps is not None else c.checkpointing_steps


def validation_schedule(spec: RunSpec) -> tuple[str, int] | None:
    """("epochs", n) or ("steps", n); None when no validation_prompt is set (no validation)."""
    v = spec.validation
    if v.validation_prompt is None:
        return None
    if v.validation_epochs is not None:
        return "epochs", v.validation_epochs
    return "steps", v.validation_steps


def lora_scale_alpha(spec: RunSpec) -> float:
    """LoRA alpha; diffusers sets alpha = rank, so the update scale alpha/rank is 1 by default."""
    return spec.lora.lora_alpha if spec.lora.lora_alpha is not None else float(spec.lora.rank)
