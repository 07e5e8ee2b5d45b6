"""Pure-functional JAX samplers for validation images, built from a diffusers scheduler config.

Owns the inference-time schedules (DDIM, DPM-Solver++ 2M, Euler, PNDM/PLMS): which timesteps
the UNet sees and how a model output moves the latents one step. The training schedule
(betas, `alphas_cumprod`) comes from `jaxbooth.diffusion.schedule_from_config`, so both
backends read a checkpoint's `scheduler/scheduler_config.json` the same way.

diffusers schedulers are stateful objects (`set_timesteps`, a step counter, lists of past
outputs) stepped from Python. Here everything that depends only on the step index is worked
out once, in numpy float64 from diffusers' float32 tables, into per-step coefficient tables;
`step` then indexes them with a traced `i`, so a whole denoising loop runs inside one
`jax.lax.fori_loop`. The only carried state is what a multistep method must remember (past
predictions), held as fixed-shape arrays. Each sampler is parity-tested against its diffusers
class in tests/jax_backend/test_schedulers.py.

Like diffusers' `XScheduler.from_config(pipeline_scheduler_config)`, any scheduler class's
config works for any sampler: keys the sampler does not know are ignored, and keys the config
leaves out take the defaults of the diffusers class being mirrored (so DDIM defaults to
"leading" spacing while DPM-Solver and Euler default to "linspace"). Options we do not
implement raise a `JaxboothError` rather than silently sampling differently.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbooth.diffusion import SCHEDULER_CONFIG, schedule_from_config
from jaxbooth.errors import JaxboothError

State = Any
"""A small pytree of fixed-shape arrays carried between steps (() for one-step methods)."""

# Accepted sampler names (case-insensitive) per canonical name. The run spec's
# `validation_scheduler` uses diffusers class names; the short names are for the CLI.
_ALIASES = {
    "ddim": ("DDIMScheduler", "ddim"),
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


def _at(table: np.ndarray, i: jax.Array | int) -> jax.Array:
    """table[i] for a numpy per-step table and a (possibly traced) step index."""
    return jnp.asarray(table)[i]


def _x0_and_eps(prediction_type: str, x: jax.Array, out: jax.Array, alpha: jax.Array,
                sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(predicted clean sample, predicted noise) for x = alpha * x0 + sigma * eps (VP form)."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    return out, (x - alpha * out) / sigma  # "sample"


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A configured sampler: static numpy tables plus pure step functions.

    `eq=False` makes it hash by identity, so it can be a static argument of `jax.jit`.
    Use: x = noise * init_noise_sigma; state = init_state(x); for i in range(num_steps):
    out = unet(scale_model_input(state, x, i), timesteps[i]); x, state = step(state, out, i, x).
    `i` may be a traced int32 (inside `jax.lax.fori_loop`).
    """

    name: str
    """Canonical sampler name: 'ddim', 'dpm++', 'euler' or 'pndm'."""
    prediction_type: str
    """What the UNet predicts: 'epsilon', 'v_prediction' or 'sample'."""
    timesteps: np.ndarray
    """[num_steps] float32: the timestep fed to the UNet at each model call (may be fractional)."""
    init_noise_sigma: float
    """Standard deviation of the initial latent noise."""

    @property
    def num_steps(self) -> int:
        """Number of UNet calls (PNDM makes more calls than inference steps)."""
        return len(self.timesteps)

    def init_state(self, latents: jax.Array) -> State:
        """Initial carried state; `latents` gives the shape (the values are not read)."""
        del latents
        return ()

    def scale_model_input(self, state: State, x: jax.Array, i: jax.Array | int) -> jax.Array:
        """The UNet input for latents x at step i (identity except for Euler)."""
        del state, i
        return x

    def step(self, state: State, model_output: jax.Array, i: jax.Array | int,
             x: jax.Array) -> tuple[jax.Array, State]:
        """Latents after step i, and the new state."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSampler(Sampler):
    """Deterministic DDIM (eta=0); mirrors diffusers `DDIMScheduler.step`."""

    alpha: np.ndarray
    sigma: np.ndarray
    alpha_prev: np.ndarray
    sigma_prev: np.ndarray
    clip_range: float | None

    def step(self, state: State, model_output: jax.Array, i: jax.Array | int,
             x: jax.Array) -> tuple[jax.Array, State]:
        x0, eps = _x0_and_eps(self.prediction_type, x, model_output.astype(jnp.float32),
                              _at(self.alpha, i), _at(self.sigma, i))
        if self.clip_range is not None:
            x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
        x_next = _at(self.alpha_prev, i) * x0 + _at(self.sigma_prev, i) * eps
        return x_next.astype(x.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverSampler(Sampler):
    """DPM-Solver++ (2M) in data-prediction form; mirrors diffusers `DPMSolverMultistepScheduler`.

    Every step is x_next = cx * x + c0 * x0 + c1 * (x0 - x0_prev): the first-order update
    (c1 = 0) or the second-order multistep one. Which one applies depends only on i, so
    diffusers' `lower_order_nums` counter and `lower_order_final` logic become the c1 table.
    """

    alpha: np.ndarray
    sigma: np.ndarray
    cx: np.ndarray
    c0: np.ndarray
    c1: np.ndarray

    def init_state(self, latents: jax.Array) -> State:
        return jnp.zeros(latents.shape, jnp.float32)  # the previous step's x0 prediction

    def step(self, state: State, model_output: jax.Array, i: jax.Array | int,
             x: jax.Array) -> tuple[jax.Array, State]:
        x0, _ = _x0_and_eps(self.prediction_type, x, model_output.astype(jnp.float32),
                            _at(self.alpha, i), _at(self.sigma, i))
        x0 = x0.astype(jnp.float32)
        x_next = _at(self.cx, i) * x + _at(self.c0, i) * x0 + _at(self.c1, i) * (x0 - state)
        return x_next.astype(x.dtype), x0


@dataclasses.dataclass(frozen=True, eq=False)
class EulerSampler(Sampler):
    """Euler in the variance-exploding (k-diffusion) form; mirrors `EulerDiscreteScheduler`
    with s_churn=0. Latents live at scale sqrt(1 + sigma^2), hence `init_noise_sigma` and
    `scale_model_input`."""

    sigma: np.ndarray
    dt: np.ndarray
    in_scale: np.ndarray

    def scale_model_input(self, state: State, x: jax.Array, i: jax.Array | int) -> jax.Array:
        del state
        return x * _at(self.in_scale, i)

    def step(self, state: State, model_output: jax.Array, i: jax.Array | int,
             x: jax.Array) -> tuple[jax.Array, State]:
        out = model_output.astype(jnp.float32)
        sigma = _at(self.sigma, i)
        if self.prediction_type == "epsilon":
            x0 = x - sigma * out
        elif self.prediction_type == "v_prediction":
            x0 = out * (-sigma * _at(self.in_scale, i)) + x * jnp.square(_at(self.in_scale, i))
        else:
            x0 = out
        x_next = x + (x - x0) / sigma * _at(self.dt, i)
        return x_next.astype(x.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class PNDMSampler(Sampler):
    """PNDM: Runge-Kutta warm-up (unless `skip_prk_steps`) then linear multistep (PLMS);
    mirrors diffusers `PNDMScheduler`.

    diffusers keeps a list of past outputs `ets`, a running Runge-Kutta sum and a saved
    sample, and branches on a counter. Here the last three outputs sit in a [3, ...] buffer,
    and per-step tables give the mix: out = w[:3]·history + w[3]*model_output + use_acc*acc.
    """

    weights: np.ndarray  # [N, 4]
    use_acc: np.ndarray
    acc_keep: np.ndarray
    acc_add: np.ndarray
    push: np.ndarray  # bool: append this output to the history
    use_saved: np.ndarray  # bool: step from the saved sample instead of x
    save: np.ndarray  # bool: save x as the sample to step from later
    alpha: np.ndarray
    sigma: np.ndarray
    c_sample: np.ndarray
    c_eps: np.ndarray

    def init_state(self, latents: jax.Array) -> State:
        zeros = jnp.zeros(latents.shape, jnp.float32)
        return jnp.zeros((3, *latents.shape), jnp.float32), zeros, zeros

    def step(self, state: State, model_output: jax.Array, i: jax.Array | int,
             x: jax.Array) -> tuple[jax.Array, State]:
        history, saved, acc = state
        out = model_output.astype(jnp.float32)
        w = _at(self.weights, i)
        mixed = jnp.tensordot(w[:3], history, axes=1) + w[3] * out + _at(self.use_acc, i) * acc
        sample = jnp.where(_at(self.use_saved, i), saved, x.astype(jnp.float32))
        if self.prediction_type == "v_prediction":
            mixed = _at(self.alpha, i) * mixed + _at(self.sigma, i) * sample
        x_next = _at(self.c_sample, i) * sample - _at(self.c_eps, i) * mixed
        new_history = jnp.where(_at(self.push, i), jnp.concatenate([history[1:], out[None]]), history)
        new_saved = jnp.where(_at(self.save, i), x.astype(jnp.float32), saved)
        new_acc = _at(self.acc_keep, i) * acc + _at(self.acc_add, i) * out
        return x_next.astype(x.dtype), (new_history, new_saved, new_acc)


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


def _sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """[T] float32 ((1 - ac) / ac) ** 0.5, computed in float32 as diffusers does."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac)


def _spaced(spacing: str, train_steps: int, steps: int, offset: int) -> np.ndarray:
    """Descending float64 timesteps for DDIM/Euler/PNDM `set_timesteps` (linspace not rounded)."""
    if spacing == "linspace":
        return np.linspace(0, train_steps - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (train_steps // steps))[::-1].astype(np.float64) + offset
    return np.round(np.arange(train_steps, 0, -train_steps / steps)) - 1  # trailing


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps whose sigma is each of `sigmas`; mirrors diffusers `_sigma_to_t`."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas; mirrors diffusers `_convert_to_karras`."""
    ramp = np.linspace(0, 1, steps)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _build_ddim(cfg: Mapping[str, Any], source: str, steps: int) -> Sampler:
    opts = _options("ddim", cfg, source)
    schedule = schedule_from_config(cfg, source=source)
    ac, train_steps = schedule.alphas_cumprod, schedule.num_train_timesteps
    if opts["timestep_spacing"] == "linspace":
        timesteps = np.round(_spaced("linspace", train_steps, steps, 0))
    else:
        timesteps = _spaced(opts["timestep_spacing"], train_steps, steps, opts["steps_offset"])
    timesteps = timesteps.astype(np.int64)
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


def _dpm_timesteps(opts: dict[str, Any], lambdas: np.ndarray, train_steps: int, steps: int) -> np.ndarray:
    """`DPMSolverMultistepScheduler.set_timesteps` spacing (N+1 points, the last dropped)."""
    clipped = int(np.searchsorted(np.flip(lambdas), opts["lambda_min_clipped"]))
    last = train_steps - clipped
    spacing = opts["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + opts["steps_offset"]
    return np.arange(last, 0, -train_steps / steps).round().astype(np.int64) - 1


def _dpm_coefficients(opts: dict[str, Any], sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step (alpha, sigma, cx, c0, c1) from the [N+1] VE sigmas; see `DPMSolverSampler`."""
    n = len(sigmas) - 1
    sig = sigmas.astype(np.float64)
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    vp_sigma = sig * alpha
    cx, c0, c1 = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        ratio = sig[i + 1] / sig[i]  # exp(-h), h = lambda_{i+1} - lambda_i; finite at sigma 0
        cx[i] = vp_sigma[i + 1] / vp_sigma[i]
        c0[i] = alpha[i + 1] * (1.0 - ratio)
        final = i == n - 1 and (opts["euler_at_final"] or opts["final_sigmas_type"] == "zero"
                                or (opts["lower_order_final"] and n < 15))
        if opts["solver_order"] == 1 or i == 0 or final:
            continue
        h = math.log(sig[i] / sig[i + 1])
        r0 = math.log(sig[i - 1] / sig[i]) / h
        if opts["solver_type"] == "midpoint":
            c1[i] = 0.5 * alpha[i + 1] * (1.0 - ratio) / r0
        else:  # heun
            c1[i] = alpha[i + 1] * ((ratio - 1.0) / h + 1.0) / r0
    tables = {"alpha": alpha[:n], "sigma": vp_sigma[:n], "cx": cx, "c0": c0, "c1": c1}
    return {key: value.astype(np.float32) for key, value in tables.items()}


def _build_dpm(cfg: Mapping[str, Any], source: str, steps: int) -> Sampler:
    opts = _options("dpm++", cfg, source)
    schedule = schedule_from_config(cfg, source=source)
    ac = schedule.alphas_cumprod.astype(np.float32)
    if opts["rescale_betas_zero_snr"]:
        ac[-1] = 2.0**-24  # as diffusers, so the last sigma stays finite
    sigmas_full = _sigma_table(ac)
    lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
    timesteps = _dpm_timesteps(opts, lambdas, schedule.num_train_timesteps, steps)
    if opts["use_karras_sigmas"]:
        sigmas = _karras(float(sigmas_full[0]), float(sigmas_full[-1]), steps)
        timesteps = _sigma_to_t(sigmas, np.log(sigmas_full))
        if cfg.get("beta_schedule") != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    else:
        sigmas = np.interp(timesteps, np.arange(len(sigmas_full)), sigmas_full)
    last = sigmas_full[0] if opts["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return DPMSolverSampler(
        name="dpm++", prediction_type=schedule.prediction_type,
        timesteps=timesteps.astype(np.int64).astype(np.float32), init_noise_sigma=1.0,
        **_dpm_coefficients(opts, sigmas),
    )


def _build_euler(cfg: Mapping[str, Any], source: str, steps: int) -> Sampler:
    opts = _options("euler", cfg, source)
    schedule = schedule_from_config(cfg, source=source)
    ac = schedule.alphas_cumprod.astype(np.float32)
    if opts["rescale_betas_zero_snr"]:
        ac[-1] = 2.0**-24
    sigmas_full = _sigma_table(ac)
    spacing = opts["timestep_spacing"]
    timesteps = _spaced(spacing, schedule.num_train_timesteps, steps, opts["steps_offset"])
    timesteps = timesteps.astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(len(sigmas_full)), sigmas_full)
    if opts["use_karras_sigmas"]:
        lo = sigmas[-1] if opts["sigma_min"] is None else opts["sigma_min"]
        hi = sigmas[0] if opts["sigma_max"] is None else opts["sigma_max"]
        sigmas = _karras(float(lo), float(hi), steps)
        timesteps = _sigma_to_t(sigmas, np.log(sigmas_full)).astype(np.float32)
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


def _pndm_plan(opts: dict[str, Any], train_steps: int, steps: int) -> list[tuple[int, int, int]]:
    """(model timestep, timestep to step from, timestep to step to) per model call, and the
    call kind, following `PNDMScheduler.set_timesteps` / `step_prk` / `step_plms`."""
    ascending = _spaced(opts["timestep_spacing"], train_steps, steps, opts["steps_offset"])[::-1]
    if opts["timestep_spacing"] == "linspace":
        ascending = np.round(ascending)
    ts = ascending.astype(np.int64)
    ratio = train_steps // steps
    plan = []
    if not opts["skip_prk_steps"]:
        prk = (np.repeat(ts[-4:], 2) + np.tile([0, ratio // 2], 4))[:-1].repeat(2)[1:-1][::-1]
        for c, t in enumerate(prk):
            prev = t - (0 if c % 2 else ratio // 2)
            plan.append((int(t), int(prk[c // 4 * 4]), int(prev)))
        plms = ts[:-3][::-1]
    else:
        plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
    for c, t in enumerate(plms, start=len(plan)):
        from_t, to_t = (t + ratio, t) if c == 1 else (t, t - ratio)
        plan.append((int(t), int(from_t), int(to_t)))
    return plan


# PLMS weights over [history0, history1, history2, this output] by the number of stored outputs.
_PLMS_WEIGHTS = {1: (0, 0, 0, 1), 2: (0, 0, -1 / 2, 3 / 2), 3: (0, 5 / 12, -16 / 12, 23 / 12),
                 4: (-9 / 24, 37 / 24, -59 / 24, 55 / 24)}


def _pndm_mixing(skip_prk: bool, num_calls: int) -> dict[str, np.ndarray]:
    """Per-call mixing tables for `PNDMSampler`, replaying diffusers' counter logic."""
    rows = []
    stored = 0
    for c in range(num_calls):
        row = {"weights": (0, 0, 0, 1), "use_acc": 0, "acc_keep": 1, "acc_add": 0, "push": False,
               "use_saved": False, "save": False}
        if not skip_prk and c < 12:  # Runge-Kutta: 4 calls per step, accumulated 1/6, 1/3, 1/3, 1/6
            phase = c % 4
            row.update(push=phase == 0, save=phase == 0, use_saved=phase != 0)
            if phase < 3:
                row["acc_add"] = (1 / 6, 1 / 3, 1 / 3)[phase]
            else:
                row.update(weights=(0, 0, 0, 1 / 6), use_acc=1, acc_keep=0)
            stored += phase == 0
        elif c == 1:  # second call at the first timestep: average with the first output
            row.update(weights=(0, 0, 1 / 2, 1 / 2), use_saved=True)
        else:
            stored = min(stored + 1, 4)
            row.update(weights=_PLMS_WEIGHTS[stored], push=True, save=c == 0)
        rows.append(row)
    return {key: np.array([r[key] for r in rows], np.bool_ if key in ("push", "use_saved", "save")
                          else np.float32) for key in rows[0]}


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
    plan = np.array(_pndm_plan(opts, train_steps, steps), np.int64)
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
        **_pndm_mixing(bool(opts["skip_prk_steps"]), len(plan)),
    )


_BUILDERS = {"ddim": _build_ddim, "dpm++": _build_dpm, "euler": _build_euler, "pndm": _build_pndm}


def canonical_sampler_name(name: str) -> str:
    """'ddim', 'dpm++', 'euler' or 'pndm' for any accepted spelling; JaxboothError otherwise."""
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
