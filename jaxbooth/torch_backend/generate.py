"""`jaxbooth generate` for DeepFloyd IF, on diffusers' own pipelines (JAX has no IF UNet).

What a user of diffusers would run: the saved pipeline (``IFPipeline`` / ``IFSuperResolutionPipeline``), or
the LoRA's base with ``load_lora_weights`` and ``fuse_lora(lora_scale=s)``; the scheduler by name from the
pipeline's config with a learned variance sampled as ``fixed_small`` (DreamBooth trains only the noise half;
the switch saved pipelines already carry, and the one the LoRA card tells users to make);
``clean_caption=False`` (the prompt as trained). Stage II upscales ``image``. A full pipeline saved without its
text encoder (``--skip_save_text_encoder``) takes it from its base: ``--pretrained_model_name_or_path``, else
the base its folder records. The LoRA file and its base are found as on the JAX side
(:mod:`jaxbooth.lora.base_model`); the adapters are checked against the base before anything is sampled.
No safety checker, as JAX ``generate``; a watermarker the folder has is applied, as diffusers does.
Never imports jax.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from jaxbooth import deepfloyd, validation_files
from jaxbooth.errors import JaxboothError
from jaxbooth.lora import files as lora_files
from jaxbooth.lora.base_model import (
    BASE_FLAG,
    BaseModel,
    _base_from_files,
    _plain_pipeline_errors,
    _resolve_base,
    find_base_model,
    lora_file_of,
    not_a_model_file,
)

PIPELINE_CLASSES = {1: "IFPipeline", 2: "IFSuperResolutionPipeline"}
TEXT_PARTS = ("tokenizer", "text_encoder")


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class ``--scheduler`` names, or an error naming the flag (before any load)."""
    import diffusers

    found = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if not isinstance(found, type) or not issubclass(found, diffusers.SchedulerMixin):
        raise JaxboothError(f"--scheduler {name}: not a diffusers scheduler class; use e.g. "
                            "DPMSolverMultistepScheduler (the default) or DDPMScheduler (IF's own)")
    return found


def read_image(path: str) -> Any:
    """``--image`` as the RGB PIL image stage II upscales (any size: the pipeline resizes it), or an error."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise JaxboothError(f"--image {path}: no such file; pass the low-resolution image to upscale") from None
    except Exception as error:  # PIL raises many kinds for a corrupt or non-image file
        raise JaxboothError(f"--image {path}: cannot be read as an image ({error}); pass a PNG or JPEG") from None


def missing_text_parts(folder: Path) -> list[str]:
    """The tokenizer/text encoder a pipeline folder was saved without (``[null, null]`` or no entry)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [part for part in TEXT_PARTS if not (isinstance(index.get(part), list) and index[part][-1])]


def text_parts_from_base(folder: Path, parts: list[str], given: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """The parts ``folder`` lacks, loaded from its base (the flag, else the one the folder records)."""
    from jaxbooth.text import load_tokenizer
    from jaxbooth.torch_backend.models import dtype_kwargs, text_encoder_class

    base = BaseModel(given, BASE_FLAG) if given else _base_from_files(folder)
    if base is None:
        raise JaxboothError(f"{folder}: saved without its {' and '.join(parts)} (--skip_save_text_encoder), and no "
                            "base model is recorded (jaxbooth_run.yaml, README.md base_model). Fix: pass the "
                            f"pipeline it was trained from as {BASE_FLAG}.")
    base_dir = _resolve_base(base, subfolders=[*parts, ""])
    loaded: dict[str, Any] = {}
    if "tokenizer" in parts:
        loaded["tokenizer"] = load_tokenizer(base_dir)
    if "text_encoder" in parts:
        loaded["text_encoder"] = text_encoder_class(base_dir).from_pretrained(
            base_dir, subfolder="text_encoder", variant=base.variant, **dtype_kwargs(dtype))
    return loaded


def check_lora_fits(lora_file: Path, base: BaseModel, pipeline: Any) -> None:
    """Every adapter of the file names a layer of the base pipeline with its shape, else one error naming the file,
    a key and the fix (diffusers' loader only warns when keys match nothing)."""
    fix = f"Fix: pass the base model this LoRA was trained on as {BASE_FLAG}."
    try:
        state = lora_files.read_lora_file(lora_file)
    except JaxboothError as error:
        raise JaxboothError(f"{error}\n(loading into the base model {base.name}, from {base.origin})") from None
    if not any(state.values()):
        raise JaxboothError(f"{lora_file}: holds no LoRA adapters. Fix: pass a LoRA file or output folder.")
    for component, layers in state.items():
        model = getattr(pipeline, component, None) if layers else None
        if layers and model is None:
            raise JaxboothError(f"{lora_file}: adapts {component}, which the base model {base.name} does not have. "
                                f"{fix}")
        modules = dict(model.named_modules()) if layers else {}
        for path, layer in sorted(layers.items()):
            module = modules.get(path, modules.get(path.removeprefix("text_model.")))
            weight = getattr(module, "weight", None)
            if weight is None:
                raise JaxboothError(f"{lora_file}: '{component}.{path}' matches no layer of the base model "
                                    f"{base.name}. {fix}")
            if tuple(weight.shape[:2]) != (layer.up.shape[0], layer.down.shape[1]):
                raise JaxboothError(f"{lora_file}: the adapter of '{component}.{path}' is [{layer.up.shape[0]}, "
                                    f"{layer.down.shape[1]}] but that layer of the base model {base.name} is "
                                    f"{list(weight.shape)}. {fix}")


def load_if_pipeline(model_dir: str, *, base: str | None, lora_scale: float | None, dtype: torch.dtype,
                     device: torch.device, image: str | None) -> Any:
    """The IF pipeline ``generate`` samples (a LoRA fused at ``lora_scale``, None: 1.0), checked before loading:
    an IF pipeline, and ``image`` given exactly for stage II."""
    from jaxbooth.hub import resolve_model_dir
    from jaxbooth.torch_backend.models import dtype_kwargs, quiet_library_output

    path = Path(model_dir).expanduser()
    lora_file = lora_file_of(path)
    missing: list[str] = []
    if lora_file is not None:
        found = find_base_model(lora_file, base)
        folder, variant = _resolve_base(found), found.variant
    elif path.is_file():
        raise not_a_model_file(model_dir)
    else:
        found, folder, variant = None, Path(resolve_model_dir(model_dir)), None
        missing = missing_text_parts(folder)
        if lora_scale is not None or (base is not None and not missing):
            _plain_pipeline_errors(model_dir, folder, base=base, lora_scale=lora_scale)
    stage = deepfloyd.stage(folder)
    if stage is None:
        raise JaxboothError(f"{folder / 'model_index.json'}: not a DeepFloyd IF pipeline; the torch backend's "
                            "generate samples IFPipeline / IFSuperResolutionPipeline only (SD and SDXL sample with "
                            "`jaxbooth generate` on the jax backend)")
    if stage == 2 and image is None:
        raise JaxboothError(f"{model_dir}: an IFSuperResolutionPipeline (DeepFloyd IF stage II) upscales an image; "
                            "pass the low-resolution one with --image PATH")
    if stage == 1 and image is not None:
        raise JaxboothError(f"--image: {model_dir} samples an IFPipeline (DeepFloyd IF stage I), which takes no "
                            "input image; drop --image")
    quiet_library_output()
    extra = text_parts_from_base(folder, missing, base, dtype) if missing else {}
    pipeline_class = getattr(importlib.import_module("diffusers"), PIPELINE_CLASSES[stage])
    kwargs: dict[str, Any] = {"variant": variant} if variant else {}
    pipeline = pipeline_class.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                              **dtype_kwargs(dtype), **kwargs, **extra)
    if lora_file is not None:
        check_lora_fits(lora_file, found, pipeline)
        pipeline.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        pipeline.fuse_lora(lora_scale=1.0 if lora_scale is None else lora_scale)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def generate_to_dir(model_dir: str, prompt: str, *, num_images: int, steps: int, guidance_scale: float | None,
                    negative_prompt: str | None, scheduler: str, seed: int, resolution: int | None,
                    out_dir: str, pretrained_model_name_or_path: str | None = None,
                    lora_scale: float | None = None, image: str | None = None) -> list[Path]:
    """Sample ``num_images`` images of ``prompt`` from a DeepFloyd IF pipeline or LoRA and write them as PNG files
    (``sample-seed{seed}-{k:03d}.png``, as the JAX ``generate``); returns their paths.

    ``guidance_scale`` / ``resolution`` None: the pipeline's defaults (IF-I 7.0, IF-II 4.0; the UNet's sample
    size). ``image``: the low-resolution image stage II upscales (required there, refused on stage I).
    One pipeline call with ``num_images_per_prompt``, from one generator seeded with ``seed``.
    """
    from jaxbooth.torch_backend.class_images import generation_dtype
    from jaxbooth.torch_backend.validation import IF_CALL, validation_scheduler

    scheduler_class(scheduler)
    low_res = read_image(image) if image is not None else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_if_pipeline(model_dir, base=pretrained_model_name_or_path, lora_scale=lora_scale,
                                dtype=generation_dtype(None, device), device=device, image=image)
    pipeline.scheduler = validation_scheduler(scheduler, pipeline.scheduler.config)
    call: dict[str, Any] = dict(IF_CALL, num_images_per_prompt=num_images, num_inference_steps=steps,
                                generator=torch.Generator(device=device).manual_seed(seed))
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    if negative_prompt is not None:
        call["negative_prompt"] = negative_prompt
    if resolution is not None:
        call.update(height=resolution, width=resolution)
    if low_res is not None:
        call["image"] = low_res
    with torch.no_grad():
        images = pipeline(prompt, **call).images
    return validation_files.save_samples(images, out_dir, seed)
