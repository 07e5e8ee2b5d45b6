"""Which diffusers pipeline classes each backend trains, checked from ``model_index.json`` alone.

Both backends refuse a pipeline they cannot train before any weight is downloaded or loaded,
with one message that names the class, the file, and the backend that trains it (or that none
does yet). The CLI reads the same file to route ``backend: auto`` (``detected_family``): a
DeepFloyd IF pipeline goes to torch, the only backend with an IF UNet. The table is data, like
the capability table; framework-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxbooth import hub
from jaxbooth.errors import JaxboothError

TRAINED_BY: dict[str, tuple[str, ...]] = {
    "jax": ("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
    "torch": ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "IFPipeline", "IFSuperResolutionPipeline"),
}
# The families diffusers' DreamBooth scripts train, by pipeline class, for messages.
FAMILY_NAMES = {
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusionXLPipeline": "SDXL",
    "IFPipeline": "DeepFloyd IF stage I",
    "IFSuperResolutionPipeline": "DeepFloyd IF stage II",
}


def pipeline_class(model_dir: str | Path) -> str:
    """``_class_name`` of ``model_dir/model_index.json``, or an error naming the file and the fix."""
    index = Path(model_dir) / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except FileNotFoundError:
        raise JaxboothError(f"{index}: not found; --pretrained_model_name_or_path must be a diffusers pipeline "
                            "folder (one written by DiffusionPipeline.save_pretrained) or its Hub id") from None
    except (OSError, ValueError, AttributeError) as error:
        raise JaxboothError(f"{index}: cannot be read as a JSON object ({error}); re-download the model") from None
    return str(name)


def backends_training(name: str) -> list[str]:
    return [backend for backend, names in TRAINED_BY.items() if name in names]


def refuse_untrainable_pipeline(model_dir: str | Path, backend: str, model_family: str = "auto") -> str:
    """The pipeline class, if ``backend`` trains it and it is of ``model_family`` (``auto``: any);
    else an error naming it and who trains it (DeepFloyd IF on jax: ``--backend=torch``), or the family it is."""
    name = pipeline_class(model_dir)
    if name in TRAINED_BY[backend]:
        check_family(name, model_family, model_dir)
        return name
    index = Path(model_dir) / "model_index.json"
    what = f"a {FAMILY_NAMES[name]} pipeline" if name in FAMILY_NAMES else "not a pipeline class jaxbooth knows"
    others = backends_training(name)
    known = ", ".join(FAMILY_NAMES.values())
    who = (f"use --backend={others[0]}" if others
           else f"no backend trains {name}; point --pretrained_model_name_or_path at a pipeline of a family "
                f"jaxbooth trains ({known})")
    raise JaxboothError(f"{index}: _class_name={name} is {what}, which the {backend} backend does not train; {who}")


# model_family values and the pipeline classes of each (``auto`` takes the class model_index.json names).
FAMILY_CLASSES = {
    "sd": ("StableDiffusionPipeline",),
    "sdxl": ("StableDiffusionXLPipeline",),
    "deepfloyd_if": ("IFPipeline", "IFSuperResolutionPipeline"),
}


def check_family(name: str, model_family: str, model_dir: str | Path) -> None:
    """A set ``model_family`` (the SDXL script's preset sets ``sdxl``) must match the pipeline's class."""
    if model_family == "auto" or name in FAMILY_CLASSES.get(model_family, (name,)):
        return
    actual = next((family for family, names in FAMILY_CLASSES.items() if name in names), None)
    fix = f"drop --model_family or set it to {actual}" if actual else "drop --model_family"
    if model_family == "sdxl":
        fix += " (train_dreambooth_lora_sdxl.py sets sdxl: use train_dreambooth_lora.py for this pipeline)"
    raise JaxboothError(f"{Path(model_dir) / 'model_index.json'}: _class_name={name} is not a "
                        f"{FAMILY_NAMES[FAMILY_CLASSES[model_family][0]]} pipeline, but model_family={model_family}; "
                        f"{fix}, or point --pretrained_model_name_or_path at a {model_family} pipeline")


def family_of(class_name: str) -> str | None:
    """The ``model_family`` value of a pipeline class (``IFPipeline`` -> ``deepfloyd_if``); None if unknown."""
    return next((family for family, names in FAMILY_CLASSES.items() if class_name in names), None)


def detected_family(spec: Any) -> tuple[str, Path] | None:
    """(family, folder holding model_index.json) of the spec's base model, read from that file alone.

    For ``backend: auto``, before a backend is picked: a Hub id fetches ``model_index.json`` only
    (as both backends' load phase does first). None when no model is given (the built-in tiny SD
    model) or the class is none jaxbooth knows (the backend's load then refuses it by name).
    """
    m = spec.model
    if m.pretrained_model_name_or_path is None:
        return None
    index_dir = hub.resolve_model_dir(m.pretrained_model_name_or_path, subfolders=[], revision=m.revision,
                                      token=spec.hub.hub_token, cache_dir=spec.data.cache_dir)
    family = family_of(pipeline_class(index_dir))
    return None if family is None else (family, Path(index_dir))


def family_source(model_dir: str | Path) -> str:
    """Where a detected family comes from, for the ``backend: auto`` reason:
    ``<dir>/model_index.json names IFPipeline (DeepFloyd IF stage I)``."""
    name = pipeline_class(model_dir)
    what = f" ({FAMILY_NAMES[name]})" if name in FAMILY_NAMES else ""
    return f"{Path(model_dir) / 'model_index.json'} names {name}{what}"
