"""Shared layers in models/blocks.py against the torch functions they mirror."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbooth.jax_backend.models.blocks import (
    Attention,
    compute_sinusoidal_embedding,
    random_params,
    resize_nearest,
)


@pytest.mark.requires_torch
@pytest.mark.parametrize(("dim", "flip", "shift"), [(32, True, 0), (32, False, 1), (33, True, 0), (8, True, 0)])
def test_sinusoidal_embedding_matches_diffusers(dim: int, flip: bool, shift: float) -> None:
    torch = pytest.importorskip("torch")
    from diffusers.models.embeddings import get_timestep_embedding

    timesteps = np.array([0, 1, 17, 500, 999], np.int64)
    expected = get_timestep_embedding(
        torch.tensor(timesteps), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    ).numpy()
    ours = compute_sinusoidal_embedding(timesteps, dim, flip_sin_to_cos=flip, freq_shift=shift)
    # Angles reach ~1000 rad, where one float32 ulp is 6e-5: exp/sin implementations differ by that.
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=1e-4)


@pytest.mark.requires_torch
@pytest.mark.parametrize(("size_in", "size_out"), [((4, 5), (8, 10)), ((7, 8), (13, 15)), ((3, 3), (5, 7))])
def test_resize_nearest_matches_torch_interpolate(size_in: tuple, size_out: tuple) -> None:
    torch = pytest.importorskip("torch")
    x = np.random.RandomState(0).randn(2, 3, *size_in).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.tensor(x), size=size_out, mode="nearest").numpy()
    ours = resize_nearest(jnp.asarray(x.transpose(0, 2, 3, 1)), size_out)
    np.testing.assert_array_equal(np.asarray(ours).transpose(0, 3, 1, 2), expected)


def test_random_params_follow_shapes_and_seed() -> None:
    abstract = {
        "dense": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32), "bias": jax.ShapeDtypeStruct((3,), jnp.float32)},
        "norm": {"scale": jax.ShapeDtypeStruct((3,), jnp.bfloat16)},
    }
    first, again, other = random_params(abstract, 0), random_params(abstract, 0), random_params(abstract, 1)
    assert first["dense"]["kernel"].shape == (4, 3) and first["norm"]["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(first["dense"]["kernel"], again["dense"]["kernel"])
    assert not np.array_equal(first["dense"]["kernel"], other["dense"]["kernel"])
    assert float(jnp.abs(first["dense"]["bias"]).max()) == 0.0 and float(first["norm"]["scale"].min()) == 1.0
    from_key = random_params(abstract, jax.random.key(3))
    np.testing.assert_array_equal(
        from_key["dense"]["kernel"], random_params(abstract, jax.random.key(3))["dense"]["kernel"]
    )


def test_attention_kernels_agree_with_mask() -> None:
    rng = np.random.RandomState(0)
    x, context = rng.randn(2, 6, 16).astype(np.float32), rng.randn(2, 5, 12).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)[:, None, None, :]
    params = Attention(2, 8, 16).init(jax.random.key(0), x, context)
    outs = {
        kernel: Attention(2, 8, 16, kernel=kernel).apply(params, x, context, mask) for kernel in ("xla", "dot_product")
    }
    np.testing.assert_allclose(outs["dot_product"], outs["xla"], rtol=1e-5, atol=1e-6)
    # The mask matters: the second example must differ from an unmasked run.
    unmasked = Attention(2, 8, 16).apply(params, x, context)
    assert not np.allclose(unmasked[1], outs["xla"][1])
    np.testing.assert_allclose(unmasked[0], outs["xla"][0], rtol=1e-6)


@pytest.mark.requires_torch
def test_feed_forward_matches_diffusers_exact_gelu() -> None:
    """Block-level and tight: the tanh-approximate GELU of the old Flax class stays below the
    whole-model 1e-4 tolerance, so it is pinned here."""
    torch = pytest.importorskip("torch")
    from diffusers.models.attention import FeedForward as TorchFeedForward

    from jaxbooth.jax_backend.models.blocks import FeedForward
    from jaxbooth.jax_backend.weights import torch_state_to_flax

    torch.manual_seed(0)
    reference = TorchFeedForward(16, activation_fn="geglu").eval()
    x = np.random.RandomState(0).randn(2, 5, 16).astype(np.float32) * 3
    with torch.no_grad():
        expected = reference(torch.tensor(x)).numpy()
    module = FeedForward(16)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    ours = module.apply({"params": torch_state_to_flax(state, abstract)}, x)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-6)
