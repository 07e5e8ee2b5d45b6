"""Noise-schedule and DreamBooth loss math, written once for both backends.

This module owns the DDPM training schedule (betas, `alphas_cumprod`, SNR) read from a
diffusers `scheduler/scheduler_config.json`, the forward-noising step, the v-target, Min-SNR
loss weights, offset noise and the DreamBooth (prior-preservation) loss. diffusers pastes the
Min-SNR lines into ~20 example scripts and they have drifted apart (see shared/STYLE.md), so
both jaxbooth backends call this one copy instead.

It imports only the standard library and numpy at module level, never jax or torch (a test
checks this in a subprocess). The training functions take the backend's own arrays (numpy,
jax — also inside `jax.jit` — or torch) and use only Python operators, indexing and a
namespace looked up lazily from the array type by `_xp`.

Numbers mirror `diffusers.DDPMScheduler` (what `train_dreambooth.py` builds from any saved
scheduler config): betas and alphas_cumprod are bit-identical to x86 torch, including its
float32 quirks (`_linspace_f32`, `_cumprod_f32`). Square roots are IEEE float32, as CUDA and
numpy compute them; torch's MKL CPU sqrt is up to 1 ulp off, which moves diffusers' own
zero-terminal-SNR rescale by ~4e-6 relative. Parity tests live in tests/test_diffusion.py.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxbooth.errors import JaxboothError

Array = Any
"""A numpy array, jax array (or tracer) or torch tensor; functions return the same kind."""

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# train_dreambooth.py raises "Unknown prediction type" for anything else, "sample" included.
TRAINABLE_PREDICTION_TYPES = ("epsilon", "v_prediction")
# train_dreambooth.py --offset_noise: noise = randn_like(x) + 0.1 * randn(B, C, 1, 1).
OFFSET_NOISE_SCALE = 0.1
# DDPMScheduler.__init__ defaults, used for keys a saved config leaves out (as from_config does).
_DDPM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}


# ----------------------------------------------------------------------------------------------
# Schedule construction (numpy only)
# ----------------------------------------------------------------------------------------------


class NoiseTables(NamedTuple):
    """Per-timestep float32 lookup tables, each of shape [num_train_timesteps].

    A NamedTuple so it is a jax pytree as is; a backend converts it once, e.g.
    `tables.map(jnp.asarray)` or `tables.map(torch.from_numpy)`.
    """

    sqrt_alphas_cumprod: Array
    """sqrt(alphas_cumprod[t]): the signal coefficient of x_t."""
    sqrt_one_minus_alphas_cumprod: Array
    """sqrt(1 - alphas_cumprod[t]): the noise coefficient of x_t."""
    snr: Array
    """(sqrt_alphas_cumprod / sqrt_one_minus_alphas_cumprod) ** 2, as diffusers `compute_snr`."""

    def map(self, fn: Callable[[Array], Array]) -> NoiseTables:
        """Apply `fn` (an array conversion) to every table."""
        return NoiseTables(*(fn(table) for table in self))


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The DDPM training schedule of a checkpoint, as `diffusers.DDPMScheduler` builds it."""

    num_train_timesteps: int
    """T; training timesteps are integers in [0, T)."""
    betas: np.ndarray
    """[T] float64 holding diffusers' float32 betas exactly (widened losslessly)."""
    alphas_cumprod: np.ndarray
    """[T] float64 holding diffusers' float32 `alphas_cumprod` exactly; 0 at T-1 under zero SNR."""
    prediction_type: str
    """What the UNet predicts: 'epsilon', 'v_prediction' or 'sample'."""

    def as_tables(self) -> NoiseTables:
        """float32 tables computed the way diffusers does in float32 (`add_noise`, `compute_snr`)."""
        alphas_cumprod = self.alphas_cumprod.astype(np.float32)
        sqrt_ac = np.sqrt(alphas_cumprod)
        sqrt_1m_ac = np.sqrt(np.float32(1.0) - alphas_cumprod)
        snr = (sqrt_ac / sqrt_1m_ac) ** 2
        return NoiseTables(sqrt_ac, sqrt_1m_ac, snr)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace bit-identical to torch's CPU `torch.linspace(..., dtype=torch.float32)`.

    diffusers builds betas with torch.linspace, which differs from np.linspace in ~20% of
    entries by 1 ulp (enough to move alphas_cumprod by ~4e-7 relative). torch computes a
    float32 step, fills the first half as `start + step * i` and the second half as
    `end - step * (steps - 1 - i)`; the x86 build contracts each into one fused multiply-add,
    which float64 arithmetic followed by one rounding to float32 reproduces.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    low = (np.float64(start32) + step * idx).astype(np.float32)
    high = (np.float64(end32) - step * (steps - 1 - idx)).astype(np.float32)
    return np.where(np.arange(steps) < steps // 2, low, high)


def _cumprod_f32(values: np.ndarray) -> np.ndarray:
    """torch CPU `cumprod` of float32: accumulates in float64 (at::acc_type), rounds each output.

    A float32 np.cumprod drifts from diffusers' alphas_cumprod by up to ~0.7% at t=999.
    """
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def _betas_for_alpha_bar_cosine(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide cosine schedule; mirrors diffusers `betas_for_alpha_bar(..., "cosine")` in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """float32 mirror of diffusers `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1).

    Recovering betas from ratios of nearly equal alphas_bar is ill-conditioned, so the 1-ulp
    sqrt difference between IEEE and torch's MKL CPU sqrt shows up as ~1e-6 relative here.
    """
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return np.float32(1.0) - alphas


def _config_value(cfg: Mapping[str, Any], key: str, kinds: tuple[type, ...], source: str) -> Any:
    """cfg[key] (or the DDPMScheduler default), type-checked with an error naming the key."""
    value = cfg.get(key, _DDPM_DEFAULTS[key])
    if value is None:
        value = _DDPM_DEFAULTS[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(kind.__name__ for kind in kinds)
        raise JaxboothError(f"{source}: {key}={value!r} should be {expected}")
    return value


def _choice_error(source: str, key: str, value: object, choices: tuple[str, ...], extra: str = "") -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = ", ".join(repr(choice) for choice in choices)
    return f"{source}: {key}={value!r} is not supported{hint}; use one of {listed}{extra}"


def _compute_betas(cfg: Mapping[str, Any], num_timesteps: int, source: str) -> np.ndarray:
    """float32 betas exactly as `DDPMScheduler.__init__` computes them (before zero-SNR rescale)."""
    trained = cfg.get("trained_betas")
    if trained is not None:
        try:
            betas = np.asarray(trained, dtype=np.float64).astype(np.float32)
        except (TypeError, ValueError) as err:
            raise JaxboothError(f"{source}: trained_betas should be a list of numbers ({err})") from err
        if betas.shape != (num_timesteps,):
            raise JaxboothError(
                f"{source}: trained_betas has shape {betas.shape} but num_train_timesteps="
                f"{num_timesteps}; give one beta per training timestep"
            )
        return betas
    schedule = _config_value(cfg, "beta_schedule", (str,), source)
    start = _config_value(cfg, "beta_start", (int, float), source)
    end = _config_value(cfg, "beta_end", (int, float), source)
    if schedule == "linear":
        return _linspace_f32(start, end, num_timesteps)
    if schedule == "scaled_linear":  # specific to latent diffusion: linear in sqrt(beta)
        return _linspace_f32(start**0.5, end**0.5, num_timesteps) ** 2
    if schedule == "squaredcos_cap_v2":
        return _betas_for_alpha_bar_cosine(num_timesteps)
    extra = ", or set trained_betas"
    raise JaxboothError(_choice_error(source, "beta_schedule", schedule, BETA_SCHEDULES, extra))


def schedule_from_config(cfg: Mapping[str, Any], *, source: str = SCHEDULER_CONFIG) -> NoiseSchedule:
    """Build the training schedule from a diffusers scheduler config dict.

    Any scheduler class's config works (DDPM, DDIM, PNDM, Euler, DPMSolver...): like
    `DDPMScheduler.from_config`, which train_dreambooth.py uses, it reads num_train_timesteps,
    beta_start, beta_end, beta_schedule, trained_betas, prediction_type and
    rescale_betas_zero_snr, takes DDPM defaults for missing ones and ignores inference-only
    keys (timestep_spacing, steps_offset, ...). `source` names the file in error messages.
    """
    if not isinstance(cfg, Mapping):
        raise JaxboothError(f"{source}: expected a JSON object, found {type(cfg).__name__}")
    num_timesteps = _config_value(cfg, "num_train_timesteps", (int,), source)
    if num_timesteps < 1:
        raise JaxboothError(f"{source}: num_train_timesteps={num_timesteps} must be at least 1")
    prediction_type = _config_value(cfg, "prediction_type", (str,), source)
    if prediction_type not in PREDICTION_TYPES:
        raise JaxboothError(_choice_error(source, "prediction_type", prediction_type, PREDICTION_TYPES))
    betas = _compute_betas(cfg, num_timesteps, source)
    if _config_value(cfg, "rescale_betas_zero_snr", (bool,), source):
        betas = _rescale_zero_terminal_snr(betas)
    if not np.all((betas >= 0) & (betas <= 1)):
        raise JaxboothError(
            f"{source}: betas must lie in [0, 1], found min {betas.min()} and max {betas.max()}; "
            "check beta_start, beta_end and trained_betas"
        )
    alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
    return NoiseSchedule(
        num_train_timesteps=num_timesteps,
        betas=_read_only(betas.astype(np.float64)),
        alphas_cumprod=_read_only(alphas_cumprod.astype(np.float64)),
        prediction_type=prediction_type,
    )


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def load_schedule(model_dir: str | Path) -> NoiseSchedule:
    """Read `<model_dir>/scheduler/scheduler_config.json` of a diffusers model folder."""
    return schedule_from_config(read_scheduler_config(model_dir), source=str(Path(model_dir) / SCHEDULER_CONFIG))


def read_scheduler_config(model_dir: str | Path) -> dict:
    """`<model_dir>/scheduler/scheduler_config.json` as a dict, or one error naming the file and the fix;
    the one reader of it, for both backends' training, sampling and validation."""
    path = Path(model_dir) / SCHEDULER_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise JaxboothError(
            f"{path}: cannot read the scheduler config ({err.strerror or err}); model_dir should be "
            f"a diffusers model folder containing {SCHEDULER_CONFIG}"
        ) from err
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as err:
        raise JaxboothError(f"{path}: invalid JSON ({err}); re-save it from diffusers") from err
    return cfg


# ----------------------------------------------------------------------------------------------
# Array-agnostic training math (numpy, jax or torch arrays)
# ----------------------------------------------------------------------------------------------


def _xp(x: Array) -> Any:
    """The array namespace of `x` (numpy, jax.numpy or torch), imported only when needed."""
    module = type(x).__module__
    if module.startswith("torch"):
        import torch

        return torch
    if module.startswith(("jax", "jaxlib")):  # jax arrays live in jaxlib, tracers in jax._src
        import jax.numpy as jnp

        return jnp
    return np


def _is_torch(xp: Any) -> bool:
    return xp.__name__ == "torch"


def _astype(x: Array, dtype: Any) -> Array:
    return x.to(dtype) if _is_torch(_xp(x)) else x.astype(dtype)


def _float32(x: Array) -> Array:
    return _astype(x, _xp(x).float32)


def _gather(table: Array, timesteps: Array, like: Array) -> Array:
    """table[timesteps] as an array of `like`'s kind and device, shaped [B, 1, ..., 1] to
    broadcast over `like` (diffusers' flatten-then-unsqueeze). The table is converted here
    only if the backend did not convert it already; jax clamps out-of-range timesteps."""
    xp = _xp(like)
    if _is_torch(xp):
        table = xp.as_tensor(table, device=like.device)
        coef = table[xp.as_tensor(timesteps, device=like.device).long()]
    else:
        coef = xp.asarray(table)[timesteps]
    return coef.reshape((-1,) + (1,) * (like.ndim - 1))


def add_noise(x0: Array, noise: Array, timesteps: Array, tables: NoiseTables) -> Array:
    """Forward diffusion x_t = sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * noise.

    Mirrors diffusers `DDPMScheduler.add_noise`. x0 and noise: same shape [B, ...] in any
    layout (NHWC or NCHW; the per-example coefficients broadcast over all non-batch dims).
    timesteps: [B] integers in [0, T). The result has x0's dtype.
    """
    sqrt_ac = _astype(_gather(tables.sqrt_alphas_cumprod, timesteps, x0), x0.dtype)
    sqrt_1m_ac = _astype(_gather(tables.sqrt_one_minus_alphas_cumprod, timesteps, x0), x0.dtype)
    return sqrt_ac * x0 + sqrt_1m_ac * noise


def velocity(x0: Array, noise: Array, timesteps: Array, tables: NoiseTables) -> Array:
    """v-prediction target v = sqrt(ac[t]) * noise - sqrt(1 - ac[t]) * x0.

    Mirrors diffusers `DDPMScheduler.get_velocity`; shapes as in `add_noise`.
    """
    sqrt_ac = _astype(_gather(tables.sqrt_alphas_cumprod, timesteps, x0), x0.dtype)
    sqrt_1m_ac = _astype(_gather(tables.sqrt_one_minus_alphas_cumprod, timesteps, x0), x0.dtype)
    return sqrt_ac * noise - sqrt_1m_ac * x0


def drop_learned_variance(pred: Array, channels: int, channel_axis: int = 1) -> Array:
    """The noise half of a learned-variance UNet's output: the first ``channels`` channels when ``pred``
    has ``2 * channels`` (IF's 6 = 3 noise + 3 variance; diffusers' scripts ``chunk(2, dim=1)``), ``pred``
    unchanged when it has ``channels``; any other count is a ValueError."""
    axis = channel_axis % pred.ndim
    found = pred.shape[axis]
    if found == channels:
        return pred
    if found != 2 * channels:
        raise ValueError(f"the prediction has {found} channels on axis {channel_axis}; expected {channels} "
                         f"(the input's) or {2 * channels} (with a learned variance)")
    index = (slice(None),) * axis + (slice(0, channels),)
    return pred[index]


def _check_trainable(prediction_type: str) -> None:
    if prediction_type not in TRAINABLE_PREDICTION_TYPES:
        raise JaxboothError(
            f"{SCHEDULER_CONFIG}: prediction_type={prediction_type!r} cannot be trained; DreamBooth "
            f"training (as diffusers train_dreambooth.py) supports {TRAINABLE_PREDICTION_TYPES}"
        )


def training_target(
    x0: Array, noise: Array, timesteps: Array, tables: NoiseTables, prediction_type: str
) -> Array:
    """What the UNet output is regressed onto: the noise for 'epsilon', `velocity` for
    'v_prediction'. Like train_dreambooth.py, any other type (including 'sample') is an error."""
    _check_trainable(prediction_type)
    if prediction_type == "epsilon":
        return noise
    return velocity(x0, noise, timesteps, tables)


def compute_snr(timesteps: Array, tables: NoiseTables) -> Array:
    """SNR(t) = (sqrt(ac[t]) / sqrt(1 - ac[t])) ** 2 as float32 [B] for timesteps [B].

    Mirrors diffusers `training_utils.compute_snr` (the table holds the same float32 values).
    SNR is 0 at t = T-1 under rescale_betas_zero_snr.
    """
    return _gather(tables.snr, timesteps, timesteps)


def min_snr_loss_weights(snr: Array, snr_gamma: float, prediction_type: str) -> Array:
    """Per-example Min-SNR-gamma loss weights (arXiv 2303.09556), float32 [B].

    Mirrors `mse_loss_weights` in diffusers `examples/dreambooth/train_dreambooth.py`:
    min(snr, gamma) / snr for epsilon and min(snr, gamma) / (snr + 1) for v_prediction (the
    paper's v weight). We follow train_dreambooth.py, not `train_dreambooth_lora_sdxl.py`,
    whose v branch computes min(snr, gamma) / snr + 1 — a different loss under the same flag;
    the (snr + 1) form is the one the paper derives and keeps the weights bounded.
    As in diffusers, epsilon with zero terminal SNR gives 0/0 = NaN at t = T-1.
    """
    _check_trainable(prediction_type)
    xp = _xp(snr)
    gamma = np.float32(snr_gamma)  # diffusers' snr_gamma * ones_like(...) is float32
    clipped = xp.clamp(snr, max=float(gamma)) if _is_torch(xp) else xp.minimum(snr, gamma)
    divisor = snr + 1 if prediction_type == "v_prediction" else snr
    return clipped / divisor


def offset_noise_shape(noise_shape: tuple[int, ...], channel_axis: int = -1) -> tuple[int, ...]:
    """Shape of the extra draw for `offset_noise`: 1 on every axis but batch and channels,
    i.e. [B, 1, 1, C] for NHWC (channel_axis=-1) and [B, C, 1, 1] for NCHW (channel_axis=1)."""
    channel_axis %= len(noise_shape)
    return tuple(n if axis in (0, channel_axis) else 1 for axis, n in enumerate(noise_shape))


def offset_noise(
    noise: Array, offset_sample: Array, *, channel_axis: int = -1, scale: float = OFFSET_NOISE_SCALE
) -> Array:
    """noise + scale * offset_sample: train_dreambooth.py `--offset_noise`.

    diffusers draws `0.1 * randn(B, C, 1, 1)`; the RNG belongs to the backend, so the caller
    passes that standard-normal draw with shape `offset_noise_shape(noise.shape, channel_axis)`
    ([B, 1, 1, C] for NHWC, [B, C, 1, 1] for NCHW) and it broadcasts over the spatial axes.
    The shape is checked so that a draw in the other layout fails instead of broadcasting.
    """
    expected = offset_noise_shape(tuple(noise.shape), channel_axis)
    if tuple(offset_sample.shape) != expected:
        raise ValueError(
            f"offset_sample has shape {tuple(offset_sample.shape)}, expected {expected} for noise "
            f"{tuple(noise.shape)} with channel_axis={channel_axis}"
        )
    return noise + scale * offset_sample


def dreambooth_loss(
    pred: Array,
    target: Array,
    *,
    with_prior_preservation: bool,
    prior_loss_weight: float = 1.0,
    snr_weights: Array | None = None,
) -> tuple[Array, Array, Array]:
    """The train_dreambooth.py loss, in float32; returns (total, instance_loss, prior_loss).

    pred, target: [B, ...]. With prior preservation the batch is instance examples then class
    examples, B even: the class half gives prior_loss = mean MSE (never SNR-weighted, as in
    diffusers) and total = instance_loss + prior_loss_weight * prior_loss. Otherwise
    prior_loss is 0. instance_loss is the mean MSE, or with `snr_weights` ([B], from
    `min_snr_loss_weights` over the whole batch) the per-example mean MSE times its weight,
    averaged.

    Deliberate difference: with prior preservation diffusers multiplies the [B/2] instance
    losses by all [B] weights, which broadcasts only at train_batch_size=1 (then weighting by
    the mean of the instance and class weights) and crashes above it. We weight each
    instance example by its own weight (the first B/2 entries), as the Min-SNR paper does.
    """
    pred, target = _float32(pred), _float32(target)
    return reduce_dreambooth_loss((pred - target) ** 2, with_prior_preservation=with_prior_preservation,
                                  prior_loss_weight=prior_loss_weight, snr_weights=snr_weights)


def reduce_dreambooth_loss(errors: Array, *, with_prior_preservation: bool, prior_loss_weight: float = 1.0,
                           snr_weights: Array | None = None) -> tuple[Array, Array, Array]:
    """`dreambooth_loss`'s reduction of per-element float32 errors [B, ...] (squared, or huber: `loss_options`)."""
    batch = errors.shape[0]
    if snr_weights is not None and tuple(snr_weights.shape) != (batch,):
        raise ValueError(f"snr_weights has shape {tuple(snr_weights.shape)}, expected ({batch},)")
    if with_prior_preservation:
        if batch % 2:
            raise ValueError(f"prior preservation needs instance+class halves; batch {batch} is odd")
        half = batch // 2
        prior_loss = errors[half:].mean()
        errors = errors[:half]
        snr_weights = None if snr_weights is None else snr_weights[:half]
    if snr_weights is None:
        instance_loss = errors.mean()
    else:
        per_example = errors.reshape(errors.shape[0], -1).mean(1)
        instance_loss = (per_example * _float32(snr_weights)).mean()
    if not with_prior_preservation:
        return instance_loss, instance_loss, _xp(instance_loss).zeros_like(instance_loss)
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss


def __getattr__(name: str) -> Any:
    """`LossOptions` and `loss_from_prediction` moved to `jaxbooth.loss_options` (with kohya's loss options);
    still importable from here."""
    if name in ("LossOptions", "loss_from_prediction"):
        from jaxbooth import loss_options

        return getattr(loss_options, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
