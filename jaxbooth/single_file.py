"""One ``.safetensors`` in the original Stable Diffusion layout: what A1111 and ComfyUI load.

Users of those tools cannot open a diffusers folder (diffusers #2765, #4453, #5162). This converts a
pipeline, a ``jaxbooth train`` output folder or any ``checkpoint-N`` of one into a single file (SD 1.x,
SD 2.x, SDXL), and ``--save_single_file`` does it at the end of a run through ``output.write_pipeline``.
A checkpoint holds only the trained components: the rest comes from the base model its resolved spec
records. A LoRA (output folder or checkpoint) is merged into its base first: a single-file checkpoint is a
whole model; the LoRA's own A1111 form is ``--output_kohya_format``. The key tables are in
``single_file_keys``. numpy and safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth import log
from jaxbooth import single_file_keys as keys
from jaxbooth.errors import JaxboothError

PRECISIONS = ("fp16", "bf16", "fp32")
DEFAULT_PRECISION = "fp16"  # as A1111 checkpoints are shared
SUFFIX = ".safetensors"
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
# Stability's ModelSpec (modelspec.*) names, which A1111 extensions, ComfyUI and model sites read
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
IF_REFUSAL = ("DeepFloyd IF has no single-file checkpoint form: it is a pixel-space cascade (stage I, the stage II "
              "upscaler) with a T5-XXL text encoder and no VAE, which A1111 and ComfyUI do not load from one Stable "
              "Diffusion layout file. Share the diffusers folder instead (IFPipeline.from_pretrained); drop "
              "--save_single_file")


@dataclass
class Source:
    """Where each component's diffusers folder is, and what the file's metadata says about it."""

    pipeline_dir: Path  # model_index.json, scheduler/ and the components not found elsewhere
    folders: dict[str, Path] = field(default_factory=dict)  # component -> folder that replaces the pipeline's
    variant: str | None = None  # of the base's weights (a folder without variant files falls back to plain ones)
    lora: Path | None = None  # a LoRA file merged into the components it adapts
    base_model: str = ""
    steps: int | None = None
    kind: str = "pipeline"  # pipeline, output, checkpoint, LoRA merged
    default_out: Path | None = None
    fallback: Path | None = None  # a pipeline lending the components the others lack (the run's base)
    record_dir: Path | None = None  # else a folder whose recorded spec names that base, resolved when needed


def precision_dtype(precision: str | None) -> Any:
    """numpy dtype of a ``save_precision`` value (None: fp16)."""
    import ml_dtypes

    precision = precision or DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise JaxboothError(f"save_precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}[precision]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise JaxboothError(f"{path}: cannot be read ({error}). Fix: repair or re-download the model.") from None
    if not isinstance(data, dict):
        raise JaxboothError(f"{path}: not a JSON object. Fix: repair or re-download the model.")
    return data


def pipeline_family(pipeline_dir: Path) -> str:
    """sd or sdxl from ``model_index.json``; DeepFloyd IF and unknown classes are refused by name."""
    from jaxbooth import pipelines

    name = pipelines.pipeline_class(pipeline_dir)
    if name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        return "sdxl" if name == "StableDiffusionXLPipeline" else "sd"
    if pipelines.family_of(name) == "deepfloyd_if":
        raise JaxboothError(f"{pipeline_dir / 'model_index.json'}: {name}. {IF_REFUSAL}.")
    raise JaxboothError(f"{pipeline_dir / 'model_index.json'}: _class_name={name}; single-file export knows "
                        "StableDiffusionPipeline (SD 1.x/2.x) and StableDiffusionXLPipeline. Fix: pass one of those.")


def sd_version(text_encoder_dir: Path) -> str:
    """sd1 or sd2 from the text encoder: OpenCLIP's GELU is SD 2.x's, OpenAI CLIP's quick-GELU SD 1.x's."""
    config = text_encoder_dir / "config.json"
    return "sd2" if config.is_file() and _read_json(config).get("hidden_act") == "gelu" else "sd1"


# ---------------------------------------------------------------- inputs


def _recorded_spec(folder: Path) -> dict[str, Any] | None:
    """The run spec a folder records: ``jaxbooth_run.yaml`` (an output) or the checkpoint marker's."""
    import yaml

    from jaxbooth.checkpoints import MARKER, read_marker
    from jaxbooth.output import SPEC_FILENAME

    if (folder / MARKER).is_file():
        spec = read_marker(folder).get("spec")
        return spec if isinstance(spec, dict) else None
    if (folder / SPEC_FILENAME).is_file():
        try:
            spec = yaml.safe_load((folder / SPEC_FILENAME).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise JaxboothError(f"{folder / SPEC_FILENAME}: cannot be read ({error}). Fix: repair it.") from None
        return spec if isinstance(spec, dict) else None
    return None


def _base_of(folder: Path, spec: Mapping[str, Any] | None, why: str) -> tuple[Path, Mapping[str, Any]]:
    """The base pipeline folder a run recorded (fetched like the run fetched it), and the spec's model section."""
    from jaxbooth.hub import resolve_model_dir

    model = spec.get("model") if isinstance(spec, Mapping) else None
    name = model.get("pretrained_model_name_or_path") if isinstance(model, Mapping) else None
    if not name:
        raise JaxboothError(f"{folder}: {why}, and no jaxbooth_run.yaml or checkpoint marker here records the base "
                            "model. Fix: pass the complete output folder, or a diffusers pipeline folder.")
    try:
        base = resolve_model_dir(str(name), revision=model.get("revision"), variant=model.get("variant"))
    except JaxboothError as error:
        raise JaxboothError(f"{folder}: the recorded base model {name!r} cannot be loaded ({error}). Fix: make it "
                            "available where the run found it.") from None
    return Path(base), model


def _vae_override(model: Mapping[str, Any]) -> dict[str, Path]:
    """``{"vae": folder}`` of the run's ``--pretrained_vae_name_or_path``, if it had one (the pipeline it wrote
    holds that VAE; a checkpoint or LoRA output does not)."""
    if not model.get("pretrained_vae_name_or_path"):
        return {}
    from jaxbooth.hub import resolve_vae_dir, vae_component_folder

    return {"vae": vae_component_folder(resolve_vae_dir(str(model["pretrained_vae_name_or_path"])))}


def _steps_of(folder: Path) -> int | None:
    from jaxbooth.output import training_figures

    figures = training_figures(folder)
    return int(figures["step"]) if figures else None


def resolve_source(path: str | Path) -> Source:
    """What to convert at ``path``: a diffusers pipeline folder (a full ``jaxbooth train`` output included), a
    ``checkpoint-N`` folder, or a LoRA output folder; anything else is one error naming what was looked for."""
    from jaxbooth.checkpoints import MARKER, read_marker
    from jaxbooth.lora.files import LORA_WEIGHTS_NAME

    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise JaxboothError(f"{path}: {what}. Fix: pass a diffusers pipeline folder, a jaxbooth train output folder "
                            "or one of its checkpoint-N folders.")
    folder = folder.resolve()
    if (folder / "model_index.json").is_file():  # a pipeline; an output missing its text encoder borrows the base's
        spec = _recorded_spec(folder)
        model = spec.get("model", {}) if spec else {}
        return Source(pipeline_dir=folder, kind="output" if spec else "pipeline", steps=_steps_of(folder),
                      base_model=str(model.get("pretrained_model_name_or_path") or folder.name),
                      default_out=folder / f"{folder.name}{SUFFIX}", record_dir=folder if spec else None,
                      variant=model.get("variant"))
    if (folder / MARKER).is_file():
        record = read_marker(folder)
        base, model = _base_of(folder, record.get("spec"), "a checkpoint holds only its trained components")
        run = folder.parent.name
        source = Source(pipeline_dir=base, variant=model.get("variant"), kind="checkpoint",
                        steps=int(record["step"]), base_model=str(model["pretrained_model_name_or_path"]),
                        default_out=folder / f"{run}-step{int(record['step'])}{SUFFIX}")
        if (folder / LORA_WEIGHTS_NAME).is_file():
            source.lora, source.kind = folder / LORA_WEIGHTS_NAME, "checkpoint, LoRA merged"
        source.folders = {name: folder / name for name in ("unet", "text_encoder", "text_encoder_2")
                          if (folder / name / "config.json").is_file()}
        if source.lora is None and not source.folders:
            raise JaxboothError(f"{folder}: a checkpoint with neither trained components (unet/, text_encoder/) nor "
                                f"{LORA_WEIGHTS_NAME}. Fix: pass a complete checkpoint of a jaxbooth run.")
        source.folders.update(_vae_override(model))
        return source
    if (folder / LORA_WEIGHTS_NAME).is_file():
        base, model = _base_of(folder, _recorded_spec(folder), "a LoRA output holds no base weights")
        return Source(pipeline_dir=base, variant=model.get("variant"), lora=folder / LORA_WEIGHTS_NAME,
                      kind="LoRA merged", steps=_steps_of(folder), folders=_vae_override(model),
                      base_model=str(model["pretrained_model_name_or_path"]),
                      default_out=folder / f"{folder.name}{SUFFIX}")
    raise JaxboothError(f"{path}: no model_index.json (a pipeline), {MARKER} (a checkpoint) or {LORA_WEIGHTS_NAME} "
                        "(a LoRA output) here. Fix: pass a diffusers pipeline folder, a jaxbooth train output folder "
                        "or one of its checkpoint-N folders.")


# ---------------------------------------------------------------- conversion


def _component_folder(source: Source, name: str) -> tuple[Path, str | None]:
    """(folder, variant) of a component: the source's own, the pipeline's, or the fallback's (the run's base)."""
    if name in source.folders:
        return source.folders[name], None
    if (source.pipeline_dir / name / "config.json").is_file():
        return source.pipeline_dir / name, source.variant
    if source.fallback is None and source.record_dir is not None:
        source.fallback = _base_of(source.record_dir, _recorded_spec(source.record_dir), f"it has no {name}/")[0]
    if source.fallback is not None and (source.fallback / name / "config.json").is_file():
        return source.fallback / name, source.variant
    raise JaxboothError(f"{source.pipeline_dir}: no {name}/ (with config.json); a single-file checkpoint needs "
                        f"every component. Fix: pass a complete pipeline, or the output folder of a run that saved "
                        f"{name} (a run with --skip_save_text_encoder records its base in jaxbooth_run.yaml).")


def _lora_layers(source: Source) -> dict[str, Any]:
    if source.lora is None:
        return {}
    from jaxbooth.lora.files import read_lora_file
    from jaxbooth.lora.merge import component_module_paths

    paths = component_module_paths(source.pipeline_dir, ("unet", "text_encoder", "text_encoder_2"), source.variant)
    return {name: layers for name, layers in read_lora_file(source.lora, paths).items() if layers}


def _text_prefix(fam: str, name: str) -> tuple[str, bool]:
    """(key prefix, OpenCLIP layout?) of a text encoder in the single file."""
    if fam == "sdxl":
        return keys.SDXL_TEXT_PREFIXES[name == "text_encoder_2"], name == "text_encoder_2"
    return (keys.SD2_TEXT_PREFIX, True) if fam == "sd2" else (keys.SD1_TEXT_PREFIX, False)


def convert(source: Source, precision: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of the single file, cast to ``precision`` (None: fp16)."""
    from jaxbooth.lora.merge import merge_into_state_dict, read_component_weights

    dtype = precision_dtype(precision)
    fam = pipeline_family(source.pipeline_dir)
    if fam == "sd":
        fam = sd_version(_component_folder(source, "text_encoder")[0])
    layers = _lora_layers(source)
    tensors: dict[str, np.ndarray] = {}
    for name in COMPONENTS[fam]:
        folder, variant = _component_folder(source, name)
        state = read_component_weights(folder, variant)
        if name in layers:
            state = merge_into_state_dict(state, layers[name])
        if name == "unet":
            converted = keys.prefixed(keys.UNET_PREFIX, {new: state[old] for old, new in keys.unet_keys(
                list(state)).items()})
        elif name == "vae":
            converted = keys.prefixed(keys.VAE_PREFIX, keys.vae_to_original(state))
        else:
            prefix, open_clip = _text_prefix(fam, name)
            canonical = keys.clip_canonical(state)
            converted = keys.prefixed(prefix, keys.open_clip_to_original(canonical, name) if open_clip else canonical)
        tensors.update({key: np.ascontiguousarray(value.astype(dtype)) for key, value in converted.items()})
        del state, converted
    scheduler = source.pipeline_dir / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(scheduler) if scheduler.is_file() else {}
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction == "v_prediction":  # ComfyUI reads these marker keys (NoobAI-style v-pred SDXL checkpoints)
        tensors["v_pred"] = np.zeros((0,), dtype)
        if scheduler_config.get("rescale_betas_zero_snr"):
            tensors["ztsnr"] = np.zeros((0,), dtype)
    return tensors, _metadata(source, fam, precision or DEFAULT_PRECISION, prediction)


def _metadata(source: Source, fam: str, precision: str, prediction: str) -> dict[str, str]:
    unet_config = source.folders.get("unet", source.pipeline_dir / "unet") / "config.json"
    size = _read_json(unet_config).get("sample_size") if unet_config.is_file() else None
    meta = {"format": "pt", "jaxbooth.format": "stable-diffusion-single-file", "jaxbooth.family": fam,
            "jaxbooth.precision": precision, "jaxbooth.source": source.kind, "jaxbooth.base_model": source.base_model,
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURES[fam],
            "modelspec.implementation": IMPLEMENTATION,
            "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon"}
    if source.default_out is not None:
        meta["modelspec.title"] = source.default_out.stem
    if isinstance(size, int):
        meta["modelspec.resolution"] = f"{size * 8}x{size * 8}"
    if source.lora is not None:
        meta["jaxbooth.lora_merged"] = source.lora.name
    if source.steps is not None:
        meta["jaxbooth.steps"] = str(source.steps)
    return meta


def _out_path(source: Source, out: str | Path | None) -> Path:
    path = Path(out).expanduser() if out is not None else source.default_out
    assert path is not None
    if path.is_dir():
        path = path / (source.default_out.name if source.default_out else f"model{SUFFIX}")
    if path.suffix != SUFFIX:
        raise JaxboothError(f"--out {out}: name the file *{SUFFIX} (A1111 and ComfyUI list checkpoints by that "
                            "extension)")
    return path


def write(source: Source, out: str | Path | None = None, precision: str | None = None) -> Path:
    """Convert ``source`` and write the file (atomically); returns its path."""
    from jaxbooth.lora.files import save_safetensors

    path = _out_path(source, out)
    tensors, metadata = convert(source, precision)
    save_safetensors(path, tensors, metadata)
    log.info(f"single-file checkpoint ({metadata['jaxbooth.family']}, {metadata['jaxbooth.precision']}): {path}")
    return path


def export(path: str | Path, out: str | Path | None = None, precision: str | None = None) -> Path:
    """``jaxbooth export --single-file PATH``: resolve ``path`` (``resolve_source``), convert and write."""
    return write(resolve_source(path), out, precision)


def run_file_name(out_dir: str | Path) -> str:
    """The file ``--save_single_file`` writes in the output folder: ``<folder name>.safetensors``."""
    return f"{Path(out_dir).absolute().name}{SUFFIX}"


def write_for_run(out_dir: Path, *, base_dir: Path, spec: Any, steps: int) -> Path:
    """``--save_single_file``: the just-written pipeline ``out_dir`` as ``out_dir/<name>.safetensors``; a component
    the folder lacks (``--skip_save_text_encoder``) is the base's."""
    out_dir = Path(out_dir).absolute()
    source = Source(pipeline_dir=out_dir, kind="output", steps=steps,
                    base_model=str(spec.model.pretrained_model_name_or_path or base_dir),
                    default_out=out_dir / run_file_name(out_dir), fallback=Path(base_dir), variant=spec.model.variant)
    return write(source, precision=spec.checkpointing.save_precision)


def check_spec(spec: Any) -> None:
    """Refuse ``--save_single_file`` for a DeepFloyd IF run before anything trains (reads model_index.json)."""
    from jaxbooth import pipelines

    if not spec.checkpointing.save_single_file:
        return
    family_name = spec.model.model_family
    if family_name == "auto":
        detected = pipelines.detected_family(spec)
        family_name = detected[0] if detected else "sd"
    if family_name == "deepfloyd_if":
        raise JaxboothError(f"--save_single_file: {IF_REFUSAL}.")
