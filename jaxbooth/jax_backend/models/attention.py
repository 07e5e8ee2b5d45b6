"""The one attention kernel switch shared by the UNet, the VAE and CLIP.

Modules own their projections (``to_q``/``q_proj``...) and call :func:`attend` for the
softmax(QK^T)V part, so choosing a kernel is one argument, not one class per kernel
(unlike diffusers' processor zoo). Kernels:

- ``"xla"``: plain einsum + softmax; XLA fuses it on every platform.
- ``"dot_product"``: ``jax.nn.dot_product_attention`` with the platform's choice
  (cuDNN flash attention on GPUs that support it, XLA elsewhere).
- ``"flash"``: ``jax.nn.dot_product_attention(implementation="cudnn")``; GPU only.
- ``"chunked"``: query-chunked, recomputing attention (``chunked_attention``); the fast and
  small one on CPU. Masked or causal calls (CLIP) take the ``"xla"`` path.
- ``"auto"``: ``dot_product`` on GPU, ``chunked`` on CPU, ``xla`` on TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbooth.jax_backend.models.chunked_attention import chunked_attention

KERNELS = ("auto", "xla", "dot_product", "flash", "chunked")


def resolve_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {KERNELS}")
    if kernel == "auto":
        return {"gpu": "dot_product", "cpu": "chunked"}.get(jax.default_backend(), "xla")
    return kernel


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    kernel: str = "xla",
    mask: jax.Array | None = None,
    is_causal: bool = False,
    upcast: bool = False,
) -> jax.Array:
    """Scaled dot-product attention over ``[batch, length, heads, head_dim]`` inputs.

    ``mask`` is boolean, broadcastable to ``[batch, heads, q_len, kv_len]``, True = attend.
    ``upcast`` computes scores and softmax in float32 (diffusers ``upcast_attention`` /
    ``upcast_softmax``); the result has the query's dtype.
    """
    kernel = resolve_kernel(kernel)
    if kernel in ("dot_product", "flash"):
        implementation = "cudnn" if kernel == "flash" else None
        return jax.nn.dot_product_attention(
            query, key, value, mask=mask, is_causal=is_causal, implementation=implementation
        )
    if kernel == "chunked" and mask is None and not is_causal:
        return chunked_attention(query, key, value)
    dtype = query.dtype
    scale = query.shape[-1] ** -0.5
    if upcast:
        query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query * jnp.asarray(scale, query.dtype), key)
    if is_causal:
        q_len, kv_len = scores.shape[-2:]
        causal = jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32) if upcast else scores, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, value).astype(dtype)
