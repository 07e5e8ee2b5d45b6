"""Cross-key validation of a RunSpec: diffusers' parse_args checks plus jaxbooth's own.

``validate_spec`` reports every problem at once, each naming the key, the value, where it
was set and the fix. Errors raise; warnings (legal but probably unintended) are returned
for the loader to log. Checks that need devices are in ``derived.mesh_shape`` and
``capabilities.choose_backend``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

from jaxbooth.errors import JaxboothError
from jaxbooth.spec.schema import FIELDS, LoraSection, RunSpec


class SpecWarning(UserWarning):
    """A spec that loads but is probably not what the user meant (kept for callers that name it;
    such warnings are now logged on the ``jaxbooth`` logger, not issued with ``warnings``)."""


# name -> (lower bound, inclusive?) for numeric keys; None values (unset) are not checked.
_LOWER_BOUNDS: Mapping[str, tuple[float, bool]] = types.MappingProxyType({
    **dict.fromkeys(["train_batch_size", "sample_batch_size", "num_train_epochs", "max_train_steps",
                     "gradient_accumulation_steps", "checkpointing_steps", "checkpoints_total_limit",
                     "save_steps", "validation_steps", "validation_epochs", "num_validation_images",
                     "num_class_images", "lr_num_cycles", "log_every_steps", "repeats", "rank",
                     "tokenizer_max_length", "fsdp_parallelism", "num_processes"], (1, True)),
    **dict.fromkeys(["seed", "lr_warmup_steps", "dataloader_num_workers", "process_id", "prior_loss_weight",
                     "adam_weight_decay", "adam_weight_decay_text_encoder", "adam_beta1", "adam_beta2",
                     "lora_dropout", "prodigy_beta3"], (0, True)),
    **dict.fromkeys(["learning_rate", "text_encoder_lr", "lr_power", "adam_epsilon", "max_grad_norm",
                     "snr_gamma", "lora_alpha"], (0, False)),
    "resolution": (8, True),
    "local_rank": (-1, True),
})
# The LoRA section's options other than the switch itself: they need LoRA mode.
LORA_ONLY_KEYS = tuple(f.name for f in dataclasses.fields(LoraSection) if f.name != "use_lora")
_BELOW_ONE = frozenset({"adam_beta1", "adam_beta2", "lora_dropout", "prodigy_beta3"})


class _Report:
    """Collects every problem so one run of the CLI shows all of them, each with its source."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]):
        self.values, self.sources = values, sources
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def at(self, name: str, *, quote: bool = True) -> str:
        """``--key=value`` or ``run.yaml:3: optim.key=value``: where the user wrote it."""
        value = self.values[name]
        return f"{self.sources.get(name, '--' + name)}={value!r}" if quote else \
            f"{self.sources.get(name, '--' + name)}={value}"

    def is_set(self, name: str) -> bool:
        return self.values[name] != FIELDS[name].default


def validate_spec(spec: RunSpec, sources: Mapping[str, str] | None = None) -> list[str]:
    """Cross-key rules (diffusers' parse_args checks and ours); returns warnings, raises on errors.

    ``sources`` maps flat names to where they were set, for messages; load_spec passes it.
    Checks that need the devices are in ``mesh_shape`` and ``capabilities.choose_backend``.
    """
    report = _Report(spec.flat(), sources or {})
    for check in (_check_ranges, _check_prior, _check_lr_scheduler, _check_schedule, _check_conflicts,
                  _check_multihost, _check_lora_mode, _check_inert, _check_dataset_config):
        check(report)
    if len(report.errors) == 1:
        raise JaxboothError(report.errors[0])
    if report.errors:
        raise JaxboothError(f"{len(report.errors)} problems in the run spec:\n  - "
                            + "\n  - ".join(report.errors))
    return report.warnings


def _check_ranges(r: _Report) -> None:
    for name, (low, inclusive) in _LOWER_BOUNDS.items():
        value = r.values[name]
        if value is None:
            continue
        high_ok = name not in _BELOW_ONE or value < 1
        if (value >= low if inclusive else value > low) and high_ok:
            continue
        rule = f"{'>=' if inclusive else '>'} {low}" + (" and < 1" if name in _BELOW_ONE else "")
        default = FIELDS[name].default
        fix = f"the default is {default}" if default is not None else "or leave it unset"
        r.errors.append(f"{r.at(name)}: must be {rule}; {fix}")
    if r.values["seed"] is not None and r.values["seed"] >= 2**32:  # numpy's seed range, which diffusers uses too
        r.errors.append(f"{r.at('seed')}: must be < 2**32; pick a smaller seed")
    resolution = r.values["resolution"]
    if resolution % 8:
        r.errors.append(f"{r.at('resolution')}: not divisible by 8 (the VAE downsamples by 8); "
                        f"use {resolution // 8 * 8} or {(resolution // 8 + 1) * 8}")
    if r.values["data_parallelism"] == 0 or r.values["data_parallelism"] < -1:
        r.errors.append(f"{r.at('data_parallelism')}: must be -1 (all devices left after fsdp) or >= 1")


def _check_prior(r: _Report) -> None:
    """diffusers: prior preservation needs both class keys; class keys alone are only a warning."""
    v = r.values
    if v["dataset_config"] is not None:  # its is_reg subsets are the class images (_check_dataset_config)
        return
    if v["with_prior_preservation"]:
        for name, example in (("class_data_dir", "class_images"), ("class_prompt", "a photo of dog")):
            if v[name] is None:
                r.errors.append(f"--with_prior_preservation needs --{name}, which is not set; "
                                f"add e.g. --{name}=\"{example}\" or drop --with_prior_preservation")
    else:
        for name in ("class_data_dir", "class_prompt"):
            if v[name] is not None:
                r.warnings.append(f"{r.at(name)} has no effect without --with_prior_preservation; "
                                  "add that flag to use class images")


def _check_dataset_config(r: _Report) -> None:
    """``--dataset_config`` replaces the image-folder flags, and its file is checked now (structure, keys
    with their lines), before anything loads; its folders are scanned later, by ``instance_dataset``."""
    v = r.values
    if v["dataset_config"] is None:
        return
    for name in ("instance_data_dir", "dataset_name", "class_data_dir"):
        if v[name] is not None:
            r.errors.append(f"{r.at('dataset_config')} and {r.at(name)}: the config file's subsets are the images "
                            f"(its is_reg ones the class images); drop --{name} or add it to the file as a "
                            "[[datasets.subsets]] image_dir")
    from jaxbooth.data.dataset_config import check_file

    try:
        check_file(v["dataset_config"])
    except JaxboothError as error:
        r.errors.append(str(error))


def _check_lr_scheduler(r: _Report) -> None:
    """piecewise_constant is one of diffusers' get_scheduler names, but it needs step rules that
    no DreamBooth script passes (it fails there too)."""
    if r.values["lr_scheduler"] == "piecewise_constant":
        working = ", ".join(c for c in FIELDS["lr_scheduler"].choices or () if c != "piecewise_constant")
        r.errors.append(f"{r.at('lr_scheduler', quote=False)}: needs step rules (diffusers' get_scheduler "
                        f"step_rules) that no DreamBooth script passes, so it fails in diffusers too; "
                        f"use one of {working}")


def _check_schedule(r: _Report) -> None:
    """One unit per duration: steps win over epochs (diffusers); the two validation cadences clash."""
    v = r.values
    if v["max_train_steps"] is not None and r.is_set("num_train_epochs"):
        r.warnings.append(f"{r.at('num_train_epochs')} is ignored because {r.at('max_train_steps')} "
                          "is set (as in diffusers, steps win); drop one of them")
    if v["validation_epochs"] is not None and r.is_set("validation_steps"):
        r.errors.append(f"{r.at('validation_epochs')} and {r.at('validation_steps')} both set the "
                        "validation cadence; keep one")
    if v["save_steps"] is not None and r.is_set("checkpointing_steps") \
            and v["save_steps"] != v["checkpointing_steps"]:
        r.errors.append(f"{r.at('save_steps')} and {r.at('checkpointing_steps')} both set the "
                        "checkpoint cadence; keep --checkpointing_steps")


def _check_conflicts(r: _Report) -> None:
    v = r.values
    if v["train_text_encoder"] and v["pre_compute_text_embeddings"]:
        r.errors.append("--train_text_encoder cannot be used with --pre_compute_text_embeddings "
                        "(precomputed embeddings freeze the text encoder); drop one")
    if v["dataset_name"] is not None and v["instance_data_dir"] is not None:
        r.errors.append(f"{r.at('dataset_name')} and {r.at('instance_data_dir')}: give only one "
                        "source of instance images")
    if v["report_to"] in ("wandb", "all") and v["hub_token"] is not None:
        r.errors.append(f"{r.at('report_to')} with --hub_token would log your token to the tracker; "
                        "drop --hub_token and run `hf auth login` instead")
    if v["use_8bit_adam"] and v["optimizer"] != "adamw":
        r.errors.append(f"--use_8bit_adam is an AdamW variant but {r.at('optimizer')}; "
                        "drop --use_8bit_adam or use --optimizer=adamw")
    if v["do_edm_style_training"] and v["snr_gamma"] is not None:  # diffusers' SDXL script raises the same
        r.errors.append(f"{r.at('do_edm_style_training')} with {r.at('snr_gamma')}: Min-SNR weighting is not "
                        "supported with EDM-style training (as in diffusers' SDXL script); drop one")
    vae_a, vae_b = v["pretrained_vae_name_or_path"], v["pretrained_vae_model_name_or_path"]
    if vae_a is not None and vae_b is not None and vae_a != vae_b:
        r.errors.append(f"{r.at('pretrained_vae_name_or_path')} and "
                        f"{r.at('pretrained_vae_model_name_or_path')} name different VAEs; keep one")


def _check_multihost(r: _Report) -> None:
    """jax.distributed needs address, count and id together, or none of them (auto-detect)."""
    v = r.values
    keys = ("coordinator_address", "num_processes", "process_id")
    given = [k for k in keys if v[k] is not None]
    if given and len(given) < len(keys):
        missing = ", ".join(f"--{k}" for k in keys if v[k] is None)
        r.errors.append(f"{', '.join(r.at(k) for k in given)}: multi-host setup also needs {missing}; "
                        "set all three or none (Cloud TPU and SLURM are auto-detected)")
    elif given and v["process_id"] >= v["num_processes"]:
        r.errors.append(f"{r.at('process_id')}: must be < {r.at('num_processes')}")


def _check_lora_mode(r: _Report) -> None:
    """LoRA options outside LoRA mode would be accepted and ignored: refuse them, naming the mode."""
    if r.values["use_lora"]:
        _check_lora_outputs(r)
        return
    given = [name for name in LORA_ONLY_KEYS if r.is_set(name)]
    if given:
        options = ", ".join(r.at(name) for name in given)
        r.errors.append(f"{options} {'is a LoRA option' if len(given) == 1 else 'are LoRA options'}, but LoRA "
                        "mode is off; use `jaxbooth train train_dreambooth_lora.py ...` or --use_lora")


def _check_lora_outputs(r: _Report) -> None:
    """LoRA-mode combinations whose output could not be what was asked for."""
    v = r.values
    if v["use_dora"] and v["output_kohya_format"]:
        r.errors.append(f"{r.at('output_kohya_format')} with {r.at('use_dora')}: kohya's LoRA format has no DoRA "
                        "magnitudes; drop one (the diffusers file pytorch_lora_weights.safetensors holds DoRA)")
    if v["skip_save_text_encoder"] and not v["merge_lora_into_pipeline"]:
        r.errors.append(f"{r.at('skip_save_text_encoder')}: a LoRA output holds no text encoder (only adapters); "
                        "it applies with --merge_lora_into_pipeline, which also writes a full pipeline")


# Keys that only act together with another one (as in diffusers, which ignores them quietly):
# key -> (is the gate open?, what opens it). Set while the gate is closed, they draw a warning.
_GATES: Mapping[str, tuple[Callable[[Mapping[str, Any]], bool], str]] = types.MappingProxyType({
    **dict.fromkeys(["prior_loss_weight", "num_class_images", "sample_batch_size", "prior_generation_precision"],
                    (lambda v: v["with_prior_preservation"] or v["dataset_config"] is not None,
                     "without --with_prior_preservation")),
    **dict.fromkeys(["text_encoder_lr", "adam_weight_decay_text_encoder"],
                    (lambda v: v["train_text_encoder"], "without --train_text_encoder")),
    "lr_warmup_steps": (lambda v: v["lr_scheduler"] != "constant" or v["lr_warmup_steps"] == 0,
                        "with --lr_scheduler=constant (use constant_with_warmup)"),
    "lr_num_cycles": (lambda v: v["lr_scheduler"] == "cosine_with_restarts",
                      "unless --lr_scheduler=cosine_with_restarts"),
    "lr_power": (lambda v: v["lr_scheduler"] == "polynomial", "unless --lr_scheduler=polynomial"),
    **dict.fromkeys(["num_validation_images", "validation_steps", "validation_epochs", "validation_scheduler",
                     "validation_images"],
                    (lambda v: v["validation_prompt"] is not None, "without --validation_prompt")),
    "sample_prompts": (lambda v: v["sample_every_n_steps"] is not None or v["sample_every_n_epochs"] is not None,
                       "without --sample_every_n_steps or --sample_every_n_epochs (as in kohya, which samples "
                       "only when one is set); add one of them"),
    "sample_every_n_steps": (lambda v: v["sample_prompts"] is not None and v["sample_every_n_epochs"] is None,
                             "without --sample_prompts, or with --sample_every_n_epochs (which wins, as in kohya)"),
    "sample_every_n_epochs": (lambda v: v["sample_prompts"] is not None, "without --sample_prompts"),
    "hub_model_id": (lambda v: v["push_to_hub"], "without --push_to_hub"),
    **dict.fromkeys(["dataset_config_name", "image_column", "caption_column"],
                    (lambda v: v["dataset_name"] is not None, "without --dataset_name")),
    "logging_dir": (lambda v: v["report_to"] != "none", "with --report_to=none"),
    **dict.fromkeys(["min_bucket_reso", "max_bucket_reso"],
                    (lambda v: v["enable_bucket"] and not v["bucket_no_upscale"],
                     "without --enable_bucket, or with --bucket_no_upscale (each image's bucket comes from its size)")),
    **dict.fromkeys(["bucket_reso_steps", "bucket_no_upscale"],
                    (lambda v: v["enable_bucket"], "without --enable_bucket")),
    "multires_noise_discount": (lambda v: v["multires_noise_iterations"] > 0, "without --multires_noise_iterations"),
    **dict.fromkeys(["huber_schedule", "huber_c"],
                    (lambda v: v["loss_type"] != "l2", "with --loss_type=l2 (use huber or smooth_l1)")),
    "ema_decay": (lambda v: v["use_ema"], "without --use_ema"),
    **dict.fromkeys(["keep_tokens", "caption_separator"],
                    (lambda v: v["shuffle_caption"] or v["dataset_config"] is not None, "without --shuffle_caption")),
    "remat_policy": (lambda v: v["gradient_checkpointing"], "without --gradient_checkpointing"),
    "encoding_cache_dir": (lambda v: v["cache_latents_to_disk"] or v["cache_text_embeddings_to_disk"],
                           "without --cache_latents_to_disk or --cache_text_embeddings_to_disk"),
    "cache_latents_to_disk": (lambda v: v["cache_latents"], "with --cache_latents=false (latents are encoded "
                                                            "every step, never cached)"),
    "cache_text_embeddings_to_disk": (lambda v: not v["train_text_encoder"], "with --train_text_encoder (a "
                                      "trained encoder's embeddings change every step, so none are cached)"),
    **dict.fromkeys(["prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup"],
                    (lambda v: v["optimizer"] == "prodigy", "unless --optimizer=prodigy")),
    "save_precision": (lambda v: v["save_single_file"], "without --save_single_file"),
    **dict.fromkeys(["adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay"],
                    (lambda v: v["optimizer"] != "adafactor", "with --optimizer=adafactor (optax's adafactor "
                                                               "has its own decay rates)")),
})
_LION_IGNORES = "adam_epsilon"


def _check_inert(r: _Report) -> None:
    """Options that only matter together with another one: say so instead of ignoring silently.

    Only keys the user set (a flag or a config file): a script preset's defaults never warn.
    """
    v = r.values
    for name, (gate_open, why) in _GATES.items():
        if r.is_set(name) and not gate_open(v) and not r.sources.get(name, "").startswith("preset "):
            r.warnings.append(f"{r.at(name)} has no effect {why}")
    if v["optimizer"] == "lion" and r.is_set(_LION_IGNORES) and not r.sources.get(_LION_IGNORES, "").startswith(
            "preset "):
        r.warnings.append(f"{r.at(_LION_IGNORES)} has no effect with --optimizer=lion (lion has no epsilon)")
