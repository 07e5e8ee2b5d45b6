"""numpy helpers behind `schedulers.make_sampler`: timestep spacings and per-step coefficient tables.

Each function replays one piece of a diffusers scheduler's `set_timesteps` or `step` that depends
only on the step index, once, on the host, so the jitted step in `sampler_steps` just indexes the
tables. Inputs are diffusers' float32 tables (`alphas_cumprod`, sigmas); outputs are float32
arrays with one row per model call.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """[T] float32 ((1 - ac) / ac) ** 0.5, computed in float32 as diffusers does."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac)


def spaced_timesteps(spacing: str, train_steps: int, steps: int, offset: int) -> np.ndarray:
    """Descending float64 timesteps for DDIM/DDPM/Euler/PNDM `set_timesteps` (linspace not rounded)."""
    if spacing == "linspace":
        return np.linspace(0, train_steps - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (train_steps // steps))[::-1].astype(np.float64) + offset
    return np.round(np.arange(train_steps, 0, -train_steps / steps)) - 1  # trailing


def integer_timesteps(spacing: str, train_steps: int, steps: int, offset: int) -> np.ndarray:
    """int64 timesteps of DDIM's and DDPM's `set_timesteps`: `spaced_timesteps`, linspace rounded."""
    if spacing == "linspace":
        return np.round(spaced_timesteps("linspace", train_steps, steps, 0)).astype(np.int64)
    return spaced_timesteps(spacing, train_steps, steps, offset).astype(np.int64)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps whose sigma is each of `sigmas`; mirrors diffusers `_sigma_to_t`."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas; mirrors diffusers `_convert_to_karras`."""
    ramp = np.linspace(0, 1, steps)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


# ----------------------------------------------------------------------------------------------
# DDPM (ancestral)
# ----------------------------------------------------------------------------------------------


def ddpm_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray, variance_type: str) -> dict[str, np.ndarray]:
    """Per-step tables of `DDPMScheduler.step`: x_prev = c0 * x0 + cx * x + noise_std * z.

    The step goes from timesteps[i] to timesteps[i + 1] (-1 after the last, where the cumulative
    alpha is 1), as diffusers' `previous_timestep` does once `set_timesteps` has run. Computed in
    float32 in diffusers' order of operations: `1 - a_t / a_prev` cancels badly for small steps,
    so float64 here would differ from diffusers by more than the parity tolerance. Noise is added
    only where the timestep is above 0 (diffusers' `if t > 0`).
    """
    ac = alphas_cumprod.astype(np.float32)
    one = np.float32(1.0)
    prev = np.concatenate([timesteps[1:], [-1]])
    a_t = ac[timesteps]
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], one).astype(np.float32)
    beta_prod_t, beta_prod_prev = one - a_t, one - a_prev
    current_alpha = a_t / a_prev
    current_beta = one - current_alpha
    variance = np.maximum(beta_prod_prev / beta_prod_t * current_beta, np.float32(1e-20))
    if variance_type == "fixed_small":
        std = np.sqrt(variance)
    elif variance_type == "fixed_small_log":
        std = np.exp(np.float32(0.5) * np.log(variance))
    elif variance_type == "fixed_large":
        std = np.sqrt(current_beta)
    else:
        raise ValueError(f"variance_type={variance_type!r} has no fixed noise table")
    tables = {
        "alpha": np.sqrt(a_t), "sigma": np.sqrt(beta_prod_t),
        "c0": np.sqrt(a_prev) * current_beta / beta_prod_t,
        "cx": np.sqrt(current_alpha) * beta_prod_prev / beta_prod_t,
        "noise_std": np.where(timesteps > 0, std, np.float32(0.0)),
    }
    return {key: value.astype(np.float32) for key, value in tables.items()}


# ----------------------------------------------------------------------------------------------
# DPM-Solver++
# ----------------------------------------------------------------------------------------------


def dpm_timesteps(opts: dict[str, Any], lambdas: np.ndarray, train_steps: int, steps: int) -> np.ndarray:
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


def dpm_coefficients(opts: dict[str, Any], sigmas: np.ndarray) -> dict[str, np.ndarray]:
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


# ----------------------------------------------------------------------------------------------
# PNDM
# ----------------------------------------------------------------------------------------------


def pndm_plan(opts: dict[str, Any], train_steps: int, steps: int) -> list[tuple[int, int, int]]:
    """(model timestep, timestep to step from, timestep to step to) per model call, and the
    call kind, following `PNDMScheduler.set_timesteps` / `step_prk` / `step_plms`."""
    ascending = spaced_timesteps(opts["timestep_spacing"], train_steps, steps, opts["steps_offset"])[::-1]
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


def pndm_mixing(skip_prk: bool, num_calls: int) -> dict[str, np.ndarray]:
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
