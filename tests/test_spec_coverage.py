"""Every run-spec key is honest on every backend: it changes what the run does, or it is refused.

``ACCOUNT`` says, for each key of ``jaxbooth.spec.FIELDS`` and each backend, how the key is
accounted for:

* ``Effect``: a probe (tests/_coverage_probes.py for jax, tests/_coverage_torch.py for torch)
  runs the backend's own phase functions on the base spec and on the spec with the key
  changed, and the results must differ. ``context`` holds keys set in both specs (the ones
  the key only matters with, as in diffusers);
* ``Refused``: ``capabilities.check_backend`` rejects the value before any model loads, with a
  message naming the key (or the key that gates it, e.g. ``--use_lora`` for ``--rank``);
* ``SpecRejects``: spec validation rejects the key when its gate is off;
* ``Warned``: the key is inert in that context, as in diffusers, and spec validation warns
  naming it (e.g. ``--adam_beta1`` with optax's adafactor);
* ``CoveredBy``: a real training run elsewhere proves it (the test must exist and set the key);
* ``Meta``: launcher keys and keys whose behaviour is fixed on a backend, with why and a check.

A key a backend accepts and ignores gets ``xfail="SILENT: <where it should be consumed>"``:
a strict expected failure, so the case fails (XPASS) the moment the backend consumes it and
the mark must go. ``GATED`` lists keys that only matter with another one (as in diffusers):
with the gate off they must be warned about or refused, never ignored quietly.

The base spec is the default one as the CLI hands it to the backend (tests/_coverage_env.py);
the file runs in about half a minute on a CPU (no training run, no model compile but the tiny CLIP's).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from jaxbooth import capabilities
from jaxbooth import spec as spec_lib
from jaxbooth.errors import JaxboothError
from tests import _coverage_probes as jp
from tests import _coverage_torch as tp
from tests._coverage_env import CLASS_PROMPT, Env, make_spec
from tests._coverage_meta import (
    backend_dispatch,
    data_axis_follows_the_devices,
    family_must_match_the_pipeline,
    jax_always_precomputes,
)

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("jax", "torch")


@dataclasses.dataclass(frozen=True)
class Effect:
    changed: Any
    probe: Callable[[spec_lib.RunSpec, Env], Any]
    context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    also: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # set with the key (a source switch)
    xfail: str | None = None


@dataclasses.dataclass(frozen=True)
class Refused:
    value: Any
    context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    names: tuple[str, ...] = ()  # keys that gate this one; the message may name them instead
    xfail: str | None = None


@dataclasses.dataclass(frozen=True)
class SpecRejects:
    value: Any
    gate: str  # the key it needs; without it spec validation names both
    xfail: str | None = None


@dataclasses.dataclass(frozen=True)
class Warned:
    """The key is inert in this context (as in diffusers) and the spec says so: one warning naming it."""

    value: Any
    context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    xfail: str | None = None


@dataclasses.dataclass(frozen=True)
class CoveredBy:
    node: str
    xfail: str | None = None


@dataclasses.dataclass(frozen=True)
class Meta:
    why: str
    check: Callable[[Env, str], None]
    xfail: str | None = None


def both(*checks: Any) -> dict[str, tuple]:
    return {"jax": checks, "torch": checks}


def on(jax: Any, torch: Any) -> dict[str, tuple]:
    return {"jax": jax if isinstance(jax, tuple) else (jax,), "torch": torch if isinstance(torch, tuple) else (torch,)}


# ------------------------------------------------------------------ contexts (set in base and changed spec)

PRIOR = {"with_prior_preservation": True, "class_data_dir": lambda env: str(env.class_folder("a", 3)),
         "class_prompt": CLASS_PROMPT, "num_class_images": 3}
PRIOR_KEYS = {key: value for key, value in PRIOR.items() if key != "with_prior_preservation"}
TE = {"train_text_encoder": True}
OPT = {"learning_rate": 1e-3}  # so weight decay and epsilon show in float32 updates
SCHEDULE = {"max_train_steps": 10, "lr_warmup_steps": 0}
HUB = {"pretrained_model_name_or_path": jp.HUB_MODEL_ID}
DATASET = {"dataset_name": lambda env: str(env.hf_dataset), "instance_data_dir": None}
DATASET_CONFIG_JAX = "tests/test_dataset_config_train.py::test_jax_trains_the_kohya_config_with_its_captions"
DATASET_CONFIG_TORCH = "tests/test_dataset_config_train.py::test_torch_trains_the_kohya_config_with_its_captions"
LOOP = {"max_train_steps": 12}
VALID = {"validation_prompt": "a photo of sks toy on a beach"}
LORA = {"use_lora": True}
MULTIHOST = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 0}
PRODIGY = {"optimizer": "prodigy"}
HUB_TOKENIZER = {"tokenizer_name": "owner/tiny-tokenizer"}
BAD_IMAGE = {"instance_data_dir": lambda env: str(env.with_bad_image)}

# ------------------------------------------------------------------ the account

LORA_OPTIONS = {"rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.1, "use_dora": True,
                "lora_target_modules": ("to_q",), "lora_text_encoder_target_modules": ("q_proj",),
                "output_kohya_format": True, "merge_lora_into_pipeline": True}
LORA_RUN = "tests/test_lora_cli.py::with_options"  # the fixture's run sets every LoRA option
LORA_DROPOUT_TORCH = "tests/torch_backend/test_lora.py::test_lora_dropout_reaches_peft"
PRODIGY_OPTIONS = {"prodigy_beta3": 0.5, "prodigy_decouple": False, "prodigy_use_bias_correction": False,
                   "prodigy_safeguard_warmup": False}
# DeepFloyd IF (torch only): the seed's four IF command lines run on tiny IF pipelines
IF_STAGE2_INPUTS = ("tests/torch_backend/test_deepfloyd_stage2.py::"
                    "test_training_inputs_match_what_ifsuperresolutionpipeline_feeds_the_unet")
IF_STAGE2_VALIDATION = ("tests/torch_backend/test_deepfloyd_stage2.py::"
                        "test_seed_stage2_full_and_lora_outputs_load_and_upscale")
# --sample_prompts: one short run per backend (jax every n steps, torch every n epochs), the other cadence each
SAMPLES_JAX = "tests/test_sample_prompts.py::test_jax_run_samples_the_prompt_file_every_n_steps"
SAMPLES_TORCH = "tests/test_sample_prompts.py::test_torch_run_samples_the_prompt_file_every_n_epochs"
SAMPLES_JAX_EPOCHS = "tests/test_sample_prompts.py::test_jax_validator_samples_every_n_epochs"
SAMPLES_TORCH_STEPS = "tests/test_sample_prompts.py::test_torch_hook_samples_every_n_steps"
# lion reads adam_beta2 as its b2: at adam's 0.999 its momentum barely moves in eight steps, so b1 shows only at 0.9
LION_B2 = {("lion", key): {"adam_beta2": 0.9} for key in ("adam_beta1", "adam_weight_decay", "adam_epsilon")}
# value, and the jax optimizers that build without the key (optim._make_base_optimizer)
OPTIMIZER_HYPERS = {"adam_beta1": (0.5, ("adafactor",)), "adam_beta2": (0.9, ("adafactor",)),
                    "adam_weight_decay": (0.5, ("adafactor",)), "adam_epsilon": (1e-2, ("adafactor", "lion"))}


def deepfloyd_if_is_the_if_pipelines(env: Env, backend: str) -> None:
    """model_family=deepfloyd_if names IFPipeline and IFSuperResolutionPipeline: the torch backend takes it
    for them (and backend auto reads it from model_index.json), and refuses it for any other pipeline by name
    before anything loads; the IF runs of test_deepfloyd_memory.py (explicit) and the seed runs (detected)
    train what it names."""
    from jaxbooth import pipelines

    capabilities.check_backend(make_spec(env, {"model_family": "deepfloyd_if"}), backend)
    for class_name in ("IFPipeline", "IFSuperResolutionPipeline"):
        index_only = env.root / f"index-{class_name}"
        index_only.mkdir(exist_ok=True)
        (index_only / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        assert pipelines.refuse_untrainable_pipeline(index_only, backend, "deepfloyd_if") == class_name
        found = pipelines.detected_family(make_spec(env, {"pretrained_model_name_or_path": str(index_only)}))
        assert found == ("deepfloyd_if", index_only.resolve())
    with pytest.raises(JaxboothError, match="_class_name=StableDiffusionPipeline .*model_family=deepfloyd_if"):
        tp.torch_inputs(make_spec(env, {"model_family": "deepfloyd_if"}), env)


ACCOUNT: dict[str, dict[str, tuple]] = {
    "backend": both(Meta("the CLI's backend choice", backend_dispatch)),
    # model
    "pretrained_model_name_or_path": on(Effect(lambda env: str(env.tiny_copy), jp.jax_paths),
                                        Effect(lambda env: str(env.tiny_copy), tp.torch_inputs)),
    "revision": on((Effect("v1.0", jp.jax_hub, HUB), Effect("v1.0", jp.jax_tokenizer_hub, HUB_TOKENIZER)),
                   (Effect("v1.0", tp.torch_hub, HUB), Effect("v1.0", tp.torch_tokenizer_hub, HUB_TOKENIZER))),
    "variant": on(Effect("fp16", jp.jax_hub, HUB), Effect("fp16", tp.torch_hub, HUB)),
    "tokenizer_name": on(Effect(lambda env: str(env.tokenizer16), jp.jax_loaded),
                         Effect(lambda env: str(env.tokenizer16), tp.torch_trainer)),
    "pretrained_vae_name_or_path": on(Effect(lambda env: str(env.tiny_copy), jp.jax_paths),
                                      Effect(lambda env: str(env.tiny_copy), tp.torch_inputs)),
    "model_family": on(
        (Refused("deepfloyd_if"),
         Meta("'sd' and 'sdxl' must match the pipeline class", family_must_match_the_pipeline)),
        (Meta("'sd' and 'sdxl' must match the pipeline class", family_must_match_the_pipeline),
         Meta("deepfloyd_if names the IF pipelines, which torch trains", deepfloyd_if_is_the_if_pipelines),
         CoveredBy("tests/torch_backend/test_deepfloyd_memory.py::runs"))),
    "train_text_encoder": on(
        (Effect(True, jp.jax_caches), Effect(True, jp.jax_optimizer),
         CoveredBy("tests/jax_backend/test_train.py::test_prior_preservation_text_encoder_training_and_validation")),
        (Effect(True, tp.torch_optimizer),
         CoveredBy("tests/torch_backend/test_features.py::"
                   "test_prior_preservation_generates_missing_class_images_and_trains_text_encoder"))),
    "tokenizer_max_length": on(Effect(16, jp.jax_caches), Effect(16, tp.torch_trainer)),
    "text_encoder_use_attention_mask": on(Effect(True, jp.jax_caches), Effect(True, tp.torch_conditioner)),
    # data
    "instance_data_dir": on(Effect(lambda env: str(env.two_images), jp.jax_inputs),
                            Effect(lambda env: str(env.two_images), tp.torch_dataset)),
    "instance_prompt": on(Effect("a photo of zwx toy", jp.jax_inputs), Effect("a photo of zwx toy", tp.torch_dataset)),
    "resolution": on(Effect(32, jp.jax_caches), Effect(32, tp.torch_batches)),
    "center_crop": on(Effect(True, jp.jax_caches), Effect(True, tp.torch_batches)),
    "random_flip": on(Effect(True, jp.jax_caches), Effect(True, tp.torch_batches)),
    "image_interpolation_mode": on(Effect("lanczos", jp.jax_caches), Effect("lanczos", tp.torch_batches)),
    "repeats": on(Effect(3, jp.jax_inputs), Effect(3, tp.torch_dataset)),
    "dataset_name": on(Effect(lambda env: str(env.hf_dataset), jp.jax_inputs, also={"instance_data_dir": None}),
                       Effect(lambda env: str(env.hf_dataset), tp.torch_dataset, also={"instance_data_dir": None})),
    "dataset_config_name": on(Effect("other", jp.jax_inputs, DATASET), Effect("other", tp.torch_dataset, DATASET)),
    "image_column": on(Effect("image_b", jp.jax_inputs, DATASET), Effect("image_b", tp.torch_dataset, DATASET)),
    "caption_column": on(Effect("text_b", jp.jax_inputs, DATASET), Effect("text_b", tp.torch_dataset, DATASET)),
    "cache_dir": on(
        (Effect(lambda env: str(env.root / "hf-cache"), jp.jax_inputs, DATASET),
         Effect(lambda env: str(env.root / "hub-cache"), jp.jax_hub, HUB),
         Effect(lambda env: str(env.root / "hub-cache"), jp.jax_tokenizer_hub, HUB_TOKENIZER)),
        (Effect(lambda env: str(env.root / "hf-cache"), tp.torch_dataset, DATASET),
         Effect(lambda env: str(env.root / "hub-cache"), tp.torch_hub, HUB),
         Effect(lambda env: str(env.root / "hub-cache"), tp.torch_tokenizer_hub, HUB_TOKENIZER))),
    "dataloader_num_workers": on(Effect(2, jp.jax_caches), Effect(2, tp.torch_batches)),
    "skip_bad_images": on(Effect(True, jp.jax_inputs_or_error, BAD_IMAGE),
                          Effect(True, tp.torch_dataset_or_error, BAD_IMAGE)),
    # prior preservation
    "with_prior_preservation": on(
        (Effect(True, jp.jax_inputs, PRIOR_KEYS), Effect(True, jp.jax_loss, PRIOR_KEYS)),
        (Effect(True, tp.torch_dataset, PRIOR_KEYS), Effect(True, tp.torch_loss, PRIOR_KEYS))),
    "prior_loss_weight": on(Effect(0.25, jp.jax_loss, PRIOR), Effect(0.25, tp.torch_loss, PRIOR)),
    "class_data_dir": on(Effect(lambda env: str(env.class_folder("b", 3)), jp.jax_inputs, PRIOR),
                         Effect(lambda env: str(env.class_folder("b", 3)), tp.torch_dataset, PRIOR)),
    "class_prompt": on(Effect("a photo of a plush toy", jp.jax_inputs, PRIOR),
                       Effect("a photo of a plush toy", tp.torch_dataset, PRIOR)),
    "num_class_images": on(Effect(2, jp.jax_inputs, PRIOR), Effect(2, tp.torch_dataset, PRIOR)),
    "sample_batch_size": on(Effect(2, jp.jax_class_images, PRIOR), Effect(2, tp.torch_class_images, PRIOR)),
    "prior_generation_precision": on(Effect("bf16", jp.jax_class_images, PRIOR),
                                     Effect("bf16", tp.torch_class_images, PRIOR)),
    # optimization
    "seed": on((Effect(7, jp.jax_inputs), Effect(7, jp.jax_caches)),
               (Effect(7, tp.torch_inputs), Effect(7, tp.torch_batches))),
    "train_batch_size": on(Effect(2, jp.jax_inputs), Effect(2, tp.torch_batches)),
    "num_train_epochs": on(Effect(3, jp.jax_inputs), Effect(3, tp.torch_trainer)),
    "max_train_steps": on(Effect(7, jp.jax_inputs), Effect(7, tp.torch_trainer)),
    "gradient_accumulation_steps": on((Effect(2, jp.jax_optimizer), Effect(2, jp.jax_loop)),
                                      (Effect(2, tp.torch_accelerator), Effect(2, tp.torch_loop))),
    "learning_rate": on(Effect(1e-3, jp.jax_optimizer), Effect(1e-3, tp.torch_optimizer)),
    "text_encoder_lr": on(Effect(1e-2, jp.jax_optimizer, {**TE, **OPT}),
                          Effect(1e-2, tp.torch_optimizer, {**TE, **OPT})),
    "scale_lr": on(Effect(True, jp.jax_optimizer, OPT), Effect(True, tp.torch_optimizer, OPT)),
    "lr_scheduler": on(Effect("linear", jp.jax_optimizer, SCHEDULE), Effect("linear", tp.torch_optimizer, SCHEDULE)),
    "lr_warmup_steps": on(Effect(3, jp.jax_optimizer, {**SCHEDULE, "lr_scheduler": "constant_with_warmup"}),
                          Effect(3, tp.torch_optimizer, {**SCHEDULE, "lr_scheduler": "constant_with_warmup"})),
    "lr_num_cycles": on(Effect(3, jp.jax_optimizer, {**SCHEDULE, "lr_scheduler": "cosine_with_restarts"}),
                        Effect(3, tp.torch_optimizer, {**SCHEDULE, "lr_scheduler": "cosine_with_restarts"})),
    "lr_power": on(Effect(2.0, jp.jax_optimizer, {**SCHEDULE, "lr_scheduler": "polynomial"}),
                   Effect(2.0, tp.torch_optimizer, {**SCHEDULE, "lr_scheduler": "polynomial"})),
    "optimizer": on((Effect("lion", jp.jax_optimizer, OPT), Effect("adafactor", jp.jax_optimizer, OPT),
                     Refused("prodigy")),
                    (Effect("prodigy", tp.torch_optimizer), Refused("lion"), Refused("adafactor"))),
    "use_8bit_adam": on(Refused(True), Effect(True, tp.torch_optimizer)),
    **{key: on(tuple(Warned(value, {**OPT, "optimizer": name}) if name in ignored_by else
                     Effect(value, jp.jax_optimizer, {**OPT, "optimizer": name, **LION_B2.get((name, key), {})})
                     for name in ("adamw", "lion", "adafactor")),
               Effect(value, tp.torch_optimizer, OPT))
       for key, (value, ignored_by) in OPTIMIZER_HYPERS.items()},
    "adam_weight_decay_text_encoder": on(Effect(0.5, jp.jax_optimizer, {**TE, **OPT}),
                                         Effect(0.5, tp.torch_optimizer, {**TE, **OPT})),
    "max_grad_norm": on(Effect(100.0, jp.jax_optimizer), Effect(100.0, tp.torch_loop)),
    **{key: on(Refused(value), Effect(value, tp.torch_optimizer, PRODIGY)) for key, value in PRODIGY_OPTIONS.items()},
    "snr_gamma": on(Effect(5.0, jp.jax_loss), Effect(5.0, tp.torch_loss)),
    "offset_noise": on(Effect(True, jp.jax_loss), Effect(True, tp.torch_loss)),
    # precision and memory
    "mixed_precision": on((Effect("bf16", jp.jax_loaded), Refused("fp16")), Effect("bf16", tp.torch_accelerator)),
    "allow_tf32": on(Refused(True), Effect(True, tp.torch_memory)),
    "gradient_checkpointing": on(Effect(True, jp.jax_loaded), Effect(True, tp.torch_memory)),
    "enable_xformers_memory_efficient_attention": on(
        Refused(True), (Effect(True, tp.torch_start), CoveredBy("tests/torch_backend/test_memory.py::"
                                                                 "test_xformers_kernels_train_on_gpu"))),
    "set_grads_to_none": on(Refused(True), Effect(True, tp.torch_loop)),
    "attention": on(Effect("chunked", jp.jax_loaded), Refused("chunked")),
    "cache_latents": on(Refused(False), Effect(False, tp.torch_trainer)),
    "pre_compute_text_embeddings": on(Meta("always on for jax", jax_always_precomputes),
                                      Effect(True, tp.torch_conditioner)),
    "compilation_cache_dir": on(Effect(lambda env: str(env.root / "xla-cache"), jp.jax_configure),
                                Refused(lambda env: str(env.root / "xla-cache"))),
    # checkpointing
    "output_dir": on(Effect(lambda env: str(env.root / "elsewhere"), jp.jax_inputs),
                     Effect(lambda env: str(env.root / "elsewhere"), tp.torch_inputs)),
    "checkpointing_steps": on(Effect(4, jp.jax_loop, LOOP), Effect(4, tp.torch_loop, LOOP)),
    "checkpoints_total_limit": on(
        CoveredBy("tests/jax_backend/test_train.py::test_total_limit_holds_across_a_resume"),
        CoveredBy("tests/torch_backend/test_train.py::test_total_limit_keeps_the_newest_across_a_resume")),
    "resume_from_checkpoint": on(CoveredBy("tests/jax_backend/test_train.py::test_resume_continues_exactly"),
                                 CoveredBy("tests/torch_backend/test_train.py::test_half_then_resume_equals_straight_run")),
    "save_steps": on(Effect(3, jp.jax_loop, LOOP), Effect(3, tp.torch_loop, LOOP)),
    "skip_save_text_encoder": on(Effect(True, jp.jax_saved_components, TE),
                                 Effect(True, tp.torch_saved_components, TE)),
    # validation
    "validation_prompt": on(Effect("a photo of sks toy on a beach", jp.jax_validator),
                            Effect("a photo of sks toy on a beach", tp.torch_validator)),
    "num_validation_images": on(Effect(2, jp.jax_validator, VALID), Effect(2, tp.torch_validator, VALID)),
    "validation_steps": on(Effect(5, jp.jax_loop, {**VALID, **LOOP}), Effect(5, tp.torch_loop, {**VALID, **LOOP})),
    "validation_epochs": on(Effect(2, jp.jax_loop, {**VALID, **LOOP}), Effect(2, tp.torch_loop, {**VALID, **LOOP})),
    "validation_images": on(Refused(("low_res.png",), VALID), CoveredBy(IF_STAGE2_VALIDATION)),
    "validation_scheduler": on(Effect("DDPMScheduler", jp.jax_validator, VALID),
                               Effect("DDPMScheduler", tp.torch_validator, VALID)),
    # hub
    "push_to_hub": on(Effect(True, jp.jax_finish), Effect(True, tp.torch_finish)),
    "hub_token": on((Effect("hf_not_a_real_token", jp.jax_hub, HUB),
                     Effect("hf_not_a_real_token", jp.jax_finish, {"push_to_hub": True}),
                     Effect("hf_not_a_real_token", jp.jax_tokenizer_hub, HUB_TOKENIZER),
                     CoveredBy("tests/test_hub_push.py::train")),  # jax_push: no token in any file or output
                    (Effect("hf_not_a_real_token", tp.torch_hub, HUB),
                     Effect("hf_not_a_real_token", tp.torch_finish, {"push_to_hub": True}),
                     Effect("hf_not_a_real_token", tp.torch_tokenizer_hub, HUB_TOKENIZER),
                     CoveredBy("tests/test_hub_push.py::train"))),  # torch_lora_push: the same for torch
    "hub_model_id": on(Effect("me/my-dreambooth", jp.jax_finish, {"push_to_hub": True}),
                       Effect("me/my-dreambooth", tp.torch_finish, {"push_to_hub": True})),
    # logging
    "logging_dir": on(Effect("tb", jp.jax_progress), Effect("tb", tp.torch_accelerator)),
    "report_to": on((Effect("none", jp.jax_progress), Refused("mlflow")), Effect("none", tp.torch_accelerator)),
    "log_every_steps": on(Effect(4, jp.jax_loop, LOOP), Effect(4, tp.torch_loop, LOOP)),
    # LoRA: real runs on both backends prove each option (tests/test_lora_cli.py); without LoRA mode
    # every option is a spec error naming --use_lora
    "use_lora": both(CoveredBy(LORA_RUN)),
    **{key: both(CoveredBy(LORA_RUN), SpecRejects(LORA_OPTIONS[key], "use_lora"))
       for key in ("rank", "lora_alpha", "lora_target_modules", "lora_text_encoder_target_modules",
                   "output_kohya_format", "merge_lora_into_pipeline")},
    "use_dora": both(CoveredBy("tests/test_lora_cli.py::test_dora_trains_and_writes_magnitudes"),
                     SpecRejects(True, "use_lora")),
    "lora_dropout": on((Refused(0.1, LORA), SpecRejects(0.1, "use_lora")),
                       (CoveredBy(LORA_DROPOUT_TORCH), SpecRejects(0.1, "use_lora"))),
    # SDXL, DeepFloyd IF
    "pretrained_vae_model_name_or_path": on(Effect(lambda env: str(env.tiny_copy), jp.jax_paths),
                                            Effect(lambda env: str(env.tiny_copy), tp.torch_inputs)),
    "do_edm_style_training": on(Refused(True), CoveredBy("tests/torch_backend/test_edm.py::runs")),
    "class_labels_conditioning": on(Refused("timesteps"), CoveredBy(IF_STAGE2_INPUTS)),
    # parallelism
    "data_parallelism": on(Meta("fixed by the device count", data_axis_follows_the_devices), Refused(2)),
    "fsdp_parallelism": on(Effect(2, jp.jax_mesh), Refused(2)),
    "coordinator_address": on(Effect("10.0.0.2:4321", jp.jax_configure, MULTIHOST),
                              Refused("10.0.0.2:4321", MULTIHOST)),
    "num_processes": on(Effect(4, jp.jax_configure, MULTIHOST), Refused(4, MULTIHOST)),
    "process_id": on(Effect(1, jp.jax_configure, MULTIHOST), Refused(1, MULTIHOST)),
    "multi_host": on(Effect(True, jp.jax_configure), Refused(True)),
    "local_rank": on(Refused(3), Effect(3, tp.torch_start)),
    # planned (issues 21 and 23): refused by both backends until wired
    # kohya captions and dataset configs: one training run per backend sets them all (through the TOML and flags)
    "caption_extension": on(CoveredBy(DATASET_CONFIG_JAX), CoveredBy(DATASET_CONFIG_TORCH)),
    "caption_dropout_rate": on(CoveredBy(DATASET_CONFIG_JAX), CoveredBy(DATASET_CONFIG_TORCH)),
    "shuffle_caption": on(CoveredBy(DATASET_CONFIG_JAX), CoveredBy(DATASET_CONFIG_TORCH)),
    "keep_tokens": on(CoveredBy(DATASET_CONFIG_JAX), CoveredBy(DATASET_CONFIG_TORCH)),
    "caption_separator": on(CoveredBy(DATASET_CONFIG_JAX), CoveredBy(DATASET_CONFIG_TORCH)),
    "dataset_config": on(CoveredBy(DATASET_CONFIG_JAX), CoveredBy(DATASET_CONFIG_TORCH)),
    "enable_bucket": on(CoveredBy("tests/test_buckets_train.py::test_jax_one_compile_per_bucket_and_exact_resume"),
                         CoveredBy("tests/test_buckets_train.py::test_torch_batches_in_bucket_shapes")),
    "min_bucket_reso": on(CoveredBy("tests/test_buckets_train.py::test_jax_one_compile_per_bucket_and_exact_resume"),
                           CoveredBy("tests/test_buckets_train.py::test_torch_batches_in_bucket_shapes")),
    "max_bucket_reso": on(CoveredBy("tests/test_buckets_train.py::test_jax_one_compile_per_bucket_and_exact_resume"),
                           CoveredBy("tests/test_buckets_train.py::test_torch_batches_in_bucket_shapes")),
    "bucket_reso_steps": on(CoveredBy("tests/test_buckets_train.py::test_jax_one_compile_per_bucket_and_exact_resume"),
                             CoveredBy("tests/test_buckets_train.py::test_torch_batches_in_bucket_shapes")),
    "bucket_no_upscale": on(CoveredBy("tests/test_buckets_train.py::test_jax_no_upscale_caches"),
                             CoveredBy("tests/test_buckets_train.py::test_torch_batches_in_bucket_shapes")),
    "multires_noise_iterations": on(Effect(6, jp.jax_loss), Effect(6, tp.torch_loss)),
    "multires_noise_discount": on(Effect(0.5, jp.jax_loss, {"multires_noise_iterations": 6}),
                                  Effect(0.5, tp.torch_loss, {"multires_noise_iterations": 6})),
    "zero_terminal_snr": on(CoveredBy("tests/test_ema_train.py::jax_ema_run"),
                            CoveredBy("tests/test_ema_train.py::torch_ema_run")),
    "debiased_estimation_loss": on(Effect(True, jp.jax_loss), Effect(True, tp.torch_loss)),
    "loss_type": on((Effect("huber", jp.jax_loss), Effect("smooth_l1", jp.jax_loss)),
                    (Effect("huber", tp.torch_loss), Effect("smooth_l1", tp.torch_loss))),
    "huber_schedule": on(Effect("constant", jp.jax_loss, {"loss_type": "huber"}),
                         Effect("constant", tp.torch_loss, {"loss_type": "huber"})),
    "huber_c": on(Effect(0.2, jp.jax_loss, {"loss_type": "huber"}), Effect(0.2, tp.torch_loss, {"loss_type": "huber"})),
    "masked_loss": on(Effect(True, jp.jax_caches),
                      CoveredBy("tests/test_masked_loss.py::test_a_fully_transparent_subject_trains_on_nothing")),
    "use_ema": on(CoveredBy("tests/test_ema_train.py::jax_ema_run"),
                  CoveredBy("tests/test_ema_train.py::torch_ema_run")),
    "ema_decay": on(CoveredBy("tests/test_ema_train.py::jax_ema_run"),
                    CoveredBy("tests/test_ema_train.py::torch_ema_run")),
    "remat_policy": on(Effect("dots_saveable", jp.jax_loaded, {"gradient_checkpointing": True}),
                       Refused("dots_saveable", {"gradient_checkpointing": True})),
    "cache_latents_to_disk": both(CoveredBy("tests/test_encoding_cache_train.py::cache_runs")),
    "cache_text_embeddings_to_disk": both(CoveredBy("tests/test_encoding_cache_train.py::cache_runs")),
    "encoding_cache_dir": both(CoveredBy("tests/test_encoding_cache_train.py::cache_runs")),
    "save_single_file": on(CoveredBy("tests/test_single_file.py::jax_run"),
                           CoveredBy("tests/test_single_file.py::torch_run")),
    "save_precision": on(CoveredBy("tests/test_single_file.py::jax_run"),
                         CoveredBy("tests/test_single_file.py::torch_run")),
    "sample_prompts": on(CoveredBy(SAMPLES_JAX), CoveredBy(SAMPLES_TORCH)),
    "sample_every_n_steps": on(CoveredBy(SAMPLES_JAX), CoveredBy(SAMPLES_TORCH_STEPS)),
    "sample_every_n_epochs": on(CoveredBy(SAMPLES_JAX_EPOCHS), CoveredBy(SAMPLES_TORCH)),
}


# Keys that only matter together with another one, as in diffusers: (value, the gate's context
# turned off). With the gate off both backends ignore them, so the spec must say so (a warning
# naming the key, spec/validation._check_inert) or refuse them.
GATED: dict[str, tuple[Any, Mapping[str, Any]]] = {
    "class_data_dir": (lambda env: str(env.class_folder("a", 3)), {}),
    "class_prompt": (CLASS_PROMPT, {}),
    "prior_loss_weight": (0.5, {}),
    "num_class_images": (10, {}),
    "sample_batch_size": (2, {}),
    "prior_generation_precision": ("bf16", {}),
    "text_encoder_lr": (1e-4, {}),
    "adam_weight_decay_text_encoder": (0.1, {}),
    "lr_warmup_steps": (100, {}),  # lr_scheduler=constant
    "lr_num_cycles": (3, {}),
    "lr_power": (2.0, {}),
    "num_validation_images": (2, {}),
    "validation_steps": (50, {}),
    "validation_epochs": (1, {}),
    "validation_scheduler": ("DDPMScheduler", {}),
    "sample_prompts": ("prompts.txt", {}),
    "sample_every_n_steps": (5, {}),
    "sample_every_n_epochs": (1, {}),
    "hub_model_id": ("me/my-dreambooth", {}),
    "dataset_config_name": ("other", {}),
    "image_column": ("image_b", {}),
    "caption_column": ("text_b", {}),
    "prodigy_beta3": (0.5, {}),
    "save_precision": ("bf16", {}),
    "num_train_epochs": (3, {"max_train_steps": 10}),
    "logging_dir": ("tb", {"report_to": "none"}),
    "min_bucket_reso": (128, {}),
    "max_bucket_reso": (2048, {}),
    "bucket_reso_steps": (32, {}),
    "bucket_no_upscale": (True, {}),
    "multires_noise_discount": (0.5, {}),
    "huber_schedule": ("constant", {}),
    "huber_c": (0.2, {}),
    "ema_decay": (0.99, {}),
    "keep_tokens": (1, {}),  # shuffle_caption off
    "caption_separator": (";", {}),
    "remat_policy": ("dots_saveable", {}),
    "encoding_cache_dir": ("enc", {}),
    "cache_latents_to_disk": (True, {"cache_latents": False}),
    "cache_text_embeddings_to_disk": (True, {"train_text_encoder": True}),
}
WARNED_TODAY = set(GATED)  # all of them, since _check_inert got its gate table


def _gated_cases() -> list:
    reason = ("SILENT with its gate off: both backends ignore --{key} then, and spec/validation._check_inert "
              "does not warn; add it there next to class_data_dir and prodigy_*")
    return [pytest.param(key, value, context, id=key, marks=[] if key in WARNED_TODAY else
                         [pytest.mark.xfail(strict=True, reason=reason.format(key=key))])
            for key, (value, context) in GATED.items()]


@pytest.mark.parametrize("key, value, context", _gated_cases())
def test_a_gated_key_is_never_ignored_quietly(env: Env, key: str, value: Any, context: Mapping) -> None:
    from jaxbooth.spec.validation import validate_spec

    spec = spec_lib.replace_flat(make_spec(env, context), **{key: value(env) if callable(value) else value})
    try:
        warnings = validate_spec(spec)
    except JaxboothError as error:
        warnings = [str(error)]
    assert any(key in warning for warning in warnings), warnings


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def env(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """The folders, offline Hub and datasets (caches under the test folder)."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("coverage")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        try:
            import datasets
        except ImportError:  # the --dataset_name cases skip (Env.hf_dataset)
            pass
        else:
            patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
            patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets-cache")
        yield Env(root=root, tiny=tiny_model_dir)


def _cases() -> list:
    cases = []
    for key, per_backend in ACCOUNT.items():
        for backend, checks in per_backend.items():
            for index, check in enumerate(checks):
                name = f"{key}-{backend}" + (f"-{index}" if len(checks) > 1 else "")
                marks = [pytest.mark.xfail(strict=True, reason=check.xfail)] if check.xfail else []
                cases.append(pytest.param(key, backend, check, id=name, marks=marks))
    return cases


def test_account_covers_exactly_the_spec_keys() -> None:
    assert set(ACCOUNT) - set(spec_lib.FIELDS) == set(), "accounts for keys the spec no longer has"
    assert set(spec_lib.FIELDS) - set(ACCOUNT) == set(), "spec keys without an account: add them to ACCOUNT"
    for key, per_backend in ACCOUNT.items():
        assert sorted(per_backend) == sorted(BACKENDS) and all(per_backend.values()), key


def test_every_capability_row_a_backend_lacks_is_accounted_as_refused() -> None:
    """The table and the account agree: each (key, value) a backend lacks has a Refused case."""
    for cap in capabilities.CAPABILITIES:
        for backend in set(BACKENDS) - cap.backends:
            refused = [check for check in ACCOUNT[cap.key][backend] if isinstance(check, Refused)]
            assert refused, f"{cap.key} on {backend}: the table refuses it; add a Refused account"
            if cap.values:
                assert any(check.value in cap.values for check in refused), (cap.key, backend, cap.values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_base_spec_is_accepted(env: Env, backend: str) -> None:
    capabilities.check_backend(make_spec(env, {}), backend)


_BASE_RESULTS: dict = {}


def _probe_base(probe: Callable, spec: spec_lib.RunSpec, env: Env) -> Any:
    """Probe results of base specs are shared by the keys with the same context."""
    key = (probe, spec)
    if key not in _BASE_RESULTS:
        _BASE_RESULTS[key] = probe(spec, env)
    return _BASE_RESULTS[key]


@pytest.mark.parametrize("key, backend, check", _cases())
def test_key_is_honest_on_backend(env: Env, key: str, backend: str, check: Any) -> None:
    if isinstance(check, Effect):
        base = make_spec(env, check.context)
        changed = make_spec(env, {**check.context, **check.also, key: check.changed})
        assert spec_lib.get_flat(base, key) != spec_lib.get_flat(changed, key), "the changed value is the base value"
        before, after = _probe_base(check.probe, base, env), check.probe(changed, env)
        assert before != after, f"--{key} changed nothing {check.probe.__name__} sees on {backend}: {before!r}"
    elif isinstance(check, Refused):
        spec = make_spec(env, {**check.context, key: check.value})
        with pytest.raises(JaxboothError) as info:
            capabilities.check_backend(spec, backend)
        assert any(f"--{name}" in str(info.value) for name in (key, *check.names)), str(info.value)
    elif isinstance(check, SpecRejects):
        with pytest.raises(JaxboothError, match=rf"\b{key}=") as info:
            make_spec(env, {key: check.value})
        assert f"--{check.gate}" in str(info.value)
    elif isinstance(check, Warned):
        from jaxbooth.spec.validation import validate_spec

        warnings = validate_spec(make_spec(env, {**check.context, key: check.value}))
        assert [w for w in warnings if f"--{key}=" in w and "no effect" in w], warnings
    elif isinstance(check, CoveredBy):
        path, _, name = check.node.partition("::")
        source = (ROOT / path).read_text()
        found = [node for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.FunctionDef) and node.name == name.split("::")[-1]]
        assert found, f"{check.node} does not exist"
        assert key in ast.get_source_segment(source, found[0]), f"{check.node} does not set --{key}"
    else:
        check.check(env, backend)  # see its docstring (check.why in brief)


def _probe_contexts() -> dict:
    """Each probe once, with the context of the first key that uses it."""
    seen: dict = {}
    for per_backend in ACCOUNT.values():
        for checks in per_backend.values():
            for check in checks:
                if isinstance(check, Effect) and not check.xfail:
                    seen.setdefault(check.probe, check.context)
    return seen


@pytest.mark.parametrize("probe, context", [pytest.param(p, c, id=p.__name__ if hasattr(p, "__name__") else str(i))
                                            for i, (p, c) in enumerate(_probe_contexts().items())])
def test_probes_are_deterministic(env: Env, probe: Callable, context: Mapping) -> None:
    """A probe that differed between two runs of one spec would prove nothing about a key."""
    spec = make_spec(env, context)
    assert probe(spec, env) == _probe_base(probe, spec, env)
