"""Sample prompts during a torch run (``--sample_prompts``, kohya's per-prompt settings): the loop's hook.

``SampleHook.due(step, epochs_done)`` is ``sample_prompts.should_sample`` (kohya's cadence); the hook then
samples the in-memory models, with the pipeline class validation uses (``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``; DeepFloyd IF is refused: its stages sample at fixed sizes from, for stage II,
images). Files and logging are ``sample_prompts``' (``samples/step-000100.png`` and one file per prompt), the
same as the JAX backend's. With ``pre_compute_text_embeddings`` the prompts and negatives were encoded with
the training prompts (``sample_prompts.prompt_texts``) before the encoders were freed. Never imports jax.
"""

from __future__ import annotations

from typing import Any

import torch

from jaxbooth import edm, sample_prompts
from jaxbooth.errors import JaxboothError
from jaxbooth.torch_backend import models, validation
from jaxbooth.torch_backend.loop import log

__all__ = ["SampleHook", "make_sample_hook"]


class SampleHook:
    """Built once per run: the loop asks ``due(step, epochs_done)`` after each optimizer step, then calls it."""

    def __init__(self, *, prompts: list[sample_prompts.SamplePrompt], schedule: tuple[str, int], accelerator: Any,
                 m: models.Models, unet: Any, text_encoder: Any | None, conditioner: Any, output_dir: Any,
                 default_scheduler: str) -> None:
        from diffusers import DDPMScheduler

        self.prompts, self.schedule, self.accelerator, self.m = prompts, schedule, accelerator, m
        self.unet, self.text_encoder, self.conditioner, self.output_dir = unet, text_encoder, conditioner, output_dir
        self.default_scheduler = default_scheduler
        self.scheduler_config = DDPMScheduler.load_config(m.model_dir, subfolder="scheduler")
        self.written: list[str] = []

    def scheduler(self, name: str | None) -> Any:
        return validation.validation_scheduler(name or self.default_scheduler, self.scheduler_config)

    def _pipeline(self) -> tuple[Any, Any]:
        """(pipeline, prompt_inputs or None) of the current models, as validation builds them."""
        m, accelerator, conditioner = self.m, self.accelerator, self.conditioner
        trained_te = accelerator.unwrap_model(self.text_encoder) if self.text_encoder is not None else None
        unet = accelerator.unwrap_model(self.unet)
        scheduler = self.scheduler(None)
        if m.is_sdxl:
            encoders = (tuple(models.trained_components(trained_te).values()) if trained_te is not None
                        else m.text_encoders)
            pipeline = validation.make_sdxl_pipeline(unet=unet, vae=m.vae, text_encoders=encoders,
                                                     tokenizers=(m.tokenizer, m.tokenizer_2), scheduler=scheduler,
                                                     model_dir=m.model_dir)
            if m.text_encoder is not None:
                return pipeline, None

            def sdxl_inputs(p: sample_prompts.SamplePrompt) -> dict[str, Any]:
                inputs = validation.sdxl_prompt_inputs(conditioner, p.prompt, pipeline)
                if p.negative is not None:
                    negative, pooled = conditioner.embeddings([p.negative])
                    inputs.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=pooled)
                return inputs

            return pipeline, sdxl_inputs
        pipeline = validation.make_pipeline(unet=unet, vae=m.vae, text_encoder=trained_te or m.text_encoder,
                                            tokenizer=m.tokenizer, scheduler=scheduler)
        if m.text_encoder is not None or trained_te is not None:
            return pipeline, None
        return pipeline, lambda p: {"prompt_embeds": conditioner.embeddings([p.prompt]),
                                    "negative_prompt_embeds": conditioner.embeddings([p.negative or ""])}

    def due(self, step: int, epochs_done: int | None = None) -> bool:
        """Whether ``step`` (or the ``epochs_done`` it ended, None if none) is on the cadence."""
        return sample_prompts.should_sample(self.schedule, step, epochs_done)

    def __call__(self, step: int) -> None:
        """Sample the prompts with the current weights (main process only; the loop asks ``due`` first)."""
        if not self.accelerator.is_main_process:
            return
        pipeline, prompt_inputs = self._pipeline()
        sampled = [pipeline.unet] + ([self.text_encoder] if self.text_encoder is not None else [])
        was_training = [model.training for model in sampled]
        for model in sampled:  # no LoRA dropout while sampling
            model.eval()
        dtype = models.weight_dtype(self.accelerator.mixed_precision)
        try:
            images = validation.sample_prompt_images(
                pipeline, self.prompts, scheduler=self.scheduler, device=self.accelerator.device,
                autocast_dtype=None if dtype == torch.float32 else dtype, prompt_inputs=prompt_inputs)
        finally:
            for model, training in zip(sampled, was_training, strict=True):
                model.train(training)
        path = validation.save_and_log_samples(images, self.output_dir, step, self.accelerator.trackers)
        self.written.append(str(path.relative_to(self.output_dir)))
        log(self.accelerator, f"samples for step {step}: {sample_prompts.describe(self.prompts)} -> {path}")


def make_sample_hook(run: Any, accelerator: Any, m: models.Models, unet: Any, text_encoder: Any | None,
                     conditioner: Any) -> SampleHook | None:
    """The loop's ``Trainer.sample``, or None when the run samples no prompts."""
    spec = run.spec
    schedule = sample_prompts.sample_schedule(spec)
    prompts = sample_prompts.spec_sample_prompts(spec, run.seed)
    if schedule is None or not prompts:
        return None
    if getattr(m, "if_stage", None) is not None:
        raise JaxboothError(f"--sample_prompts={spec.validation.sample_prompts}: DeepFloyd IF runs sample no prompt "
                            "files (its stages have fixed sizes; stage II upscales images); use --validation_prompt")
    default = spec.validation.validation_scheduler
    if edm.training_scheduler(m.model_dir, spec.sdxl.do_edm_style_training) is not None:
        default = edm.pipeline_scheduler_class(m.model_dir)  # EDM-style runs sample with their own scheduler
        chosen = [p for p in prompts if p.sampler is not None]
        if chosen:
            raise JaxboothError(f"{chosen[0].source}: --ss picks a DDPM-family sampler, but this EDM-style run "
                                f"samples with the pipeline's {default}; drop --ss")
    return SampleHook(prompts=prompts, schedule=schedule, accelerator=accelerator, m=m, unet=unet,
                      text_encoder=text_encoder, conditioner=conditioner, output_dir=run.output_dir,
                      default_scheduler=default)
