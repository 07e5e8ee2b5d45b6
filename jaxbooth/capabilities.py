"""Which backend supports which run-spec option, and the ``backend: auto`` decision.

The table is data: one row per option (or per option value) that not every backend
supports, plus rows that record the JAX path's coverage of features diffusers' Flax
script lacked. Options without a row are framework-neutral (paths, prompts, data
loading) and work on both. An option counts as *set* when it differs from its default.

Imports the standard library and ``jaxbooth.spec.schema`` (which imports nothing of
jaxbooth's but errors); ``jaxbooth.spec`` re-exports names from here lazily, so either module
can be imported first. Probing devices is the CLI's job; everything here is pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxbooth.errors import JaxboothError
from jaxbooth.spec.schema import FIELDS, RunSpec

JAX, TORCH = "jax", "torch"
BOTH = frozenset({JAX, TORCH})
JAX_ONLY = frozenset({JAX})
TORCH_ONLY = frozenset({TORCH})
PLANNED = frozenset()  # a row for a key the spec accepts (diffusers' flag name) but no backend trains yet

# `backend: auto` uses JAX on GPUs with at least this much memory (the diffusers guide's
# ">30GB" for Flax). Decimal GB, so a "32 GB" V100 (34.1e9 bytes) counts.
JAX_MIN_GPU_MEMORY_BYTES = 30 * 10**9


@dataclass(frozen=True)
class Capability:
    """``key`` set to a non-default value (or, when ``values`` is given, to one of them) needs
    one of ``backends``. ``fix`` is the way to keep the run on the other backend, if any."""

    key: str
    backends: frozenset[str]
    values: tuple[Any, ...] = ()
    note: str = ""
    fix: str = ""


CAPABILITIES: tuple[Capability, ...] = (
    # Supported by both; listed because the old Flax script lacked them or they are core.
    Capability("train_text_encoder", BOTH),
    Capability("with_prior_preservation", BOTH),
    Capability("snr_gamma", BOTH, note="Min-SNR weighting, computed once in jaxbooth.diffusion"),
    Capability("offset_noise", BOTH),
    Capability("gradient_checkpointing", BOTH, note="remat on jax"),
    Capability("mixed_precision", BOTH, values=("bf16", "no")),
    Capability("mixed_precision", TORCH_ONLY, values=("fp16",), note="fp16 needs dynamic loss scaling",
               fix="--mixed_precision=bf16 (the JAX backend has no dynamic loss scaling, which fp16 needs)"),
    Capability("gradient_accumulation_steps", BOTH, note="optax.MultiSteps on jax"),
    Capability("lr_scheduler", BOTH),
    Capability("checkpointing_steps", BOTH),
    Capability("resume_from_checkpoint", BOTH),
    Capability("validation_prompt", BOTH),
    Capability("push_to_hub", BOTH),
    Capability("cache_latents", TORCH_ONLY, values=(False,),
               note="jax always trains on cached VAE posteriors (both orientations with random_flip)"),
    Capability("pre_compute_text_embeddings", BOTH),
    Capability("text_encoder_use_attention_mask", BOTH),
    Capability("tokenizer_max_length", BOTH),
    Capability("use_lora", BOTH, note="peft adapters on torch; an adapter pytree beside the frozen params on jax"),
    Capability("use_dora", BOTH),
    Capability("model_family", BOTH, values=("sdxl",),
               note="SDXL UNet, full or LoRA, with both text encoders frozen and cached"),
    Capability("dataloader_num_workers", BOTH,
               note="torch: loader workers each step; jax: threads decoding images once for the latent cache"),
    # Torch only.
    Capability("use_8bit_adam", TORCH_ONLY, note="bitsandbytes"),
    Capability("enable_xformers_memory_efficient_attention", TORCH_ONLY, note="xFormers is a CUDA library"),
    Capability("set_grads_to_none", TORCH_ONLY, note="a torch optimizer.zero_grad option"),
    Capability("allow_tf32", TORCH_ONLY, note="a torch.backends.cuda switch"),
    Capability("do_edm_style_training", TORCH_ONLY, note="EDM-style SDXL training (Euler/EDM preconditioning, "
               "jaxbooth.edm)"),
    Capability("lora_dropout", TORCH_ONLY, note="jax merges the adapters into the weights inside the step, "
               "where dropout on the adapter's input has no place", fix="--lora_dropout=0 (the LoRA scripts' default)"),
    # DeepFloyd IF: torch only (the jax backend has no IF UNet); jaxbooth.deepfloyd refuses the stage-II keys
    # on every other pipeline.
    Capability("model_family", TORCH_ONLY, values=("deepfloyd_if",),
               note="DeepFloyd IF stage I and II, full or LoRA, in pixel space; the jax backend has no IF UNet"),
    Capability("class_labels_conditioning", TORCH_ONLY, note="DeepFloyd IF stage II: the upscaler's noise level"),
    Capability("validation_images", TORCH_ONLY, note="DeepFloyd IF stage II validation: the images it upscales"),
    Capability("optimizer", TORCH_ONLY, values=("prodigy",), note="prodigyopt"),
    Capability("prodigy_beta3", TORCH_ONLY),
    Capability("prodigy_decouple", TORCH_ONLY),
    Capability("prodigy_use_bias_correction", TORCH_ONLY),
    Capability("prodigy_safeguard_warmup", TORCH_ONLY),
    Capability("report_to", TORCH_ONLY,
               values=("aim", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "trackio"),
               note="accelerate trackers; jax logs to tensorboard and wandb"),
    # JAX only.
    Capability("optimizer", JAX_ONLY, values=("adafactor", "lion"), note="optax"),
    Capability("fsdp_parallelism", JAX_ONLY, note="sharded params and optimizer state"),
    Capability("data_parallelism", JAX_ONLY, note="torch takes the process count from its launcher"),
    Capability("attention", JAX_ONLY, values=("xla", "dot_product", "flash", "chunked")),
    Capability("compilation_cache_dir", JAX_ONLY),
    Capability("coordinator_address", JAX_ONLY, note="jax.distributed; torch uses accelerate launch"),
    Capability("num_processes", JAX_ONLY),
    Capability("process_id", JAX_ONLY),
    Capability("multi_host", JAX_ONLY, note="jax.distributed discovery; torch uses accelerate launch"),
    Capability("local_rank", TORCH_ONLY, note="set by torch launchers; jax numbers processes with --process_id",
               fix="--process_id with --coordinator_address and --num_processes"),
    # Planned: accepted under their kohya/diffusers names, refused by every backend until trained.
    Capability("caption_extension", BOTH, note="kohya captions (jaxbooth.data.captions)"),
    Capability("caption_dropout_rate", BOTH, note="kohya captions (jaxbooth.data.captions)"),
    Capability("shuffle_caption", BOTH, note="kohya captions (jaxbooth.data.captions)"),
    Capability("keep_tokens", BOTH, note="kohya captions (jaxbooth.data.captions)"),
    Capability("caption_separator", BOTH, note="kohya captions (jaxbooth.data.captions)"),
    Capability("dataset_config", BOTH, note="kohya's dataset_config TOML or YAML (jaxbooth.data.dataset_config)"),
    Capability("enable_bucket", BOTH, note="aspect-ratio buckets (jaxbooth.data.buckets)"),
    Capability("min_bucket_reso", BOTH, note="aspect-ratio buckets (jaxbooth.data.buckets)"),
    Capability("max_bucket_reso", BOTH, note="aspect-ratio buckets (jaxbooth.data.buckets)"),
    Capability("bucket_reso_steps", BOTH, note="aspect-ratio buckets (jaxbooth.data.buckets)"),
    Capability("bucket_no_upscale", BOTH, note="aspect-ratio buckets (jaxbooth.data.buckets)"),
    Capability("multires_noise_iterations", BOTH, note="kohya pyramid noise, jaxbooth.loss_options"),
    Capability("multires_noise_discount", BOTH, note="kohya pyramid noise, jaxbooth.loss_options"),
    Capability("zero_terminal_snr", BOTH, note="rescaled training betas, jaxbooth.loss_options"),
    Capability("debiased_estimation_loss", BOTH, note="kohya debiased estimation, jaxbooth.loss_options"),
    Capability("loss_type", BOTH, note="kohya huber / smooth_l1, jaxbooth.loss_options"),
    Capability("huber_schedule", BOTH, note="kohya huber / smooth_l1, jaxbooth.loss_options"),
    Capability("huber_c", BOTH, note="kohya huber / smooth_l1, jaxbooth.loss_options"),
    Capability("masked_loss", BOTH, note="alpha-channel loss masks, jaxbooth.data.masks"),
    Capability("use_ema", BOTH, note="jaxbooth.ema: optax state on jax, accelerate-registered on torch"),
    Capability("ema_decay", BOTH, note="jaxbooth.ema: optax state on jax, accelerate-registered on torch"),
    Capability("remat_policy", JAX_ONLY, note="jax.checkpoint policies of the rematerialised blocks",
               fix="drop --remat_policy (torch's gradient checkpointing recomputes each block)"),
    Capability("cache_latents_to_disk", BOTH, note="jaxbooth.encoding_cache; either backend reads the files"),
    Capability("cache_text_embeddings_to_disk", BOTH, note="jaxbooth.encoding_cache; either backend reads the files"),
    Capability("encoding_cache_dir", BOTH, note="jaxbooth.encoding_cache; either backend reads the files"),
    Capability("save_single_file", BOTH, note="single-file checkpoints: jaxbooth.single_file"),
    Capability("save_precision", BOTH, note="dtype of the single-file checkpoint"),
    Capability("sample_prompts", BOTH, note="kohya sample prompt files: jaxbooth.sample_prompts"),
    Capability("sample_every_n_steps", BOTH, note="kohya sample prompt files: jaxbooth.sample_prompts"),
    Capability("sample_every_n_epochs", BOTH, note="kohya sample prompt files: jaxbooth.sample_prompts"),
)


@dataclass(frozen=True)
class DeviceInfo:
    """What the CLI found: platform ('cpu' | 'gpu' | 'tpu'), memory per device (total, not the
    allocator's limit; None if unknown) and device count."""

    platform: str
    memory_bytes: int | None
    count: int

    def __post_init__(self) -> None:
        aliases = {"cuda": "gpu", "rocm": "gpu"}
        object.__setattr__(self, "platform", aliases.get(self.platform, self.platform))
        if self.platform not in ("cpu", "gpu", "tpu"):
            raise ValueError(f"DeviceInfo.platform={self.platform!r}; expected cpu, gpu or tpu")
        if self.count < 1:
            raise ValueError(f"DeviceInfo.count={self.count}; expected >= 1")


def unsupported_options(spec: RunSpec, backend: str, *, model_family: str | None = None
                        ) -> list[tuple[str, Any, frozenset[str]]]:
    """(key, value, backends that support it) for every set option that ``backend`` lacks
    (planned options, which no backend has, included with an empty set).

    ``model_family`` is the family the CLI detected from the model files; it stands in for
    ``model_family: auto``.
    """
    return [(cap.key, value, cap.backends) for cap, value in _unsupported(spec, backend, model_family)]


def _unsupported(spec: RunSpec, backend: str, model_family: str | None) -> list[tuple[Capability, Any]]:
    values = spec.flat()
    if model_family is not None and values["model_family"] == "auto":
        values["model_family"] = model_family
    out = []
    for cap in CAPABILITIES:
        value = values[cap.key]
        if value == FIELDS[cap.key].default or (cap.values and value not in cap.values):
            continue
        if backend not in cap.backends:
            out.append((cap, value))
    return out


def _flag(key: str, value: Any) -> str:
    if isinstance(value, (tuple, list)):  # list keys, as typed: --validation_images a.png b.png
        return f"--{key} {' '.join(map(str, value))}"
    return f"--{key}" if value is True else f"--{key}={value}"


def check_backend(spec: RunSpec, backend: str, *, model_family: str | None = None) -> None:
    """Raise naming every set option ``backend`` cannot honour, the backend that can, and the fix.

    A JAX run never drops a torch-only option silently (and vice versa).
    """
    if backend not in (JAX, TORCH):
        raise JaxboothError(f"--backend={backend!r}: expected jax or torch here (auto is resolved first)")
    problems = planned_problems(spec, model_family)
    for cap, value in _unsupported(spec, backend, model_family):
        if not cap.backends:
            continue
        other = "/".join(sorted(cap.backends))
        problems.append(f"{_flag(cap.key, value)} is only supported by the {other} backend; "
                        f"use --backend={other} or {cap.fix or 'drop it'}")
    if problems:
        raise JaxboothError("\n".join(problems))


def planned_problems(spec: RunSpec, model_family: str | None = None) -> list[str]:
    """One message per set option that no backend trains yet, naming it and the fix."""
    return [f"{_flag(cap.key, value)}: {cap.note or cap.key} is not supported by any backend yet (planned); "
            f"{cap.fix or 'drop it'}" for cap, value in _unsupported(spec, JAX, model_family) if not cap.backends]


def backend_support(key: str) -> str:
    """Which backends honour ``key``, for ``--help``: 'jax, torch', 'torch only', plus the values
    that only one backend has ('jax, torch; fp16: torch only')."""
    rows = [cap for cap in CAPABILITIES if cap.key == key]
    whole = next((cap.backends for cap in rows if not cap.values), BOTH)
    by_backends: dict[frozenset[str], list[str]] = {}
    for cap in rows:
        if cap.values and cap.backends != whole:
            shown = [str(v).lower() if isinstance(v, bool) else str(v) for v in cap.values]
            by_backends.setdefault(cap.backends, []).extend(shown)
    parts = [_backends_text(whole)]
    parts += [f"{', '.join(values)}: {_backends_text(backends)}" for backends, values in by_backends.items()]
    return "; ".join(parts)


def _backends_text(backends: frozenset[str]) -> str:
    if not backends:
        return "no backend yet (planned)"
    return ", ".join(sorted(backends)) if len(backends) > 1 else f"{next(iter(backends))} only"


def choose_backend(spec: RunSpec, device: DeviceInfo, *, model_family: str | None = None,
                   family_source: str | None = None) -> tuple[str, str]:
    """(backend, reason) for this spec on this device; the reason is printed for the user.

    auto: an option only one backend supports decides; otherwise jax on TPU, CPU and GPUs
    with >= 30 GB, torch on smaller GPUs (it has 8-bit Adam, xFormers and DeepSpeed).
    An explicit backend is validated with ``check_backend``. ``model_family``: the family the CLI
    read from the model files (stands in for ``model_family: auto``); ``family_source`` says where
    (``<dir>/model_index.json names IFPipeline (...)``), so a reason or error names the file, not a
    flag the user never typed.
    """
    if spec.backend != "auto":
        check_backend(spec, spec.backend, model_family=model_family)
        _check_platform(spec.backend, device, f"--backend={spec.backend}")
        return spec.backend, f"backend {spec.backend} (set explicitly)"
    planned = planned_problems(spec, model_family)
    if planned:
        raise JaxboothError("\n".join(planned))
    detected = family_source if spec.model.model_family == "auto" and model_family is not None else None
    needs_torch = unsupported_options(spec, JAX, model_family=model_family)
    needs_jax = unsupported_options(spec, TORCH, model_family=model_family)
    if needs_torch and needs_jax:
        raise JaxboothError(f"no backend supports all options: {_names(needs_torch, detected)} need torch and "
                            f"{_names(needs_jax)} need jax; drop one side")
    if needs_torch:
        options = [found for found in needs_torch if not (detected and found[0] == "model_family")]
        if len(options) < len(needs_torch):  # the model itself decides
            if device.platform == "tpu":
                raise JaxboothError(f"{detected}, which only the torch backend trains, and torch does not run on "
                                    "TPU; train this model on a GPU or CPU host")
            reason = f"backend auto -> torch: {detected}, which only the torch backend trains"
            return TORCH, reason + (f"; {_names(options)} {_is(options)} torch-only" if options else "")
        _check_platform(TORCH, device, _names(needs_torch), _fixes(spec, model_family))
        return TORCH, f"backend auto -> torch: {_names(needs_torch)} {_is(needs_torch)} torch-only"
    if needs_jax:
        return JAX, f"backend auto -> jax: {_names(needs_jax)} {_is(needs_jax)} jax-only"
    return _by_device(device)


def _by_device(device: DeviceInfo) -> tuple[str, str]:
    if device.platform == "tpu":
        return JAX, f"backend auto -> jax: TPU ({device.count} devices)"
    if device.platform == "cpu":
        return JAX, "backend auto -> jax: CPU"
    if device.memory_bytes is None:
        return TORCH, "backend auto -> torch: GPU memory unknown, torch has more memory savers"
    gb = device.memory_bytes / 1e9
    if device.memory_bytes >= JAX_MIN_GPU_MEMORY_BYTES:
        return JAX, f"backend auto -> jax: GPU with {gb:.0f} GB (>= 30 GB)"
    return TORCH, f"backend auto -> torch: GPU with {gb:.0f} GB (< 30 GB; torch has 8-bit Adam, xFormers)"


def _check_platform(backend: str, device: DeviceInfo, why: str, fixes: str = "") -> None:
    if backend == TORCH and device.platform == "tpu":
        raise JaxboothError(f"{why} needs the torch backend, which does not run on TPU; "
                            f"{fixes or 'drop it'} to train with jax")


def _fixes(spec: RunSpec, model_family: str | None) -> str:
    """'use --mixed_precision=bf16 (...)' for torch-only options that have a JAX alternative."""
    fixes = [cap.fix for cap, _ in _unsupported(spec, JAX, model_family) if cap.fix]
    return "use " + "; ".join(fixes) if fixes else ""


def _names(found: list[tuple[str, Any, frozenset[str]]], detected: str | None = None) -> str:
    """The options as flags; a detected model family (``detected``: where it was read) as its source."""
    return ", ".join(detected if detected and key == "model_family" else _flag(key, value)
                     for key, value, _ in found)


def _is(found: list) -> str:
    return "is" if len(found) == 1 else "are"
