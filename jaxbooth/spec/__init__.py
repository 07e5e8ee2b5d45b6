"""The run spec: one typed, frozen description of a DreamBooth run that drives both backends.

A package by concern, all re-exported here so ``from jaxbooth import spec as spec_lib;
spec_lib.X`` works for every public name:

  schema        the nested frozen dataclasses (field names are diffusers' flag names), FIELDS, SECTIONS
  presets       SCRIPT_PRESETS: the other diffusers scripts' defaults, selected by script name
  coercion      typing a raw value as its field; get_flat / replace_flat
  command_line  the argparse command line built from FIELDS, and ``--help``
  loading       load_spec (command line + YAML), load_spec_from_dict, write_resolved_spec
  validation    validate_spec: cross-key rules, every problem reported at once
  derived       scaled LR, total steps, mesh shape...: computed from the spec, never written back

It imports only the standard library and yaml: never jax, torch, flax, transformers or
diffusers, so the CLI can validate a run before any framework loads. The backend capability
table and ``backend: auto`` routing live in ``jaxbooth.capabilities``, which imports
``jaxbooth.spec.schema``; its names re-exported here (``check_backend``, ``choose_backend``,
``DeviceInfo``) are looked up on first use, so either module may be imported first.

Defaults are those of diffusers' ``examples/dreambooth/train_dreambooth.py`` (main, 58eb52c).
Flags that exist only in ``train_dreambooth_flax.py`` (v0.39.0) or the LoRA / SDXL scripts are
fields too; where such a script's default differs, ``SCRIPT_PRESETS`` holds it, so
``jaxbooth train train_dreambooth_lora.py ARGS`` behaves like that script.
"""

from __future__ import annotations

from typing import Any

from jaxbooth.spec.coercion import get_flat, replace_flat
from jaxbooth.spec.command_line import CommandLine, HelpRequested, format_help, parse_command_line
from jaxbooth.spec.derived import (
    checkpoint_every_steps,
    effective_batch_size,
    effective_learning_rate,
    effective_text_encoder_learning_rate,
    lora_scale_alpha,
    mesh_shape,
    num_update_steps_per_epoch,
    total_train_epochs,
    total_train_steps,
    vae_name_or_path,
    validation_schedule,
)
from jaxbooth.spec.loading import (
    given_keys,
    load_spec,
    load_spec_from_dict,
    load_spec_with_keys,
    shareable_spec_dict,
    spec_to_dict,
    without_hub_token,
    write_resolved_spec,
)
from jaxbooth.spec.presets import SCRIPT_PRESETS, script_name
from jaxbooth.spec.schema import FIELDS, SECTIONS, FieldInfo, RunSpec, default_flat
from jaxbooth.spec.validation import LORA_ONLY_KEYS, SpecWarning, validate_spec

__all__ = [
    "RunSpec", "DeviceInfo", "FieldInfo", "FIELDS", "SECTIONS", "SCRIPT_PRESETS", "SpecWarning",
    "load_spec", "load_spec_from_dict", "validate_spec", "spec_to_dict", "write_resolved_spec",
    "get_flat", "replace_flat", "default_flat", "check_backend", "choose_backend",
    "effective_learning_rate", "effective_text_encoder_learning_rate", "effective_batch_size",
    "num_update_steps_per_epoch", "total_train_steps", "total_train_epochs", "mesh_shape",
    "vae_name_or_path", "checkpoint_every_steps", "validation_schedule", "lora_scale_alpha",
    # added with the package split
    "given_keys", "load_spec_with_keys", "parse_command_line", "CommandLine", "HelpRequested", "format_help",
    "script_name", "LORA_ONLY_KEYS", "shareable_spec_dict", "without_hub_token",
]

_FROM_CAPABILITIES = frozenset({"DeviceInfo", "check_backend", "choose_backend"})


def __getattr__(name: str) -> Any:
    """``spec_lib.check_backend`` and friends, resolved lazily: capabilities imports this package."""
    if name in _FROM_CAPABILITIES:
        from jaxbooth import capabilities

        return getattr(capabilities, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
