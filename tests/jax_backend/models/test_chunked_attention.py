"""The chunked CPU attention kernel equals the einsum kernel in value and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbooth.jax_backend.models import attention
from jaxbooth.jax_backend.models.chunked_attention import chunked_attention


def _inputs(q_len: int, kv_len: int, heads: int = 2, dim: int = 4, batch: int = 2, dtype=jnp.float32):
    rng = np.random.default_rng(q_len * 1000 + kv_len)
    make = lambda length: jnp.asarray(rng.standard_normal((batch, length, heads, dim)) * 2, dtype)  # noqa: E731
    return make(q_len), make(kv_len), make(kv_len)


def _value_and_grads(fn, q, k, v):
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


# (q_len, kv_len, chunk): exact chunks, a padded last chunk, cross-attention, one chunk
@pytest.mark.parametrize("q_len,kv_len,chunk", [(16, 16, 4), (13, 13, 4), (12, 5, 8), (6, 7, 128)])
def test_chunked_matches_einsum_value_and_gradients(q_len, kv_len, chunk) -> None:
    q, k, v = _inputs(q_len, kv_len)
    out = chunked_attention(q, k, v, chunk=chunk)
    ref = attention.attend(q, k, v, kernel="xla")
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    got = _value_and_grads(lambda *a: chunked_attention(*a, chunk=chunk), q, k, v)
    want = _value_and_grads(lambda *a: attention.attend(*a, kernel="xla"), q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for name, g, w in zip("qkv", got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_chunked_keeps_low_precision_dtype_and_computes_in_float32() -> None:
    q, k, v = _inputs(8, 8, dtype=jnp.bfloat16)
    out = chunked_attention(q, k, v, chunk=4)
    assert out.dtype == jnp.bfloat16
    exact = attention.attend(*(x.astype(jnp.float32) for x in (q, k, v)), kernel="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2e-2, atol=2e-2)
    grads = jax.grad(lambda q: jnp.sum(chunked_attention(q, k, v, chunk=4).astype(jnp.float32)))(q)
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))


def test_chunked_kernel_falls_back_for_masks_and_causal() -> None:
    q, k, v = _inputs(6, 6)
    mask = jnp.asarray(np.tril(np.ones((6, 6), bool)))
    for kwargs in ({"mask": mask}, {"is_causal": True}):
        np.testing.assert_allclose(attention.attend(q, k, v, kernel="chunked", **kwargs),
                                   attention.attend(q, k, v, kernel="xla", **kwargs), rtol=1e-6)


def test_chunked_saves_less_memory_than_einsum() -> None:
    # The reason the kernel exists: the backward pass keeps no [heads, q, k] probabilities.
    q, k, v = _inputs(512, 512, heads=4, dim=8, batch=1)

    def temp_bytes(kernel: str) -> int:
        step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention.attend(q, k, v, kernel=kernel) ** 2),
                                argnums=(0, 1, 2)))
        return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("chunked") * 3 < temp_bytes("xla")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU default")
def test_auto_kernel_is_chunked_on_cpu() -> None:
    assert attention.resolve_kernel("auto") == "chunked"
