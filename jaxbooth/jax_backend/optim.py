"""Learning-rate schedules and the optax optimizer for the JAX backend.

Owns the reproduction of diffusers' `get_scheduler` (optimization.py) and of the
`torch.optim.AdamW` + `clip_grad_norm_` + accelerate gradient-accumulation update that
`examples/dreambooth/train_dreambooth.py` performs. Imports jax, optax and numpy only,
never torch or the torch backend.

How the reference steps its schedule (accelerate `AcceleratedScheduler.step`): the script
calls `lr_scheduler.step()` on every micro-batch, but the wrapper only advances the
underlying `LambdaLR` when `GradientState.sync_gradients` is true, i.e. once per optimizer
update (`adjust_scheduler` only bumps `_step_count`, which no LR value reads), and then
`num_processes` times. The script multiplies warmup and total steps by `num_processes`,
so update n (0-based) uses `lr * lambda(n * P)` with `W * P`, `T * P`: the same value as
`lr * lambda(n)` with W and T unscaled. Our schedules are therefore built with the
unscaled `lr_warmup_steps` / `max_train_steps` and indexed by optax's update count.

Param groups (``--train_text_encoder``): torch gives each trained model its own group (lr,
weight decay) and one `LambdaLR` scales every group's initial lr by the same lambda, so
both groups follow one schedule shape; `clip_grad_norm_` sees all params at once. Here the
groups are top-level keys of the params dict, one optax rule each under
`optax.multi_transform`, after a clip over the whole tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbooth import ema
from jaxbooth.errors import JaxboothError

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
OPTIMIZERS = ("adamw", "adafactor", "lion")

# diffusers `get_polynomial_decay_schedule_with_warmup` default; `get_scheduler` never overrides it.
POLYNOMIAL_LR_END = 1e-7

_Factor = Callable[[jax.Array], jax.Array]


def _unknown_choice(key: str, value: object, choices: tuple[str, ...]) -> JaxboothError:
    """Build the 'not one of' error with a closest-match hint."""
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return JaxboothError(f"{key}={value!r} is not one of {list(choices)}{hint}")


def _as_float(count: jax.Array | int) -> jax.Array:
    """The update count as the default float (f64 under `jax.enable_x64`, for parity tests)."""
    return jnp.asarray(count, dtype=jnp.result_type(float))


def _warmup(step: jax.Array, num_warmup_steps: int) -> jax.Array:
    """Linear 0 -> 1 ramp shared by every diffusers warmup: step / max(1, W)."""
    return step / max(1, num_warmup_steps)


def _decay_factor(name: str, num_warmup_steps: int, num_training_steps: int, num_cycles: int) -> _Factor:
    """Post-warmup multiplier of diffusers' linear / cosine / cosine_with_restarts lambdas."""
    w, t = num_warmup_steps, num_training_steps
    span = max(1, t - w)

    def linear(step: jax.Array) -> jax.Array:
        return jnp.maximum(0.0, (t - step) / span)

    def cosine(step: jax.Array) -> jax.Array:
        # get_scheduler never forwards num_cycles here: diffusers' cosine is always the
        # half-cosine default (num_cycles=0.5), so --lr_num_cycles only affects restarts.
        progress = (step - w) / span
        return jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * 0.5 * 2.0 * progress)))

    def cosine_with_restarts(step: jax.Array) -> jax.Array:
        progress = (step - w) / span
        cycle = jnp.mod(float(num_cycles) * progress, 1.0)
        value = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * cycle)))
        return jnp.where(progress >= 1.0, 0.0, value)

    return {"linear": linear, "cosine": cosine, "cosine_with_restarts": cosine_with_restarts}[name]


def _polynomial_lr(
    learning_rate: float, num_warmup_steps: int, num_training_steps: int, power: float
) -> optax.Schedule:
    """diffusers `get_polynomial_decay_schedule_with_warmup` with its fixed lr_end=1e-7."""
    w, t = num_warmup_steps, num_training_steps
    lr_range = learning_rate - POLYNOMIAL_LR_END

    def schedule(count: jax.Array) -> jax.Array:
        step = _as_float(count)
        # W <= step <= T in the branch that is kept, so the clamp only guards the others
        # (and T == W, where diffusers divides by zero).
        remaining = jnp.clip(1.0 - (step - w) / max(1, t - w), 0.0, 1.0)
        decay = lr_range * remaining**power + POLYNOMIAL_LR_END
        after = jnp.where(step > t, POLYNOMIAL_LR_END, decay)
        return jnp.where(step < w, learning_rate * _warmup(step, w), after)

    return schedule


def make_lr_schedule(
    name: str,
    *,
    learning_rate: float,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
    optimizer_learning_rate: float | None = None,
) -> optax.Schedule:
    """Optax schedule equal to diffusers `get_scheduler(name, ...)` per optimizer update.

    `count` is optax's 0-based update count; update n uses `lr * lambda(n)`, as torch's
    `LambdaLR` does (it sets `lambda(0)` at construction, then steps after each update).
    Pass the *unscaled* `lr_warmup_steps` / `max_train_steps` (see module docstring).
    `num_cycles` only affects cosine_with_restarts and `power` only polynomial, exactly
    as `get_scheduler` forwards them. Parity-tested in tests/jax_backend/test_optim.py.

    `optimizer_learning_rate`: for a param group whose lr differs from the optimizer's
    default (torch: the first group's, the UNet's). Only diffusers' polynomial lambda reads
    that default (`decay / optimizer.defaults["lr"]`), so the group's schedule is
    `learning_rate * polynomial(optimizer_learning_rate) / optimizer_learning_rate`.
    """
    if name == "polynomial" and optimizer_learning_rate is not None and optimizer_learning_rate != learning_rate:
        reference = make_lr_schedule(name, learning_rate=optimizer_learning_rate, num_warmup_steps=num_warmup_steps,
                                     num_training_steps=num_training_steps, power=power)
        ratio = learning_rate / optimizer_learning_rate
        return lambda count: reference(count) * ratio
    if name not in LR_SCHEDULERS:
        raise _unknown_choice("lr_scheduler", name, LR_SCHEDULERS)
    if num_warmup_steps < 0 or num_training_steps < 0:
        raise JaxboothError(
            f"lr_warmup_steps={num_warmup_steps} and max_train_steps={num_training_steps} must both be >= 0"
        )
    if name == "polynomial":
        if not learning_rate > POLYNOMIAL_LR_END:
            raise JaxboothError(
                f"learning_rate={learning_rate} must be larger than the polynomial scheduler's "
                f"end lr {POLYNOMIAL_LR_END} (diffusers' fixed lr_end); raise learning_rate"
            )
        return _polynomial_lr(learning_rate, num_warmup_steps, num_training_steps, power)
    if name == "constant":
        return lambda count: jnp.full((), learning_rate, _as_float(count).dtype)

    w = num_warmup_steps
    if name == "constant_with_warmup":
        after: _Factor = lambda step: jnp.ones_like(step)
    else:
        after = _decay_factor(name, w, num_training_steps, num_cycles)

    def schedule(count: jax.Array) -> jax.Array:
        step = _as_float(count)
        return learning_rate * jnp.where(step < w, _warmup(step, w), after(step))

    return schedule


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """`torch.nn.utils.clip_grad_norm_`: scale by min(1, max_norm / (norm + 1e-6)).

    Unlike `optax.clip_by_global_norm` (divides by the bare norm, only above max_norm),
    torch adds 1e-6 to the norm; keeping it makes the AdamW parity test exact in f64.
    """

    def clip(updates: Any, params: Any = None) -> Any:
        del params
        coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates)

    return optax.stateless(clip)


class GradNormState(NamedTuple):
    """The global norm of the last gradient the optimizer rule received (see `record_grad_norm`)."""

    accumulated_grad_norm: jax.Array


def record_grad_norm() -> optax.GradientTransformation:
    """Pass updates through and keep their global norm in the state.

    Placed first inside `optax.MultiSteps`, it sees the averaged gradient of the whole
    accumulation window, the one the clip sees (MultiSteps keeps the inner state of the
    emitting micro-step only), which is what torch logs from `clip_grad_norm_`.
    """

    def init(params: Any) -> GradNormState:
        del params
        return GradNormState(jnp.zeros((), jnp.float32))

    def update(updates: Any, state: GradNormState, params: Any = None) -> tuple[Any, GradNormState]:
        del state, params
        return updates, GradNormState(optax.tree.norm(updates).astype(jnp.float32))

    return optax.GradientTransformation(init, update)


def accumulated_grad_norm(opt_state: Any) -> jax.Array:
    """The norm `record_grad_norm` kept: of the last optimizer step's (averaged) gradient."""
    found = optax.tree_utils.tree_get(opt_state, "accumulated_grad_norm")
    if found is None:
        raise ValueError("the optimizer state has no record_grad_norm state; build the optimizer with "
                         "jaxbooth.jax_backend.optim.make_optimizer")
    return found


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """A torch param group's own settings for one top-level subtree of the params."""

    learning_rate_schedule: optax.ScalarOrSchedule
    weight_decay: float


def _make_base_optimizer(
    name: str,
    schedule: optax.ScalarOrSchedule,
    beta1: float,
    beta2: float,
    epsilon: float,
    weight_decay: float,
) -> optax.GradientTransformation:
    """The per-update rule without clipping or accumulation."""
    if name == "adamw":
        # optax.adamw == torch.optim.AdamW: bias-corrected moments, eps outside the sqrt,
        # decoupled decay lr*wd*param on every trainable leaf (the script passes one
        # param group, so biases and norms decay too).
        return optax.adamw(schedule, b1=beta1, b2=beta2, eps=epsilon, weight_decay=weight_decay)
    if name == "lion":
        # Decay is decoupled and scaled by lr, like AdamW; betas come from the adam_* keys.
        return optax.lion(schedule, b1=beta1, b2=beta2, weight_decay=weight_decay)
    if name == "adafactor":
        # optax's adafactor adds weight decay *after* the lr scaling (not lr-scaled), so
        # adam_weight_decay would decay 1%/step: it is not applied here. Parameter-scale
        # multiplication is off so learning_rate is an absolute step size, as with AdamW.
        return optax.adafactor(schedule, multiply_by_parameter_scale=False)
    raise _unknown_choice("optimizer", name, OPTIMIZERS)


def _mask_labels(trainable_mask: Any) -> Any:
    """Map a bool mask (pytree or params -> pytree callable) to multi_transform labels."""

    def to_labels(mask_tree: Any) -> Any:
        return jax.tree.map(lambda keep: "trainable" if keep else "frozen", mask_tree)

    if callable(trainable_mask):
        return lambda params: to_labels(trainable_mask(params))
    return to_labels(trainable_mask)


def _grouped_rule(
    make_rule: Callable[[ParamGroup], optax.GradientTransformation],
    default: ParamGroup,
    groups: Mapping[str, ParamGroup],
) -> optax.GradientTransformation:
    """One rule per param group; top-level keys not named in `groups` use `default`."""
    if not groups:
        return make_rule(default)
    labels_of = {key: f"group:{key}" for key in groups}

    def labels(params: Any) -> Any:
        if not isinstance(params, Mapping):
            raise ValueError(f"param_groups {sorted(groups)} need a dict of params keyed by group name")
        missing = sorted(set(groups) - set(params))
        if missing:
            raise ValueError(f"param_groups name {missing}, which the params (keys {sorted(params)}) lack")
        return {key: jax.tree.map(lambda _, k=key: labels_of.get(k, "default"), sub) for key, sub in params.items()}

    rules = {"default": make_rule(default), **{labels_of[key]: make_rule(g) for key, g in groups.items()}}
    return optax.multi_transform(rules, labels)


def make_optimizer(
    *,
    learning_rate_schedule: optax.ScalarOrSchedule,
    optimizer: str = "adamw",
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_epsilon: float = 1e-8,
    adam_weight_decay: float = 1e-2,
    max_grad_norm: float | None = 1.0,
    gradient_accumulation_steps: int = 1,
    trainable_mask: Any = None,
    param_groups: Mapping[str, ParamGroup] | None = None,
    ema_decay: float | None = None,
) -> optax.GradientTransformation:
    """The train_dreambooth.py update: accumulate -> clip -> AdamW, as one optax transform.

    Mirrors accelerate + torch: micro-step gradients are averaged (accelerate divides the
    loss by k) by `optax.MultiSteps`, which emits zero updates on the first k-1 calls; the
    clip (`clip_grad_norm_` runs only when `sync_gradients`) then sees the averaged
    gradient, and the schedule advances once per real update. `trainable_mask` (bool
    pytree or callable on params) routes frozen leaves to `set_to_zero`, so they get no
    moments and no accumulator, like params with `requires_grad=False`, and are left out
    of the clip norm, as torch only sees params that have a `.grad`.

    `param_groups` maps top-level keys of the params dict (e.g. ``"text_encoder"``) to their
    own schedule and weight decay; other keys use `learning_rate_schedule` and
    `adam_weight_decay`. The clip norm is over all groups together, as torch's. The state
    records the norm the clip sees (`accumulated_grad_norm`). `ema_decay` (``--use_ema``): the state also
    keeps the EMA of the params (`with_ema`).
    """
    if gradient_accumulation_steps < 1:
        raise JaxboothError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be >= 1")

    def make_rule(group: ParamGroup) -> optax.GradientTransformation:
        return _make_base_optimizer(
            optimizer, group.learning_rate_schedule, adam_beta1, adam_beta2, adam_epsilon, group.weight_decay
        )

    tx = _grouped_rule(make_rule, ParamGroup(learning_rate_schedule, adam_weight_decay), param_groups or {})
    if max_grad_norm is not None and max_grad_norm > 0:
        tx = optax.chain(clip_by_global_norm_like_torch(max_grad_norm), tx)
    tx = optax.chain(record_grad_norm(), tx)
    if gradient_accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=gradient_accumulation_steps).gradient_transformation()
    if trainable_mask is not None:
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, _mask_labels(trainable_mask))
    return tx if ema_decay is None else with_ema(tx, ema_decay, gradient_accumulation_steps)


class EmaState(NamedTuple):
    """`with_ema`'s state: the wrapped optimizer's, the micro-steps seen, and the EMA of the params."""

    inner: Any
    ema_micro_steps: jax.Array
    ema_params: Any


def with_ema(tx: optax.GradientTransformation, decay: float, every_k: int = 1) -> optax.GradientTransformation:
    """`tx`, whose state also tracks the EMA of the params it updates (``jaxbooth.ema``: diffusers' warmup
    decay), refreshed after every optimizer step, i.e. every `every_k`-th micro-step under accumulation.

    Living in the optimizer state, the average is sharded like it, saved and restored by orbax with it (a
    resume continues it exactly) and needs no change to the train step.
    """

    def init(params: Any) -> EmaState:
        return EmaState(tx.init(params), jnp.zeros((), jnp.int32), jax.tree.map(jnp.array, params))

    def update(updates: Any, state: EmaState, params: Any = None) -> tuple[Any, EmaState]:
        if params is None:
            raise ValueError("with_ema needs the params in update(); call tx.update(grads, state, params)")
        updates, inner = tx.update(updates, state.inner, params)
        micro = state.ema_micro_steps + 1
        new_params = optax.apply_updates(params, updates)
        decay_now = ema.ema_decay(micro // every_k, decay)
        stepped = micro % every_k == 0

        def average(old: jax.Array, new: jax.Array) -> jax.Array:
            return jnp.where(stepped, ema.ema_update(old, new, decay_now).astype(old.dtype), old)

        return updates, EmaState(inner, micro, jax.tree.map(average, state.ema_params, new_params))

    return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any:
    """The EMA of the params kept by `with_ema` (the state of `make_optimizer(..., ema_decay=...)`)."""
    if not isinstance(opt_state, EmaState):
        raise ValueError("the optimizer state keeps no EMA; build the optimizer with make_optimizer(ema_decay=...)")
    return opt_state.ema_params


def output_params(params: Any, opt_state: Any, use_ema: bool) -> Any:
    """What validation samples and the output holds: the EMA of the params under ``--use_ema``, else them."""
    return ema_params(opt_state) if use_ema else params


def count_optimizer_state_bytes(opt_state: Any) -> int:
    """Bytes held by an optimizer state; works on arrays and `jax.eval_shape` structs alike."""
    total = 0
    for leaf in jax.tree.leaves(opt_state):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        else:
            total += np.asarray(leaf).nbytes
    return total
