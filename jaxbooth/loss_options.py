"""kohya-style loss options, written once for both backends: multires (pyramid) noise, zero terminal SNR,
debiased estimation, the huber / smooth-L1 losses with their timestep schedules; and `LossOptions` with
`loss_from_prediction`, the one DreamBooth loss both backends call.

Behaviour follows kohya sd-scripts (``--multires_noise_iterations``, ``--zero_terminal_snr``,
``--debiased_estimation_loss``, ``--loss_type``, ``--huber_schedule``, ``--huber_c``), written from its
documented formulas. Like ``jaxbooth.diffusion`` this imports only numpy and the standard library at module
level; the training functions take numpy, jax (also traced) or torch arrays. What needs the backend's RNG
or image resize (the multires draws and their bilinear upsample) comes in as arguments, so both backends
compute the same formula.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth import diffusion
from jaxbooth.diffusion import Array, NoiseSchedule, NoiseTables, _float32, _gather, _is_torch, _xp

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# kohya clamps the SNR before 1/sqrt(SNR): t = 0 has a huge SNR (and a zero one would be infinite).
DEBIASED_SNR_MAX = 1000.0


@dataclass(frozen=True)
class LossOptions:
    """The run-spec fields the DreamBooth loss needs; one definition for both backends.

    Hashable, so the JAX backend can bind it statically into its jitted step.
    """

    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    offset_noise: bool = False
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    text_encoder_use_attention_mask: bool = False
    latent_scaling_factor: float = 0.18215
    latent_shift_factor: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    debiased_estimation_loss: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1


def spec_loss_options(optim: Any) -> dict[str, Any]:
    """The kohya loss fields of `LossOptions` from a spec's ``optim`` section (both backends' ``loss_options``)."""
    return {"multires_noise_iterations": optim.multires_noise_iterations,
            "multires_noise_discount": optim.multires_noise_discount,
            "debiased_estimation_loss": optim.debiased_estimation_loss, "loss_type": optim.loss_type,
            "huber_schedule": optim.huber_schedule, "huber_c": optim.huber_c}


# ----------------------------------------------------------------------------------------------
# Zero terminal SNR (arXiv 2305.08891): the training schedule, and the config a model samples with
# ----------------------------------------------------------------------------------------------


def zero_terminal_snr_schedule(schedule: NoiseSchedule) -> NoiseSchedule:
    """The schedule with its betas rescaled so alphas_cumprod[-1] == 0 (kohya ``--zero_terminal_snr``):
    diffusers' ``rescale_betas_zero_snr``, applied to the loaded training schedule; a schedule that already
    ends at zero (its config sets ``rescale_betas_zero_snr``) is returned as is."""
    if schedule.alphas_cumprod[-1] == 0:
        return schedule
    betas = diffusion._rescale_zero_terminal_snr(schedule.betas.astype(np.float32))
    alphas_cumprod = diffusion._cumprod_f32(np.float32(1.0) - betas)
    return replace(schedule, betas=diffusion._read_only(betas.astype(np.float64)),
                   alphas_cumprod=diffusion._read_only(alphas_cumprod.astype(np.float64)))


def training_schedule(schedule: NoiseSchedule, zero_terminal_snr: bool) -> NoiseSchedule:
    """What a run trains on: the loaded schedule, rescaled under ``zero_terminal_snr``."""
    return zero_terminal_snr_schedule(schedule) if zero_terminal_snr else schedule


# diffusers schedulers that read rescale_betas_zero_snr and timestep_spacing (PNDM, SD 1.x's, reads neither).
ZERO_SNR_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                       "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler")


def zero_terminal_snr_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler config a model trained with zero terminal SNR samples with (the paper's section 3.3:
    rescaled betas and "trailing" timesteps, so sampling starts from pure noise at t = T-1). A class that
    reads neither key (PNDM) becomes DDIMScheduler, with clip_sample and set_alpha_to_one off as SD's."""
    out = {**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    if config.get("_class_name", "DDIMScheduler") not in ZERO_SNR_SCHEDULERS:
        out.update(_class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False)
        out.pop("skip_prk_steps", None)
    return out


def training_scheduler_config(config: Mapping[str, Any], zero_terminal_snr: bool) -> dict[str, Any]:
    """The pipeline's scheduler config as a run trains, validates and saves it (`zero_terminal_snr_config`)."""
    return zero_terminal_snr_config(config) if zero_terminal_snr else dict(config)


def save_zero_terminal_snr_scheduler(scheduler_dir: str | Path) -> None:
    """Rewrite an output pipeline's ``scheduler/scheduler_config.json`` with `zero_terminal_snr_config`, so
    ``from_pretrained`` samples the model as it was trained."""
    path = Path(scheduler_dir) / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(zero_terminal_snr_config(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Multires (pyramid) noise
# ----------------------------------------------------------------------------------------------


def multires_noise_shapes(noise_shape: Sequence[int], iterations: int, channel_axis: int = -1
                          ) -> list[tuple[int, ...]]:
    """Shapes of the standard-normal draws of `multires_noise`: level i at 1/2**i of the spatial size
    (at least 1), stopping after the level that reaches 1 on an axis, as kohya's ``pyramid_noise_like``.

    kohya shrinks level i by r**i with a fresh random r in [2, 4) each step; those shapes change from step
    to step, which a jitted step cannot take, so jaxbooth fixes r = 2 (the finest of kohya's pyramids).
    """
    shape = tuple(int(n) for n in noise_shape)
    channel_axis %= len(shape)
    spatial = [axis for axis in range(1, len(shape)) if axis != channel_axis]
    shapes = []
    for level in range(iterations):
        sizes = {axis: max(1, int(shape[axis] / 2**level)) for axis in spatial}
        shapes.append(tuple(sizes.get(axis, n) for axis, n in enumerate(shape)))
        if min(sizes.values()) == 1:
            break
    return shapes


def _std(x: Array) -> Array:
    """Unbiased standard deviation over all elements (torch's ``Tensor.std()``)."""
    xp = _xp(x)
    return x.std() if _is_torch(xp) else xp.std(x, ddof=1)


def multires_noise(noise: Array, draws: Sequence[Array], upsample: Callable[[Array, tuple[int, ...]], Array],
                   discount: float) -> Array:
    """kohya's multires noise: noise + sum_i discount**i * upsample(draws[i]), divided by its std.

    draws: standard normals of `multires_noise_shapes(noise.shape, ...)`; upsample(x, shape): the backend's
    bilinear resize of x to `shape` (half-pixel centres, torch's ``align_corners=False``).
    """
    total = noise
    for level, draw in enumerate(draws):
        total = total + upsample(draw, tuple(noise.shape)) * (discount**level)
    return total / _std(total)


def bilinear_upsample_numpy(x: np.ndarray, shape: tuple[int, ...], channel_axis: int = -1) -> np.ndarray:
    """Reference numpy bilinear resize (half-pixel centres, edge-clamped, as torch's
    ``interpolate(mode="bilinear", align_corners=False)`` upsamples); for tests and numpy callers."""
    channel_axis %= x.ndim
    out = np.asarray(x, np.float64)
    for axis in range(1, x.ndim):
        if axis == channel_axis or out.shape[axis] == shape[axis]:
            continue
        size_in, size_out = out.shape[axis], shape[axis]
        pos = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, None)
        low = np.minimum(np.floor(pos).astype(int), size_in - 1)
        high = np.minimum(low + 1, size_in - 1)
        frac = (pos - low).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        out = np.take(out, low, axis) * (1 - frac) + np.take(out, high, axis) * frac
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Debiased estimation and the huber losses
# ----------------------------------------------------------------------------------------------


def debiased_estimation_weights(snr: Array, prediction_type: str) -> Array:
    """kohya's per-example debiased-estimation weights (arXiv 2310.08442): 1/sqrt(SNR) for epsilon,
    1/(SNR + 1) for v_prediction, with SNR clamped at `DEBIASED_SNR_MAX` first (float32 [B])."""
    diffusion._check_trainable(prediction_type)
    xp = _xp(snr)
    snr = _float32(snr)
    clamped = xp.clamp(snr, max=DEBIASED_SNR_MAX) if _is_torch(xp) else xp.minimum(snr, np.float32(DEBIASED_SNR_MAX))
    if prediction_type == "v_prediction":
        return 1 / (clamped + 1)
    return 1 / xp.sqrt(clamped)


def huber_thresholds(timesteps: Array, tables: NoiseTables, schedule: str, huber_c: float) -> Array:
    """kohya's per-example huber threshold c(t), float32 [B]: ``constant`` c; ``exponential``
    exp(-t ln(1/c) / T), from 1 at t = 0 down to c at t = T; ``snr`` (1 - c) / (1 + sigma_t)**2 + c with
    sigma_t = sqrt((1 - ac[t]) / ac[t]), from ~1 at low noise to c at high noise."""
    if schedule not in HUBER_SCHEDULES:
        raise ValueError(f"huber_schedule={schedule!r} is not one of {HUBER_SCHEDULES}")
    xp = _xp(timesteps)
    steps = _float32(timesteps)
    if schedule == "constant":
        return xp.zeros_like(steps) + np.float32(huber_c)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / int(tables.snr.shape[0])
        return xp.exp(steps * np.float32(-alpha))
    with np.errstate(divide="ignore"):  # sigma_t is inf at a zero terminal SNR, giving c there
        ratio = _float32(_gather(tables.sqrt_one_minus_alphas_cumprod, timesteps, timesteps)) / _float32(
            _gather(tables.sqrt_alphas_cumprod, timesteps, timesteps))
    return np.float32(1 - huber_c) / (1 + ratio) ** 2 + np.float32(huber_c)


def elementwise_loss(pred: Array, target: Array, loss_type: str, thresholds: Array | None = None) -> Array:
    """Per-element float32 loss: ``l2`` (pred - target)**2; ``huber`` 2c(sqrt(d**2 + c**2) - c), ~d**2 for
    |d| << c and ~2c|d| beyond; ``smooth_l1`` 2(sqrt(d**2 + c**2) - c), the same divided by c. thresholds:
    c per example [B] (`huber_thresholds`), broadcast over the other axes."""
    pred, target = _float32(pred), _float32(target)
    if loss_type == "l2":
        return (pred - target) ** 2
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if thresholds is None:
        raise ValueError(f"loss_type={loss_type!r} needs per-example thresholds (huber_thresholds)")
    c = _float32(thresholds).reshape((-1,) + (1,) * (pred.ndim - 1))
    smooth = 2 * (_xp(pred).sqrt((pred - target) ** 2 + c**2) - c)
    return c * smooth if loss_type == "huber" else smooth


# ----------------------------------------------------------------------------------------------
# The loss both backends call
# ----------------------------------------------------------------------------------------------


def loss_weights(timesteps: Array, tables: NoiseTables, options: LossOptions) -> Array | None:
    """Per-example instance-loss weights [B]: Min-SNR times debiased estimation (kohya multiplies both),
    or None when neither is on."""
    weights = None
    if options.snr_gamma is not None or options.debiased_estimation_loss:
        snr = diffusion.compute_snr(timesteps, tables)
        if options.snr_gamma is not None:
            weights = diffusion.min_snr_loss_weights(snr, options.snr_gamma, options.prediction_type)
        if options.debiased_estimation_loss:
            debiased = debiased_estimation_weights(snr, options.prediction_type)
            weights = debiased if weights is None else weights * debiased
    return weights


def loss_from_prediction(pred: Array, x0: Array, noise: Array, timesteps: Array, tables: NoiseTables,
                         options: LossOptions, mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Target, per-example weights and the train_dreambooth.py loss for a model prediction.

    Both backends call this after their own forward pass of ``add_noise(x0, noise, t)``; returns
    (loss, {"instance_loss", "prior_loss"}) in float32. ``loss_type`` applies to every row (class rows
    too); the weights (Min-SNR, debiased estimation) to the instance rows, as diffusers weights them.
    ``mask`` (``--masked_loss``, ``jaxbooth.data.masks``): per-row weights broadcastable to ``pred`` (NHWC
    ``[B, h, w, 1]`` on jax, NCHW ``[B, 1, h, w]`` on torch) that multiply the per-element loss.
    """
    target = diffusion.training_target(x0, noise, timesteps, tables, options.prediction_type)
    thresholds = None
    if options.loss_type != "l2":
        thresholds = huber_thresholds(timesteps, tables, options.huber_schedule, options.huber_c)
    errors = elementwise_loss(pred, target, options.loss_type, thresholds)
    if mask is not None:  # --masked_loss: per-row masks, broadcast over channels (kohya multiplies before the mean)
        errors = errors * _float32(mask)
    loss, instance_loss, prior_loss = diffusion.reduce_dreambooth_loss(
        errors, with_prior_preservation=options.with_prior_preservation,
        prior_loss_weight=options.prior_loss_weight, snr_weights=loss_weights(timesteps, tables, options))
    return loss, {"instance_loss": instance_loss, "prior_loss": prior_loss}
