"""``--remat_policy``: every policy computes the same gradients; what differs is what the backward pass keeps.

Checked on a small UNet's forward+backward: gradients equal the unrematerialised ones, and every
rematerialised block of the traced program carries the chosen policy. The speed/memory trade on real shapes
is a benchmark's job, not a unit test's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbooth import spec as spec_lib
from jaxbooth.jax_backend import loading
from jaxbooth.jax_backend.models import blocks
from jaxbooth.jax_backend.models import unet as unet_lib
from tests.jax_backend.test_lora import CONFIG, unet_inputs


@pytest.fixture(scope="module")
def params():
    config = unet_lib.unet_config_from_dict(CONFIG)
    return config, jax.device_get(unet_lib.init_params(config, jax.random.PRNGKey(0)))


def _grad_step(config, remat):
    model = unet_lib.FlaxUNet2DConditionModel(config, gradient_checkpointing=remat)
    sample, timesteps, context = unet_inputs()

    def loss(p):
        return jnp.mean(model.apply({"params": p}, sample, timesteps, context) ** 2)

    return jax.jit(jax.value_and_grad(loss))


def test_the_dots_policies_give_the_unrematerialised_gradients(params) -> None:
    config, p = params
    want_loss, want = _grad_step(config, False)(p)
    for policy in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        got_loss, got = _grad_step(config, policy)(p)
        np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=1e-6, err_msg=policy)


def _remat_policies(config, params, remat) -> list:
    """The policy of every rematerialised region in the traced forward+backward (None: jax's default)."""
    found = []

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
                found.append(eqn.params.get("policy"))
            for sub in jax_core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(_grad_step(config, remat))(params).jaxpr)
    return found


@pytest.mark.parametrize("policy", ["dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_each_block_is_rematerialised_with_the_chosen_policy(params, policy) -> None:
    """XLA:CPU's buffer sizes at test shapes do not tell the policies apart, so the check is on the program."""
    config, p = params
    assert _remat_policies(config, p, False) == []
    full = _remat_policies(config, p, True)
    assert full and set(full) == {None}  # every resnet and transformer block, jax's keep-only-inputs default
    chosen = _remat_policies(config, p, policy)
    assert len(chosen) == len(full) and set(chosen) == {blocks.REMAT_POLICIES[policy]}


def test_the_spec_picks_the_modules_policy() -> None:
    spec = spec_lib.load_spec_from_dict({})
    assert loading.remat_setting(spec) is False
    on = spec_lib.replace_flat(spec, gradient_checkpointing=True)
    assert loading.remat_setting(on) is True  # full: diffusers' gradient checkpointing, as before the key
    assert loading.remat_setting(spec_lib.replace_flat(on, remat_policy="dots_saveable")) == "dots_saveable"
    with pytest.raises(ValueError, match="remat policy 'dots'"):
        blocks.maybe_remat(nn.Dense, "dots")
