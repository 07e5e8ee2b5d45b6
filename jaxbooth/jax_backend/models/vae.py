"""``FlaxAutoencoderKL``: the Stable Diffusion VAE (image <-> latent), from diffusers' ``config.json``.

Mirrors diffusers ``AutoencoderKL`` (parity-tested in ``tests/jax_backend/models/test_vae.py``).
Layout: images and latents are **NHWC** (channels last).

``scaling_factor`` (and ``shift_factor``) are exposed from the config but NOT applied inside
:meth:`FlaxAutoencoderKL.encode`/:meth:`~FlaxAutoencoderKL.decode`, exactly as in diffusers:
the trainer computes ``(latents - shift) * scale`` after encoding and the sampler undoes it
before decoding. ``force_upcast`` is ignored (choose ``dtype`` instead).

Param names follow the old diffusers ``FlaxAutoencoderKL``, which differ from torch only in
the mid-block attention (``query``/``key``/``value``/``proj_attn`` vs torch's
``to_q``/``to_k``/``to_v``/``to_out.0``); :data:`TORCH_TO_FLAX_RENAMES` and
:data:`FLAX_TO_TORCH_RENAMES` bridge that, so old Flax msgpack checkpoints load unchanged.
Imports jax/flax only; never torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.models.blocks import (
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
    group_norm,
    multi_head_attention,
    random_params,
)

__all__ = [
    "FLAX_TO_TORCH_RENAMES",
    "TORCH_TO_FLAX_RENAMES",
    "DiagonalGaussian",
    "FlaxAutoencoderKL",
    "VAEConfig",
    "abstract_params",
    "init_params",
    "vae_config_from_dict",
]

_OLD_FLAX_ATTENTION_NAMES = ("query", "key", "value", "proj_attn")
_TORCH_ATTENTION_NAMES = ("to_q", "to_k", "to_v", "to_out.0")
TORCH_TO_FLAX_RENAMES: tuple[tuple[str, str], ...] = tuple(
    (rf"(mid_block\.attentions\.\d+)\.{torch_name.replace('.', '[.]')}\.", rf"\1.{flax_name}.")
    for torch_name, flax_name in zip(_TORCH_ATTENTION_NAMES, _OLD_FLAX_ATTENTION_NAMES, strict=True)
)
FLAX_TO_TORCH_RENAMES: tuple[tuple[str, str], ...] = tuple(
    (rf"(mid_block\.attentions\.\d+)\.{flax_name}\.", rf"\1.{torch_name}.")
    for torch_name, flax_name in zip(_TORCH_ATTENTION_NAMES, _OLD_FLAX_ATTENTION_NAMES, strict=True)
)

_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """A supported diffusers ``AutoencoderKL`` config (field names are diffusers')."""

    in_channels: int
    out_channels: int
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    sample_size: int | tuple[int, int]
    scaling_factor: float
    shift_factor: float | None
    latents_mean: tuple[float, ...] | None
    latents_std: tuple[float, ...] | None
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_block_add_attention: bool


def vae_config_from_dict(d: Mapping[str, Any], *, source: str = "vae/config.json") -> VAEConfig:
    """Check a diffusers ``AutoencoderKL`` config dict; unsupported values raise JaxboothError."""
    m = {**_DEFAULTS, **{k: v for k, v in d.items() if k in _DEFAULTS}}
    fix = "Fix: use a Stable Diffusion-style AutoencoderKL config."
    if m["act_fn"] not in ("silu", "swish"):
        raise JaxboothError(
            f"{source}: act_fn={m['act_fn']!r} is not supported; jaxbooth supports 'silu'. {fix}"
        )
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for block in m[key]:
            if block != allowed:
                raise JaxboothError(
                    f"{source}: {key} contains {block!r}; jaxbooth supports only {allowed!r}. {fix}"
                )
        if len(m[key]) != len(m["block_out_channels"]):
            raise JaxboothError(
                f"{source}: {key} has {len(m[key])} entries but block_out_channels has "
                f"{len(m['block_out_channels'])}; they must match."
            )
    optional_tuple = lambda v: None if v is None else tuple(float(x) for x in v)
    return VAEConfig(
        in_channels=int(m["in_channels"]),
        out_channels=int(m["out_channels"]),
        down_block_types=tuple(m["down_block_types"]),
        up_block_types=tuple(m["up_block_types"]),
        block_out_channels=tuple(int(c) for c in m["block_out_channels"]),
        layers_per_block=int(m["layers_per_block"]),
        latent_channels=int(m["latent_channels"]),
        norm_num_groups=int(m["norm_num_groups"]),
        sample_size=tuple(m["sample_size"]) if isinstance(m["sample_size"], list) else m["sample_size"],
        scaling_factor=float(m["scaling_factor"]),
        shift_factor=None if m["shift_factor"] is None else float(m["shift_factor"]),
        latents_mean=optional_tuple(m["latents_mean"]),
        latents_std=optional_tuple(m["latents_std"]),
        use_quant_conv=bool(m["use_quant_conv"]),
        use_post_quant_conv=bool(m["use_post_quant_conv"]),
        mid_block_add_attention=bool(m["mid_block_add_attention"]),
    )


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior ``N(mean, exp(logvar))``; mirrors diffusers ``DiagonalGaussianDistribution``.

    NHWC ``[B, h, w, latent_channels]`` each; ``logvar`` is clipped to [-30, 20] like diffusers.
    A pytree, so it can leave a ``jax.jit``.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """``mean + std * eps`` with ``eps ~ N(0, 1)`` drawn from ``rng`` (in ``mean``'s dtype)."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL to the standard normal, summed over each example: ``[B]``."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class VAEAttentionBlock(nn.Module):
    """Single-head spatial self-attention with a residual; mirrors the VAE's diffusers ``Attention``
    (``residual_connection=True``, ``upcast_softmax=True``), with the old Flax names
    (``group_norm``, ``query``, ``key``, ``value``, ``proj_attn``; all with bias)."""

    groups: int
    kernel: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = group_norm(self.groups, 1e-6, name="group_norm", dtype=self.dtype, param_dtype=self.param_dtype)(
            x
        )
        h = h.reshape(batch, height * width, channels)
        h = multi_head_attention(
            h,
            h,
            heads=1,
            dim_head=channels,
            out_features=channels,
            names=_OLD_FLAX_ATTENTION_NAMES,
            qkv_bias=True,
            upcast=True,
            kernel=self.kernel,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        return h.reshape(batch, height, width, channels) + x


class VAEMidBlock(nn.Module):
    """Resnet, attention, resnet (no time embedding); mirrors diffusers ``UNetMidBlock2D`` in the VAE."""

    config: VAEConfig
    kernel: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        channels, groups = self.config.block_out_channels[-1], self.config.norm_num_groups
        x = ResnetBlock2D(channels, groups=groups, eps=1e-6, name="resnets_0", **kw)(x)
        if self.config.mid_block_add_attention:
            x = VAEAttentionBlock(groups, kernel=self.kernel, name="attentions_0", **kw)(x)
        return ResnetBlock2D(channels, groups=groups, eps=1e-6, name="resnets_1", **kw)(x)


class VAEResnetStack(nn.Module):
    """Resnets then an optional resampler; mirrors diffusers ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``.

    ``resample="down"``: stride-2 conv padded at the bottom/right (``downsamplers_0``);
    ``"up"``: nearest 2x + conv (``upsamplers_0``); ``None``: the last block has neither.
    """

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        for layer in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=1e-6, name=f"resnets_{layer}", **kw)(
                x
            )
        if self.resample == "down":
            x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class VAEEncoder(nn.Module):
    """Image -> posterior moments (2 * latent_channels); mirrors diffusers ``Encoder(double_z=True)``."""

    config: VAEConfig
    kernel: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = conv2d(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = VAEResnetStack(
                channels,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                "down" if i < last else None,
                name=f"down_blocks_{i}",
                **kw,
            )(x)
        x = VAEMidBlock(cfg, kernel=self.kernel, name="mid_block", **kw)(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return conv2d(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class VAEDecoder(nn.Module):
    """Latent -> image; mirrors diffusers ``Decoder``: each up block has ``layers_per_block + 1`` resnets."""

    config: VAEConfig
    kernel: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = conv2d(cfg.block_out_channels[-1], 3, name="conv_in", **kw)(z)
        x = VAEMidBlock(cfg, kernel=self.kernel, name="mid_block", **kw)(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(reversed(cfg.block_out_channels)):
            x = VAEResnetStack(
                channels,
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                "up" if i < last else None,
                name=f"up_blocks_{i}",
                **kw,
            )(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return conv2d(cfg.out_channels, 3, name="conv_out", **kw)(x)


class FlaxAutoencoderKL(nn.Module):
    """KL autoencoder; mirrors diffusers ``AutoencoderKL``. NHWC in and out.

    Attributes: ``config``; ``dtype`` (compute); ``param_dtype``; ``attention_kernel`` (see
    ``attention.attend``). Call :meth:`encode` / :meth:`decode` through ``apply``::

        posterior = vae.apply({"params": params}, images_nhwc, method=vae.encode)
        latents = posterior.sample(rng) * vae.scaling_factor   # the caller scales
        images = vae.apply({"params": params}, latents / vae.scaling_factor, method=vae.decode)
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_kernel: str = "xla"

    def setup(self) -> None:
        cfg, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.encoder = VAEEncoder(cfg, kernel=self.attention_kernel, **kw)
        self.decoder = VAEDecoder(cfg, kernel=self.attention_kernel, **kw)
        latent = cfg.latent_channels
        self.quant_conv = conv2d(2 * latent, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = conv2d(latent, 1, **kw) if cfg.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        """Multiply sampled latents by this before the UNet (diffusers applies it outside the VAE too)."""
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float | None:
        """Subtract before scaling when set (SD3/Flux-style VAEs); ``None`` for SD 1.x/2.x/XL."""
        return self.config.shift_factor

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """NHWC images ``[B, H, W, in_channels]`` in [-1, 1] -> posterior over NHWC latents."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, latents: jax.Array) -> jax.Array:
        """NHWC unscaled latents -> NHWC images ``[B, H, W, out_channels]`` (roughly [-1, 1])."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(
        self, images: jax.Array, sample_posterior: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        """Reconstruct ``images`` (posterior mode, or a sample with ``rng``); also what ``init`` traces."""
        posterior = self.encode(images)
        latents = posterior.sample(rng) if sample_posterior else posterior.mode()
        return self.decode(latents)


def _dummy_images(config: VAEConfig) -> jax.Array:
    """Smallest valid input (the total stride); param shapes do not depend on the spatial size."""
    size = 2 ** (len(config.block_out_channels) - 1)
    return jnp.zeros((1, size, size, config.in_channels), jnp.float32)


def abstract_params(config: VAEConfig, dtype: Dtype = jnp.float32) -> dict:
    """The param tree as ``jax.ShapeDtypeStruct`` leaves, for loading and sharding."""
    model = FlaxAutoencoderKL(config, param_dtype=dtype)
    return jax.eval_shape(lambda rng: model.init(rng, _dummy_images(config))["params"], jax.random.key(0))


def init_params(config: VAEConfig, rng: jax.Array | int, dtype: Dtype = jnp.float32) -> dict:
    """Random params for tiny test models (see :func:`jaxbooth.jax_backend.models.blocks.random_params`)."""
    return random_params(abstract_params(config, dtype), rng)
