"""The JAX samplers: static per-step tables plus pure, jittable step functions.

`schedulers.make_sampler` builds them from a diffusers scheduler config (the tables come from
`sampler_tables`); `sample.py` runs one in a `jax.lax.fori_loop`. Each class mirrors the `step`
of one diffusers scheduler; everything that depends only on the step index is a numpy table
indexed with the (traced) step `i`, and the only carried state is what the method must remember
between steps: past predictions for multistep methods, and PRNG keys for ancestral DDPM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

State = Any
"""A small pytree of fixed-shape arrays carried between steps (() for one-step methods)."""


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
    Use: x = noise * init_noise_sigma; state = init_state(x, keys); for i in range(num_steps):
    out = unet(scale_model_input(state, x, i), timesteps[i]); x, state = step(state, out, i, x).
    `i` may be a traced int32 (inside `jax.lax.fori_loop`).
    """

    name: str
    """Canonical sampler name: 'ddim', 'ddpm', 'dpm++', 'euler' or 'pndm'."""
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

    def init_state(self, latents: jax.Array, keys: jax.Array | None = None) -> State:
        """Initial carried state; `latents` gives the shape (the values are not read).

        `keys`: one PRNG key per example [B] (the key its initial noise was drawn from). Only
        samplers that draw fresh noise every step (DDPM) read them; the others ignore them.
        """
        del latents, keys
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
class DDPMSampler(Sampler):
    """Ancestral DDPM; mirrors diffusers `DDPMScheduler.step`: predict x0, clip it, take the
    posterior mean c0 * x0 + cx * x, then add `noise_std[i]` times fresh standard normal noise.

    diffusers draws that noise from the pipeline's torch generator; here example b draws it at
    step i from `fold_in(keys[b], i)`, where `keys` (the state) are the per-example keys given
    to `init_state`. So an image depends only on its own key, not on its batch, and the same key
    gives the same image. The values cannot equal torch's; `step_with_noise` takes the noise
    explicitly, which is how the parity tests feed both sides the same draws.
    """

    alpha: np.ndarray
    sigma: np.ndarray
    c0: np.ndarray
    cx: np.ndarray
    noise_std: np.ndarray
    clip_range: float | None

    def init_state(self, latents: jax.Array, keys: jax.Array | None = None) -> State:
        if keys is None:
            raise ValueError("DDPM sampling draws fresh noise at every step: init_state needs the per-example "
                             "PRNG keys [B] the initial noise was drawn from")
        if keys.shape != latents.shape[:1]:
            raise ValueError(f"init_state got keys of shape {keys.shape} for latents of shape {latents.shape}")
        return keys

    @staticmethod
    def step_noise(keys: jax.Array, i: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
        """The standard normal noise [B, ...] of step i: example b from `fold_in(keys[b], i)`."""
        return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), shape[1:], jnp.float32))(keys)

    def step_with_noise(self, model_output: jax.Array, i: jax.Array | int, x: jax.Array,
                        noise: jax.Array) -> jax.Array:
        """Latents after step i with the given standard normal `noise` (the shape of x)."""
        x0, _ = _x0_and_eps(self.prediction_type, x.astype(jnp.float32), model_output.astype(jnp.float32),
                            _at(self.alpha, i), _at(self.sigma, i))
        if self.clip_range is not None:
            x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
        mean = _at(self.c0, i) * x0 + _at(self.cx, i) * x.astype(jnp.float32)
        return (mean + _at(self.noise_std, i) * noise).astype(x.dtype)

    def step(self, state: State, model_output: jax.Array, i: jax.Array | int,
             x: jax.Array) -> tuple[jax.Array, State]:
        return self.step_with_noise(model_output, i, x, self.step_noise(state, i, x.shape)), state


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

    def init_state(self, latents: jax.Array, keys: jax.Array | None = None) -> State:
        del keys
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

    def init_state(self, latents: jax.Array, keys: jax.Array | None = None) -> State:
        del keys
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
