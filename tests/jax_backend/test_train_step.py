"""The CPU two-executable train step computes what the single jitted train step computes."""

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
from jaxbooth.jax_backend.train_step import LossOptions, make_train_step

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
    tx = optax.chain(optim.clip_by_global_norm_like_torch(1.0), optax.sgd(0.05))
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
