"""The run spec: one typed, frozen description of a DreamBooth run that drives both backends.

This module owns the schema (nested frozen dataclasses whose field names are diffusers'
DreamBooth flag names), loading it from a flat diffusers-style command line and/or YAML,
load-time validation, and the derived values (scaled LR, total steps, mesh shape) that
are computed from the spec and never written back into it. The backend capability table
and ``backend: auto`` routing live in ``jaxbooth.capabilities`` and are re-exported here.

It imports only the standard library and yaml: never jax, torch, flax, transformers or
diffusers, so the CLI can validate a run before any framework loads. Parsing has no side
effects (no mkdir, no downloads, no environment reads such as diffusers' LOCAL_RANK).

Defaults are those of diffusers' ``examples/dreambooth/train_dreambooth.py`` (main,
58eb52c). Flags that exist only in ``train_dreambooth_flax.py`` (v0.39.0) or the LoRA /
SDXL scripts are fields too; where such a script's default differs, ``SCRIPT_PRESETS``
holds it, so ``load_spec(argv, preset="train_dreambooth_lora.py")`` behaves like that
script.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from jaxbooth.capabilities import DeviceInfo, check_backend, choose_backend
from jaxbooth.errors import JaxboothError

__all__ = [
    "RunSpec", "DeviceInfo", "FieldInfo", "FIELDS", "SECTIONS", "SCRIPT_PRESETS", "SpecWarning",
    "load_spec", "load_spec_from_dict", "validate_spec", "spec_to_dict", "write_resolved_spec",
    "get_flat", "replace_flat", "default_flat", "check_backend", "choose_backend",
    "effective_learning_rate", "effective_text_encoder_learning_rate", "effective_batch_size",
    "num_update_steps_per_epoch", "total_train_steps", "total_train_epochs", "mesh_shape",
    "vae_name_or_path", "checkpoint_every_steps", "validation_schedule", "lora_scale_alpha",
]


class SpecWarning(UserWarning):
    """A spec that loads but is probably not what the user meant (diffusers warns on these too)."""


def _f(default: Any, doc: str) -> Any:
    """A dataclass field whose ``doc`` feeds ``jaxbooth train --help`` and the field table."""
    return field(default=default, metadata={"doc": doc})


Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                    "constant_with_warmup", "piecewise_constant"]
# accelerate's LoggerType values, plus "none" (jaxbooth: log nowhere but stdout).
ReportTo = Literal["tensorboard", "wandb", "all", "none", "aim", "comet_ml", "mlflow", "clearml",
                   "dvclive", "swanlab", "trackio"]
# torchvision InterpolationMode names, lowercased, as the diffusers LoRA scripts accept.
Interpolation = Literal["nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]


@dataclass(frozen=True)
class ModelSection:
    """Which pretrained pipeline to start from and which of its parts are trained."""

    pretrained_model_name_or_path: str | None = _f(
        None, "Hub id or local diffusers pipeline folder. None: jaxbooth's built-in tiny model "
              "(diffusers requires this flag).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the pretrained model.")
    variant: str | None = _f(None, "Weight file variant to load, e.g. 'fp16' for *.fp16.safetensors.")
    tokenizer_name: str | None = _f(None, "Tokenizer to use when it differs from the model's own.")
    pretrained_vae_name_or_path: str | None = _f(
        None, "A VAE to use instead of the pipeline's (train_dreambooth_flax.py's name for it).")
    model_family: Literal["auto", "sd", "sdxl", "deepfloyd_if"] = _f(
        "auto", "Architecture family; auto reads it from the model's model_index.json at train time.")
    train_text_encoder: bool = _f(False, "Also fine-tune the text encoder (more memory, better faces).")
    tokenizer_max_length: int | None = _f(
        None, "Token length prompts are padded/truncated to; None: the tokenizer's model_max_length.")
    text_encoder_use_attention_mask: bool = _f(
        False, "Pass the padding mask to the text encoder (needed for T5 in DeepFloyd IF).")


@dataclass(frozen=True)
class DataSection:
    """Instance images, prompts and how images become training tensors."""

    instance_data_dir: str | None = _f(
        None, "Folder of subject images. None: the bundled example images (the trainer fills this in, "
              "not the resolver).")
    instance_prompt: str | None = _f(
        None, "Prompt with the rare identifier, e.g. 'a photo of sks dog'. None: 'a photo of sks toy' "
              "for the bundled images (the trainer fills this in).")
    resolution: int = _f(512, "Square training size in pixels; images are resized (and cropped) to it.")
    center_crop: bool = _f(False, "Center-crop after resizing instead of a random crop.")
    random_flip: bool = _f(False, "Flip images horizontally with probability 0.5.")
    image_interpolation_mode: Interpolation = _f(
        "bilinear", "Resize filter. bilinear matches train_dreambooth.py; the LoRA scripts default to "
                    "lanczos (see SCRIPT_PRESETS).")
    repeats: int = _f(1, "How many times each instance image appears per epoch.")
    dataset_name: str | None = _f(
        None, "A Hub dataset to train on instead of instance_data_dir (needs the datasets library).")
    dataset_config_name: str | None = _f(None, "Config name of dataset_name.")
    cache_dir: str | None = _f(None, "Where downloaded models and datasets are cached.")
    image_column: str = _f("image", "Image column of dataset_name.")
    caption_column: str | None = _f(
        None, "Per-image caption column of dataset_name; None: use instance_prompt for all.")
    dataloader_num_workers: int = _f(0, "Loader worker processes; 0 loads in the main process.")
    skip_bad_images: bool = _f(
        False, "Skip unreadable images with a warning instead of failing the run before training.")


@dataclass(frozen=True)
class PriorSection:
    """Prior preservation: a second loss on class images keeps the model's idea of the class."""

    with_prior_preservation: bool = _f(False, "Add the prior-preservation loss on class images.")
    prior_loss_weight: float = _f(1.0, "Weight of the prior-preservation loss.")
    class_data_dir: str | None = _f(
        None, "Folder of class images; missing ones are generated there before training.")
    class_prompt: str | None = _f(
        None, "Prompt for the class, without the identifier, e.g. 'a photo of dog'.")
    num_class_images: int = _f(100, "How many class images to have; the shortfall is generated.")
    sample_batch_size: int = _f(4, "Batch size (per device) when generating class images.")
    prior_generation_precision: Literal["no", "fp32", "fp16", "bf16"] | None = _f(
        None, "Precision of class-image generation; None: fp16 on GPU, fp32 elsewhere (as diffusers).")


@dataclass(frozen=True)
class OptimSection:
    """Batching, run length, optimizer, LR schedule and the loss variants."""

    seed: int | None = _f(None, "Seed for reproducible training; None: a fresh random seed.")
    train_batch_size: int = _f(4, "Examples per device per micro-step (prior examples come on top).")
    num_train_epochs: int = _f(1, "Epochs to run; ignored when max_train_steps is set (as diffusers).")
    max_train_steps: int | None = _f(None, "Optimizer steps to run; overrides num_train_epochs.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps whose gradients are summed per optimizer step.")
    learning_rate: float = _f(5e-6, "Peak learning rate (before scale_lr).")
    text_encoder_lr: float | None = _f(
        None, "Text-encoder learning rate; None: the (scaled) UNet learning_rate.")
    scale_lr: bool = _f(False, "Multiply the LR by grad accumulation x batch size x processes.")
    lr_scheduler: Scheduler = _f("constant", "LR schedule, by diffusers' get_scheduler names.")
    lr_warmup_steps: int = _f(500, "Linear warmup length in optimizer steps.")
    lr_num_cycles: int = _f(1, "Hard restarts for cosine_with_restarts.")
    lr_power: float = _f(1.0, "Power of the polynomial schedule.")
    optimizer: Literal["adamw", "adafactor", "lion", "prodigy"] = _f(
        "adamw", "Optimizer (case-insensitive, so the SDXL script's 'AdamW' works).")
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (torch backend).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_weight_decay: float = _f(1e-2, "Decoupled weight decay of the UNet parameters.")
    adam_weight_decay_text_encoder: float | None = _f(
        None, "Weight decay of the text encoder; None: adam_weight_decay.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    max_grad_norm: float = _f(1.0, "Global gradient-norm clip.")
    prodigy_beta3: float | None = _f(None, "Prodigy beta3; None: sqrt(beta2).")
    prodigy_decouple: bool = _f(True, "Prodigy: decoupled weight decay.")
    prodigy_use_bias_correction: bool = _f(True, "Prodigy: Adam bias correction.")
    prodigy_safeguard_warmup: bool = _f(True, "Prodigy: exclude LR from the D estimate during warmup.")
    snr_gamma: float | None = _f(None, "Min-SNR loss weighting gamma (5.0 recommended); None: off.")
    offset_noise: bool = _f(False, "Add offset noise (0.1 x per-channel noise) to the training noise.")


@dataclass(frozen=True)
class PrecisionSection:
    """Numeric precision, memory savers and attention kernels."""

    mixed_precision: Literal["no", "fp16", "bf16"] | None = _f(
        None, "Compute dtype. None: accelerate's config on torch, fp32 ('no') on jax.")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs (torch backend).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (remat on jax).")
    enable_xformers_memory_efficient_attention: bool = _f(False, "xFormers attention (torch backend).")
    set_grads_to_none: bool = _f(False, "zero_grad(set_to_none=True) to save memory (torch backend).")
    attention: Literal["auto", "xla", "dot_product", "flash", "chunked"] = _f(
        "auto", "JAX attention kernel: xla einsum, jax.nn.dot_product_attention, cuDNN 'flash', or "
                "'chunked' (query chunks, recomputed softmax; fastest on CPU); auto picks per platform.")
    cache_latents: bool = _f(True, "Encode every image with the VAE once, then train on cached latents.")
    pre_compute_text_embeddings: bool = _f(
        False, "Encode prompts once and free the text encoder (incompatible with train_text_encoder).")
    compilation_cache_dir: str | None = _f(None, "Persistent XLA compilation cache folder (jax).")


@dataclass(frozen=True)
class CheckpointingSection:
    """Where results go, how often state is saved and what is resumed."""

    output_dir: str = _f("dreambooth-model", "Folder for the final pipeline and checkpoint-N folders.")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most N checkpoints; None: keep all.")
    resume_from_checkpoint: str | None = _f(
        None, "A checkpoint folder to resume from, or 'latest' for the newest in output_dir.")
    save_steps: int | None = _f(
        None, "train_dreambooth_flax.py's name for checkpointing_steps; when set it wins.")
    skip_save_text_encoder: bool = _f(
        False, "Leave the text encoder out of the saved pipeline (saves space for T5).")


@dataclass(frozen=True)
class ValidationSection:
    """Sample images during training to watch progress."""

    validation_prompt: str | None = _f(None, "Prompt for validation images; None: no validation.")
    num_validation_images: int = _f(4, "Images generated per validation.")
    validation_steps: int = _f(100, "Validate every N optimizer steps.")
    validation_epochs: int | None = _f(
        None, "Validate every N epochs instead of every validation_steps (the LoRA scripts' way).")
    validation_images: tuple[str, ...] | None = _f(
        None, "Low-resolution images to upscale at validation (DeepFloyd IF stage II).")
    validation_scheduler: Literal["DPMSolverMultistepScheduler", "DDPMScheduler"] = _f(
        "DPMSolverMultistepScheduler", "Sampler used for validation images.")


@dataclass(frozen=True)
class HubSection:
    """Publishing the result to the Hugging Face Hub."""

    push_to_hub: bool = _f(False, "Upload output_dir to the Hub when training ends.")
    hub_token: str | None = _f(None, "Hub token; prefer `hf auth login`. Never written to resolved specs.")
    hub_model_id: str | None = _f(None, "Hub repo id; None: the output_dir name under your account.")


@dataclass(frozen=True)
class LoggingSection:
    """Metrics and trackers."""

    logging_dir: str = _f("logs", "Tracker log folder, relative to output_dir.")
    report_to: ReportTo = _f("tensorboard", "Tracker (accelerate names); 'none' logs to stdout only.")
    log_every_steps: int = _f(10, "Log metrics (a host sync on jax) every N optimizer steps.")


@dataclass(frozen=True)
class LoraSection:
    """Low-rank adapters instead of a full fine-tune (the LoRA scripts' flags)."""

    use_lora: bool = _f(False, "Train LoRA adapters instead of all weights (train_dreambooth_lora*.py).")
    rank: int = _f(4, "LoRA rank.")
    lora_alpha: float | None = _f(None, "LoRA alpha; None: equal to rank, as diffusers.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    lora_target_modules: tuple[str, ...] | None = _f(
        None, "UNet module names to adapt; None: diffusers' list for the model family.")
    lora_text_encoder_target_modules: tuple[str, ...] | None = _f(
        None, "Text-encoder module names to adapt; None: q/k/v/out projections.")
    output_kohya_format: bool = _f(False, "Also write the LoRA in kohya format (A1111, ComfyUI).")


@dataclass(frozen=True)
class SdxlSection:
    """Options of train_dreambooth_lora_sdxl.py."""

    pretrained_vae_model_name_or_path: str | None = _f(
        None, "A VAE to use instead of the pipeline's, e.g. an fp16-safe SDXL VAE.")
    do_edm_style_training: bool = _f(False, "EDM-style preconditioning and loss (SDXL script).")


@dataclass(frozen=True)
class DeepFloydIFSection:
    """Options that only DeepFloyd IF stages use."""

    class_labels_conditioning: Literal["timesteps"] | None = _f(
        None, "Extra UNet class-label conditioning; 'timesteps' for the IF stage II upscaler.")


@dataclass(frozen=True)
class ParallelismSection:
    """Device mesh ("data", "fsdp") and multi-host setup."""

    data_parallelism: int = _f(-1, "Size of the mesh 'data' axis; -1: all devices left after fsdp.")
    fsdp_parallelism: int = _f(1, "Size of the mesh 'fsdp' axis (params and optimizer sharded over it).")
    coordinator_address: str | None = _f(
        None, "host:port of process 0 for jax.distributed; None: auto-detect (Cloud TPU, SLURM).")
    num_processes: int | None = _f(None, "Number of hosts/processes; set with coordinator_address.")
    process_id: int | None = _f(None, "This process's index in [0, num_processes).")
    local_rank: int = _f(-1, "Set by torch launchers; -1 outside distributed runs.")


@dataclass(frozen=True)
class RunSpec:
    """A whole run. Build it with ``load_spec``/``load_spec_from_dict``; it is never mutated."""

    backend: Literal["auto", "jax", "torch"] = _f(
        "auto", "auto: jax on TPU, CPU and GPUs >= 30 GB, torch on smaller GPUs or for torch-only options.")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    prior: PriorSection = field(default_factory=PriorSection)
    optim: OptimSection = field(default_factory=OptimSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    checkpointing: CheckpointingSection = field(default_factory=CheckpointingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    hub: HubSection = field(default_factory=HubSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sdxl: SdxlSection = field(default_factory=SdxlSection)
    deepfloyd_if: DeepFloydIFSection = field(default_factory=DeepFloydIFSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)

    def flat(self) -> dict[str, Any]:
        """Every field by its flat (diffusers flag) name; sections disappear."""
        out: dict[str, Any] = {"backend": self.backend}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        return out


SECTIONS: dict[str, type] = {
    name: cls for name, cls in typing.get_type_hints(RunSpec).items() if name != "backend"}


# --------------------------------------------------------------------------- field index


@dataclass(frozen=True)
class FieldInfo:
    """One spec key: where it lives, its type and default, and what it is for."""

    name: str
    section: str | None  # None for the top-level ``backend``
    annotation: Any
    default: Any
    doc: str

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The allowed strings of a Literal-typed field, else None."""
        inner = _strip_optional(self.annotation)[0]
        return typing.get_args(inner) if typing.get_origin(inner) is Literal else None

    @property
    def kind(self) -> str:
        """How the CLI reads it: 'bool' (bare flag), 'list' (nargs='+') or 'scalar'."""
        inner = _strip_optional(self.annotation)[0]
        if inner is bool:
            return "bool"
        return "list" if typing.get_origin(inner) is tuple else "scalar"


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of ``X | None``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _build_field_index() -> dict[str, FieldInfo]:
    """Flat name -> FieldInfo; fails at import if two sections reuse a name (flat CLI must be unique)."""
    hints = typing.get_type_hints(RunSpec)
    index = {"backend": FieldInfo("backend", None, hints["backend"], "auto",
                                  dataclasses.fields(RunSpec)[0].metadata["doc"])}
    for section, cls in SECTIONS.items():
        section_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in index or f.name in SECTIONS:
                raise RuntimeError(f"spec field {f.name!r} is defined twice; flat names must be unique")
            index[f.name] = FieldInfo(f.name, section, section_hints[f.name], f.default, f.metadata["doc"])
    return index


FIELDS: Mapping[str, FieldInfo] = types.MappingProxyType(_build_field_index())

# Defaults of the other diffusers DreamBooth scripts where they differ from train_dreambooth.py,
# so a user's command line for those scripts means what it meant there.
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


def default_flat() -> dict[str, Any]:
    """Every key's default by flat name; an option counts as 'set' when it differs from this."""
    return {name: info.default for name, info in FIELDS.items()}


def get_flat(spec: RunSpec, name: str) -> Any:
    """The value of one key by its flat name (``get_flat(spec, "learning_rate")``)."""
    info = _field(name, f"--{name}")
    return spec.backend if info.section is None else getattr(getattr(spec, info.section), name)


def replace_flat(spec: RunSpec, **overrides: Any) -> RunSpec:
    """A copy of ``spec`` with keys replaced by flat name, type-checked like CLI values.

    Only per-key checks run here; call ``validate_spec`` on the result for cross-key rules.
    """
    values = spec.flat()
    for name, raw in overrides.items():
        where = f"replace_flat: {name}"
        values[name] = _coerce(_field(name, where), raw, where)
    return _build(values)


# --------------------------------------------------------------------------- value coercion

_TRUE = frozenset({"true", "1", "yes", "on", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "off", "n", "f"})
_NONE_WORDS = frozenset({"none", "null", "~"})


def _field(name: str, where: str) -> FieldInfo:
    """The FieldInfo of ``name`` or an error suggesting the closest valid key."""
    info = FIELDS.get(name)
    if info is None:
        raise JaxboothError(f"{where}: unknown option{_suggest(name)}")
    return info


def _closest(name: str, pool: Sequence[str]) -> str | None:
    """The most similar string in ``pool`` (case-insensitive), or None when nothing is close."""
    lowered = {p.lower(): p for p in pool}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def _suggest(name: str, candidates: Sequence[str] | None = None) -> str:
    """'; did you mean --x (section s)?' for an unknown key, or a pointer to the full list."""
    hit = _closest(name, list(candidates if candidates is not None else [*FIELDS, *SECTIONS]))
    if hit is None:
        return "; run `jaxbooth train --help` for the valid keys"
    if hit in SECTIONS:
        return f"; did you mean section {hit!r}?"
    section = FIELDS[hit].section
    return f"; did you mean --{hit}" + (f" (section {section})?" if section else "?")


def _coerce(info: FieldInfo, raw: Any, where: str) -> Any:
    """``raw`` (a CLI string or a YAML value) as the field's declared type, or a JaxboothError."""
    inner, optional = _strip_optional(info.annotation)
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in _NONE_WORDS
                       and inner is not str and "none" not in (info.choices or ())):
        if optional:
            return None
        raise JaxboothError(f"{where} cannot be empty; expected {_expected(info)}, "
                            f"e.g. --{info.name}={info.default} (its default)")
    try:
        return _convert(inner, raw, info)
    except (TypeError, ValueError):
        if info.choices and isinstance(raw, str):
            hit = _closest(raw, info.choices)
            hint = f"; did you mean {hit!r}?" if hit else ""
            raise JaxboothError(f"{where}={raw!r} is not {_expected(info)}{hint}") from None
        example = info.default if info.default is not None else _example(inner)
        example = f"--{info.name}={example}" if where.startswith("--") else f"{info.name}: {example}"
        raise JaxboothError(f"{where}={raw!r} is not {_expected(info)}; use e.g. {example}") from None


def _convert(inner: Any, raw: Any, info: FieldInfo) -> Any:
    """Type conversion proper; raises TypeError/ValueError for _coerce to word."""
    if inner is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower() if isinstance(raw, str) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(raw)
    if inner is int:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, int):
            return raw
        value = float(raw) if isinstance(raw, float) else None
        if value is None:
            text = str(raw).strip()
            if text.lstrip("+-").isdigit():
                return int(text)
            value = float(text)  # "1e3" is a fine step count; "4.5" is not
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(raw)
        return int(value)
    if inner is float:
        if isinstance(raw, bool):
            raise TypeError(raw)
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    if typing.get_origin(inner) is tuple:
        items = [raw] if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) else raw
        if not isinstance(items, (list, tuple)) or not items:
            raise TypeError(raw)
        return tuple(_plain_str(x) for x in items)
    text = _plain_str(raw)
    if info.choices is not None:
        return _pick_choice(info, text)
    return text


def _plain_str(raw: Any) -> str:
    """Strings pass; YAML numbers (a revision '2023') become text; booleans and containers fail."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)
    raise TypeError(raw)


def _pick_choice(info: FieldInfo, text: str) -> str:
    """The canonical spelling of a choice, matched case-insensitively (diffusers' 'AdamW')."""
    for choice in info.choices or ():
        if text.strip().lower() == choice.lower():
            return choice
    raise ValueError(text)


def _expected(info: FieldInfo) -> str:
    inner, optional = _strip_optional(info.annotation)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    text = names.get(inner, "one or more strings" if typing.get_origin(inner) is tuple else "a value")
    if info.choices:
        text = "one of " + ", ".join(info.choices)
    return text + (" (or none)" if optional else "")


def _example(inner: Any) -> str:
    return {bool: "true", int: "1", float: "1.0", str: "VALUE"}.get(inner, "VALUE")


# --------------------------------------------------------------------------- loading

_Item = tuple[str, Any, str]  # (flat name, typed value, where it came from for messages)


def load_spec(argv: Sequence[str], *, preset: str | None = None) -> RunSpec:
    """Parse a diffusers-style command line (plus ``--config RUN.yaml``) into a validated RunSpec.

    Precedence, lowest first: field defaults, ``SCRIPT_PRESETS[preset]`` (or ``--preset
    train_dreambooth_lora.py`` on the command line, which wins over the argument), each ``--config``
    file in order (each may ``extends:`` a base file), then the other flags. Flags take
    ``--key=value``, ``--key value``, bare ``--flag`` for booleans (``--flag=false`` too) and
    several values for list keys (``--validation_images a.png b.png``). Warnings are issued
    as ``SpecWarning``; every user error is a ``JaxboothError`` naming key, value and fix.
    """
    values, sources = default_flat(), {}
    for name, value, where in _command_line_items(argv, preset):
        values[name], sources[name] = value, where
    return _finish(_build(values), sources)


def _command_line_items(argv: Sequence[str], preset: str | None = None) -> list[_Item]:
    """What a command line sets, lowest precedence first: preset, ``--config`` files, flags."""
    config_paths, cli_preset, cli_items = _parse_cli(argv)
    items = _preset_items(cli_preset or preset)
    for path in config_paths:
        items += _read_yaml_items(path)
    return items + cli_items


def given_keys(argv: Sequence[str]) -> set[str]:
    """The flat keys a command line sets itself (flags, ``--config`` files, a preset), not by default."""
    return {name for name, _, _ in _command_line_items(argv)}


def load_spec_from_dict(d: Mapping[str, Any], *, source: str = "<dict>") -> RunSpec:
    """A validated RunSpec from a mapping that is nested by section, flat, or a mix of both."""
    values, sources = default_flat(), {}
    for name, value, where in _mapping_items(d, source, {}):
        values[name], sources[name] = value, where
    return _finish(_build(values), sources)


def _finish(spec: RunSpec, sources: Mapping[str, str]) -> RunSpec:
    """Validate, surface warnings, and reject torch-only options under an explicit backend early."""
    for message in validate_spec(spec, sources):
        warnings.warn(message, SpecWarning, stacklevel=3)
    if spec.backend != "auto":
        check_backend(spec, spec.backend)
    return spec


def _preset_items(preset: str | None) -> list[_Item]:
    if preset is None:
        return []
    if not preset.endswith(".py"):
        preset += ".py"
    if preset not in SCRIPT_PRESETS:
        raise JaxboothError(f"unknown preset {preset!r}; expected one of {', '.join(SCRIPT_PRESETS)}")
    where = f"preset {preset}"
    return [(k, _coerce(FIELDS[k], v, where), where) for k, v in SCRIPT_PRESETS[preset].items()]


def _parse_cli(argv: Sequence[str]) -> tuple[list[str], str | None, list[_Item]]:
    """(config paths, preset, typed items) from flat flags; unknown flags name the closest key."""
    configs: list[str] = []
    preset = None
    items: list[_Item] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise JaxboothError(f"unexpected argument {token!r}: options look like --key=value "
                                "(if it is a value with spaces, quote it)")
        name, has_eq, inline = token[2:].partition("=")
        name = name.replace("-", "_")
        i += 1
        if name in ("config", "preset"):
            value, i = _take_value(argv, i, inline if has_eq else None, f"--{name}")
            if name == "config":
                configs.append(value)
            else:
                preset = value
            continue
        info = _field(name, f"--{name}")
        raw, i = _take_raw(info, argv, i, inline if has_eq else None)
        items.append((name, _coerce(info, raw, f"--{name}"), f"--{name}"))
    return configs, preset, items


def _take_value(argv: Sequence[str], i: int, inline: str | None, flag: str) -> tuple[str, int]:
    """The value of ``--key=v`` or ``--key v``; a following ``--other`` is not a value."""
    if inline is not None:
        return inline, i
    if i < len(argv) and not argv[i].startswith("--"):
        return argv[i], i + 1
    raise JaxboothError(f"{flag} needs a value: write {flag}=VALUE")


def _take_raw(info: FieldInfo, argv: Sequence[str], i: int, inline: str | None) -> tuple[Any, int]:
    """Raw CLI value(s) for one flag, following argparse's store_true and nargs='+' conventions."""
    if info.kind == "bool":
        if inline is not None:
            return inline, i
        if i < len(argv) and argv[i].lower() in _TRUE | _FALSE:
            return argv[i], i + 1  # --flag false: accepted for the type=bool prodigy flags
        return True, i
    if info.kind == "list":
        values = [] if inline is None else [inline]
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if not values:
            raise JaxboothError(f"--{info.name} needs one or more values: --{info.name} A [B ...]")
        return values, i
    return _take_value(argv, i, inline, f"--{info.name}")


def _read_yaml_items(path: str, chain: tuple[Path, ...] = ()) -> list[_Item]:
    """Typed items from one YAML file, after those of the file it ``extends:`` (relative path)."""
    resolved = Path(path).resolve()
    if resolved in chain:
        raise JaxboothError(f"{path}: 'extends' loops back to itself via {' -> '.join(map(str, chain))}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JaxboothError(f"{path}: config file not found; check the --config path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise JaxboothError(f"{path}: cannot read config file ({error})") from None
    data, lines = _parse_yaml(text, path)
    if not isinstance(data, dict):
        raise JaxboothError(f"{path}: expected a mapping of spec keys at the top level, found "
                            f"{type(data).__name__}; write `key: value` lines or `section:` blocks")
    items: list[_Item] = []
    base = data.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise JaxboothError(f"{path}: extends={base!r} must be a file path")
        items += _read_yaml_items(str(resolved.parent / base), (*chain, resolved))
    return items + _mapping_items(data, path, lines)


def _parse_yaml(text: str, path: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """(data, line of each key) from YAML text; syntax errors and repeated keys name the line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise JaxboothError(f"{path}{line}: invalid YAML ({problem}); fix the syntax there") from None
    lines: dict[tuple[str, ...], int] = {}
    _collect_key_lines(root, (), lines, path)
    return data, lines


def _collect_key_lines(node: Any, prefix: tuple[str, ...], lines: dict, path: str) -> None:
    if not isinstance(node, yaml.MappingNode) or len(prefix) > 1:
        return
    for key_node, value_node in node.value:
        key = (*prefix, str(key_node.value))
        line = key_node.start_mark.line + 1
        if key in lines:
            raise JaxboothError(f"{path}:{line}: key {'.'.join(key)!r} repeats the one on line "
                                f"{lines[key]}; keep one")
        lines[key] = line
        _collect_key_lines(value_node, key, lines, path)


def _mapping_items(data: Mapping[str, Any], origin: str, lines: Mapping[tuple, int]) -> list[_Item]:
    """Typed items from a mapping of sections and/or flat keys; each key may appear once."""
    items: list[_Item] = []
    for key, value in data.items():
        key = str(key)
        if key in SECTIONS and not isinstance(value, Mapping) and value is not None:
            raise JaxboothError(f"{_loc(origin, lines, (key,))}: section {key!r} must be a mapping "
                                f"of its keys, found {value!r}")
        if key in SECTIONS:
            items += [_mapping_item(key, str(k), v, origin, lines) for k, v in (value or {}).items()]
        else:
            items.append(_mapping_item(None, key, value, origin, lines))
    seen: dict[str, str] = {}
    for name, _, where in items:
        if name in seen:
            raise JaxboothError(f"{where}: {name} is also set at {seen[name]}; keep one of them")
        seen[name] = where
    return items


def _mapping_item(section: str | None, key: str, value: Any, origin: str, lines: Mapping) -> _Item:
    path = (key,) if section is None else (section, key)
    where = f"{_loc(origin, lines, path)}: {'.'.join(path)}"
    info = FIELDS.get(key)
    if info is None:
        pool = None if section is None else [n for n, f in FIELDS.items() if f.section == section]
        hint = _suggest(key, pool)
        if section is not None and "did you mean" not in hint:
            hint = _suggest(key)
        raise JaxboothError(f"{where}: unknown key{hint}")
    if section is not None and info.section != section:
        home = f"section {info.section!r}" if info.section else "the top level"
        raise JaxboothError(f"{where}: {key!r} belongs to {home}, not {section!r}; move it there "
                            "(or write it flat, without a section)")
    return key, _coerce(info, value, where), where


def _loc(origin: str, lines: Mapping[tuple, int], path: tuple[str, ...]) -> str:
    line = lines.get(path)
    return f"{origin}:{line}" if line else origin


def _build(values: Mapping[str, Any]) -> RunSpec:
    """RunSpec from a complete flat mapping (no validation)."""
    grouped: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in values.items():
        section = FIELDS[name].section
        if section is not None:
            grouped[section][name] = value
    return RunSpec(backend=values["backend"],
                   **{section: cls(**grouped[section]) for section, cls in SECTIONS.items()})


# --------------------------------------------------------------------------- validation

# name -> (lower bound, inclusive?) for numeric keys; None values (unset) are not checked.
_LOWER_BOUNDS: Mapping[str, tuple[float, bool]] = types.MappingProxyType({
    **dict.fromkeys(["train_batch_size", "sample_batch_size", "num_train_epochs", "max_train_steps",
                     "gradient_accumulation_steps", "checkpointing_steps", "checkpoints_total_limit",
                     "save_steps", "validation_steps", "validation_epochs", "num_validation_images",
                     "num_class_images", "lr_num_cycles", "log_every_steps", "repeats", "rank",
                     "tokenizer_max_length", "fsdp_parallelism", "num_processes"], (1, True)),
    **dict.fromkeys(["lr_warmup_steps", "dataloader_num_workers", "process_id", "prior_loss_weight",
                     "adam_weight_decay", "adam_weight_decay_text_encoder", "adam_beta1", "adam_beta2",
                     "lora_dropout", "prodigy_beta3"], (0, True)),
    **dict.fromkeys(["learning_rate", "text_encoder_lr", "lr_power", "adam_epsilon", "max_grad_norm",
                     "snr_gamma", "lora_alpha"], (0, False)),
    "resolution": (8, True),
    "local_rank": (-1, True),
})
_BELOW_ONE = frozenset({"adam_beta1", "adam_beta2", "lora_dropout", "prodigy_beta3"})


class _Report:
    """Collects every problem so one run of the CLI shows all of them, each with its source."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]):
        self.values, self.sources = values, sources
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def at(self, name: str) -> str:
        """``--key=value`` or ``run.yaml:3: optim.key=value``: where the user wrote it."""
        value = self.values[name]
        return f"{self.sources.get(name, '--' + name)}={value!r}"

    def is_set(self, name: str) -> bool:
        return self.values[name] != FIELDS[name].default


def validate_spec(spec: RunSpec, sources: Mapping[str, str] | None = None) -> list[str]:
    """Cross-key rules (diffusers' parse_args checks and ours); returns warnings, raises on errors.

    ``sources`` maps flat names to where they were set, for messages; load_spec passes it.
    Checks that need the devices are in ``mesh_shape`` and ``capabilities.choose_backend``.
    """
    report = _Report(spec.flat(), sources or {})
    for check in (_check_ranges, _check_prior, _check_schedule, _check_conflicts, _check_multihost,
                  _check_inert):
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
    resolution = r.values["resolution"]
    if resolution % 8:
        r.errors.append(f"{r.at('resolution')}: not divisible by 8 (the VAE downsamples by 8); "
                        f"use {resolution // 8 * 8} or {(resolution // 8 + 1) * 8}")
    if r.values["data_parallelism"] == 0 or r.values["data_parallelism"] < -1:
        r.errors.append(f"{r.at('data_parallelism')}: must be -1 (all devices left after fsdp) or >= 1")


def _check_prior(r: _Report) -> None:
    """diffusers: prior preservation needs both class keys; class keys alone are only a warning."""
    v = r.values
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


def _check_inert(r: _Report) -> None:
    """Options that only matter together with another one: say so instead of ignoring silently."""
    v = r.values
    if not v["use_lora"]:
        for name in ("rank", "lora_alpha", "lora_dropout", "use_dora", "lora_target_modules",
                     "lora_text_encoder_target_modules", "output_kohya_format"):
            if r.is_set(name):
                r.warnings.append(f"{r.at(name)} has no effect without --use_lora")
    if v["optimizer"] != "prodigy":
        for name in ("prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction",
                     "prodigy_safeguard_warmup"):
            if r.is_set(name):
                r.warnings.append(f"{r.at(name)} has no effect unless --optimizer=prodigy")
    if v["validation_images"] is not None and v["validation_prompt"] is None:
        r.warnings.append("--validation_images has no effect without --validation_prompt")


# --------------------------------------------------------------------------- derived values


def effective_learning_rate(spec: RunSpec, num_processes: int) -> float:
    """UNet LR after ``scale_lr``: lr x grad accumulation x per-device batch x processes (diffusers)."""
    o = spec.optim
    if not o.scale_lr:
        return o.learning_rate
    return o.learning_rate * o.gradient_accumulation_steps * o.train_batch_size * num_processes


def effective_text_encoder_learning_rate(spec: RunSpec, num_processes: int) -> float:
    """Text-encoder LR: ``text_encoder_lr`` as given (the SDXL script does not scale it), else the UNet's."""
    if spec.optim.text_encoder_lr is not None:
        return spec.optim.text_encoder_lr
    return effective_learning_rate(spec, num_processes)


def effective_batch_size(spec: RunSpec, num_processes: int) -> int:
    """Instance examples per optimizer step over all replicas (diffusers' 'total train batch size')."""
    return spec.optim.train_batch_size * num_processes * spec.optim.gradient_accumulation_steps


def num_update_steps_per_epoch(spec: RunSpec, num_examples: int, num_processes: int) -> int:
    """Optimizer steps per epoch as diffusers counts them: batches (last partial kept), split
    over processes, divided by gradient accumulation, each rounded up.

    ``num_examples`` is the dataset length: the instance image count, or with prior
    preservation max(instance images, class images), as diffusers' DreamBoothDataset.
    """
    if num_examples < 1:
        raise JaxboothError(f"the training set is empty (num_examples={num_examples}); "
                            "check --instance_data_dir")
    batches = math.ceil(num_examples / spec.optim.train_batch_size)
    per_process = math.ceil(batches / num_processes)
    return math.ceil(per_process / spec.optim.gradient_accumulation_steps)


def total_train_steps(spec: RunSpec, num_examples: int, num_processes: int) -> int:
    """``max_train_steps`` if set, else epochs x update steps per epoch (diffusers' rule)."""
    if spec.optim.max_train_steps is not None:
        return spec.optim.max_train_steps
    return spec.optim.num_train_epochs * num_update_steps_per_epoch(spec, num_examples, num_processes)


def total_train_epochs(spec: RunSpec, num_examples: int, num_processes: int) -> int:
    """Epochs the loop runs: diffusers recomputes them from the total steps, rounding up."""
    per_epoch = num_update_steps_per_epoch(spec, num_examples, num_processes)
    return math.ceil(total_train_steps(spec, num_examples, num_processes) / per_epoch)


def mesh_shape(spec: RunSpec, device_count: int) -> tuple[int, int]:
    """(data, fsdp) axis sizes for ``device_count`` devices; -1 data means all that remain."""
    par = spec.parallelism
    fsdp, data = par.fsdp_parallelism, par.data_parallelism
    if device_count % fsdp:
        raise JaxboothError(f"--fsdp_parallelism={fsdp} does not divide the {device_count} devices; "
                            f"use a divisor of {device_count}")
    if data == -1:
        data = device_count // fsdp
    if data * fsdp != device_count:
        raise JaxboothError(f"--data_parallelism={data} x --fsdp_parallelism={fsdp} = {data * fsdp}, "
                            f"but there are {device_count} devices; use --data_parallelism=-1")
    return data, fsdp


def vae_name_or_path(spec: RunSpec) -> str | None:
    """The VAE override, whichever of the flax or SDXL flag names gave it (validation forbids both)."""
    return spec.model.pretrained_vae_name_or_path or spec.sdxl.pretrained_vae_model_name_or_path


def checkpoint_every_steps(spec: RunSpec) -> int:
    """Checkpoint cadence in optimizer steps; the flax script's ``save_steps`` wins when given."""
    c = spec.checkpointing
    return c.save_steps if c.save_steps is not None else c.checkpointing_steps


def validation_schedule(spec: RunSpec) -> tuple[str, int] | None:
    """("epochs", n) or ("steps", n); None when no validation_prompt is set (no validation)."""
    v = spec.validation
    if v.validation_prompt is None:
        return None
    if v.validation_epochs is not None:
        return "epochs", v.validation_epochs
    return "steps", v.validation_steps


def lora_scale_alpha(spec: RunSpec) -> float:
    """LoRA alpha; diffusers sets alpha = rank, so the update scale alpha/rank is 1 by default."""
    return spec.lora.lora_alpha if spec.lora.lora_alpha is not None else float(spec.lora.rank)


# --------------------------------------------------------------------------- serialization


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """Plain nested dict (``backend`` then one mapping per section); tuples become lists for YAML."""
    out: dict[str, Any] = {"backend": spec.backend}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(spec, section))
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


def write_resolved_spec(spec: RunSpec, path: str | Path) -> Path:
    """Write the full spec as YAML that ``load_spec(["--config", path])`` reads back equal.

    The hub token is left out (written as null): resolved specs land in output dirs and
    checkpoints that get shared. Creates the parent folder; returns the path written.
    """
    data = spec_to_dict(spec)
    data["hub"]["hub_token"] = None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# jaxbooth resolved run spec: every key, defaults included. Reuse with --config.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
