"""DeepFloyd IF, written once for both backends: which stage a pipeline is, stage II's conditioning
arithmetic, the learned-variance scheduler switch, and the options an IF run refuses.

IF is a cascade of pixel-space models: stage I (``IFPipeline``) makes 64 px images, stage II
(``IFSuperResolutionPipeline``) upscales them. Both UNets predict noise and a variance (6 output
channels, schedulers with ``variance_type="learned_range"``); DreamBooth trains only the noise
half, so saved pipelines sample with ``fixed_small`` (diffusers' scripts do the same).

Stage II's UNet sees ``cat([x_t, cond])`` where ``cond`` is the low-resolution image upscaled
bilinearly and noised by the pipeline's ``image_noising_scheduler`` at a noise level that is also
its class label. jaxbooth trains on exactly that input (the pipeline's rule), so this module holds
the pieces a backend composes: box downsampling, the 8-bit round trip a PIL stage-I image goes
through, the upsampling mode, and the noising schedule.

Framework-free: stdlib and numpy at module level (PIL only inside ``option_problems``); the array
functions take numpy, jax or torch arrays like ``jaxbooth.diffusion``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxbooth import diffusion
from jaxbooth.errors import JaxboothError

PIPELINE_STAGES = {"IFPipeline": 1, "IFSuperResolutionPipeline": 2}
LOW_RESOLUTION = 64  # stage I's output size: what the cascade feeds stage II, whatever stage II's own size
PROMPT_MAX_LENGTH = 77  # IF pipelines' encode_prompt always pads/truncates to 77 tokens, with the mask
# F.interpolate(low_res, (H, W), mode="bilinear", align_corners=True) in IFSuperResolutionPipeline;
# each backend calls its own op with these.
UPSAMPLE_MODE = "bilinear"
UPSAMPLE_ALIGN_CORNERS = True
NOISING_SCHEDULER = "image_noising_scheduler"
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
FIXED_VARIANCE_TYPE = "fixed_small"
LICENSE = "deepfloyd-if-license"  # the IF checkpoints' licence, which a fine-tune inherits
CARD_TAGS = ("if", "if-diffusers")


# ----------------------------------------------------------------------------------------------
# Which pipeline
# ----------------------------------------------------------------------------------------------


def _model_index(model_dir: str | Path) -> dict:
    """model_index.json as a dict; {} when missing or unreadable (callers fall back)."""
    try:
        index = json.loads((Path(model_dir) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def stage(model_dir: str | Path) -> int | None:
    """1 for an ``IFPipeline`` folder, 2 for ``IFSuperResolutionPipeline``, None otherwise (or unreadable)."""
    return PIPELINE_STAGES.get(_model_index(model_dir).get("_class_name"))


def is_if_pipeline(model_dir: str | Path) -> bool:
    """Whether ``model_dir/model_index.json`` names a DeepFloyd IF stage (False if unreadable)."""
    return stage(model_dir) is not None


def text_encoder_class_name(base_dir: str | Path) -> str:
    """The pipeline's text-encoder class from ``model_index.json`` (``T5EncoderModel`` for IF), for the
    snippets that load a pipeline saved without its text encoder; ``CLIPTextModel`` failing that."""
    entry = _model_index(base_dir).get("text_encoder")
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str) and entry[1]:
        return entry[1]
    return "CLIPTextModel"


# ----------------------------------------------------------------------------------------------
# Stage II conditioning (array-agnostic: numpy, jax or torch)
# ----------------------------------------------------------------------------------------------


def prompt_as_sampled(prompt: str) -> str:
    """The text an IF pipeline hands T5 for ``prompt`` with ``clean_caption=False``: lower-cased and stripped
    (``_text_preprocessing``). T5's tokenizer is case-sensitive, so training on the prompt as written would
    condition on embeddings sampling never produces for "a photo of SKS dog"; diffusers' script has that
    mismatch, jaxbooth trains on what the pipeline encodes."""
    return prompt.lower().strip()


def sampled_prompts(tokenize: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
    """``tokenize`` applied to each prompt :func:`prompt_as_sampled`."""
    return lambda prompts: tokenize([prompt_as_sampled(p) for p in prompts])


def low_res_factor(resolution: int) -> int:
    """How much stage II upscales: ``resolution // LOW_RESOLUTION`` (the seed's 256 -> 4)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= LOW_RESOLUTION \
            or resolution % LOW_RESOLUTION:
        raise JaxboothError(
            f"--resolution={resolution}: DeepFloyd IF stage II upscales stage I's {LOW_RESOLUTION} px images, so "
            f"it trains at a multiple of {LOW_RESOLUTION} above {LOW_RESOLUTION}; set --resolution=256 "
            "(IF-II's size, as the seed's stage II commands do)")
    return resolution // LOW_RESOLUTION


def _spatial_axes(ndim: int, channel_axis: int) -> tuple[int, int]:
    """The two image axes: the last two axes other than the channel axis (NCHW, NHWC, CHW, HWC)."""
    channel_axis %= ndim
    others = [axis for axis in range(ndim) if axis != channel_axis]
    if len(others) < 2:
        raise ValueError(f"an image needs two spatial axes besides the channels; got ndim={ndim}")
    return others[-2], others[-1]


def downsample_box(pixels: Any, factor: int, channel_axis: int = 1) -> Any:
    """Average non-overlapping ``factor`` x ``factor`` blocks (PIL's ``Image.reduce(factor)``, before its
    rounding), for batched or single images in either layout."""
    if factor < 1:
        raise ValueError(f"factor must be at least 1, got {factor}")
    height_axis, width_axis = _spatial_axes(pixels.ndim, channel_axis)
    shape = list(pixels.shape)
    if shape[height_axis] % factor or shape[width_axis] % factor:
        raise ValueError(f"image size {shape[height_axis]}x{shape[width_axis]} is not divisible by {factor}")
    blocks: list[int] = []
    for axis, size in enumerate(shape):
        blocks.extend((size // factor, factor) if axis in (height_axis, width_axis) else (size,))
    # after the split, each spatial axis a is followed by its block axis: a + 1 + (splits before a)
    reduce = (height_axis + 1, width_axis + 2)
    blocked = pixels.reshape(tuple(blocks))
    if diffusion._is_torch(diffusion._xp(pixels)):
        return blocked.mean(dim=reduce)
    return blocked.mean(axis=reduce)


def quantize_8bit(pixels: Any) -> Any:
    """[-1, 1] pixels rounded to the 8-bit grid ``k / 127.5 - 1``: what a stage-I image becomes as a
    PIL image (``numpy_to_pil``: clip, x255, round) read back by stage II (``/ 127.5 - 1``)."""
    xp = diffusion._xp(pixels)
    unit = pixels / 2 + 0.5
    unit = unit.clamp(0, 1) if diffusion._is_torch(xp) else xp.clip(unit, 0, 1)
    return xp.round(unit * 255) / 127.5 - 1


def load_noising_schedule(model_dir: str | Path) -> diffusion.NoiseSchedule:
    """The schedule of a stage II pipeline's ``image_noising_scheduler`` (what noises the upscaled input)."""
    path = Path(model_dir) / NOISING_SCHEDULER / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise JaxboothError(f"{path}: cannot read it ({error.strerror or error}); a DeepFloyd IF stage II folder "
                            f"has {NOISING_SCHEDULER}/ (re-download the pipeline)") from None
    except ValueError as error:
        raise JaxboothError(f"{path}: invalid JSON ({error}); re-download the pipeline") from None
    return diffusion.schedule_from_config(config, source=str(path))


# ----------------------------------------------------------------------------------------------
# Learned variance -> fixed variance
# ----------------------------------------------------------------------------------------------


def has_learned_variance(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config samples with a UNet-predicted variance (IF's ``learned_range``)."""
    return config.get("variance_type") in LEARNED_VARIANCE_TYPES


def fixed_variance_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` sampling with ``fixed_small`` when it had a learned variance; else unchanged.

    DreamBooth regresses only the noise channels, so the trained variance channels are stale;
    diffusers' scripts make this switch for saving and validation.
    """
    out = dict(config)
    if has_learned_variance(config):
        out["variance_type"] = FIXED_VARIANCE_TYPE
    return out


def write_fixed_variance(scheduler_dir: Path) -> bool:
    """Rewrite ``scheduler_dir/scheduler_config.json`` with ``fixed_small`` if it is learned; True when changed.

    Atomic (temporary file + rename); a folder without that file is left alone.
    """
    path = Path(scheduler_dir) / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        return False
    except ValueError as error:
        raise JaxboothError(f"{path}: invalid JSON ({error}); re-save the base pipeline's scheduler") from None
    if not isinstance(config, dict) or not has_learned_variance(config):
        return False
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(fixed_variance_config(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------------------------
# Options ("no silent flags"), checked from the spec and the pipeline class before any model loads
# ----------------------------------------------------------------------------------------------


def _what(pipeline_class: str) -> str:
    names = {"IFPipeline": "DeepFloyd IF stage I", "IFSuperResolutionPipeline": "DeepFloyd IF stage II"}
    return f"{pipeline_class} ({names[pipeline_class]})" if pipeline_class in names else pipeline_class


def _image_problem(path: str) -> str | None:
    """Why ``path`` is not a readable image, or None."""
    from PIL import Image

    if not Path(path).is_file():
        return (f"--validation_images: {path} does not exist; give existing low-resolution image files (e.g. the "
                f"instance images downsized to {LOW_RESOLUTION} px)")
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises many kinds for a corrupt or non-image file
        return f"--validation_images: {path} cannot be read as an image ({error}); give PNG or JPEG files"
    return None


def option_problems(spec: Any, pipeline_class: str) -> list[str]:
    """One line per option this pipeline refuses, each naming the key and the fix; [] when all is well.

    For every pipeline: the IF-only keys (``class_labels_conditioning``, ``validation_images``) are
    refused where the UNet or pipeline would ignore or reject them. For IF: VAE overrides (pixel
    space), the kohya format (none exists for IF), LoRA on the text encoder (T5 has none of the
    target projections), stage II without its class-label conditioning or validation images, and a
    ``--resolution`` stage II cannot be fed at. ``validation_images`` files are opened here.
    """
    stage_ = PIPELINE_STAGES.get(pipeline_class)
    what = _what(pipeline_class)
    labels = spec.deepfloyd_if.class_labels_conditioning
    images = tuple(spec.validation.validation_images or ())
    prompt = spec.validation.validation_prompt
    problems = []
    if stage_ != 2:
        if labels is not None:
            problems.append(f"--class_labels_conditioning={labels}: only DeepFloyd IF stage II's UNet takes class "
                            f"labels (its noise level); {what} has none to feed, and diffusers would ignore it "
                            "silently. Drop --class_labels_conditioning")
        if images:
            problems.append(f"--validation_images: these are low-resolution images for DeepFloyd IF stage II to "
                            f"upscale; {what} takes no input image (diffusers' validation call fails). Drop "
                            "--validation_images")
    else:
        if labels is None:
            problems.append(f"--class_labels_conditioning is not set, but {what} conditions its UNet on the noise "
                            "level of its upscaled input as a class label (the UNet refuses to run without one). "
                            "Add --class_labels_conditioning=timesteps (jaxbooth feeds the noise-augmentation level, "
                            "as IFSuperResolutionPipeline does)")
        if prompt is not None and not images:
            problems.append(f"--validation_prompt is set but --validation_images is not: {what} upscales an image, "
                            f"so validation needs one. Add --validation_images PATH... ({LOW_RESOLUTION} px images, "
                            "e.g. downsized instance images), or drop --validation_prompt")
        if images and prompt is None:
            problems.append("--validation_images without --validation_prompt: validation runs only with a prompt "
                            "(as in diffusers), so the images would never be used. Add --validation_prompt, or drop "
                            "--validation_images")
        problems.extend(p for p in map(_image_problem, images) if p)
        try:
            low_res_factor(spec.data.resolution)
        except JaxboothError as error:
            problems.append(str(error))
    if stage_ is None:
        return problems
    vae_keys = {"pretrained_vae_name_or_path": spec.model.pretrained_vae_name_or_path,
                "pretrained_vae_model_name_or_path": spec.sdxl.pretrained_vae_model_name_or_path}
    for key, value in vae_keys.items():
        if value is not None:
            problems.append(f"--{key}={value}: {what} is a pixel-space model with no VAE. Drop --{key}")
    if spec.lora.use_lora and spec.lora.output_kohya_format:
        problems.append(f"--output_kohya_format: there is no kohya/AUTOMATIC1111 LoRA format for {what}. Drop "
                        "--output_kohya_format (pytorch_lora_weights.safetensors loads with load_lora_weights)")
    if spec.lora.use_lora and spec.model.train_text_encoder:
        problems.append(f"--train_text_encoder with --use_lora: {what}'s text encoder is T5, which has none of "
                        "the LoRA text-encoder targets (q_proj, k_proj, v_proj, out_proj; diffusers' script fails "
                        "on it too). Drop --train_text_encoder, or fine-tune fully (without --use_lora) with "
                        "--train_text_encoder")
    return problems


def option_warnings(spec: Any, pipeline_class: str) -> list[str]:
    """Options diffusers allows for IF that train on embeddings its pipelines never feed; [] elsewhere."""
    if pipeline_class not in PIPELINE_STAGES:
        return []
    why = (f"{_what(pipeline_class)} encodes prompts with the attention mask at {PROMPT_MAX_LENGTH} tokens; "
           "training on other embeddings conditions on what inference never feeds")
    warnings = []
    if not spec.model.text_encoder_use_attention_mask:
        warnings.append(f"--text_encoder_use_attention_mask is off: {why}. Add --text_encoder_use_attention_mask")
    length = spec.model.tokenizer_max_length
    if length != PROMPT_MAX_LENGTH:
        found = "is not set (the tokenizer's model_max_length)" if length is None else f"is {length}"
        warnings.append(f"--tokenizer_max_length {found}: {why}. Set --tokenizer_max_length={PROMPT_MAX_LENGTH}")
    return warnings


# ----------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------


def _scheduler_config(base_dir: Path) -> dict:
    try:
        config = json.loads((Path(base_dir) / diffusion.SCHEDULER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def card_call_arguments(pipeline_class: str) -> str:
    """Extra arguments of the pipeline call in a card's snippet: stage II needs the image it upscales."""
    return ", image=low_res_image" if PIPELINE_STAGES.get(pipeline_class) == 2 else ""


def card_notes(*, base_dir: Path, lora: bool, text_encoder_saved: bool) -> str:
    """Markdown a model card adds for a base like IF: the fixed-variance switch after loading LoRA
    weights, the ``image=`` stage II upscales, and which text-encoder class to pass when it was not
    saved. "" for a plain SD/SDXL base."""
    notes = []
    index = _model_index(base_dir)
    stage_ = PIPELINE_STAGES.get(index.get("_class_name"))
    if lora and has_learned_variance(_scheduler_config(base_dir)):
        notes.append("The base scheduler samples with a learned variance, which DreamBooth does not train: after "
                     "`load_lora_weights`, switch it to a fixed variance (diffusers' advice for IF):\n\n```python\n"
                     "pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, "
                     f'variance_type="{FIXED_VARIANCE_TYPE}")\n```')
    if stage_ == 2:
        notes.append(f"This is a DeepFloyd IF stage II (upscaler) model: `low_res_image` is a {LOW_RESOLUTION} px "
                     "image, e.g. stage I's output (`IFPipeline(..., output_type=\"pt\")`) or a PIL image.")
    if not text_encoder_saved and stage_ is not None:
        notes.append(f"The text encoder to pass is the base's `{text_encoder_class_name(base_dir)}` (T5); IF "
                     f"pipelines encode prompts at {PROMPT_MAX_LENGTH} tokens with the attention mask.")
    return "\n\n".join(notes)
