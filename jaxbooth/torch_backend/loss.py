"""The DreamBooth loss on torch tensors, and the per-micro-step randomness that feeds it.

The noise/target/Min-SNR/prior math is the shared code in ``jaxbooth.diffusion`` (the same
functions the JAX step calls), so both backends compute one loss; this module only runs
the UNet and draws the random inputs. EDM-style training (``--do_edm_style_training``, or a pipeline
whose scheduler is an EDM one) runs ``edm_denoising_loss`` on the shared ``jaxbooth.edm`` math instead.
DeepFloyd IF trains in pixel space (``draw_inputs`` without a std), regresses only the noise half of
its 6-channel output, and its stage II UNet also takes the noised upscaled input (``condition``) and
its noise level (``class_labels``; drawn by ``draw_upscaler_inputs``).
Layout is NCHW throughout (diffusers' layout).
Imports torch and the shared core; never jax or ``jaxbooth.jax_backend``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from jaxbooth import diffusion, edm, loss_options
from jaxbooth.loss_options import LossOptions

__all__ = ["LossOptions", "denoising_loss", "draw_inputs", "draw_upscaler_inputs", "edm_denoising_loss",
           "edm_schedule", "make_generator", "step_seed"]


def denoising_loss(unet: Any, latents_nchw: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, tables: diffusion.NoiseTables,
                   options: LossOptions, *, added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                   condition: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DreamBooth loss for given latents, noise and timesteps (no randomness inside).

    latents_nchw, noise: float [B, C, H, W] (scaled latents, or pixels for IF; with prior preservation
    the instance rows come first, then the class rows); timesteps: int [B]; encoder_hidden_states:
    [B, L, D]; added_cond_kwargs: SDXL's ``{"text_embeds": [B, P], "time_ids": [B, 6]}``, passed to
    the UNet only when given; condition: [B, C', H, W] appended to the noisy input's channels (IF stage
    II's upscaled image); class_labels: [B], passed when given (stage II's noise level); mask: [B, 1, H, W]
    loss weights (``--masked_loss``). A prediction
    with twice the input's channels (IF's learned variance) is cut to its noise half, as diffusers'
    scripts do. Returns (loss, {"instance_loss", "prior_loss"}), all float32 scalars.
    Mirrors diffusers ``train_dreambooth.py``'s loss block; the JAX twin is
    ``jaxbooth.jax_backend.train_step.denoising_loss`` (parity: tests/test_cross_backend.py).
    """
    noisy = diffusion.add_noise(latents_nchw, noise, timesteps, tables)
    extra: dict[str, Any] = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    if class_labels is not None:
        extra["class_labels"] = class_labels
    if condition is not None:
        noisy = torch.cat([noisy, condition.to(noisy.dtype)], dim=1)
    pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False, **extra)[0]
    pred = diffusion.drop_learned_variance(pred, latents_nchw.shape[1], channel_axis=1)
    return loss_options.loss_from_prediction(pred.float(), latents_nchw, noise, timesteps, tables, options, mask)


def edm_denoising_loss(unet: Any, latents_nchw: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor,
                       encoder_hidden_states: torch.Tensor, schedule: edm.EdmSchedule, options: LossOptions, *,
                       added_cond_kwargs: dict[str, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The EDM-style DreamBooth loss (diffusers' SDXL script under ``--do_edm_style_training``).

    ``indices``: int [B] in [0, num_train_timesteps), drawn as the DDPM timesteps are; the UNet sees
    ``c_in * (x0 + sigma * noise)`` at ``schedule.timesteps[indices]`` and its output, made a denoised
    estimate, is regressed onto the latents. ``schedule``'s tables are tensors on the latents' device
    (``edm_schedule``). Returns (loss, {"instance_loss", "prior_loss"}) as ``denoising_loss``.
    """
    indices = indices.long()
    sigma = edm.lookup(schedule.sigmas, indices, latents_nchw.ndim)
    noisy = edm.add_noise(latents_nchw, noise, sigma)
    coefficients = edm.preconditioning(sigma, schedule)
    extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    pred = unet(noisy * coefficients.c_in, schedule.timesteps[indices], encoder_hidden_states, return_dict=False,
                **extra)[0]
    return edm.loss_from_prediction(pred.float(), latents_nchw, noisy, sigma, schedule, options)


def edm_schedule(model_dir: Any, do_edm_style_training: bool, device: torch.device) -> edm.EdmSchedule | None:
    """The EDM-style training schedule with float32 tables on ``device``, or None for DDPM training."""
    schedule = edm.load_schedule(model_dir, do_edm_style_training)
    if schedule is None:
        return None
    return schedule.map(lambda table: torch.from_numpy(np.array(table, np.float32)).to(device))


def step_seed(seed: int, micro_step: int, process_index: int) -> int:
    """A 63-bit seed for one micro-step of one process.

    Randomness is a function of (seed, micro-step, process), as the JAX backend's
    ``fold_in(rng, step)``: a resumed run draws exactly what the straight run drew, without
    relying on saved global RNG states, and data-parallel processes draw different noise.
    """
    state = np.random.SeedSequence([seed, micro_step, process_index, 0x6A62]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def make_generator(seed: int, micro_step: int, process_index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, micro_step, process_index))


@dataclasses.dataclass
class RandomInputs:
    """What one micro-step draws: latents from the VAE posterior, noise and timesteps."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def draw_inputs(mean: torch.Tensor, std: torch.Tensor | None, generator: torch.Generator, num_train_timesteps: int,
                options: LossOptions) -> RandomInputs:
    """Sample scaled latents from N(mean, std) (diffusers' ``latent_dist.sample()``), noise
    (plus offset noise, drawn [B, C, 1, 1] as diffusers, then kohya's multires noise) and uniform timesteps,
    in that order.
    ``std`` None (pixel space, ``inputs.PixelSource``): ``mean`` is the input as is, with no draw and no
    scale or shift."""
    device = mean.device
    if std is None:
        latents = mean.float()
    else:
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
        latents = mean.float() + std.float() * eps
        latents = (latents - options.latent_shift_factor) * options.latent_scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if options.offset_noise:
        shape = diffusion.offset_noise_shape(tuple(latents.shape), channel_axis=1)
        offsets = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        noise = diffusion.offset_noise(noise, offsets, channel_axis=1)
    if options.multires_noise_iterations:
        shapes = loss_options.multires_noise_shapes(tuple(latents.shape), options.multires_noise_iterations,
                                                    channel_axis=1)
        draws = [torch.randn(shape, generator=generator, device=device, dtype=torch.float32) for shape in shapes]
        noise = loss_options.multires_noise(noise, draws, _upsample, options.multires_noise_discount)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator, device=device)
    return RandomInputs(latents, noise, timesteps.long())


def _upsample(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Bilinear resize of NCHW ``x`` to ``shape`` (``align_corners=False``, as kohya's ``nn.Upsample``)."""
    return torch.nn.functional.interpolate(x, size=tuple(shape[2:]), mode="bilinear", align_corners=False)


def draw_upscaler_inputs(shape: tuple[int, ...], generator: torch.Generator, num_noise_levels: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """IF stage II's extra draws, after ``draw_inputs``'s: (noise levels int64 [B], uniform in
    [0, num_noise_levels), as Imagen's noise-conditioning augmentation; noise [B, C, H, W] for the
    upscaled input, ``shape`` the training input's)."""
    device = generator.device
    levels = torch.randint(0, num_noise_levels, (shape[0],), generator=generator, device=device).long()
    noise = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return levels, noise


def encode_prompt(text_encoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  use_attention_mask: bool) -> torch.Tensor:
    """Last hidden state of the text encoder; the mask is passed only when asked (diffusers'
    ``--text_encoder_use_attention_mask``, needed for T5)."""
    mask = attention_mask if use_attention_mask else None
    return text_encoder(input_ids, attention_mask=mask, return_dict=False)[0]
