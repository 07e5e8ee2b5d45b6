"""What a torch run makes of its models besides training them: validation images during the run, and the
output folder at its end (a diffusers pipeline, or a LoRA file with its card).

Validation samples the in-memory models with the pipeline class of the base: ``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, or a DeepFloyd IF stage (``validation.make_if_pipeline``; stage II upscales
each ``--validation_images`` file, one call per image, and every IF call passes ``clean_caption=False`` so
the prompt sampled is the prompt trained). Split from ``train.py`` (which re-exports these names) to keep
that module to the run's phases. Never imports jax.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from jaxbooth import edm, output, sdxl
from jaxbooth.lora import AdapterSettings
from jaxbooth.loss_options import training_scheduler_config
from jaxbooth.torch_backend import lora, models, validation
from jaxbooth.torch_backend.loop import log

if TYPE_CHECKING:
    from jaxbooth.torch_backend.inputs import TextConditioner
    from jaxbooth.torch_backend.train import RunInputs


def make_validator(run: RunInputs, accelerator: Any, m: models.Models, unet: Any, text_encoder: Any | None,
                   conditioner: TextConditioner, written: list[str]) -> Any:
    """``validate(step)`` for the loop, or None without a validation_prompt."""
    spec = run.spec
    if spec.validation.validation_prompt is None:
        return None
    from diffusers import DDPMScheduler

    # sample as this run trains: rescaled betas and trailing timesteps under --zero_terminal_snr
    scheduler_config = training_scheduler_config(DDPMScheduler.load_config(m.model_dir, subfolder="scheduler"),
                                                 spec.optim.zero_terminal_snr)
    # EDM-style runs sample with the pipeline's own scheduler, as diffusers' SDXL script
    edm_style = edm.training_scheduler(m.model_dir, spec.sdxl.do_edm_style_training) is not None
    validation_name = edm.pipeline_scheduler_class(m.model_dir) if edm_style else spec.validation.validation_scheduler
    is_sdxl = sdxl.is_sdxl_pipeline(run.model_dir)
    if_stage = getattr(m, "if_stage", None)
    dtype = models.weight_dtype(accelerator.mixed_precision)

    def validate(step: int) -> None:
        if not accelerator.is_main_process:
            return
        prompt = spec.validation.validation_prompt
        trained_te = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
        scheduler = validation.validation_scheduler(validation_name, scheduler_config)
        embeds, inputs, if_options = None, None, {}
        if is_sdxl:  # the trained encoders when they train (both in one module), else the frozen ones
            encoders = (tuple(models.trained_components(trained_te).values()) if trained_te is not None
                        else m.text_encoders)
            pipeline = validation.make_sdxl_pipeline(
                unet=accelerator.unwrap_model(unet), vae=m.vae, text_encoders=encoders,
                tokenizers=(m.tokenizer, m.tokenizer_2), scheduler=scheduler, model_dir=m.model_dir)
            if m.text_encoder is None:  # pre_compute_text_embeddings freed both encoders
                inputs = validation.sdxl_prompt_inputs(conditioner, prompt, pipeline)
        else:
            if if_stage is not None:  # pixel space: the IF stage's own pipeline, T5 encoder and tokenizer
                pipeline = validation.make_if_pipeline(
                    stage=if_stage, unet=accelerator.unwrap_model(unet), text_encoder=trained_te or m.text_encoder,
                    tokenizer=m.tokenizer, scheduler=scheduler, model_dir=m.model_dir)
                if_options = {"per_call": validation.if_calls(spec, if_stage), "extra": dict(validation.IF_CALL)}
            else:
                pipeline = validation.make_pipeline(
                    unet=accelerator.unwrap_model(unet), vae=m.vae, text_encoder=trained_te or m.text_encoder,
                    tokenizer=m.tokenizer, scheduler=scheduler)
            if m.text_encoder is None and trained_te is None:
                embeds = (conditioner.embeddings([prompt]), conditioner.embeddings([""]))
        sampled = [pipeline.unet] + ([trained_te] if trained_te is not None else [])  # no LoRA dropout in sampling
        was_training = [model.training for model in sampled]
        for model in sampled:
            model.eval()
        images = validation.generate_images(
            pipeline, prompt=prompt, num_images=spec.validation.num_validation_images, seed=run.seed,
            device=accelerator.device, autocast_dtype=None if dtype == torch.float32 else dtype, prompt_embeds=embeds,
            inputs=inputs, **if_options)
        for model, training in zip(sampled, was_training, strict=True):
            model.train(training)
        path = validation.save_and_log(images, run.output_dir, step, accelerator.trackers)
        written.append(str(path.relative_to(run.output_dir)))
        log(accelerator, f"validation images for step {step}: {path}")

    return validate


def save_pipeline(run: RunInputs, accelerator: Any, unet: Any, text_encoder: Any | None, steps_done: int,
                  validation_images: list[str]) -> Path:
    """The final output folder: a diffusers pipeline loadable with ``StableDiffusionPipeline.from_pretrained``
    (``StableDiffusionXLPipeline`` for SDXL, whose trained encoders are both saved; ``IFPipeline`` /
    ``IFSuperResolutionPipeline`` for IF, with the fixed-variance scheduler ``output.write_pipeline`` writes)."""
    spec, out = run.spec, run.output_dir
    saved = output.components_to_save(spec)
    accelerator.unwrap_model(unet).save_pretrained(out / "unet")
    if "text_encoder" in saved:
        encoders = models.trained_components(accelerator.unwrap_model(text_encoder))
        for name, encoder in encoders.items():
            encoder.save_pretrained(out / name)
        saved = tuple(dict.fromkeys([*saved, *encoders]))
    return output.write_pipeline(out, base_dir=run.model_dir, trained_components=saved, vae_dir=run.vae_dir,
                                 spec=spec, steps=steps_done, backend="torch",
                                 instance_prompt=spec.data.instance_prompt, validation_images=validation_images)


def save_lora(run: RunInputs, accelerator: Any, unet: Any, text_encoder: Any | None, steps_done: int,
              validation_images: list[str]) -> Path:
    """The final LoRA output folder: ``pytorch_lora_weights.safetensors`` (``load_lora_weights`` reads it),
    a model card and the resolved spec; kohya file and merged pipeline when the spec asks."""
    from jaxbooth.lora import outputs

    spec, settings = run.spec, AdapterSettings.from_spec(run.spec, sdxl=sdxl.is_sdxl_pipeline(run.model_dir))
    encoders = models.trained_components(accelerator.unwrap_model(text_encoder)) if text_encoder is not None else {}
    state = lora.export_lora_state(accelerator.unwrap_model(unet), encoders.get("text_encoder"), settings,
                                   text_encoder_2=encoders.get("text_encoder_2"))
    return outputs.write_lora_output(run.output_dir, state, settings=settings, spec=spec, base_dir=run.model_dir,
                                     vae_dir=run.vae_dir, steps=steps_done, backend="torch",
                                     instance_prompt=spec.data.instance_prompt, validation_images=validation_images)
