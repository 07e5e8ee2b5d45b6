"""EDM-style training math (Karras et al. 2022, arXiv 2206.00364) as diffusers'
``train_dreambooth_lora_sdxl.py --do_edm_style_training`` does it, framework-free.

The script swaps the DDPM forward process for a sigma parametrisation: it draws an index into the
training scheduler's ``timesteps`` (an ``EulerDiscreteScheduler``, or an ``EDMEulerScheduler`` when the
pipeline's own scheduler is an EDM one, which then trains EDM-style even without the flag), noises
``x = x0 + sigma * noise``, feeds the UNet ``c_in * x`` at that timestep, turns its output into a
denoised estimate ``c_skip * x + c_out * pred`` and regresses it onto x0, weighted by ``sigma**-2``
for Euler (unweighted for EDM). This module owns the sigma tables (numpy, from the scheduler config,
as those two classes build them at ``from_pretrained``) and the coefficients; a backend converts the
tables once (``EdmSchedule.map``) and calls the array functions on its own arrays (numpy or torch;
arithmetic and indexing only). Parity with the diffusers classes: tests/test_edm.py.

Imports numpy and jaxbooth's numpy-only modules; never jax or torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxbooth import diffusion, sdxl
from jaxbooth.errors import JaxboothError

Array = Any
"""A numpy array or torch tensor (jax arrays work too); functions return the same kind."""

EULER, EDM = "EulerDiscreteScheduler", "EDMEulerScheduler"
# EDMEulerScheduler.__init__ defaults, for keys a saved config leaves out (as from_config does).
_EDM_DEFAULTS: dict[str, Any] = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
                                 "sigma_schedule": "karras", "num_train_timesteps": 1000,
                                 "prediction_type": "epsilon", "rho": 7.0}
SIGMA_SCHEDULES = ("karras", "exponential")
TIMESTEP_TYPES = ("discrete", "continuous")
SNR_GAMMA_PROBLEM = "Min-SNR weighting is not supported with EDM-style training (as in diffusers' SDXL script)"


@dataclass(frozen=True, eq=False)
class EdmSchedule:
    """The training scheduler the script builds under EDM: its sigma and timestep tables.

    A training step draws ``indices`` uniformly in ``[0, num_train_timesteps)`` and uses
    ``sigmas[indices]`` for the noise and ``timesteps[indices]`` as the UNet's timestep (diffusers'
    ``noise_scheduler.timesteps[indices]`` and ``get_sigmas``).
    """

    scheduler: str
    """EULER or EDM: the diffusers class whose tables these are."""
    sigmas: Array
    """[N] float32 noise levels, N >= num_train_timesteps (numpy until ``map``)."""
    timesteps: Array
    """[N] float32 UNet timesteps: T-1-i (Euler), or c_noise = 0.25 log(sigma) (EDM, Euler 'continuous')."""
    num_train_timesteps: int
    prediction_type: str
    """'epsilon' or 'v_prediction' (the script raises on anything else)."""
    sigma_data: float = 1.0
    """EDM's data standard deviation; Euler's preconditioning is EDM's with sigma_data = 1."""

    @property
    def is_edm(self) -> bool:
        return self.scheduler == EDM

    def map(self, fn: Callable[[Array], Array]) -> EdmSchedule:
        """The same schedule with both tables converted by ``fn`` (e.g. to torch tensors on a device)."""
        return dataclasses.replace(self, sigmas=fn(self.sigmas), timesteps=fn(self.timesteps))


class Preconditioning(NamedTuple):
    """Per-example coefficients (arrays shaped like sigma) of one step."""

    c_in: Array
    """UNet input = c_in * noisy."""
    c_skip: Array
    c_out: Array
    """denoised = c_skip * noisy + c_out * prediction."""
    weight: Array | None
    """Loss weight per example: sigma**-2 for Euler, None (unweighted) for EDM."""


# ----------------------------------------------------------------------------------------------
# Tables (numpy only)
# ----------------------------------------------------------------------------------------------


def c_noise(sigmas: np.ndarray) -> np.ndarray:
    """EDM's timestep conditioning 0.25 * log(sigma), float32 (``EDMEulerScheduler.precondition_noise``)."""
    sigmas = np.asarray(sigmas, np.float32)
    return (np.float32(0.25) * np.log(sigmas)).astype(np.float32)


def _check_prediction_type(value: Any, source: str) -> str:
    trainable = diffusion.TRAINABLE_PREDICTION_TYPES
    if value not in trainable:
        raise JaxboothError(f"{source}: prediction_type={value!r} cannot be trained EDM-style; diffusers' SDXL "
                            f"script supports {trainable}")
    return value


def euler_schedule(cfg: Mapping[str, Any], *, source: str = diffusion.SCHEDULER_CONFIG) -> EdmSchedule:
    """``EulerDiscreteScheduler.from_config(cfg)``'s training tables (before any ``set_timesteps``).

    sigma_i = sqrt((1 - ac) / ac) of DDPM timestep t = T-1-i (the betas of ``diffusion``; under
    rescale_betas_zero_snr the last alphas_cumprod is 2**-24, as diffusers sets it); timesteps are
    T-1-i, or 0.25 log(sigma_i) with ``timestep_type="continuous"`` and v_prediction.
    """
    schedule = diffusion.schedule_from_config(cfg, source=source)
    prediction_type = _check_prediction_type(schedule.prediction_type, source)
    alphas_cumprod = schedule.alphas_cumprod.astype(np.float32)
    if cfg.get("rescale_betas_zero_snr"):
        alphas_cumprod = alphas_cumprod.copy()
        alphas_cumprod[-1] = np.float32(2.0**-24)
    sigmas = np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)[::-1].copy()
    timestep_type = cfg.get("timestep_type") or "discrete"
    if timestep_type not in TIMESTEP_TYPES:
        raise JaxboothError(diffusion._choice_error(source, "timestep_type", timestep_type, TIMESTEP_TYPES))
    if timestep_type == "continuous" and prediction_type == "v_prediction":
        timesteps = c_noise(sigmas)
    else:
        timesteps = np.arange(schedule.num_train_timesteps - 1, -1, -1).astype(np.float32)
    return EdmSchedule(EULER, _read_only(sigmas), _read_only(timesteps), schedule.num_train_timesteps,
                       prediction_type)


def _edm_value(cfg: Mapping[str, Any], key: str, source: str) -> Any:
    value = cfg.get(key)
    value = _EDM_DEFAULTS[key] if value is None else value
    numeric = key not in ("sigma_schedule", "prediction_type")
    if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise JaxboothError(f"{source}: {key}={value!r} should be a number")
    return value


def edm_schedule(cfg: Mapping[str, Any], *, source: str = diffusion.SCHEDULER_CONFIG) -> EdmSchedule:
    """``EDMEulerScheduler.from_config(cfg)``'s training tables: T+1 sigmas from sigma_max down to
    sigma_min on a Karras (rho) or exponential ramp, timesteps = c_noise(sigma)."""
    steps = _edm_value(cfg, "num_train_timesteps", source)
    if not isinstance(steps, int) or steps < 1:
        raise JaxboothError(f"{source}: num_train_timesteps={steps!r} must be an integer >= 1")
    sigma_min, sigma_max = (float(_edm_value(cfg, key, source)) for key in ("sigma_min", "sigma_max"))
    if not 0 < sigma_min < sigma_max:
        raise JaxboothError(f"{source}: need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    kind = _edm_value(cfg, "sigma_schedule", source)
    if kind == "karras":  # float64 ramp, as diffusers on CPU/CUDA
        rho = float(_edm_value(cfg, "rho", source))
        ramp = np.arange(steps + 1, dtype=np.float64) / steps
        low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = ((high + ramp * (low - high)) ** rho).astype(np.float32)
    elif kind == "exponential":  # diffusers: float32 torch.linspace of the logs, exp, flip
        logs = diffusion._linspace_f32(math.log(sigma_min), math.log(sigma_max), steps + 1)
        sigmas = np.exp(logs).astype(np.float32)[::-1].copy()
    else:
        raise JaxboothError(diffusion._choice_error(source, "sigma_schedule", kind, SIGMA_SCHEDULES))
    prediction_type = _check_prediction_type(_edm_value(cfg, "prediction_type", source), source)
    return EdmSchedule(EDM, _read_only(sigmas), _read_only(c_noise(sigmas)), steps, prediction_type,
                       sigma_data=float(_edm_value(cfg, "sigma_data", source)))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


# ----------------------------------------------------------------------------------------------
# Which scheduler a pipeline trains with, and what the backends refuse (before any model loads)
# ----------------------------------------------------------------------------------------------


def pipeline_scheduler_class(model_dir: str | Path) -> str | None:
    """The scheduler class ``model_index.json`` names (what the script's ``determine_scheduler_type``
    reads), else the scheduler config's ``_class_name``; None if neither is readable."""
    model_dir = Path(model_dir)
    for path, pick in ((model_dir / "model_index.json", lambda d: d.get("scheduler", [None, None])[1]),
                       (model_dir / diffusion.SCHEDULER_CONFIG, lambda d: d.get("_class_name"))):
        try:
            name = pick(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError, IndexError):
            continue
        if isinstance(name, str):
            return name
    return None


def is_edm_scheduler(name: str | None) -> bool:
    """The script's test: an EDM scheduler class ('EDMEulerScheduler', 'EDMDPMSolverMultistepScheduler')."""
    return name is not None and "EDM" in name


def training_scheduler(model_dir: str | Path, do_edm_style_training: bool) -> str | None:
    """EDM if the pipeline's scheduler is an EDM one (the script then trains EDM-style with or without
    the flag), EULER with --do_edm_style_training, None for DDPM training."""
    if is_edm_scheduler(pipeline_scheduler_class(model_dir)):
        return EDM
    return EULER if do_edm_style_training else None


def load_schedule(model_dir: str | Path, do_edm_style_training: bool) -> EdmSchedule | None:
    """The EDM-style training schedule of a pipeline folder, or None when it trains with DDPM."""
    kind = training_scheduler(model_dir, do_edm_style_training)
    if kind is None:
        return None
    source = str(Path(model_dir) / diffusion.SCHEDULER_CONFIG)
    cfg = diffusion.read_scheduler_config(model_dir)
    return edm_schedule(cfg, source=source) if kind == EDM else euler_schedule(cfg, source=source)


def pipeline_problems(model_dir: str | Path, do_edm_style_training: bool, backend: str, *,
                      snr_gamma: float | None = None) -> list[str]:
    """Why this pipeline cannot train as asked, one line each naming the key and the fix.

    EDM-style training is an option of diffusers' SDXL script only, so other pipelines refuse it;
    a pipeline with an EDM scheduler always trains EDM-style there (so Min-SNR is refused with it
    too), which only the torch backend does.
    """
    scheduler = pipeline_scheduler_class(model_dir)
    edm_pipeline = is_edm_scheduler(scheduler)
    if not (do_edm_style_training or edm_pipeline):
        return []
    index = Path(model_dir) / "model_index.json"
    if not sdxl.is_sdxl_pipeline(model_dir):
        why = "--do_edm_style_training is set" if do_edm_style_training else \
            f"its scheduler {scheduler} is an EDM scheduler, which trains EDM-style"
        return [f"{index} is not an SDXL pipeline, and {why}: EDM-style training is an option of diffusers' SDXL "
                "script (train_dreambooth_lora_sdxl.py) only. Drop --do_edm_style_training, or point "
                "--pretrained_model_name_or_path at an SDXL pipeline"]
    if not edm_pipeline:
        return []
    edm_style = f"{index}: the pipeline's scheduler {scheduler} is an EDM scheduler, which diffusers' SDXL script " \
                "always trains EDM-style (as --do_edm_style_training)"
    problems = []
    if backend == "jax":
        problems.append(f"{edm_style}; only the torch backend does: use --backend=torch")
    if snr_gamma is not None:
        problems.append(f"{edm_style}, and --snr_gamma={snr_gamma}: {SNR_GAMMA_PROBLEM}; drop --snr_gamma")
    return problems


# ----------------------------------------------------------------------------------------------
# Array-agnostic training math (numpy or torch arrays; the tables converted to the same kind)
# ----------------------------------------------------------------------------------------------


def lookup(table: Array, indices: Array, ndim: int) -> Array:
    """table[indices] shaped [B, 1, ..., 1] (``ndim`` axes) to broadcast over a batch (the script's
    ``get_sigmas``); indices on the table's device."""
    return table[indices].reshape((-1,) + (1,) * (ndim - 1))


def add_noise(x0: Array, noise: Array, sigma: Array) -> Array:
    """x = x0 + noise * sigma (``EulerDiscreteScheduler``/``EDMEulerScheduler.add_noise``)."""
    return x0 + noise * sigma


def preconditioning(sigma: Array, schedule: EdmSchedule) -> Preconditioning:
    """c_in, c_skip, c_out and the loss weight at noise level ``sigma``, as the script combines them.

    EDM: c_in = 1/sqrt(s^2 + sd^2), c_skip = sd^2/(s^2 + sd^2), c_out = +-s sd/sqrt(s^2 + sd^2)
    (minus for v_prediction), no weight (``EDMEulerScheduler.precondition_inputs/outputs``).
    Euler: c_in = 1/sqrt(s^2 + 1); epsilon: c_skip = 1, c_out = -s; v_prediction:
    c_skip = 1/(s^2 + 1), c_out = -s/sqrt(s^2 + 1); weight s^-2.
    """
    if schedule.is_edm:
        data2 = schedule.sigma_data**2
        root = (sigma**2 + data2) ** 0.5
        c_out = sigma * schedule.sigma_data / root
        c_out = -c_out if schedule.prediction_type == "v_prediction" else c_out
        return Preconditioning(1 / root, data2 / (sigma**2 + data2), c_out, None)
    root = (sigma**2 + 1) ** 0.5
    weight = sigma**-2.0
    if schedule.prediction_type == "v_prediction":
        return Preconditioning(1 / root, 1 / (sigma**2 + 1), -sigma / root, weight)
    return Preconditioning(1 / root, sigma * 0 + 1, -sigma, weight)


def denoised(noisy: Array, prediction: Array, coefficients: Preconditioning) -> Array:
    """The model's estimate of x0 from its raw output."""
    return coefficients.c_skip * noisy + coefficients.c_out * prediction


def edm_loss(estimate: Array, x0: Array, weight: Array | None, *, with_prior_preservation: bool,
             prior_loss_weight: float = 1.0) -> tuple[Array, Array, Array]:
    """(total, instance_loss, prior_loss) in float32: the (weighted) MSE of the denoised estimate to x0.

    With prior preservation the batch is instance rows then class rows; both halves are weighted,
    as in the script, and total = instance + prior_loss_weight * prior. Deliberate difference: the
    script multiplies each half by the whole batch's [B] weights, which broadcasts only at
    train_batch_size=1 (then weighting by the mean of both rows' weights) and crashes above it; each
    row here takes its own weight, as the Min-SNR weights in ``diffusion.dreambooth_loss`` do.
    """
    estimate, x0 = diffusion._float32(estimate), diffusion._float32(x0)
    weight = None if weight is None else diffusion._float32(weight)

    def mse(pred: Array, target: Array, w: Array | None) -> Array:
        squared = (pred - target) ** 2
        return squared.mean() if w is None else (w * squared).reshape(pred.shape[0], -1).mean(1).mean()

    if not with_prior_preservation:
        loss = mse(estimate, x0, weight)
        return loss, loss, diffusion._xp(loss).zeros_like(loss)
    batch = estimate.shape[0]
    if batch % 2:
        raise ValueError(f"prior preservation needs instance+class halves; batch {batch} is odd")
    half = batch // 2
    halves = [(estimate[s], x0[s], None if weight is None else weight[s]) for s in (slice(None, half),
                                                                                      slice(half, None))]
    instance, prior = mse(*halves[0]), mse(*halves[1])
    return instance + prior_loss_weight * prior, instance, prior


def loss_from_prediction(prediction: Array, x0: Array, noisy: Array, sigma: Array, schedule: EdmSchedule,
                         options: diffusion.LossOptions) -> tuple[Array, dict[str, Array]]:
    """The EDM-style DreamBooth loss of a raw UNet output; returns (loss, {"instance_loss", "prior_loss"}).

    ``options.snr_gamma`` must be None (the spec refuses Min-SNR with EDM, as the script does).
    """
    if options.snr_gamma is not None:
        raise JaxboothError(f"--snr_gamma={options.snr_gamma} with --do_edm_style_training: {SNR_GAMMA_PROBLEM}; "
                            "drop one")
    coefficients = preconditioning(sigma, schedule)
    loss, instance, prior = edm_loss(denoised(noisy, prediction, coefficients), x0, coefficients.weight,
                                     with_prior_preservation=options.with_prior_preservation,
                                     prior_loss_weight=options.prior_loss_weight)
    return loss, {"instance_loss": instance, "prior_loss": prior}
