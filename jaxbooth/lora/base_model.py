"""`jaxbooth generate`'s lookups shared by both backends: which LoRA file a path names, the base model a LoRA
records, and which pipeline class a generation will sample.

A LoRA output carries no weights of its base; diffusers users pass the base themselves. jaxbooth finds it
from ``--pretrained_model_name_or_path``, else from what the LoRA's folder records (the resolved run spec,
a checkpoint's marker, the model card's ``base_model``). The CLI reads the sampled pipeline's class from
``model_index.json`` alone (no weights) to pick the backend: DeepFloyd IF samples on torch, SD/SDXL on JAX.
Framework-free (stdlib, yaml); never jax or torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from jaxbooth.errors import JaxboothError
from jaxbooth.lora import files as lora_files

BASE_FLAG = "--pretrained_model_name_or_path"


class BaseModel(NamedTuple):
    name: str
    origin: str
    """Where the name came from, for messages: the flag or the file it was read from."""
    revision: str | None = None
    variant: str | None = None


def lora_file_of(path: Path) -> Path | None:
    """The LoRA file ``path`` names: a ``.safetensors`` file itself, or the LoRA file of a folder
    without model_index.json (a LoRA output or checkpoint); None otherwise."""
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    if not path.is_dir() or (path / "model_index.json").is_file():
        return None
    for name in (lora_files.LORA_WEIGHTS_NAME, lora_files.KOHYA_WEIGHTS_NAME):
        if (path / name).is_file():
            return path / name
    return None


def _read_structured(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".md":  # a model card: the YAML front matter between the first two '---' lines
            parts = text.split("---", 2)
            text = parts[1] if len(parts) == 3 and not parts[0].strip() else ""
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise JaxboothError(f"{path}: cannot be read ({error}) while looking for the LoRA's base model. Fix: "
                            f"repair the file, or pass the base model as {BASE_FLAG}.") from None


def _base_from_files(folder: Path) -> BaseModel | None:
    """The base model a LoRA folder records: the resolved run spec, a checkpoint's marker, the model card."""
    from jaxbooth.checkpoints import MARKER
    from jaxbooth.output import SPEC_FILENAME

    for name in (SPEC_FILENAME, MARKER, "README.md"):
        path = folder / name
        if not path.is_file():
            continue
        data = _read_structured(path)
        if name == MARKER and isinstance(data, dict):
            data = data.get("spec")
        if name != "README.md" and isinstance(data, dict) and isinstance(data.get("model"), dict):
            model = data["model"]
            if model.get("pretrained_model_name_or_path"):
                return BaseModel(str(model["pretrained_model_name_or_path"]), str(path),
                                 model.get("revision"), model.get("variant"))
        if name == "README.md" and isinstance(data, dict) and data.get("base_model"):
            base = data["base_model"]
            return BaseModel(str(base[0] if isinstance(base, list) else base), str(path))
    return None


def find_base_model(lora_file: Path, given: str | None) -> BaseModel:
    """The flag if given, else what the LoRA's folder records; none -> an error naming the flag."""
    if given:
        return BaseModel(given, BASE_FLAG)
    found = _base_from_files(lora_file.parent)
    if found is None:
        raise JaxboothError(
            f"{lora_file}: no base model found for this LoRA (looked for jaxbooth_run.yaml, a checkpoint marker and "
            f"a README.md with base_model: in {lora_file.parent}). Fix: pass the pipeline it was trained on as "
            f"{BASE_FLAG} (a diffusers folder or Hub id).")
    return found


def _resolve_base(base: BaseModel, subfolders: Sequence[str] | None = None) -> Path:
    """The base's local folder (``subfolders``: what ``hub.resolve_model_dir`` fetches of a Hub id; None: the
    usual components); an unloadable recorded base -> an error saying where the name came from."""
    from jaxbooth.hub import resolve_model_dir

    try:
        return Path(resolve_model_dir(base.name, revision=base.revision, variant=base.variant, subfolders=subfolders))
    except JaxboothError as error:
        if base.origin == BASE_FLAG:
            raise
        raise JaxboothError(f"the LoRA's base model {base.name!r} (read from {base.origin}) cannot be loaded: "
                            f"{error}\nFix: pass where it is now as {BASE_FLAG}.") from None


def not_a_model_file(name: str) -> JaxboothError:
    """The error for a file that is neither a LoRA file nor (being a file) a pipeline."""
    return JaxboothError(f"{name}: not a LoRA .safetensors file, and a file is not a pipeline. Fix: pass a LoRA "
                         "file, a LoRA output folder or a diffusers pipeline folder.")


def _plain_pipeline_errors(name: str, folder: Path, *, base: str | None, lora_scale: float | None) -> None:
    lora_here = folder / lora_files.LORA_WEIGHTS_NAME
    hint = (f" This folder also holds its LoRA: pass {lora_here} to sample the adapters at another scale."
            if lora_here.is_file() else "")
    if not (folder / "model_index.json").is_file():
        raise JaxboothError(f"{name}: no LoRA file ({lora_files.LORA_WEIGHTS_NAME}) and no model_index.json in "
                            f"{folder}. Fix: pass a LoRA output folder, a LoRA .safetensors file or a pipeline.")
    if lora_scale is not None:
        raise JaxboothError(f"{name} is a full pipeline (it has model_index.json): its weights are used as they "
                            "are, with no adapters to scale, so --lora_scale does not apply. Fix: drop --lora_scale, "
                            f"or pass a LoRA output folder or .safetensors file.{hint}")
    if base is not None:
        raise JaxboothError(f"{name} is a full pipeline (it has model_index.json), its own base: {BASE_FLAG} names "
                            "the base model of a LoRA only. Fix: drop the flag, or pass a LoRA output folder or "
                            f".safetensors file.{hint}")


def sampled_pipeline_class(model_dir: str, base: str | None) -> str:
    """The ``_class_name`` ``jaxbooth generate MODEL_DIR`` samples: a pipeline folder's (or Hub id's) own, or, for
    a LoRA (folder or file), its base's. Reads ``model_index.json`` only (a Hub id fetches nothing else), so the
    CLI can pick the backend before any weight loads; errors as ``generate`` itself would raise them."""
    from jaxbooth import pipelines
    from jaxbooth.hub import resolve_model_dir

    path = Path(model_dir).expanduser()
    lora_file = lora_file_of(path)
    if lora_file is not None:
        folder = _resolve_base(find_base_model(lora_file, base), subfolders=[])
    elif path.is_file():
        raise not_a_model_file(model_dir)
    else:
        folder = Path(resolve_model_dir(model_dir, subfolders=[]))
        if not (folder / "model_index.json").is_file():
            _plain_pipeline_errors(model_dir, folder, base=None, lora_scale=None)
    return pipelines.pipeline_class(folder)
