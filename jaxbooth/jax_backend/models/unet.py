"""``FlaxUNet2DConditionModel``: the SD 1.x / 2.x / XL denoiser, configured from diffusers' ``config.json``.

Mirrors diffusers ``UNet2DConditionModel`` (parity-tested in
``tests/jax_backend/models/test_unet.py``); one module serves every variant, the config
fields (``use_linear_projection``, per-block heads, ``transformer_layers_per_block``,
``addition_embed_type="text_time"``, ...) select the differences.

Layout: ``sample`` and the returned noise prediction are **NHWC** (channels last), unlike
diffusers' NCHW; ``encoder_hidden_states`` is ``[batch, tokens, cross_attention_dim]``.
Param names equal diffusers' torch names with ``.N`` written ``_N`` (also the old diffusers
Flax names), so :func:`jaxbooth.jax_backend.weights.torch_state_to_flax` needs no renames here.
Imports jax/flax only; never torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbooth.jax_backend.models.blocks import (
    Dtype,
    TimestepEmbedding,
    compute_sinusoidal_embedding,
    conv2d,
    group_norm,
    random_params,
)
from jaxbooth.jax_backend.models.unet_blocks import UNetDownBlock, UNetMidBlock2DCrossAttn, UNetUpBlock
from jaxbooth.jax_backend.models.unet_config import UNetConfig, unet_config_from_dict

__all__ = [
    "FLAX_TO_TORCH_RENAMES",
    "TORCH_TO_FLAX_RENAMES",
    "FlaxUNet2DConditionModel",
    "UNetConfig",
    "abstract_params",
    "init_params",
    "unet_config_from_dict",
]

# The UNet's Flax names already match torch's (see module docstring).
TORCH_TO_FLAX_RENAMES: tuple[tuple[str, str], ...] = ()
FLAX_TO_TORCH_RENAMES: tuple[tuple[str, str], ...] = ()


class FlaxUNet2DConditionModel(nn.Module):
    """Noise-prediction UNet; mirrors diffusers ``UNet2DConditionModel``.

    Attributes:
        config: the checked diffusers config (:func:`unet_config_from_dict`).
        dtype: computation dtype (e.g. ``jnp.bfloat16`` for mixed precision); norms reduce in float32.
        param_dtype: dtype of freshly initialised params.
        attention_kernel: ``"auto"``, ``"xla"``, ``"dot_product"``, ``"flash"`` or ``"chunked"``
            (see ``attention.attend``).
        gradient_checkpointing: remat every resnet and transformer block (as diffusers'
            ``enable_gradient_checkpointing``): less activation memory, one extra forward in backprop;
            a ``blocks.REMAT_POLICIES`` name picks what each block keeps (``--remat_policy``).

    Use ``model.apply({"params": params}, sample_nhwc, timesteps, encoder_hidden_states, ...)``;
    pass ``rngs={"dropout": key}`` with ``train=True`` when the config has ``dropout > 0``.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_kernel: str = "xla"
    gradient_checkpointing: bool | str = False

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
        *,
        added_cond_kwargs: Mapping[str, jax.Array] | None = None,
        class_labels: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """Predict noise (or v) for NHWC ``sample`` ``[B, H, W, in_channels]`` -> ``[B, H, W, out_channels]``.

        ``timesteps``: scalar or ``[B]``. ``added_cond_kwargs``: ``{"text_embeds": [B, D],
        "time_ids": [B, k]}`` for ``addition_embed_type="text_time"`` (SDXL). ``class_labels``:
        ``[B]`` for ``class_embed_type="timestep"`` or ``num_class_embeds``, ``[B, D]`` for
        identity/projection. ``encoder_attention_mask``: ``[B, tokens]``, 1/True = attend.
        """
        cfg = self.config
        deterministic = not train
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self._embed(sample.shape[0], timesteps, added_cond_kwargs, class_labels)
        mask = None
        if encoder_attention_mask is not None:
            mask = jnp.asarray(encoder_attention_mask).astype(bool)[:, None, None, :]
        block_kw = {
            "attention_kernel": self.attention_kernel,
            "gradient_checkpointing": self.gradient_checkpointing,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        x = conv2d(
            cfg.block_out_channels[0],
            cfg.conv_in_kernel,
            name="conv_in",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(sample)
        skips = [x]
        for i in range(len(cfg.down_block_types)):
            x, block_skips = UNetDownBlock(cfg, i, name=f"down_blocks_{i}", **block_kw)(
                x, temb, encoder_hidden_states, mask, deterministic
            )
            skips.extend(block_skips)
        if cfg.mid_block_type is not None:
            x = UNetMidBlock2DCrossAttn(cfg, name="mid_block", **block_kw)(
                x, temb, encoder_hidden_states, mask, deterministic
            )
        x = self._up_path(x, skips, temb, encoder_hidden_states, mask, deterministic, block_kw)
        x = group_norm(
            cfg.norm_num_groups,
            cfg.norm_eps,
            name="conv_norm_out",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)
        return conv2d(
            cfg.out_channels,
            cfg.conv_out_kernel,
            name="conv_out",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(nn.silu(x))

    def _up_path(
        self,
        x: jax.Array,
        skips: list[jax.Array],
        temb: jax.Array,
        context: jax.Array,
        mask: jax.Array | None,
        deterministic: bool,
        block_kw: dict,
    ) -> jax.Array:
        """Up blocks, each eating its skips from the end of ``skips`` (diffusers' order)."""
        cfg = self.config
        for i, n_skips in enumerate(cfg.up_layers_per_block):
            block_skips, skips = tuple(skips[-n_skips:]), skips[:-n_skips]
            # Resize to the next skip's size: 2x normally, exact for sizes the stride does not divide.
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            x = UNetUpBlock(cfg, i, name=f"up_blocks_{i}", **block_kw)(
                x, block_skips, temb, context, mask, deterministic, upsample_size
            )
        return x

    def _time_proj(self, values: jax.Array) -> jax.Array:
        """diffusers ``Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)``."""
        cfg = self.config
        return compute_sinusoidal_embedding(
            values, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        ).astype(self.dtype)

    def _embed(
        self,
        batch: int,
        timesteps: jax.Array | float | int,
        added_cond_kwargs: Mapping[str, jax.Array] | None,
        class_labels: jax.Array | None,
    ) -> jax.Array:
        """Time embedding + optional class and SDXL ``text_time`` embeddings, ``[B, time_embed_dim]``."""
        cfg = self.config
        t = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(timesteps, jnp.float32)), (batch,))
        emb = TimestepEmbedding(
            cfg.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="time_embedding"
        )(self._time_proj(t))
        class_emb = self._class_embed(class_labels)
        if class_emb is not None:
            emb = emb + class_emb
        if cfg.addition_embed_type == "text_time":
            emb = emb + self._text_time_embed(added_cond_kwargs)
        return emb

    def _class_embed(self, class_labels: jax.Array | None) -> jax.Array | None:
        """diffusers ``class_embedding``: timestep/identity/projection, or a ``num_class_embeds`` table."""
        cfg = self.config
        if cfg.class_embed_type is None and cfg.num_class_embeds is None:
            return None
        if class_labels is None:
            raise ValueError(
                f"class_labels is required: the UNet config sets class_embed_type="
                f"{cfg.class_embed_type!r}, num_class_embeds={cfg.num_class_embeds!r}"
            )
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "name": "class_embedding"}
        if cfg.class_embed_type == "timestep":
            return TimestepEmbedding(cfg.time_embed_dim, **kw)(self._time_proj(jnp.ravel(class_labels)))
        if cfg.class_embed_type == "identity":
            return jnp.asarray(class_labels, self.dtype)
        if cfg.class_embed_type == "projection":
            return TimestepEmbedding(cfg.time_embed_dim, **kw)(jnp.asarray(class_labels, self.dtype))
        return nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, **kw)(jnp.asarray(class_labels, jnp.int32))

    def _text_time_embed(self, added_cond_kwargs: Mapping[str, jax.Array] | None) -> jax.Array:
        """SDXL: sinusoids of each ``time_ids`` entry after ``text_embeds``, through ``add_embedding``."""
        cfg = self.config
        missing = [k for k in ("text_embeds", "time_ids") if not added_cond_kwargs or k not in added_cond_kwargs]
        if missing:
            raise ValueError(f"added_cond_kwargs needs {missing}: the UNet config sets addition_embed_type='text_time'")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = compute_sinusoidal_embedding(
            jnp.ravel(time_ids),
            cfg.addition_time_embed_dim,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )
        time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
        add_embeds = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), time_embeds], axis=-1)
        return TimestepEmbedding(
            cfg.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="add_embedding"
        )(add_embeds.astype(self.dtype))


def dummy_inputs(config: UNetConfig) -> tuple[tuple[jax.Array, ...], dict[str, object]]:
    """Smallest valid inputs for ``init``: every param shape follows from them.

    The spatial size is the total stride (``2 ** (blocks - 1)``), not ``sample_size``: param
    shapes do not depend on it, and tracing stays cheap for SDXL-sized configs.
    """
    size = 2 ** (len(config.block_out_channels) - 1)
    args = (
        jnp.zeros((1, size, size, config.in_channels), jnp.float32),
        jnp.ones((1,), jnp.float32),
        jnp.zeros((1, 1, config.encoder_hidden_dim), jnp.float32),
    )
    kwargs: dict[str, object] = {}
    if config.addition_embed_type == "text_time":
        # add_embedding's input width is all that matters, so one time id carries the rest as text.
        text_dim = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": jnp.zeros((1, text_dim), jnp.float32),
            "time_ids": jnp.zeros((1, 1), jnp.float32),
        }
    if config.class_embed_type == "identity":
        kwargs["class_labels"] = jnp.zeros((1, config.time_embed_dim), jnp.float32)
    elif config.class_embed_type == "projection":
        kwargs["class_labels"] = jnp.zeros((1, config.projection_class_embeddings_input_dim), jnp.float32)
    elif config.class_embed_type == "timestep" or config.num_class_embeds is not None:
        kwargs["class_labels"] = jnp.zeros((1,), jnp.int32)
    return args, kwargs


def abstract_params(config: UNetConfig, dtype: Dtype = jnp.float32) -> dict:
    """The param tree as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute): for loading and sharding."""
    model = FlaxUNet2DConditionModel(config, param_dtype=dtype)
    args, kwargs = dummy_inputs(config)
    return jax.eval_shape(lambda rng: model.init(rng, *args, **kwargs)["params"], jax.random.key(0))


def init_params(config: UNetConfig, rng: jax.Array | int, dtype: Dtype = jnp.float32) -> dict:
    """Random params for tiny test models (see :func:`jaxbooth.jax_backend.models.blocks.random_params`)."""
    return random_params(abstract_params(config, dtype), rng)
