"""Script modes: the defaults of each diffusers DreamBooth script, selected by its name.

``jaxbooth train train_dreambooth_lora.py ARGS`` (or ``--preset``) starts from that script's
defaults where they differ from ``train_dreambooth.py``, so a user's command line for it means
what it meant there; the LoRA scripts also switch LoRA mode on. ``tests/test_cli_help.py`` holds
every default of the four scripts and checks the presets reproduce them.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from jaxbooth.errors import JaxboothError
from jaxbooth.spec.coercion import Item, coerce
from jaxbooth.spec.schema import FIELDS

# Defaults of the other diffusers DreamBooth scripts where they differ from train_dreambooth.py.
SCRIPT_PRESETS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({
    "train_dreambooth.py": {},
    "train_dreambooth_flax.py": {"output_dir": "text-inversion-model", "seed": 0, "mixed_precision": "no"},
    "train_dreambooth_lora.py": {
        "use_lora": True, "output_dir": "lora-dreambooth-model", "learning_rate": 5e-4,
        "validation_epochs": 50, "image_interpolation_mode": "lanczos"},
    "train_dreambooth_lora_sdxl.py": {
        "use_lora": True, "model_family": "sdxl", "output_dir": "lora-dreambooth-model",
        "resolution": 1024, "learning_rate": 1e-4, "text_encoder_lr": 5e-6, "adam_weight_decay": 1e-4,
        "adam_weight_decay_text_encoder": 1e-3, "validation_epochs": 50,
        "image_interpolation_mode": "lanczos"},
})

# One line per script for `jaxbooth train --help`.
SCRIPT_MODES: Mapping[str, str] = types.MappingProxyType({
    "train_dreambooth.py": "full fine-tune (the default)",
    "train_dreambooth_flax.py": "full fine-tune with the Flax script's defaults (seed 0, fp32)",
    "train_dreambooth_lora.py": "LoRA mode, that script's defaults (lr 5e-4, lanczos resize, ...)",
    "train_dreambooth_lora_sdxl.py": "SDXL LoRA mode, that script's defaults (1024 px, lr 1e-4, ...)",
})


def script_name(text: str, *, what: str = "script") -> str:
    """The ``SCRIPT_PRESETS`` key for a script given by name or path, with or without ``.py``."""
    name = PurePath(text).name
    if not name.endswith(".py"):
        name += ".py"
    if name not in SCRIPT_PRESETS:
        close = difflib.get_close_matches(name, list(SCRIPT_PRESETS), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise JaxboothError(f"unknown {what} {text!r}{hint}; expected one of the diffusers DreamBooth scripts "
                            f"{', '.join(SCRIPT_PRESETS)} (a path to one is fine)")
    return name


def preset_items(preset: str | None) -> list[Item]:
    """What a script preset sets, typed; ``preset`` is a name accepted by ``script_name``."""
    if preset is None:
        return []
    name = script_name(preset, what="preset")
    where = f"preset {name}"
    return [(key, coerce(FIELDS[key], value, where), where) for key, value in SCRIPT_PRESETS[name].items()]
