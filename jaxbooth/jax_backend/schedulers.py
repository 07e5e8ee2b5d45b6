"""Pure-functional JAX samplers for validation images, built from a diffusers scheduler config.

Owns the inference-time schedules (DDIM, ancestral DDPM, DPM-Solver++ 2M, Euler, PNDM/PLMS):
which timesteps the UNet sees and how a model output moves the latents one step. The training
schedule (betas, `alphas_cumprod`) comes from `jaxbooth.diffusion.schedule_from_config`, so both
backends read a checkpoint's `scheduler/scheduler_config.json` the same way.

diffusers schedulers are stateful objects (`set_timesteps`, a step counter, lists of past
outputs) stepped from Python. Here everything that depends only on the step index is worked
out once, in numpy from diffusers' float32 tables (in float64, or in float32 where diffusers'
own rounding is larger than the parity tolerance), into per-step coefficient tables;
`step` then indexes them with a traced `i`, so a whole denoising loop runs inside one
`jax.lax.fori_loop`. The only carried state is what a multistep method must remember (past
predictions), held as fixed-shape arrays, or DDPM's per-example PRNG keys. Each sampler is
parity-tested against its diffusers class in tests/jax_backend/test_schedulers.py.

Layout: this module reads configs and builds samplers (the public entry points); the sampler
classes and their jitted steps live in `sampler_steps`, the numpy spacing and coefficient
tables in `sampler_tables`. The public names of both are re-exported here.

Like diffusers' `XScheduler.from_config(pipeline_scheduler_config)`, any scheduler class's
config works for any sampler: keys the sampler does not know are ignored, and keys the config
leaves out take the defaults of the diffusers class being mirrored (so DDIM defaults to
"leading" spacing while DPM-Solver and Euler default to "linspace"). Options we do not
implement raise a `JaxboothError` rather than silently sampling differently.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxbooth.diffusion import SCHEDULER_CONFIG, schedule_from_config
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.sampler_steps import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerSampler,
    PNDMSampler,
    Sampler,
    State,
)
from jaxbooth.jax_backend.sampler_tables import (
    ddpm_coefficients,
    dpm_coefficients,
    dpm_timesteps,
    integer_timesteps,
    karras_sigmas,
    pndm_mixing,
    pndm_plan,
    sigma_table,
    sigma_to_t,
    spaced_timesteps,
)

__all__ = [
    "SAMPLER_NAMES", "DDIMSampler", "DDPMSampler", "DPMSolverSampler", "EulerSampler", "PNDMSampler", "Sampler",
    "State", "canonical_sampler_name", "make_sampler",
]

# Accepted sampler names (case-insensitive) per canonical name. The run spec's
# `validation_scheduler` uses diffusers class names; the short names are for the CLI.
_ALIASES = {
    "ddim": ("DDIMScheduler", "ddim"),
    "ddpm": ("DDPMScheduler", "ddpm"),
    "dpm++": ("DPMSolverMultistepScheduler", "dpm++", "dpmsolver++"),
    "euler": ("EulerDiscreteScheduler", "euler"),
    "pndm": ("PNDMScheduler", "pndm"),
}
SAMPLER_NAMES = tuple(name for names in _ALIASES.values() for name in names)
_NAMES = {name.lower(): kind for kind, names in _ALIASES.items() for name in names}

# The __init__ defaults of each mirrored diffusers class, for the keys we read.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {
        "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
        "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False,
    },
    "ddpm": {
        "timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True, "clip_sample_range": 1.0,
        "thresholding": False, "variance_type": "fixed_small",
    },
    "dpm++": {
        "timestep_spacing": "linspace", "steps_offset": 0, "solver_order": 2,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
        "use_karras_sigmas": False, "thresholding": False, "rescale_betas_zero_snr": False,
    },
    "euler": {
        "timestep_spacing": "linspace", "steps_offset": 0, "interpolation_type": "linear",
        "timestep_type": "discrete", "final_sigmas_type": "zero", "use_karras_sigmas": False,
        "sigma_min": None, "sigma_max": None, "rescale_betas_zero_snr": False,
    },
    "pndm": {
        "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": False,
        "skip_prk_steps": False,
    },
}
# Options outside this table would change the result and are not implemented: key -> the
# values we support, per sampler (other samplers' diffusers classes do not read the key).
_SUPPORTED: dict[str, dict[str, tuple[Any, ...]]] = {
    "ddim": {"thresholding": (False,), "timestep_spacing": ("leading", "trailing", "linspace")},
    # fixed_large_log: diffusers' step takes the square root of log(beta) < 0, so its images are NaN.
    "ddpm": {
        "thresholding": (False,), "timestep_spacing": ("leading", "trailing", "linspace"),
        "variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
    },
    "dpm++": {
        "thresholding": (False,), "algorithm_type": ("dpmsolver++",), "solver_order": (1, 2),
        "solver_type": ("midpoint", "heun"), "final_sigmas_type": ("zero", "sigma_min"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        # DDPM configs carry variance_type; only the learned kinds change DPM-Solver's output.
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
        "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
        "use_lu_lambdas": (False, None), "use_flow_sigmas": (False, None),
    },
    "euler": {
        "interpolation_type": ("linear",), "final_sigmas_type": ("zero", "sigma_min"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "timestep_type": ("discrete", "continuous"),
        "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
    },
    "pndm": {"timestep_spacing": ("leading", "trailing", "linspace")},
}


# ----------------------------------------------------------------------------------------------
# Building the tables from a config
# ----------------------------------------------------------------------------------------------


def _options(kind: str, cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The options `kind` reads: config values (None means the class default), validated."""
    opts = {key: (default if cfg.get(key) is None else cfg[key]) for key, default in _DEFAULTS[kind].items()}
    for key, allowed in _SUPPORTED[kind].items():
        value = opts.get(key, cfg.get(key))
        if value not in allowed:
            listed = ", ".join(repr(v) for v in allowed if v is not None)
            raise JaxboothError(
                f"{source}: {key}={value!r} is not supported by the JAX {kind} sampler (supported: "
                f"{listed}); edit the config or pick another validation_scheduler"
            )
    return opts


def _build_ddim(cfg: Mapping[str, Any], source: str, steps: int) -> Sampler:
    opts = _options("ddim", cfg, source)
    schedule = schedule_from_config(cfg, source=source)
    ac, train_steps = schedule.alphas_cumprod, schedule.num_train_timesteps
    timesteps = integer_timesteps(opts["timestep_spacing"], train_steps, steps, opts["steps_offset"])
    # diffusers steps to t - T // N whatever the spacing (so with "linspace" the next model call
    # sees a slightly different t than the one stepped to); we mirror it for identical images.
    prev = timesteps - train_steps // steps
    final = 1.0 if opts["set_alpha_to_one"] else ac[0]
    ac_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
    ac_t = ac[timesteps]
    return DDIMSampler(
        name="ddim", prediction_type=schedule.prediction_type,
        timesteps=timesteps.astype(np.float32), init_noise_sigma=1.0,
        alpha=np.sqrt(ac_t).astype(np.float32), sigma=np.sqrt(1 - ac_t).astype(np.float32),
        alpha_prev=np.sqrt(ac_prev).astype(np.float32), sigma_prev=np.sqrt(1 - ac_prev).astype(np.float32),
        clip_range=float(opts["clip_sample_range"]) if opts["clip_sample"] else None,
    )


def _build_ddpm(cfg: Mapping[str, Any], source: str, steps: int) -> Sampler:
    variance_type = cfg.get("variance_type")
    if variance_type in ("learned", "learned_range"):
        raise JaxboothError(
            f"{source}: variance_type={variance_type!r} reads the variance from extra UNet output channels, "
            "which Stable Diffusion UNets do not have (diffusers fails too); set variance_type to 'fixed_small', "
            "as diffusers' log_validation (and jaxbooth's validation) does for DDPMScheduler")
    opts = _options("ddpm", cfg, source)
    schedule = schedule_from_config(cfg, source=source)
    train_steps = schedule.num_train_timesteps
    timesteps = integer_timesteps(opts["timestep_spacing"], train_steps, steps, opts["steps_offset"])
    if timesteps.max() >= train_steps:
        raise JaxboothError(f"{source}: steps_offset={opts['steps_offset']} puts timestep {timesteps.max()} past "
                            f"num_train_timesteps={train_steps} at {steps} steps (diffusers fails too); use fewer "
                            "inference steps or another timestep_spacing")
    return DDPMSampler(
        name="ddpm", prediction_type=schedule.prediction_type, timesteps=timesteps.astype(np.float32),
        init_noise_sigma=1.0, clip_range=float(opts["clip_sample_range"]) if opts["clip_sample"] else None,
        **ddpm_coefficients(schedule.alphas_cumprod, timesteps, opts["variance_type"]),
    )


def _build_dpm(cfg: Mapping[str, Any], source: str, steps: int) -> Sampler:
    opts = _options("dpm++", cfg, source)
    schedule = schedule_from_config(cfg, source=source)
    ac = schedule.alphas_cumprod.astype(np.float32)
    if opts["rescale_betas_zero_snr"]:
        ac[-1] = 2.0**-24  # as diffusers, so the last sigma stays finite
    sigmas_full = sigma_table(ac)
    lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
    timesteps = dpm_timesteps(opts, lambdas, schedule.num_train_timesteps, steps)
    if opts["use_karras_sigmas"]:
        sigmas = karras_sigmas(float(sigmas_full[0]), float(sigmas_full[-1]), steps)
        timesteps = sigma_to_t(sigmas, np.log(sigmas_full))
        if cfg.get("beta_schedule") != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    else:
        sigmas = np.interp(timesteps, np.arange(len(sigmas_full)), sigmas_full)
    last = sigmas_full[0] if opts["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return DPMSolverSampler(
        name="dpm++", prediction_type=schedule.prediction_type,
        timesteps=timesteps.astype(np.int64).astype(np.float32), init_noise_sigma=1.0,
        **dpm_coefficients(opts, sigmas),
    )


def _build_euler(cfg: Mapping[str, Any], source: str, steps: int) -> Sampler:
    opts = _options("euler", cfg, source)
    schedule = schedule_from_config(cfg, source=source)
    ac = schedule.alphas_cumprod.astype(np.float32)
    if opts["rescale_betas_zero_snr"]:
        ac[-1] = 2.0**-24
    sigmas_full = sigma_table(ac)
    spacing = opts["timestep_spacing"]
    timesteps = spaced_timesteps(spacing, schedule.num_train_timesteps, steps, opts["steps_offset"])
    timesteps = timesteps.astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(len(sigmas_full)), sigmas_full)
    if opts["use_karras_sigmas"]:
        lo = sigmas[-1] if opts["sigma_min"] is None else opts["sigma_min"]
        hi = sigmas[0] if opts["sigma_max"] is None else opts["sigma_max"]
        sigmas = karras_sigmas(float(lo), float(hi), steps)
        timesteps = sigma_to_t(sigmas, np.log(sigmas_full)).astype(np.float32)
    last = sigmas_full[0] if opts["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    if opts["timestep_type"] == "continuous" and schedule.prediction_type == "v_prediction":
        timesteps = (0.25 * np.log(sigmas[:-1])).astype(np.float32)
    max_sigma = float(sigmas.max())
    init_sigma = max_sigma if spacing in ("linspace", "trailing") else math.sqrt(max_sigma**2 + 1)
    sig = sigmas.astype(np.float64)
    return EulerSampler(
        name="euler", prediction_type=schedule.prediction_type, timesteps=timesteps,
        init_noise_sigma=init_sigma, sigma=sigmas[:-1],
        dt=(sig[1:] - sig[:-1]).astype(np.float32),
        in_scale=(1.0 / np.sqrt(sig[:-1] ** 2 + 1.0)).astype(np.float32),
    )


def _build_pndm(cfg: Mapping[str, Any], source: str, steps: int) -> Sampler:
    opts = _options("pndm", cfg, source)
    # PNDMScheduler has no rescale_betas_zero_snr option, so a config's value is ignored.
    schedule = schedule_from_config({**cfg, "rescale_betas_zero_snr": False}, source=source)
    if schedule.prediction_type not in ("epsilon", "v_prediction"):
        raise JaxboothError(f"{source}: prediction_type={schedule.prediction_type!r} is not supported by "
                            "PNDM (diffusers neither); pick another validation_scheduler")
    if not opts["skip_prk_steps"] and steps < 4:
        raise JaxboothError(f"PNDM with Runge-Kutta warm-up needs at least 4 inference steps, got {steps}")
    ac, train_steps = schedule.alphas_cumprod, schedule.num_train_timesteps
    plan = np.array(pndm_plan(opts, train_steps, steps), np.int64)
    if plan[:, 1].max() >= train_steps:
        raise JaxboothError(f"{source}: PNDM would read timestep {plan[:, 1].max()} >= num_train_timesteps="
                            f"{train_steps} (diffusers fails too); set skip_prk_steps true or change "
                            "timestep_spacing")
    final = 1.0 if opts["set_alpha_to_one"] else ac[0]
    a_t = ac[plan[:, 1]]
    a_prev = np.where(plan[:, 2] >= 0, ac[np.clip(plan[:, 2], 0, None)], final)
    denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
    return PNDMSampler(
        name="pndm", prediction_type=schedule.prediction_type,
        timesteps=plan[:, 0].astype(np.float32), init_noise_sigma=1.0,
        alpha=np.sqrt(a_t).astype(np.float32), sigma=np.sqrt(1 - a_t).astype(np.float32),
        c_sample=np.sqrt(a_prev / a_t).astype(np.float32), c_eps=((a_prev - a_t) / denom).astype(np.float32),
        **pndm_mixing(bool(opts["skip_prk_steps"]), len(plan)),
    )


_BUILDERS = {"ddim": _build_ddim, "ddpm": _build_ddpm, "dpm++": _build_dpm, "euler": _build_euler, "pndm": _build_pndm}


def canonical_sampler_name(name: str) -> str:
    """'ddim', 'ddpm', 'dpm++', 'euler' or 'pndm' for any accepted spelling; JaxboothError otherwise."""
    kind = _NAMES.get(str(name).lower())
    if kind is None:
        close = difflib.get_close_matches(str(name), SAMPLER_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise JaxboothError(f"validation_scheduler={name!r} is not a known sampler{hint}; use one of "
                            + ", ".join(SAMPLER_NAMES))
    return kind


def make_sampler(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int, *,
                 source: str = SCHEDULER_CONFIG) -> Sampler:
    """Build sampler `name` for `num_inference_steps` from a scheduler config dict.

    `scheduler_config` is a pipeline's `scheduler/scheduler_config.json` of any scheduler class
    (as `diffusers.<Name>.from_config` would take it); `source` names it in errors. Samplers
    are immutable and hash by identity: build one per step count and reuse it, or `jax.jit`
    recompiles.
    """
    kind = canonical_sampler_name(name)
    if not isinstance(scheduler_config, Mapping):
        raise JaxboothError(f"{source}: expected a JSON object, found {type(scheduler_config).__name__}")
    train_steps = scheduler_config.get("num_train_timesteps") or 1000
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or not 1 <= num_inference_steps <= train_steps:
        raise JaxboothError(f"num_inference_steps={num_inference_steps!r} must be an integer in "
                            f"[1, {train_steps}] (num_train_timesteps in {source})")
    return _BUILDERS[kind](scheduler_config, source, int(num_inference_steps))
