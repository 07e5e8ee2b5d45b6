"""The UNet's down, mid and up blocks, configured from a :class:`UNetConfig` and a block index.

One down and one up module each cover diffusers' plain and cross-attention variants
(``DownBlock2D``/``CrossAttnDownBlock2D``, ``UpBlock2D``/``CrossAttnUpBlock2D``): they differ
only in whether ``attentions_i`` follow the resnets, which the config's block type says.
Arrays are NHWC. Param names match diffusers (``resnets_0``, ``attentions_0``,
``downsamplers_0/conv``, ``upsamplers_0/conv``). Imports jax/flax only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbooth.jax_backend.models.blocks import (
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    Transformer2DModel,
    Upsample2D,
    maybe_remat,
)
from jaxbooth.jax_backend.models.unet_config import UNetConfig


class _UNetBlock(nn.Module):
    """Fields and layer factories shared by the UNet's blocks."""

    config: UNetConfig
    index: int = 0
    attention_kernel: str = "xla"
    gradient_checkpointing: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _resnet(self, out_channels: int, name: str, output_scale_factor: float = 1.0) -> nn.Module:
        # static_argnums=(3,): `deterministic` (self is 0) is a Python bool under remat.
        cls = maybe_remat(ResnetBlock2D, self.gradient_checkpointing, static_argnums=(3,))
        cfg = self.config
        return cls(
            out_channels,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            dropout=cfg.dropout,
            output_scale_factor=output_scale_factor,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _transformer(self, channels: int, heads: int, depth: int, only_cross: bool, name: str) -> nn.Module:
        cfg = self.config
        return Transformer2DModel(
            heads,
            channels // heads,
            depth=depth,
            norm_num_groups=cfg.norm_num_groups,
            use_linear_projection=cfg.use_linear_projection,
            only_cross_attention=only_cross,
            upcast_attention=cfg.upcast_attention,
            dropout=cfg.dropout,
            attention_kernel=self.attention_kernel,
            gradient_checkpointing=self.gradient_checkpointing,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


class UNetDownBlock(_UNetBlock):
    """Resnets (each followed by a transformer in ``CrossAttnDownBlock2D``), then a stride-2 conv.

    Mirrors diffusers ``DownBlock2D`` and ``CrossAttnDownBlock2D``. Returns the block output and
    the skip tensors the up path consumes (one per layer, plus the downsampled map).
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        temb: jax.Array,
        context: jax.Array,
        mask: jax.Array | None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        cfg, i = self.config, self.index
        channels = cfg.block_out_channels[i]
        cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        skips = []
        for layer in range(cfg.layers_per_block[i]):
            x = self._resnet(channels, f"resnets_{layer}")(x, temb, deterministic)
            if cross:
                transformer = self._transformer(
                    channels,
                    cfg.num_attention_heads[i],
                    cfg.transformer_layers_per_block[i][layer],
                    cfg.only_cross_attention[i],
                    f"attentions_{layer}",
                )
                x = transformer(x, context, mask, deterministic)
            skips.append(x)
        if i < len(cfg.down_block_types) - 1:
            x = Downsample2D(
                channels,
                padding=cfg.downsample_padding,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="downsamplers_0",
            )(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(_UNetBlock):
    """Resnet, then (transformer, resnet); mirrors diffusers ``UNetMidBlock2DCrossAttn`` (one layer).

    Its resnets divide by ``mid_block_scale_factor`` (1 in every SD config).
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        temb: jax.Array,
        context: jax.Array,
        mask: jax.Array | None,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels[-1]
        scale = cfg.mid_block_scale_factor
        x = self._resnet(channels, "resnets_0", scale)(x, temb, deterministic)
        x = self._transformer(
            channels, cfg.num_attention_heads[-1], cfg.mid_transformer_layers, False, "attentions_0"
        )(x, context, mask, deterministic)
        return self._resnet(channels, "resnets_1", scale)(x, temb, deterministic)


class UNetUpBlock(_UNetBlock):
    """Concatenate a skip, resnet (+ transformer in ``CrossAttnUpBlock2D``), repeat; then upsample.

    Mirrors diffusers ``UpBlock2D`` and ``CrossAttnUpBlock2D``. ``skips`` are this block's skip
    tensors in down-path order (consumed last first); ``upsample_size`` is the spatial size
    of the next skip, which equals 2x except for inputs not divisible by the total stride.
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array,
        mask: jax.Array | None,
        deterministic: bool = True,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        cfg, i = self.config, self.index
        channels = cfg.up_block_out_channels[i]
        cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        for layer in range(cfg.up_layers_per_block[i]):
            x = jnp.concatenate([x, skips[-1 - layer]], axis=-1)
            x = self._resnet(channels, f"resnets_{layer}")(x, temb, deterministic)
            if cross:
                transformer = self._transformer(
                    channels,
                    cfg.up_num_attention_heads[i],
                    cfg.reverse_transformer_layers_per_block[i][layer],
                    cfg.up_only_cross_attention[i],
                    f"attentions_{layer}",
                )
                x = transformer(x, context, mask, deterministic)
        if i < len(cfg.up_block_types) - 1:
            x = Upsample2D(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")(
                x, upsample_size
            )
        return x
