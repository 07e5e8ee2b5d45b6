"""The train step on a one-block UNet: the CPU two-executable step equals the single jit, and the
logged grad_norm is the norm of the accumulated gradient the clip sees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbooth import diffusion
from jaxbooth.jax_backend import mesh as mesh_lib
from jaxbooth.jax_backend import optim
from jaxbooth.jax_backend.models import unet as unet_lib
from jaxbooth.jax_backend.train import TwoPartStep, init_state
from jaxbooth.jax_backend.train_step import LossOptions, gradient_step, make_train_step

CONFIG = {"block_out_channels": (32,), "layers_per_block": 1, "sample_size": 8, "in_channels": 4,
          "out_channels": 4, "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",),
          "cross_attention_dim": 16, "attention_head_dim": 4}


def test_two_part_step_matches_single_jit() -> None:
    config = unet_lib.unet_config_from_dict(CONFIG)
    model = unet_lib.FlaxUNet2DConditionModel(config)
    params = jax.device_get(unet_lib.init_params(config, jax.random.PRNGKey(0)))
    tables = diffusion.NoiseTables(*(np.asarray(x, np.float32) for x in (
        np.linspace(1.0, 0.1, 1000), np.linspace(0.05, 0.99, 1000), np.linspace(400.0, 0.01, 1000))))
    # SGD: Adam's g/sqrt(v) turns float rounding on near-zero gradients into sign flips of size lr
    tx = optax.chain(optim.record_grad_norm(), optim.clip_by_global_norm_like_torch(1.0), optax.sgd(0.05))
    step_fn = make_train_step(unet_apply=model.apply, text_apply=None, tx=tx, lr_schedule=lambda step: 1e-3,
                              tables=tables, options=LossOptions(snr_gamma=5.0))
    rng = np.random.default_rng(0)
    frozen = {"latent_mean": jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32),
              "latent_std": jnp.full((3, 8, 8, 4), 0.1, jnp.float32),
              "text_embeddings": jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)}
    batch = {"example_idx": jnp.asarray([2, 0], jnp.int32), "prompt_idx": jnp.asarray([1, 0], jnp.int32)}
    mesh = mesh_lib.make_mesh((1, 1))
    replicated = mesh_lib.replicated(mesh)

    def run(make_step) -> tuple:
        state, shardings = init_state({"unet": params}, tx, mesh, seed=3)
        step = make_step(state, shardings)
        losses = []
        for _ in range(3):
            state, metrics = step(state, frozen, batch)
            losses.append(float(metrics["loss"]))
        return state, losses

    def single(state, shardings):
        return jax.jit(step_fn, out_shardings=(shardings, replicated), donate_argnums=(0,))

    def two_part(state, shardings):
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, frozen, batch))
        batch_shardings = jax.tree_util.tree_map(lambda _: mesh_lib.batch_sharding(mesh), batch)
        frozen_shardings = jax.tree_util.tree_map(lambda _: replicated, frozen)
        return TwoPartStep(step_fn, shardings, frozen_shardings, batch_shardings, mesh, abstract)

    want_state, want_losses = run(single)
    got_state, got_losses = run(two_part)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    assert int(got_state.step) == 3
    for got, want in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(got_state.params)[0], jax.tree.leaves({"unet": params})[0])


def test_logged_grad_norm_is_the_norm_of_the_accumulated_gradient() -> None:
    """gradient_accumulation_steps=2: grad_norm == |mean(g1, g2)|, as torch logs from clip_grad_norm_."""
    config = unet_lib.unet_config_from_dict(CONFIG)
    model = unet_lib.FlaxUNet2DConditionModel(config)
    params = jax.device_get(unet_lib.init_params(config, jax.random.PRNGKey(0)))
    tables = diffusion.NoiseTables(*(np.asarray(x, np.float32) for x in (
        np.linspace(1.0, 0.1, 1000), np.linspace(0.05, 0.99, 1000), np.linspace(400.0, 0.01, 1000))))
    tx = optim.make_optimizer(learning_rate_schedule=1e-3, max_grad_norm=1e-3, gradient_accumulation_steps=2)
    static = dict(unet_apply=model.apply, text_apply=None, tables=tables, options=LossOptions())
    step_fn = jax.jit(make_train_step(tx=tx, lr_schedule=lambda step: 1e-3, gradient_accumulation_steps=2, **static))
    rng = np.random.default_rng(1)
    frozen = {"latent_mean": jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32),
              "latent_std": jnp.full((2, 8, 8, 4), 0.1, jnp.float32),
              "text_embeddings": jnp.asarray(rng.standard_normal((1, 7, 16)), jnp.float32)}
    batches = [{"example_idx": jnp.asarray([i], jnp.int32), "prompt_idx": jnp.asarray([0], jnp.int32)}
               for i in (0, 1)]
    state, _ = init_state({"unet": params}, tx, mesh_lib.make_mesh((1, 1)), seed=3)
    grads_fn = jax.jit(lambda st, b: gradient_step(st, frozen, b, **static)[0])
    micro_grads = []
    for batch in batches:  # params do not move inside the window, so each micro-gradient is this one
        micro_grads.append(grads_fn(state, batch))
        state, metrics = step_fn(state, frozen, batch)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *micro_grads)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(mean)), rtol=1e-5)
    assert not np.isclose(float(optax.global_norm(mean)), float(optax.global_norm(micro_grads[1])), rtol=1e-3)
