"""Proves jaxbooth/jax_backend/optim.py against diffusers `get_scheduler` and torch AdamW."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.optim import (
    LR_SCHEDULERS,
    ParamGroup,
    accumulated_grad_norm,
    count_optimizer_state_bytes,
    make_lr_schedule,
    make_optimizer,
)

LR = 1e-4
STEPS = 30

SCHEDULE_CASES = [
    (name, warmup, cycles, power)
    for name in LR_SCHEDULERS
    for warmup in (0, 5)
    for cycles in ((1, 3) if name in ("cosine", "cosine_with_restarts") else (1,))
    for power in ((1.0, 2.0) if name == "polynomial" else (1.0,))
]


def _torch_lrs(
    name: str, warmup: int, cycles: int, power: float, lr: float, total: int, n: int
) -> list[float]:
    """LR used by each of n torch optimizer updates under diffusers' scheduler."""
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("diffusers.optimization")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = optimization.get_scheduler(
        name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles, power=power
    )
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.requires_torch
@pytest.mark.parametrize("name,warmup,cycles,power", SCHEDULE_CASES)
def test_lr_schedule_matches_diffusers_get_scheduler(
    name: str, warmup: int, cycles: int, power: float
) -> None:
    # Two steps past the end cover the post-training branches (polynomial's lr_end).
    expected = _torch_lrs(name, warmup, cycles, power, LR, STEPS, STEPS + 2)
    schedule = make_lr_schedule(
        name,
        learning_rate=LR,
        num_warmup_steps=warmup,
        num_training_steps=STEPS,
        num_cycles=cycles,
        power=power,
    )
    # optax calls the schedule on a traced int32 scalar count inside jit.
    got = jax.jit(jax.vmap(schedule))(jnp.arange(STEPS + 2, dtype=jnp.int32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6 * LR)


@pytest.mark.requires_torch
def test_cosine_with_restarts_actually_restarts() -> None:
    # Guards the case list above: with 3 cycles the lr must jump back up at least twice.
    lrs = np.asarray(
        jax.jit(
            make_lr_schedule(
                "cosine_with_restarts",
                learning_rate=LR,
                num_warmup_steps=0,
                num_training_steps=STEPS,
                num_cycles=3,
            )
        )(jnp.arange(STEPS))
    )
    assert int(np.sum(np.diff(lrs) > 0.5 * LR)) == 2


def test_unknown_schedule_lists_choices() -> None:
    with pytest.raises(JaxboothError, match="cosine_with_restarts.*did you mean 'cosine'"):
        make_lr_schedule("cosin", learning_rate=LR, num_warmup_steps=0, num_training_steps=10)


def test_polynomial_rejects_lr_below_end() -> None:
    with pytest.raises(JaxboothError, match="learning_rate"):
        make_lr_schedule("polynomial", learning_rate=1e-8, num_warmup_steps=0, num_training_steps=10)


def test_unknown_optimizer_lists_choices() -> None:
    with pytest.raises(JaxboothError, match="adafactor"):
        make_optimizer(learning_rate_schedule=1e-3, optimizer="adam8bit")


# A quadratic loss 0.5 * c_t * ||p - target||^2 whose curvature c_t changes per step, so
# some updates are clipped (norm > MAX_NORM) and some are not.
CURVATURE = (0.5, 30.0, 1.0, 50.0, 0.2, 2.0, 40.0, 0.1, 1.5, 25.0)
MAX_NORM = 1.0
ADAM = dict(adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, adam_weight_decay=0.1)


def _init_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}


def _target() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}


def _quadratic_grad(params: dict, c: float) -> dict:
    return jax.tree.map(lambda p, t: c * (p - t), params, _target())


def _torch_adamw_run(lr_name: str, warmup: int) -> tuple[dict[str, np.ndarray], list[float]]:
    """The train_dreambooth.py update loop: backward, clip_grad_norm_, AdamW, scheduler."""
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("diffusers.optimization")
    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in _init_params().items()}
    target = {k: torch.tensor(v, dtype=torch.float64) for k, v in _target().items()}
    opt = torch.optim.AdamW(
        list(params.values()),
        lr=0.05,
        betas=(ADAM["adam_beta1"], ADAM["adam_beta2"]),
        eps=ADAM["adam_epsilon"],
        weight_decay=ADAM["adam_weight_decay"],
    )
    sched = optimization.get_scheduler(
        lr_name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=len(CURVATURE)
    )
    norms = []
    for c in CURVATURE:
        loss = sum(0.5 * c * ((params[k] - target[k]) ** 2).sum() for k in params)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM)))
        opt.step()
        sched.step()
        opt.zero_grad()
    return {k: v.detach().numpy() for k, v in params.items()}, norms


@pytest.mark.requires_torch
@pytest.mark.parametrize("lr_name,warmup", [("constant", 0), ("linear", 3)])
def test_adamw_with_clipping_matches_torch(lr_name: str, warmup: int) -> None:
    # Both sides run in f64 so that f32 rounding (~1e-5 rel on small entries after 10
    # Adam steps) cannot hide a semantic difference such as eps placement or clip eps.
    expected, norms = _torch_adamw_run(lr_name, warmup)
    assert any(n > MAX_NORM for n in norms) and any(n < MAX_NORM for n in norms)
    schedule = make_lr_schedule(
        lr_name, learning_rate=0.05, num_warmup_steps=warmup, num_training_steps=len(CURVATURE)
    )
    tx = make_optimizer(learning_rate_schedule=schedule, max_grad_norm=MAX_NORM, **ADAM)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), _init_params())
        state = tx.init(params)
        update_fn = jax.jit(tx.update)
        for c in CURVATURE:
            updates, state = update_fn(_quadratic_grad(params, c), state, params)
            params = optax.apply_updates(params, updates)
        got = jax.tree.map(np.asarray, params)
    for k in expected:
        assert got[k].dtype == np.float64
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-10, atol=1e-12)
    moved = max(np.abs(expected[k] - v).max() for k, v in _init_params().items())
    assert moved > 0.05  # the run is not a no-op that trivially matches


def _scaled_random(seed: int, norm: float) -> dict[str, np.ndarray]:
    tree = {
        k: np.random.default_rng(seed).normal(size=v.shape).astype(np.float32) for k, v in _target().items()
    }
    return jax.tree.map(lambda v: v * np.float32(norm / float(optax.global_norm(tree))), tree)


def _micro_grads(scale: float) -> list[dict[str, np.ndarray]]:
    """Three micro gradients whose mean (norm 0.5 * scale) stays below MAX_NORM.

    Each one is far above MAX_NORM and points off the mean, so clipping per micro-step
    changes the direction; with scale 1 the *sum* is above MAX_NORM, so summing instead
    of averaging changes the update too (Adam alone is blind to a constant scale).
    """
    small, big = _scaled_random(3, 0.5 * scale), _scaled_random(4, 5.0 * scale)
    return [jax.tree.map(lambda a, b, s=s: a + s * b, small, big) for s in (1.0, -1.0, 0.0)]


def test_gradient_accumulation_equals_one_step_on_mean_gradient() -> None:
    schedule = make_lr_schedule("linear", learning_rate=0.05, num_warmup_steps=1, num_training_steps=4)
    ref_tx = make_optimizer(learning_rate_schedule=schedule, max_grad_norm=MAX_NORM, **ADAM)
    acc_tx = make_optimizer(
        learning_rate_schedule=schedule, max_grad_norm=MAX_NORM, gradient_accumulation_steps=3, **ADAM
    )
    ref = acc = jax.tree.map(jnp.asarray, _init_params())
    ref_state, acc_state = ref_tx.init(ref), acc_tx.init(acc)
    ref_update, acc_update = jax.jit(ref_tx.update), jax.jit(acc_tx.update)
    for scale in (1.0, 0.2, 1.0):  # three updates: the schedule must advance once per update
        micro = _micro_grads(scale)
        mean = jax.tree.map(lambda *g: sum(g) / len(g), *micro)
        assert float(optax.global_norm(mean)) < MAX_NORM < float(optax.global_norm(micro[0]))
        ref_upd, ref_state = ref_update(mean, ref_state, ref)
        ref = optax.apply_updates(ref, ref_upd)
        for i, g in enumerate(micro):
            before = acc
            upd, acc_state = acc_update(g, acc_state, acc)
            acc = optax.apply_updates(acc, upd)
            if i < 2:
                jax.tree.map(np.testing.assert_array_equal, acc, before)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), acc, ref)
    assert not np.allclose(acc["w"], _init_params()["w"], atol=1e-3)


def _mixed_params() -> dict:
    rng = np.random.default_rng(2)
    return {
        "frozen": {"kernel": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)},
        "lora": {"a": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)},
    }


MASK = {"frozen": {"kernel": False}, "lora": {"a": True}}


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "lion"])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("as_callable", [False, True])
def test_frozen_leaves_unchanged_and_hold_no_state(
    optimizer: str, accumulation: int, as_callable: bool
) -> None:
    params = _mixed_params()
    mask = (lambda p: jax.tree.map(lambda x: x.shape != (7, 5), p)) if as_callable else MASK
    tx = make_optimizer(
        learning_rate_schedule=1e-2,
        optimizer=optimizer,
        gradient_accumulation_steps=accumulation,
        trainable_mask=mask,
    )
    state = tx.init(params)
    assert all(leaf.shape != (7, 5) for leaf in jax.tree.leaves(state))
    unmasked_bytes = count_optimizer_state_bytes(
        make_optimizer(
            learning_rate_schedule=1e-2, optimizer=optimizer, gradient_accumulation_steps=accumulation
        ).init(params)
    )
    assert count_optimizer_state_bytes(state) <= unmasked_bytes - 7 * 5 * 4  # >= one moment freed
    grads = jax.tree.map(jnp.ones_like, params)
    new = params
    for _ in range(2 * accumulation):
        upd, state = jax.jit(tx.update)(grads, state, new)
        new = optax.apply_updates(new, upd)
    np.testing.assert_array_equal(new["frozen"]["kernel"], params["frozen"]["kernel"])
    assert not np.allclose(new["lora"]["a"], params["lora"]["a"])


def test_adamw_state_bytes_are_two_moments_of_trainable_params() -> None:
    params = _mixed_params()
    tx = make_optimizer(learning_rate_schedule=1e-2, trainable_mask=MASK)
    abstract = jax.eval_shape(tx.init, params)
    # mu + nu for the 2x3 f32 leaf, one int32 step count, one f32 recorded gradient norm.
    assert count_optimizer_state_bytes(abstract) == 2 * 2 * 3 * 4 + 4 + 4
    assert count_optimizer_state_bytes(tx.init(params)) == count_optimizer_state_bytes(abstract)


@pytest.mark.parametrize("max_norm", [None, 0.0])
def test_disabled_clip_is_plain_adamw(max_norm: float | None) -> None:
    # Adam is scale invariant on step 1, so use a large then a small gradient: clipping
    # the first changes the second update.
    params = {"w": jnp.zeros((3,))}
    grads = [{"w": jnp.full((3,), 100.0)}, {"w": jnp.ones((3,))}]

    def run(tx: optax.GradientTransformation) -> np.ndarray:
        p, state = params, tx.init(params)
        for g in grads:
            upd, state = tx.update(g, state, p)
            p = optax.apply_updates(p, upd)
        return np.asarray(p["w"])

    plain = run(optax.adamw(0.1, weight_decay=1e-2))
    np.testing.assert_array_equal(
        run(make_optimizer(learning_rate_schedule=0.1, max_grad_norm=max_norm)), plain
    )
    assert not np.allclose(run(make_optimizer(learning_rate_schedule=0.1, max_grad_norm=1.0)), plain)


# ----------------------------------------------------------------------------- param groups


def _two_groups() -> dict:
    rng = np.random.default_rng(5)
    return {"unet": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
            "text_encoder": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}}


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_weight_decay_per_group(optimizer: str) -> None:
    """Zero gradients leave only the decoupled decay: p <- p * (1 - lr * wd), with each group's own lr and wd."""
    params = _two_groups()
    tx = make_optimizer(learning_rate_schedule=0.1, optimizer=optimizer, adam_weight_decay=0.2, max_grad_norm=None,
                        param_groups={"text_encoder": ParamGroup(learning_rate_schedule=0.05, weight_decay=0.5)})
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["unet"]["w"], params["unet"]["w"] * (1 - 0.1 * 0.2), rtol=1e-6)
    np.testing.assert_allclose(new["text_encoder"]["w"], params["text_encoder"]["w"] * (1 - 0.05 * 0.5), rtol=1e-6)


def test_zero_text_encoder_lr_freezes_that_group_only() -> None:
    params = _two_groups()
    tx = make_optimizer(learning_rate_schedule=0.1, param_groups={"text_encoder": ParamGroup(0.0, 0.01)})
    state = tx.init(params)
    new = params
    for _ in range(2):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, new), state, new)
        new = optax.apply_updates(new, updates)
    np.testing.assert_array_equal(new["text_encoder"]["w"], params["text_encoder"]["w"])
    assert not np.allclose(new["unet"]["w"], params["unet"]["w"])


def test_clip_sees_the_norm_of_both_groups() -> None:
    """torch clips over all params: a big text-encoder gradient scales the UNet's gradient down too."""
    params = _two_groups()
    grads = {"unet": {"w": jnp.full((4, 3), 1e-3)}, "text_encoder": {"w": jnp.full((3, 2), 100.0)}}
    # Adam with b1 = b2 = 0 and a huge eps is SGD with lr / eps: its update is the clipped gradient, scaled
    linear = dict(optimizer="adamw", adam_beta1=0.0, adam_beta2=0.0, adam_epsilon=1e6, adam_weight_decay=0.0)
    tx = make_optimizer(learning_rate_schedule=1e6, max_grad_norm=1.0, **linear,
                        param_groups={"text_encoder": ParamGroup(1e6, 0.0)})
    updates, state = tx.update(grads, tx.init(params), params)
    coef = 1.0 / (float(optax.global_norm(grads)) + 1e-6)  # one coefficient for the whole tree
    for group in ("unet", "text_encoder"):
        np.testing.assert_allclose(-updates[group]["w"], grads[group]["w"] * coef, rtol=1e-4)
    np.testing.assert_allclose(accumulated_grad_norm(state), optax.global_norm(grads), rtol=1e-6)


def test_param_groups_must_name_existing_subtrees() -> None:
    tx = make_optimizer(learning_rate_schedule=0.1, param_groups={"text_encoder": ParamGroup(0.1, 0.0)})
    with pytest.raises(ValueError, match="text_encoder"):
        tx.init({"unet": {"w": jnp.zeros(2)}})


@pytest.mark.requires_torch
@pytest.mark.parametrize("name", ["linear", "polynomial"])
def test_group_schedule_matches_torch_two_group_lambda(name: str) -> None:
    """diffusers' one LambdaLR over two groups: the text-encoder group follows the same shape at its own lr
    (polynomial's lambda divides by the optimizer default lr, the first group's)."""
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("diffusers.optimization")
    unet_lr, text_lr = 1e-4, 3e-5
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": unet_lr},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": text_lr}]
    opt = torch.optim.AdamW(groups, lr=unet_lr)
    sched = optimization.get_scheduler(name, optimizer=opt, num_warmup_steps=3, num_training_steps=10, power=2.0)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    schedule = make_lr_schedule(name, learning_rate=text_lr, num_warmup_steps=3, num_training_steps=10, power=2.0,
                                optimizer_learning_rate=unet_lr)
    got = jax.vmap(schedule)(jnp.arange(12, dtype=jnp.int32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------- logged gradient norm


def test_recorded_grad_norm_is_the_norm_of_the_accumulated_mean() -> None:
    """What torch logs from clip_grad_norm_ after accumulation: the norm of the mean micro-gradient."""
    params = jax.tree.map(jnp.asarray, _init_params())
    tx = make_optimizer(learning_rate_schedule=0.01, gradient_accumulation_steps=2, max_grad_norm=MAX_NORM)
    state = tx.init(params)
    first, second = _scaled_random(3, 4.0), _scaled_random(4, 0.5)
    _, state = tx.update(first, state, params)
    _, state = tx.update(second, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, first, second)
    np.testing.assert_allclose(accumulated_grad_norm(state), optax.global_norm(mean), rtol=1e-6)
    assert not np.isclose(float(optax.global_norm(mean)), float(optax.global_norm(second)), rtol=1e-3)
