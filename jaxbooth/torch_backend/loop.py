"""The torch training loop: micro-steps under accelerate, then log, checkpoint and validate.

One micro-step draws its randomness from (seed, micro-step, process) (see ``loss.step_seed``),
runs ``loss.denoising_loss`` (``loss.edm_denoising_loss`` when ``edm`` is set; DeepFloyd IF stage II
also draws its upscaler inputs, ``upscaler``) and ``accelerator.backward``; at the end of each
accumulation window the gradients are clipped and the optimizer and LR scheduler step (accelerate
skips them inside the window, as in diffusers); with ``--use_ema`` the average of the trained parameters
(``optim.EmaWeights``) then steps too, and validation samples it (``validate_with_ema``).
The host reads values back only at log steps. Metrics are the shared ``output.metric_record``
(the JAX backend's names) and go to ``metrics.jsonl`` and accelerate's trackers; validation
follows the shared cadence (``validation_files.should_validate``). Never imports jax.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jaxbooth import data, diffusion, edm, output
from jaxbooth import log as jaxbooth_log
from jaxbooth import spec as spec_lib
from jaxbooth.progress import TrainingProgress
from jaxbooth.torch_backend import checkpoint
from jaxbooth.torch_backend.deepfloyd import UpscalerConditioning
from jaxbooth.torch_backend.inputs import LatentCache, PixelSource, SdxlTextConditioner, TextConditioner, unet_inputs
from jaxbooth.torch_backend.loss import (
    LossOptions,
    denoising_loss,
    draw_inputs,
    draw_upscaler_inputs,
    edm_denoising_loss,
    make_generator,
)
from jaxbooth.torch_backend.optim import EmaWeights
from jaxbooth.validation_files import should_validate


def log(accelerator: Any, message: str) -> None:
    if accelerator.is_main_process:
        jaxbooth_log.info(message)


@dataclasses.dataclass
class Trainer:
    """Everything the loop touches; built by ``train.py``."""

    spec: spec_lib.RunSpec
    accelerator: Any
    unet: Any
    text_encoder: Any | None  # the prepared encoder when it is trained, else None
    optimizer: Any
    lr_scheduler: Any
    iterator: data.BatchIterator
    latents: LatentCache | PixelSource  # PixelSource: a pixel-space model (DeepFloyd IF)
    text: TextConditioner | SdxlTextConditioner
    tables: diffusion.NoiseTables
    options: LossOptions
    seed: int
    max_train_steps: int
    output_dir: Path
    validate: Callable[[int], None] | None = None
    edm: edm.EdmSchedule | None = None  # EDM-style training (tables on the device), else DDPM with ``tables``
    upscaler: UpscalerConditioning | None = None  # DeepFloyd IF stage II's conditioning input, else None
    ema: EmaWeights | None = None  # --use_ema: the average of ``trained_parameters``, stepped after each update
    sample: Any = None  # --sample_prompts: ``samples.SampleHook``, ``due(step, epochs_done)`` then ``sample(step)``

    @property
    def trained_models(self) -> list[Any]:
        return [self.unet] + ([self.text_encoder] if self.text_encoder is not None else [])

    @functools.cached_property
    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """Walked once: the walk over every UNet parameter cost a few ms each step."""
        return [p for model in self.trained_models for p in model.parameters() if p.requires_grad]


def micro_step_loss(t: Trainer, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch; its random draws depend only on (seed, micro_step, process)."""
    device = t.accelerator.device
    generator = make_generator(t.seed, micro_step, t.accelerator.process_index, device)
    mean, std = t.latents.posterior(batch)
    steps = t.edm.num_train_timesteps if t.edm is not None else int(t.tables.snr.shape[0])
    drawn = draw_inputs(mean, std, generator, steps, t.options)  # under EDM the timesteps are table indices
    hidden, added = unet_inputs(t.text, batch)  # added: SDXL's pooled embeds and time ids, else None
    if t.edm is not None:
        return edm_denoising_loss(t.unet, drawn.latents, drawn.noise, drawn.timesteps, hidden, t.edm, t.options,
                                  added_cond_kwargs=added)
    condition = levels = None
    if t.upscaler is not None:  # stage II: the upscaled low-res crop noised to a level that is its class label
        shape = tuple(drawn.latents.shape)
        levels, upscaler_noise = draw_upscaler_inputs(shape, generator, t.upscaler.num_noise_levels)
        condition = t.upscaler.condition(drawn.latents, levels, upscaler_noise)
    return denoising_loss(t.unet, drawn.latents, drawn.noise, drawn.timesteps, hidden, t.tables, t.options,
                          added_cond_kwargs=added, condition=condition, class_labels=levels,
                          mask=loss_masks(t, batch, drawn.latents) if t.spec.optim.masked_loss else None)


def loss_masks(t: Trainer, batch: dict, latents: torch.Tensor) -> torch.Tensor:
    """``--masked_loss``: the batch rows' alpha masks on the latent grid (``data.masks``), NCHW ``[R, 1, h, w]``."""
    from jaxbooth.data import masks

    paths = [t.iterator.dataset.examples[int(i)].path for i in batch["example_index"]]
    factor = batch["pixel_values"].shape[1] // latents.shape[2]  # 8 for a VAE, 1 in pixel space (DeepFloyd IF)
    found = masks.batch_loss_masks(paths, batch, resolution=t.spec.data.resolution,
                                   interpolation=t.spec.data.image_interpolation_mode, factor=factor)
    return torch.from_numpy(found[:, None]).to(latents.device)


def optimizer_step(t: Trainer, micro_step: int) -> dict[str, torch.Tensor]:
    """Micro-steps until accelerate syncs the gradients (one optimizer step); returns its metrics.

    Losses are averaged over the accumulation window; ``lr`` is the rate this update used and
    ``grad_norm`` the global norm before clipping, as the JAX backend logs them.
    """
    accelerator, spec = t.accelerator, t.spec
    sums: dict[str, torch.Tensor] = {}
    count = 0
    while True:
        batch = next(t.iterator)
        with accelerator.accumulate(*t.trained_models):
            loss, aux = micro_step_loss(t, batch, micro_step + count)
            accelerator.backward(loss)
            for key, value in {"loss": loss, **aux}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            count += 1
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(t.trained_parameters, spec.optim.max_grad_norm)
                sums["grad_norm"] = torch.as_tensor(float("nan") if norm is None else norm).float()
                sums["lr"] = torch.tensor(t.optimizer.param_groups[0]["lr"])
            t.optimizer.step()
            t.lr_scheduler.step()
            t.optimizer.zero_grad(set_to_none=spec.precision.set_grads_to_none)
            if accelerator.sync_gradients and t.ema is not None:
                t.ema.step()
        if accelerator.sync_gradients:
            break
    metrics = {key: value / count for key, value in sums.items() if key not in ("grad_norm", "lr")}
    return {**metrics, "grad_norm": sums["grad_norm"], "lr": sums["lr"], "micro_steps": torch.tensor(count)}


class Progress:
    """Log line, ``metrics.jsonl`` and trackers every ``log_every_steps``; the NaN check names the range."""

    def __init__(self, t: Trainer, start_step: int):
        self.t = t
        self.metrics_log = output.MetricsLog(t.output_dir, enabled=t.accelerator.is_main_process)
        self.window = output.MetricWindow(start_step)
        self.display = TrainingProgress(t.max_train_steps, start_step, enabled=t.accelerator.is_main_process)

    def report(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        accelerator = self.t.accelerator
        names = output.LOSS_METRICS
        losses = torch.stack([metrics[name] for name in names]).to(accelerator.device)
        losses = accelerator.reduce(losses, reduction="mean").tolist()  # every process's mean
        values = {**dict(zip(names, losses, strict=True)), "lr": float(metrics["lr"]),
                  "grad_norm": float(metrics["grad_norm"])}
        record = self.window.record(step, values)
        self.metrics_log.write(step, record)
        accelerator.log(record, step=step)
        self.display.show(step, record["train/loss"], record["train/lr"], record["perf/steps_per_sec"])


def validate_with_ema(t: Trainer, step: int, validate: Callable[[int], None] | None = None) -> None:
    """``validate(step)`` (default ``t.validate``), sampling the EMA weights under ``--use_ema`` (swapped in,
    then back)."""
    validate = validate or t.validate
    if t.ema is None:
        validate(step)
        return
    raw = t.ema.copy_to_parameters()
    try:
        validate(step)
    finally:
        t.ema.restore(raw)


def run_loop(t: Trainer, start_step: int) -> int:
    """Optimizer steps from ``start_step`` to ``max_train_steps``; returns the last step done.

    SIGTERM saves a checkpoint after the current step and raises ``TrainingStopped`` (the CLI exits 0).
    """
    spec, accelerator = t.spec, t.accelerator
    validation = spec_lib.validation_schedule(spec)
    accumulation = spec.optim.gradient_accumulation_steps
    step, micro = start_step, start_step * accumulation
    progress = Progress(t, start_step)
    if t.edm is not None:  # an EDM pipeline trains EDM-style without the flag, as in diffusers: say so
        log(accelerator, f"EDM-style training: {t.edm.scheduler} sigmas and preconditioning, "
                         f"{t.edm.prediction_type} prediction, loss on the denoised latents")
    log_every, save_every = max(1, spec.logging.log_every_steps), spec_lib.checkpoint_every_steps(spec)
    for model in t.trained_models:
        model.train()
    with checkpoint.StopOnSignal() as stop:
        while step < t.max_train_steps:
            epoch_before = t.iterator.epoch
            metrics = optimizer_step(t, micro)
            micro += int(metrics["micro_steps"])
            step += 1
            progress.display.advance()
            if step % log_every == 0 or step == t.max_train_steps:
                progress.report(step, metrics)
            if (save_every and step % save_every == 0) or stop.requested:
                checkpoint.save_checkpoint(accelerator, t.output_dir, step, t.iterator.state_dict(), spec,
                                           seed=t.seed, keep=spec.checkpointing.checkpoints_total_limit)
            epochs_done = t.iterator.epoch if t.iterator.epoch > epoch_before else None
            if t.validate is not None and should_validate(validation, step, epochs_done):
                validate_with_ema(t, step)
            if t.sample is not None and t.sample.due(step, epochs_done):
                validate_with_ema(t, step, t.sample)
            if stop.requested:
                progress.display.close()
                log(accelerator, f"stopped by signal after step {step}; resume with --resume_from_checkpoint=latest")
                accelerator.end_training()
                raise checkpoint.TrainingStopped(step)
    progress.display.close()
    return step
