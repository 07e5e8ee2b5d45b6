"""The run spec's schema: nested frozen dataclasses whose field names are diffusers' DreamBooth flags.

One source for the YAML layout, the command-line flags, their defaults and ``--help`` text:
``FIELDS`` indexes every key by its flat (flag) name, ``SECTIONS`` maps section names to
their dataclasses. Defaults are those of diffusers' ``examples/dreambooth/train_dreambooth.py``
(main, 58eb52c); other scripts' defaults are ``jaxbooth.spec.presets.SCRIPT_PRESETS``.

Imports only the standard library: ``jaxbooth.capabilities`` imports this module at load time,
so nothing here may import capabilities (or anything that does).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union


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
        "auto", "Architecture family; auto reads it from the model's model_index.json (and with backend auto, "
                "a DeepFloyd IF pipeline picks torch, the backend that trains it).")
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
    center_crop: bool = _f(False, "Center-crop after resizing instead of a random crop (jax: up to 4 random crops "
                                  "per image are cached, one picked per step).")
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
    dataloader_num_workers: int = _f(0, "Loader workers; 0 loads in the main process (jax: threads decoding the "
                                        "images once for the latent cache).")
    skip_bad_images: bool = _f(
        False, "Skip unreadable images with a warning instead of failing the run before training.")
    caption_extension: str | None = _f(
        None, "Read each image's caption from the file of this extension beside it (kohya: .txt or .caption), "
              "falling back to instance_prompt where none exists; None: instance_prompt for every image, as diffusers.")
    caption_dropout_rate: float = _f(0.0, "Probability of training a row on the empty caption (kohya).")
    shuffle_caption: bool = _f(False, "Shuffle the caption's caption_separator-separated tags each time a row is "
                                      "drawn, keeping the first keep_tokens in place (kohya).")
    keep_tokens: int = _f(0, "With shuffle_caption: how many leading tags stay in place (kohya).")
    caption_separator: str = _f(",", "What separates the tags of a caption for shuffle_caption (kohya).")
    dataset_config: str | None = _f(
        None, "A dataset config file (YAML, or kohya's dataset_config TOML): subsets, each with its folder, captions, "
              "num_repeats, is_reg (class images), resolution and flip; replaces instance_data_dir/class_data_dir.")
    enable_bucket: bool = _f(False, "Aspect-ratio buckets: each image trains at the bucket shape nearest its aspect "
                                    "ratio (about resolution^2 pixels), cropped minimally, one shape a batch (kohya).")
    min_bucket_reso: int = _f(256, "Smallest bucket side in pixels (enable_bucket).")
    max_bucket_reso: int = _f(1024, "Largest bucket side in pixels (enable_bucket).")
    bucket_reso_steps: int = _f(64, "Bucket sides are multiples of this (enable_bucket).")
    bucket_no_upscale: bool = _f(False, "Never upscale an image to reach its bucket; small images get smaller buckets "
                                        "(enable_bucket).")


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

    seed: int | None = _f(None, "Seed for reproducible training; None: the resumed checkpoint's seed, else a fresh "
                                "random one (recorded, so a relaunch resumes exactly).")
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
    multires_noise_iterations: int = _f(0, "Multi-resolution (pyramid) noise levels added to the training noise; "
                                           "0: off (kohya; 6-10 typical).")
    multires_noise_discount: float = _f(0.3, "Weight decay per pyramid level of multires noise (kohya).")
    zero_terminal_snr: bool = _f(False, "Rescale the betas to zero terminal SNR (arXiv 2305.08891); use with "
                                        "v-prediction models.")
    debiased_estimation_loss: bool = _f(False, "Weight the loss by 1/sqrt(SNR) (debiased estimation, kohya).")
    loss_type: Literal["l2", "huber", "smooth_l1"] = _f("l2", "Loss between prediction and target (kohya).")
    huber_schedule: Literal["constant", "exponential", "snr"] = _f(
        "snr", "How huber_c varies over timesteps for the huber and smooth_l1 losses (kohya).")
    huber_c: float = _f(0.1, "Huber loss parameter (kohya).")
    masked_loss: bool = _f(False, "Weight the loss by each image's mask: its alpha channel (kohya).")
    use_ema: bool = _f(False, "Keep an exponential moving average of the trained weights, used for validation and "
                              "saved as the output.")
    ema_decay: float = _f(0.9999, "EMA decay per optimizer step.")


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
    remat_policy: Literal["full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"] = _f(
        "full", "What gradient_checkpointing keeps (jax.checkpoint policies): full recomputes each block; the others "
                "save matmul outputs for speed at more memory.")
    cache_latents: bool = _f(True, "Encode every image with the VAE once, then train on cached latents.")
    pre_compute_text_embeddings: bool = _f(
        False, "Encode prompts once and free the text encoder (incompatible with train_text_encoder; jax always "
               "caches the embeddings of a frozen encoder).")
    cache_latents_to_disk: bool = _f(False, "Keep the VAE latents of every image crop in encoding_cache_dir, keyed by "
                                            "image content, crop and VAE weights: a second run encodes nothing.")
    cache_text_embeddings_to_disk: bool = _f(
        False, "Keep frozen text encoders' prompt embeddings in encoding_cache_dir, keyed by prompt and encoder "
               "weights.")
    encoding_cache_dir: str | None = _f(None, "Folder of the disk caches; None: jaxbooth's cache folder/encodings.")
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
    save_single_file: bool = _f(False, "Also write the pipeline as one .safetensors in the original Stable Diffusion "
                                       "key layout (A1111, ComfyUI).")
    save_precision: Literal["fp16", "bf16", "fp32"] | None = _f(
        None, "Dtype of the single-file checkpoint; None: fp16 (as A1111 checkpoints).")


@dataclass(frozen=True)
class ValidationSection:
    """Sample images during training to watch progress."""

    validation_prompt: str | None = _f(None, "Prompt for validation images; None: no validation.")
    num_validation_images: int = _f(4, "Images generated per validation.")
    validation_steps: int = _f(100, "Validate every N optimizer steps.")
    validation_epochs: int | None = _f(
        None, "Validate every N epochs instead of every validation_steps (the LoRA scripts' way).")
    validation_images: tuple[str, ...] | None = _f(
        None, "DeepFloyd IF stage II only, and required there with validation_prompt: the low-resolution "
              "images the upscaler is validated on, one upscaled image each per validation "
              "(num_validation_images is then unused, as in diffusers). Checked before any model loads.")
    validation_scheduler: Literal["DPMSolverMultistepScheduler", "DDPMScheduler"] = _f(
        "DPMSolverMultistepScheduler", "Sampler used for validation images.")
    sample_prompts: str | None = _f(
        None, "A file of prompts, one per line, with kohya's per-prompt options (--n negative, --w/--h size, "
              "--s steps, --l guidance, --d seed), sampled into a grid image every sample_every_n_steps.")
    sample_every_n_steps: int | None = _f(None, "Sample the sample_prompts every N optimizer steps.")
    sample_every_n_epochs: int | None = _f(None, "Sample the sample_prompts every N epochs.")


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
    merge_lora_into_pipeline: bool = _f(
        False, "Also write the base pipeline with the LoRA merged in (a plain diffusers pipeline) into output_dir.")


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
        None, "DeepFloyd IF stage II only, and required there: 'timesteps' passes the noise-augmentation "
              "level of the low-resolution conditioning image as the UNet's class label, as "
              "IFSuperResolutionPipeline does at inference (diffusers' script passes the denoising timestep, "
              "which its pipeline never feeds).")


@dataclass(frozen=True)
class ParallelismSection:
    """Device mesh ("data", "fsdp") and multi-host setup."""

    data_parallelism: int = _f(-1, "Size of the mesh 'data' axis; -1: all devices left after fsdp.")
    fsdp_parallelism: int = _f(1, "Size of the mesh 'fsdp' axis (params and optimizer sharded over it).")
    coordinator_address: str | None = _f(
        None, "host:port of process 0 for jax.distributed; None: auto-detect (Cloud TPU, SLURM).")
    num_processes: int | None = _f(None, "Number of hosts/processes; set with coordinator_address.")
    process_id: int | None = _f(None, "This process's index in [0, num_processes).")
    multi_host: bool = _f(False, "Join a multi-host run whose peers jax.distributed discovers (GKE, Open MPI, a TPU "
                                 "VM...); TPU pod slices and SLURM jobs are detected without it.")
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
        inner = strip_optional(self.annotation)[0]
        return typing.get_args(inner) if typing.get_origin(inner) is Literal else None

    @property
    def kind(self) -> str:
        """How the CLI reads it: 'bool' (bare flag), 'list' (nargs='+') or 'scalar'."""
        inner = strip_optional(self.annotation)[0]
        if inner is bool:
            return "bool"
        return "list" if typing.get_origin(inner) is tuple else "scalar"


def strip_optional(annotation: Any) -> tuple[Any, bool]:
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


def default_flat() -> dict[str, Any]:
    """Every key's default by flat name; an option counts as 'set' when it differs from this."""
    return {name: info.default for name, info in FIELDS.items()}


def build_spec(values: Mapping[str, Any]) -> RunSpec:
    """RunSpec from a complete mapping of flat names to already-typed values (no validation)."""
    grouped: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in values.items():
        section = FIELDS[name].section
        if section is not None:
            grouped[section][name] = value
    return RunSpec(backend=values["backend"],
                   **{section: cls(**grouped[section]) for section, cls in SECTIONS.items()})
