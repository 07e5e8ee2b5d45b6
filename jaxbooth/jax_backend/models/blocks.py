"""Layers shared by the UNet and the VAE: resnets, resamplers, time embeddings, attention.

Every module here works on channels-last arrays (NHWC for images, ``[batch, tokens, features]``
for sequences): that is what XLA's convolutions and Flax want, so the models transpose
nowhere inside; callers holding torch-style NCHW tensors transpose once at the boundary.

Submodules are named like diffusers' PyTorch modules with ``.N`` written ``_N`` (``to_out_0``,
``net_0``, ``resnets_1``), which is also what the old diffusers Flax classes used, so
:mod:`jaxbooth.jax_backend.weights` converts checkpoints by rule. Numerics follow the
PyTorch classes (exact GELU, two-pass GroupNorm/LayerNorm variance), not the old Flax ones,
because parity with the PyTorch models is the acceptance test.

All attention goes through :func:`jaxbooth.jax_backend.models.attention.attend`.
Imports jax/flax only; never torch.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxbooth.jax_backend.models.attention import attend

Dtype = Any

ATTENTION_NAMES = ("to_q", "to_k", "to_v", "to_out_0")


def conv2d(
    features: int,
    kernel: int,
    *,
    name: str | None = None,
    dtype: Dtype,
    param_dtype: Dtype,
    stride: int = 1,
    padding: int | str | None = None,
) -> nn.Conv:
    """A square conv with torch's symmetric padding (``(kernel - 1) // 2`` unless given)."""
    pad = (kernel - 1) // 2 if padding is None else padding
    padding_spec = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding_spec,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def group_norm(groups: int, eps: float, *, name: str | None = None, dtype: Dtype, param_dtype: Dtype) -> nn.GroupNorm:
    """``torch.nn.GroupNorm`` equivalent; two-pass variance, as torch computes it."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
    )


# ``--remat_policy``: what a rematerialised block keeps for the backward pass. "full" keeps only the block's
# inputs (diffusers' gradient checkpointing); the dots policies also keep matmul outputs, trading memory for
# not recomputing them.
REMAT_POLICIES: dict[str, Any] = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(module_cls: type[nn.Module], enabled: bool | str, static_argnums: tuple[int, ...] = ()) -> Any:
    """``nn.remat(module_cls)`` when gradient checkpointing is on; same param names either way.

    ``enabled``: False (off), True (``"full"``) or a :data:`REMAT_POLICIES` name. ``static_argnums`` counts
    ``self`` as 0 and must cover the Python-bool ``deterministic``.
    """
    if not enabled:
        return module_cls
    name = "full" if enabled is True else enabled
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {name!r}; expected one of {', '.join(REMAT_POLICIES)}")
    return nn.remat(module_cls, static_argnums=static_argnums, policy=REMAT_POLICIES[name])


def random_params(abstract: Any, rng: jax.Array | int) -> Any:
    """Random params shaped like ``abstract`` (``ShapeDtypeStruct`` leaves), drawn on the host.

    Same scheme as Flax's defaults (LeCun-normal kernels, zero biases, unit norm scales,
    normal embeddings) but drawn with NumPy: jitting a model's ``init`` just to sample
    weights costs a long XLA compile on CPU, which tiny test models should not pay.
    """
    seed = int(rng) if isinstance(rng, (int, np.integer)) else np.asarray(jax.random.key_data(rng)).ravel().tolist()
    generator = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name, shape = getattr(path[-1], "key", str(path[-1])), tuple(leaf.shape)
        if name == "kernel":
            values = generator.standard_normal(shape) / math.sqrt(max(1, math.prod(shape[:-1])))
        elif name == "embedding":
            values = generator.standard_normal(shape) / math.sqrt(shape[-1])
        else:
            values = np.ones(shape) if name == "scale" else np.zeros(shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def compute_sinusoidal_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal features ``[N] -> [N, dim]`` (float32), matching diffusers ``get_timestep_embedding``.

    Frequencies are ``exp(-log(max_period) * i / (dim // 2 - freq_shift))``; ``flip_sin_to_cos``
    puts cosines first. The operation order follows torch so fp32 results agree bit-closely.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC nearest-neighbour resize with torch ``F.interpolate(mode="nearest")`` indexing.

    Exact 2x is a repeat; other sizes (a UNet fed a size that is not a multiple of its total
    downsampling) use torch's ``floor(out_index * in / out)`` source index.
    """
    height, width = x.shape[1:3]
    if size == (2 * height, 2 * width):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

    def source_index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in / n_out)
        idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32)
        return np.minimum(idx, n_in - 1)

    x = jnp.take(x, source_index(height, size[0]), axis=1)
    return jnp.take(x, source_index(width, size[1]), axis=2)


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2`` on sinusoidal features; mirrors diffusers ``TimestepEmbedding``.

    Also serves as SDXL's ``add_embedding`` and the ``class_embedding`` of
    ``class_embed_type="timestep"/"projection"`` (same torch class there).
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with an optional time-embedding add; mirrors diffusers ``ResnetBlock2D``.

    Only ``time_embedding_norm="default"`` (the SD/SDXL/VAE choice). ``time_emb_proj`` exists when
    ``temb`` is passed (UNet) and not when it is ``None`` (VAE), as in torch with
    ``temb_channels=None``. ``conv_shortcut`` (1x1) appears when channels change.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    skip_time_act: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        residual = x
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv2d(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            t = temb if self.skip_time_act else nn.silu(temb)
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(t)
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv2d(self.out_channels, 3, name="conv2", **kw)(h)
        if residual.shape[-1] != self.out_channels:
            residual = conv2d(self.out_channels, 1, name="conv_shortcut", **kw)(residual)
        out = residual + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nn.Module):
    """Stride-2 3x3 ``conv``; mirrors diffusers ``Downsample2D(use_conv=True)``.

    ``padding=1`` (UNet) pads symmetrically; ``padding=0`` (VAE encoder) pads one row/column at the
    bottom/right only, as torch does, so odd-looking but checkpoint-exact.
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            conv = conv2d(
                self.out_channels,
                3,
                stride=2,
                padding="VALID",
                name="conv",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        else:
            conv = conv2d(
                self.out_channels,
                3,
                stride=2,
                padding=self.padding,
                name="conv",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        return conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x (or to ``output_size``), 3x3 ``conv``; mirrors diffusers ``Upsample2D(use_conv=True)``."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        size = output_size if output_size is not None else (2 * x.shape[1], 2 * x.shape[2])
        x = resize_nearest(x, tuple(size))
        return conv2d(self.out_channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


def multi_head_attention(
    hidden: jax.Array,
    context: jax.Array,
    *,
    heads: int,
    dim_head: int,
    out_features: int,
    names: tuple[str, str, str, str] = ATTENTION_NAMES,
    qkv_bias: bool = False,
    mask: jax.Array | None = None,
    upcast: bool = False,
    kernel: str = "xla",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> jax.Array:
    """q/k/v/out projections around :func:`attend`, created in the *calling* module's scope.

    A function rather than a module so the VAE's attention block can keep the old Flax layout
    (``attentions_0/query`` beside ``attentions_0/group_norm``) while the UNet's
    :class:`Attention` keeps the torch names; one implementation, two name sets.
    ``hidden``: ``[B, Lq, C]``, ``context``: ``[B, Lk, Ck]`` -> ``[B, Lq, out_features]``.
    """
    inner = heads * dim_head
    dense = lambda features, name, bias: nn.Dense(
        features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name
    )
    batch = hidden.shape[0]
    q = dense(inner, names[0], qkv_bias)(hidden).reshape(batch, -1, heads, dim_head)
    k = dense(inner, names[1], qkv_bias)(context).reshape(batch, -1, heads, dim_head)
    v = dense(inner, names[2], qkv_bias)(context).reshape(batch, -1, heads, dim_head)
    out = attend(q, k, v, kernel=kernel, mask=mask, upcast=upcast).reshape(batch, -1, inner)
    return dense(out_features, names[3], True)(out)


class Attention(nn.Module):
    """Multi-head self/cross attention; mirrors diffusers ``Attention`` inside ``BasicTransformerBlock``.

    Params ``to_q``/``to_k``/``to_v`` (no bias) and ``to_out_0``. ``upcast`` is diffusers
    ``upcast_attention`` (scores and softmax in float32). ``mask``: boolean, broadcastable to
    ``[B, heads, Lq, Lk]``, True = attend.
    """

    heads: int
    dim_head: int
    out_features: int
    upcast: bool = False
    dropout: float = 0.0
    kernel: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        out = multi_head_attention(
            x,
            x if context is None else context,
            heads=self.heads,
            dim_head=self.dim_head,
            out_features=self.out_features,
            mask=mask,
            upcast=self.upcast,
            kernel=self.kernel,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class GEGLU(nn.Module):
    """``proj`` to ``2 * features``, then ``value * gelu(gate)``; mirrors diffusers ``GEGLU``.

    Exact (erf) GELU as torch's ``F.gelu``; the old Flax class used the tanh approximation.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(x, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU ``net_0``, dropout, Dense ``net_2``; mirrors diffusers ``FeedForward(activation_fn="geglu")``."""

    dim: int
    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return nn.Dense(self.dim, name="net_2", **kw)(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attn, cross-attn, GEGLU MLP; mirrors diffusers ``BasicTransformerBlock`` (layer_norm).

    With ``only_cross_attention`` the first attention also reads ``context`` (and, as in torch,
    gets no mask: diffusers passes it ``attention_mask``, not the encoder mask).
    """

    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dropout: float = 0.0
    attention_kernel: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, mask: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attn = lambda name: Attention(
            self.heads,
            self.dim_head,
            self.dim,
            upcast=self.upcast_attention,
            dropout=self.dropout,
            kernel=self.attention_kernel,
            name=name,
            **kw,
        )
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kw)
        self_context = context if self.only_cross_attention else None
        x = x + attn("attn1")(norm("norm1")(x), self_context, None, deterministic)
        x = x + attn("attn2")(norm("norm2")(x), context, mask, deterministic)
        return x + FeedForward(self.dim, dropout=self.dropout, name="ff", **kw)(norm("norm3")(x), deterministic)


class Transformer2DModel(nn.Module):
    """Norm, proj_in, transformer blocks, proj_out, residual; mirrors diffusers ``Transformer2DModel``.

    ``use_linear_projection`` (SD2/SDXL) makes ``proj_in``/``proj_out`` Dense layers on tokens;
    otherwise (SD1) they are 1x1 convs on the NHWC map. ``gradient_checkpointing`` remats each
    :class:`BasicTransformerBlock`, like diffusers does.
    """

    heads: int
    dim_head: int
    depth: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dropout: float = 0.0
    attention_kernel: str = "xla"
    gradient_checkpointing: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, mask: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        batch, height, width, channels = x.shape
        inner = self.heads * self.dim_head
        residual = x
        h = group_norm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            project = lambda features, name: nn.Dense(features, name=name, **kw)
            h = project(inner, "proj_in")(h.reshape(batch, height * width, channels))
        else:
            project = lambda features, name: conv2d(features, 1, name=name, **kw)
            h = project(inner, "proj_in")(h).reshape(batch, height * width, inner)
        block_cls = maybe_remat(BasicTransformerBlock, self.gradient_checkpointing, static_argnums=(4,))
        for i in range(self.depth):
            h = block_cls(
                inner,
                self.heads,
                self.dim_head,
                only_cross_attention=self.only_cross_attention,
                upcast_attention=self.upcast_attention,
                dropout=self.dropout,
                attention_kernel=self.attention_kernel,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, context, mask, deterministic)
        if self.use_linear_projection:
            h = project(channels, "proj_out")(h).reshape(batch, height, width, channels)
        else:
            h = project(channels, "proj_out")(h.reshape(batch, height, width, inner))
        return h + residual
