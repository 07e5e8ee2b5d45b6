"""The folders a LoRA run leaves: the final output folder and the LoRA file of each checkpoint.

Both backends hand over a ``LoraState``; everything written from it is here, framework-free:
``pytorch_lora_weights.safetensors`` (diffusers), optionally the kohya file and a merged
diffusers pipeline in the same folder, the LoRA model card and the resolved run spec (which
``jaxbooth generate`` reads the base model from).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jaxbooth import deepfloyd, output
from jaxbooth.lora import kohya
from jaxbooth.lora.card import lora_model_card
from jaxbooth.lora.files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, save_safetensors, write_lora_file
from jaxbooth.lora.layers import LoraState
from jaxbooth.lora.merge import WEIGHT_NAMES, merge_into_state_dict, read_component_weights
from jaxbooth.lora.settings import AdapterSettings

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".pt", ".ckpt", ".index.json")


def write_checkpoint_lora(checkpoint_dir: str | Path, state: LoraState, settings: AdapterSettings) -> Path:
    """``checkpoint-N/pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(checkpoint_dir)`` loads it
    mid-run. Returns the file's path."""
    return write_lora_file(Path(checkpoint_dir) / LORA_WEIGHTS_NAME, state, settings)


def write_lora_output(out_dir: str | Path, state: LoraState, *, settings: AdapterSettings, spec: Any,
                      base_dir: str | Path, vae_dir: str | Path | None, steps: int, backend: str,
                      instance_prompt: str, validation_images: Iterable[str] = ()) -> Path:
    """The final LoRA output folder; returns ``out_dir``.

    Always: the LoRA file, ``README.md`` (the LoRA card) and ``jaxbooth_run.yaml``. With
    ``spec.lora.output_kohya_format`` the kohya file; with ``spec.lora.merge_lora_into_pipeline``
    the base pipeline with the adapters merged into ``unet/`` (and ``text_encoder/`` when it has
    adapters and ``skip_save_text_encoder`` is off), completed by ``output.write_pipeline``.
    """
    from jaxbooth import spec as spec_lib

    out_dir, base_dir = Path(out_dir), Path(base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapted = [component for component, layers in state.items() if layers]
    validation_images = tuple(validation_images)
    write_lora_file(out_dir / LORA_WEIGHTS_NAME, state, settings)
    kohya_file = out_dir / KOHYA_WEIGHTS_NAME
    if spec.lora.output_kohya_format:
        save_safetensors(kohya_file, kohya.to_kohya(state), {"format": "pt"})
    else:
        kohya_file.unlink(missing_ok=True)  # a previous run's, which this card would not mention
    merge = bool(spec.lora.merge_lora_into_pipeline)
    skip_text_encoder = bool(spec.checkpointing.skip_save_text_encoder)
    if merge:
        merged = [c for c in adapted if not (c.startswith("text_encoder") and skip_text_encoder)]
        write_merged_components(out_dir, state, base_dir=base_dir, components=merged, variant=spec.model.variant)
        output.write_pipeline(out_dir, base_dir=base_dir, trained_components=merged, vae_dir=vae_dir, spec=spec,
                              steps=steps, backend=backend, instance_prompt=instance_prompt,
                              validation_images=validation_images)
    spec_path = out_dir / output.SPEC_FILENAME
    tmp = spec_path.with_name(f".{spec_path.name}.tmp{os.getpid()}")
    spec_lib.write_resolved_spec(spec, tmp)
    os.replace(tmp, spec_path)
    if spec.checkpointing.save_single_file and not merge:  # with merge, write_pipeline above wrote it
        from jaxbooth import single_file

        single_file.write(single_file.resolve_source(out_dir), precision=spec.checkpointing.save_precision)
    vae = spec.model.pretrained_vae_name_or_path or (str(vae_dir) if vae_dir is not None else None)
    targets = {c: settings.peft_config(c, present=state[c])["target_modules"] for c in adapted}
    card = lora_model_card(
        base_model=spec.model.pretrained_model_name_or_path or str(base_dir), instance_prompt=instance_prompt,
        settings=settings, targets=targets, steps=steps, backend=backend,
        pipeline_class=output.card_pipeline_class(base_dir),
        kohya=bool(spec.lora.output_kohya_format), merged=merge, merged_text_encoder=not skip_text_encoder, vae=vae,
        validation_images=validation_images, figures=output.training_figures(out_dir),
        notes=deepfloyd.card_notes(base_dir=base_dir, lora=True, text_encoder_saved=not (merge and skip_text_encoder)))
    output.atomic_write_text(out_dir / "README.md", card)  # after write_pipeline: replaces its full fine-tune card
    return out_dir


def write_merged_components(out_dir: Path, state: LoraState, *, base_dir: Path, components: Iterable[str],
                            variant: str | None = None) -> list[str]:
    """``out_dir/<component>/``: the base component's config files and its weights with the adapters
    merged, one unsharded safetensors file in the base's dtype. Each folder is built aside and
    renamed into place. Returns the components written."""
    written = []
    for component in components:
        source = Path(base_dir) / component
        weights = merge_into_state_dict(read_component_weights(source, variant), state[component])
        tmp = out_dir / f".{component}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for item in source.iterdir():
            if item.is_file() and not item.name.startswith(".") and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, tmp / item.name)
        save_safetensors(tmp / f"{WEIGHT_NAMES.get(component, 'model')}.safetensors", weights, {"format": "pt"})
        target = out_dir / component
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        written.append(component)
    return written

