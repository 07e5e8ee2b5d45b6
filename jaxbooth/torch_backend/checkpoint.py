"""Checkpoints of the torch backend, in the same layout as the JAX backend's.

``OUTPUT_DIR/checkpoint-N/`` holds ``state/`` (accelerate ``save_state``: optimizer, LR
scheduler, grad scaler, RNG states, or the DeepSpeed engine files), ``unet/`` (and
``text_encoder/``, for SDXL also ``text_encoder_2/``, when trained) in diffusers' layout, so
``UNet2DConditionModel.from_pretrained(OUTPUT_DIR, subfolder="checkpoint-N/unet")`` works, and
the shared marker ``jaxbooth_checkpoint.json`` (``checkpoints.checkpoint_record``: step, seed,
data position, spec without the Hub token), written last: a checkpoint without it
(killed mid-write) is never resumed from and is cleared by the next run. The model weights
live only in ``unet/`` / ``text_encoder/``: accelerate's state hooks write and read them
there instead of a second copy in ``state/`` (diffusers does the same inside ``state/``).
A LoRA run keeps only its adapters: ``checkpoint-N/pytorch_lora_weights.safetensors`` (the
shared ``jaxbooth.lora`` file, so ``pipe.load_lora_weights(".../checkpoint-N")`` works) instead
of ``unet/`` and ``text_encoder/``.
Naming, completeness and retention are the shared ``jaxbooth.checkpoints``. Never imports jax.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from jaxbooth import log as jaxbooth_log
from jaxbooth import spec as spec_lib
from jaxbooth.checkpoints import (
    MARKER,
    PREFIX,
    StopOnSignal,
    TrainingStopped,
    checkpoint_record,
    clear_incomplete,
    prune_checkpoints,
    read_marker,
    resolve_resume_path,
    write_marker,
)
from jaxbooth.errors import JaxboothError
from jaxbooth.lora import AdapterSettings
from jaxbooth.torch_backend.models import trained_components

STATE_DIR = "state"

__all__ = ["MARKER", "STATE_DIR", "StopOnSignal", "TrainingStopped", "checkpoint_record", "clear_incomplete",
           "maybe_resume", "register_ema", "register_state_hooks", "save_checkpoint"]


def register_state_hooks(accelerator: Any, adapters: AdapterSettings | None = None) -> None:
    """Make ``save_state(ckpt/state)`` write each trained model to ``ckpt/<component>/`` in
    diffusers/transformers format (main process), and ``load_state`` read it back from there;
    with ``adapters`` (a LoRA run), the adapters to ``ckpt/pytorch_lora_weights.safetensors``."""
    if adapters is not None:
        register_lora_hooks(accelerator, adapters)
        return

    def save_hook(models: list, weights: list, state_dir: str) -> None:
        for model in models:
            if accelerator.is_main_process:
                for name, component in trained_components(accelerator.unwrap_model(model)).items():
                    component.save_pretrained(Path(state_dir).parent / name)
            if weights:  # empty under DeepSpeed: the engine saved its own copy
                weights.pop()

    def load_hook(models: list, state_dir: str) -> None:
        while models:
            for name, component in trained_components(accelerator.unwrap_model(models.pop())).items():
                folder = Path(state_dir).parent / name
                if not folder.is_dir():
                    raise JaxboothError(f"{folder.parent}: no {folder.name}/ folder (a LoRA run's checkpoint, or one "
                                        "without --train_text_encoder?); resume it with --use_lora "
                                        "(train_dreambooth_lora.py) or the --train_text_encoder of that run, or start "
                                        "a new output_dir")
                loaded = type(component).from_pretrained(folder)
                component.load_state_dict(loaded.state_dict())
                del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def register_ema(accelerator: Any, averages: Any) -> None:
    """``--use_ema``: ``save_state`` pickles the averages (``optim.EmaWeights.state_dict``) into ``state/`` beside
    the optimizer (accelerate's ``custom_checkpoint_0.pkl``) and ``load_state`` puts them back, so a resume
    continues the average exactly. Register before ``maybe_resume``."""
    accelerator.register_for_checkpointing(averages)


def register_lora_hooks(accelerator: Any, adapters: AdapterSettings) -> None:
    """``save_state`` writes the adapters of every trained model into one LoRA file beside ``state/``;
    ``load_state`` copies them back into the peft layers (the frozen base is the run's base model)."""
    from jaxbooth.lora import files, outputs
    from jaxbooth.torch_backend import lora

    def by_component(models: list) -> dict[str, Any]:
        return {name: component for model in models
                for name, component in trained_components(accelerator.unwrap_model(model)).items()}

    def save_hook(models: list, weights: list, state_dir: str) -> None:
        trained = by_component(models)
        if accelerator.is_main_process:
            state = lora.export_lora_state(trained["unet"], trained.get("text_encoder"), adapters,
                                           text_encoder_2=trained.get("text_encoder_2"))
            outputs.write_checkpoint_lora(Path(state_dir).parent, state, adapters)
        del weights[:]  # the base weights are the run's base model: never a copy in state/

    def load_hook(models: list, state_dir: str) -> None:
        trained = by_component(models)
        path = Path(state_dir).parent / files.LORA_WEIGHTS_NAME
        if not path.is_file():
            raise JaxboothError(f"{path.parent}: no {files.LORA_WEIGHTS_NAME} (a full fine-tune's checkpoint?); resume "
                                "it without --use_lora, or start a new output_dir")
        lora.load_lora_state(files.read_lora_file(path), trained, source=str(path))
        del models[:]

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, data_state: dict, spec: spec_lib.RunSpec, *,
                    seed: int, keep: int | None) -> Path:
    """Save ``checkpoint-<step>`` on every process (DeepSpeed needs all ranks), then the
    marker and retention on the main process once every rank is done."""
    path = output_dir / f"{PREFIX}{step}"
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path / STATE_DIR))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_marker(path, checkpoint_record(step, data_state, spec, seed))
        prune_checkpoints(output_dir, keep)
        jaxbooth_log.info(f"saved {path}")
    accelerator.wait_for_everyone()
    return path


def maybe_resume(accelerator: Any, spec: spec_lib.RunSpec, output_dir: Path) -> tuple[dict | None, Path | None]:
    """Load the checkpoint ``resume_from_checkpoint`` names (``latest``: newest complete one).

    Returns (marker record, path), or (None, None) for a fresh run.
    """
    path = resolve_resume_path(output_dir, spec.checkpointing.resume_from_checkpoint)
    if path is None:
        return None, None
    record = read_marker(path)
    if not list((path / STATE_DIR).glob("random_states_*.pkl")):  # accelerate writes one per process
        raise JaxboothError(f"--resume_from_checkpoint: {path} holds no accelerate train state (a jax-backend "
                            f"checkpoint?); resume it with --backend=jax, or start a new output_dir. Its unet/ "
                            "folder loads in diffusers as a model to start from")
    try:
        accelerator.load_state(str(path / STATE_DIR))
    except JaxboothError:
        raise
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as error:
        raise JaxboothError(f"{path}: the saved train state does not fit this run ({error}); resume with the "
                            "same model and options, or start a new output_dir") from None
    return record, path

