"""Validation images during training: the JAX counterpart of diffusers' `log_validation`.

Mirrors `train_dreambooth.py`: `num_validation_images` images of `validation_prompt`, 25
inference steps, the pipeline's default guidance (7.5; SDXL's 5.0) and size (unet sample_size x VAE scale),
noise from the run seed (so every validation starts from the same noise and images are
comparable across steps), the `validation_scheduler` built from the pipeline's scheduler config
(learned variance types read as "fixed_small", as diffusers does), and TensorBoard's
`add_images("validation", images, step, dataformats="NHWC")`. The cadence and the files
(`validation/step-{N}.png`, `validation/step-{N}/{k}.png`) are `jaxbooth.validation_files`,
shared with the torch backend. An SDXL run samples as `StableDiffusionXLPipeline` (both text
encoders; no negative prompt, so zeros under `force_zeros_for_empty_prompt`; see `sample.py`).

Memory: the trainer drops the VAE params from the device once latents are cached. The
`Validator` keeps a host (numpy) copy of the VAE params, and of the text-encoder params when the
text encoder is frozen, and places them on the device(s) only for the duration of `run`; the
UNet (and a trained text encoder) params are the trainer's live device arrays, passed per call
(with LoRA: the adapters merged into the frozen base, one jitted call per validation).
A host copy costs host RAM only (SD VAE: ~335 MB in fp32) and avoids re-reading and converting
the checkpoint at each validation.

Sample prompts (`--sample_prompts`, kohya's per-prompt settings; `jaxbooth.sample_prompts` parses them and
names the files) go through the same `Validator` on their own cadence: `should_run` is true when either is
due and `run` does what is due. One image per prompt, each its own sampler call, so every distinct
(height, width, steps, sampler) compiles its sampling loop once (the first sampling pays for all of them;
later ones reuse them); a `--d` seed gives the noise `generate([prompt], seed=[d])` draws.

Samplers: every `validation_scheduler` runs as itself. DDPMScheduler is ancestral: each image
draws fresh noise at every step from its own key (see `schedulers.DDPMSampler`), so validations
stay comparable across steps as with the other samplers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from jaxbooth import log as jaxbooth_log
from jaxbooth import sample_prompts as sample_prompts_lib
from jaxbooth import validation_files
from jaxbooth.jax_backend.generate import read_scheduler_config, sampler_from_models
from jaxbooth.jax_backend.loaded import LoadedModels
from jaxbooth.jax_backend.schedulers import canonical_sampler_name
from jaxbooth.validation_files import image_grid

__all__ = ["Validator", "image_grid", "make_validator", "validation_sampler_name", "validation_scheduler_config"]

VALIDATION_STEPS = validation_files.NUM_INFERENCE_STEPS  # log_validation's num_inference_steps
VALIDATION_GUIDANCE = 7.5  # StableDiffusionPipeline.__call__'s default, which log_validation keeps
SDXL_VALIDATION_GUIDANCE = 5.0  # StableDiffusionXLPipeline.__call__'s, which the SDXL script's log_validation keeps


def _log(message: str) -> None:
    if jax.process_index() == 0:
        jaxbooth_log.info(message)


def validation_sampler_name(validation_scheduler: str) -> str:
    """The JAX sampler for a diffusers scheduler class name: the name itself, checked (unknown
    names fail here, with a suggestion, before any model loads)."""
    canonical_sampler_name(validation_scheduler)
    return validation_scheduler


def validation_scheduler_config(config: dict) -> dict:
    """diffusers' log_validation override: a learned variance type is read as "fixed_small",
    since the DreamBooth loss trains only the mean."""
    if config.get("variance_type") in ("learned", "learned_range"):
        return {**config, "variance_type": "fixed_small"}
    return config


def _host_copy(tree: Any) -> Any:
    """The params tree as host numpy (device arrays are copied, numpy kept as is), so holding it
    does not pin device buffers the trainer drops."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _place(tree: Any, mesh: Any) -> Any:
    """Host params onto the device (or replicated on `mesh`), explicitly (transfer-guard safe);
    via a callback so a mesh spanning several processes works too."""
    if mesh is None:
        return jax.device_put(tree)
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), tree)


class Validator:
    """Built once from the trainer's modules; `run` per validation with the current params.

    All processes must call `run` (sampling is collective over the mesh); only process 0
    writes files and TensorBoard events. One `Validator` keeps one compiled sampling loop, so
    only the first `run` compiles. `written`: the grids saved so far, relative to the output
    folder (for the model card).
    """

    sample_prompts: tuple[sample_prompts_lib.SamplePrompt, ...] = ()
    sample_schedule: tuple[str, int] | None = None

    def __init__(self, *, model_dir: Path, output_dir: Path, tokenizer: Any, text_encoder: Any, text_params: Any,
                 unet: Any, vae_config: Any, vae_params: Any, validation_prompt: str | None,
                 num_validation_images: int = 4, validation_scheduler: str = "DPMSolverMultistepScheduler",
                 schedule: tuple[str, int] | None = ("steps", 100), seed: int = 0,
                 num_inference_steps: int = VALIDATION_STEPS, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                 use_attention_mask: bool = False, mesh: Any = None, scheduler_config: dict | None = None,
                 tokenizer_2: Any = None, text_encoder_2: Any = None,
                 sample_prompts: Sequence[sample_prompts_lib.SamplePrompt] = (),
                 sample_schedule: tuple[str, int] | None = None) -> None:
        """`text_params`: the frozen text encoder's params (host copy kept; SDXL, with `tokenizer_2` and
        `text_encoder_2`: the tuple of both encoders'); `schedule`: what `spec.validation_schedule` returns,
        ("steps" | "epochs", n); `guidance_scale`: None for the pipeline's default; `scheduler_config`: the
        pipeline's (read from `model_dir` when None). `validation_prompt` None: sample prompts only;
        `sample_prompts` / `sample_schedule`: `sample_prompts.spec_sample_prompts` / `.sample_schedule`."""
        if validation_prompt is None:
            schedule = None
        elif schedule is None or schedule[0] not in ("steps", "epochs") or schedule[1] < 1:
            raise ValueError(f"validation schedule {schedule!r}: expected ('steps' | 'epochs', n >= 1)")
        self.sample_prompts = tuple(sample_prompts)
        self.sample_schedule = sample_schedule if self.sample_prompts else None
        if schedule is None and self.sample_schedule is None:
            raise ValueError("a Validator needs a validation_prompt and schedule, or sample prompts and their schedule")
        self._due: dict[int, tuple[bool, bool]] = {}
        if num_validation_images < 1:
            raise ValueError(f"num_validation_images={num_validation_images} must be at least 1")
        self.prompt, self.num_images, self.schedule = validation_prompt, num_validation_images, schedule
        self.is_sdxl = text_encoder_2 is not None
        if guidance_scale is None:
            guidance_scale = SDXL_VALIDATION_GUIDANCE if self.is_sdxl else VALIDATION_GUIDANCE
        self.seed, self.steps, self.guidance_scale = seed, num_inference_steps, guidance_scale
        self.height, self.width, self.negative_prompt = height, width, negative_prompt
        self.output_dir, self.mesh = Path(output_dir), mesh
        self.out_dir = self.output_dir / validation_files.VALIDATION_DIR
        self.written: list[str] = []
        self._vae_host, self._text_host = _host_copy(vae_params), _host_copy(text_params)
        self.sampler = sampler_from_models(
            model_dir=Path(model_dir), tokenizer=tokenizer, unet=unet, unet_params=None, text_encoder=text_encoder,
            text_params=None, vae_config=vae_config, vae_params=None,
            sampler_name=validation_sampler_name(validation_scheduler), use_attention_mask=use_attention_mask,
            mesh=mesh, scheduler_config=validation_scheduler_config(  # log_validation's from_config override
                scheduler_config if scheduler_config is not None else read_scheduler_config(Path(model_dir))),
            tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)
        self._samplers = {None: self.sampler}  # per sample prompt sampler (--ss); None: validation_scheduler

    def should_run(self, step: int, epochs_done: int | None = None) -> bool:
        """Whether to validate or sample now, after optimizer `step`: `validation_files.should_validate`,
        `sample_prompts.should_sample`; `run(step, ...)` then does what is due.

        `epochs_done`: the number of finished epochs when `step` ended one, else None.
        """
        due = (validation_files.should_validate(self.schedule, step, epochs_done),
               sample_prompts_lib.should_sample(self.sample_schedule, step, epochs_done))
        self._due = {step: due} if any(due) else {}
        return any(due)

    def generate(self, unet_params: Any, text_params: Any = None) -> list[Image.Image]:
        """The validation images for these params; the frozen params go on device only meanwhile."""
        if self.is_sdxl and text_params is not None and not (isinstance(text_params, tuple) and len(text_params) == 2):
            raise ValueError("SDXL validation takes the trained text params as a tuple (text_encoder's, "
                             f"text_encoder_2's), got {type(text_params).__name__}")
        if text_params is None:
            text_params = _place(self._text_host, self.mesh)
        self.sampler.vae_params = _place(self._vae_host, self.mesh)
        try:
            return self.sampler.generate(
                [self.prompt] * self.num_images, negative_prompt=self.negative_prompt,
                num_inference_steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed,
                height=self.height, width=self.width, unet_params=unet_params, text_params=text_params)
        finally:
            self.sampler.vae_params = None  # drop the device copy

    def _sampler_for(self, name: str | None) -> Any:
        """The sampler of a sample prompt's `--ss` (the same models; its own compiled loops)."""
        if name not in self._samplers:
            self._samplers[name] = dataclasses.replace(self.sampler, sampler_name=name, _samplers={})
        return self._samplers[name]

    def generate_samples(self, unet_params: Any, text_params: Any = None) -> list[Image.Image]:
        """One image per sample prompt, each with its own size, steps, guidance, negative, seed and sampler."""
        if text_params is None:
            text_params = _place(self._text_host, self.mesh)
        vae_params = _place(self._vae_host, self.mesh)
        images = []
        try:
            for p in self.sample_prompts:
                sampler = self._sampler_for(p.sampler)
                sampler.vae_params = vae_params
                images += sampler.generate(
                    [p.prompt], negative_prompt=p.negative, num_inference_steps=p.steps, guidance_scale=p.guidance,
                    seed=[p.seed], height=p.height, width=p.width, unet_params=unet_params, text_params=text_params)
        finally:
            for sampler in self._samplers.values():
                sampler.vae_params = None  # drop the device copy
        return images

    def run(self, step: int, unet_params: Any, text_params: Any = None, *, writer: Any = None) -> Path:
        """Do what `should_run(step, ...)` found due (without that call: validation): validation saves
        `validation/step-{step}.png` (grid) and `validation/step-{step}/{k}.png`, sample prompts
        `samples/step-{step:06d}.png` and one file per prompt; `writer.add_images` when a TensorBoard writer
        is given. Returns the validation grid's path (the samples grid's when only they were due).

        `unet_params`: the UNet params being trained (device arrays, any sharding on the mesh);
        `text_params`: the text encoder's when it is trained (SDXL: the tuple of both), else None (the
        frozen copy is used).
        """
        validate, sample = self._due.pop(step, (self.prompt is not None, False))
        path = None
        if sample:
            path = self._run_samples(step, unet_params, text_params, writer)
        if validate:
            path = self._run_validation(step, unet_params, text_params, writer)
        if path is None:
            raise ValueError(f"nothing to run at step {step}: no validation prompt and no sample prompts due")
        return path

    def _run_samples(self, step: int, unet_params: Any, text_params: Any, writer: Any) -> Path:
        if self.is_sdxl and text_params is not None and not (isinstance(text_params, tuple) and len(text_params) == 2):
            raise ValueError("SDXL sampling takes the trained text params as a tuple (text_encoder's, "
                             f"text_encoder_2's), got {type(text_params).__name__}")
        start = time.perf_counter()
        images = self.generate_samples(unet_params, text_params)
        grid_path = sample_prompts_lib.grid_path(self.output_dir, step)
        if jax.process_index() == 0:
            sample_prompts_lib.save_samples(images, self.output_dir, step)
            if writer is not None:
                sample_prompts_lib.log_samples(writer, Image.open(grid_path), step)
            _log(f"samples at step {step}: {sample_prompts_lib.describe(self.sample_prompts)} (on this backend each "
                 f"setting compiles once) in {time.perf_counter() - start:.1f}s -> {grid_path}")
        return grid_path

    def _run_validation(self, step: int, unet_params: Any, text_params: Any, writer: Any) -> Path:
        start = time.perf_counter()
        images = self.generate(unet_params, text_params)
        grid_path = validation_files.grid_path(self.output_dir, step)
        if jax.process_index() == 0:
            validation_files.save_validation_images(images, self.output_dir, step)
            if writer is not None:
                validation_files.log_validation_images(writer, images, step)
            _log(f"validation at step {step}: {len(images)} images of {self.prompt!r} in "
                 f"{time.perf_counter() - start:.1f}s -> {grid_path}")
        self.written.append(str(grid_path.relative_to(self.output_dir)))
        return grid_path


def make_validator(spec: Any, models: LoadedModels, *, output_dir: Path, seed: int,
                   mesh: Any = None) -> Validator | None:
    """A `Validator` from the run spec and the run's `LoadedModels`; None without a validation_prompt and
    without sample prompts (`sample_prompts.sample_schedule`).

    Uses the models' tokenizer, scheduler config and `vae_params` (call it before the trainer
    drops them: the validator keeps a host copy); the model folder is `models.model_dir`.
    """
    from jaxbooth import spec as spec_lib

    schedule = spec_lib.validation_schedule(spec)
    samples = sample_prompts_lib.spec_sample_prompts(spec, seed)
    if schedule is None and not samples:
        return None
    if models.vae_params is None:
        raise ValueError("make_validator needs LoadedModels.vae_params; build the validator before dropping them")
    v = spec.validation
    text_params, sdxl_models = models.text_params, {}
    if models.is_sdxl:
        text_params = (models.text_params, models.text_params_2)
        sdxl_models = dict(tokenizer_2=models.tokenizer_2, text_encoder_2=models.text_encoder_2)
    return Validator(
        model_dir=models.model_dir, output_dir=output_dir, tokenizer=models.tokenizer,
        text_encoder=models.text_encoder, text_params=text_params, unet=models.unet,
        vae_config=models.vae_config, vae_params=models.vae_params, validation_prompt=v.validation_prompt,
        num_validation_images=v.num_validation_images, validation_scheduler=v.validation_scheduler,
        schedule=schedule, seed=seed, use_attention_mask=spec.model.text_encoder_use_attention_mask, mesh=mesh,
        scheduler_config=models.scheduler_config, sample_prompts=samples,
        sample_schedule=sample_prompts_lib.sample_schedule(spec), **sdxl_models)
