"""Flax (linen) CLIP text encoder: SD 1.x/2.x ``text_encoder`` and SDXL's two encoders.

transformers 5 removed ``FlaxCLIPTextModel``, so jaxbooth owns this one. It mirrors the
PyTorch reference, transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``
(pre-LN transformer, causal attention, EOS pooling), and is parity-tested against it in
``tests/jax_backend/models/test_clip.py``.

Parameter paths keep the old transformers Flax names (``text_model/encoder/layers/0/
self_attn/q_proj/kernel``, ``text_model/embeddings/token_embedding/embedding``,
``text_model/final_layer_norm/scale``, ``text_projection/kernel``), so old
``flax_model.msgpack`` files load as is and torch checkpoints convert through the shared
rules in :mod:`jaxbooth.jax_backend.weights`.

Imports jax/flax/numpy only; never torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.models.attention import attend
from jaxbooth.jax_backend.models.blocks import maybe_remat

# transformers 5 ``CLIPTextModel.save_pretrained`` writes keys without the ``text_model.``
# prefix (its loader strips it from older files), while every published SD/SDXL
# checkpoint and ``CLIPTextModelWithProjection`` keep it. Our tree always has the
# ``text_model`` level, so add the prefix where it is missing.
TORCH_TO_FLAX_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(?!text_model\.|text_projection\.)", "text_model."),
)
# Export with the prefix: the layout of published checkpoints, which transformers 4 and 5
# both load.
FLAX_TO_TORCH_RENAMES: tuple[tuple[str, str], ...] = ()

SUPPORTED_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# transformers ACT2FN names -> jax. SD 1.x uses quick_gelu; SD 2.x and SDXL use exact gelu.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
# transformers' fix for old configs (PR #24773): eos_token_id == 2 means "pool at argmax(ids)".
_LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers ``CLIPTextConfig`` that change the text encoder's maths.

    Defaults are transformers' (openai/clip-vit-base-patch32). Frozen and hashable, so it
    can be a static field of a linen module.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    """Width of ``text_projection`` (only used by the projection variant)."""
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    """Pooling position: 2 means argmax(input_ids) (legacy configs), else first id == eos."""
    architectures: tuple[str, ...] = ("CLIPTextModel",)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projection(self) -> bool:
        """True for SDXL's ``text_encoder_2`` (``CLIPTextModelWithProjection``)."""
        return "CLIPTextModelWithProjection" in self.architectures


def _check_int(d: Mapping[str, Any], key: str, source: str, *, minimum: int) -> None:
    value = d.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise JaxboothError(f"{source}: {key}={value!r} must be an integer >= {minimum}")


def _validate_clip_dict(d: Mapping[str, Any], source: str) -> None:
    """Reject configs this encoder would silently get wrong; each message names the key."""
    if "text_config" in d:
        raise JaxboothError(
            f"{source}: this is a full CLIPModel config (it has 'text_config'); "
            "point at the text encoder's config.json (e.g. <model>/text_encoder/config.json)"
        )
    archs = d.get("architectures") or []
    unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unknown:
        raise JaxboothError(
            f"{source}: architectures={list(archs)} is not supported; expected one of "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    act = d.get("hidden_act", CLIPTextConfig.hidden_act)
    if act not in _ACTIVATIONS:
        raise JaxboothError(
            f"{source}: hidden_act={act!r} is not supported; use one of {sorted(_ACTIVATIONS)}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"):
        _check_int(d, key, source, minimum=1)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        _check_int(d, key, source, minimum=0)
    if "eos_token_id" in d and d["eos_token_id"] is None:
        raise JaxboothError(f"{source}: eos_token_id=None; the pooled output needs the EOS token id")
    hidden = d.get("hidden_size", CLIPTextConfig.hidden_size)
    heads = d.get("num_attention_heads", CLIPTextConfig.num_attention_heads)
    if hidden % heads:
        raise JaxboothError(
            f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}"
        )
    dropout = d.get("attention_dropout") or 0.0
    if dropout != 0.0:
        raise JaxboothError(
            f"{source}: attention_dropout={dropout} is not supported (this encoder has no dropout, "
            "like every SD/SDXL text encoder); set it to 0.0"
        )


def clip_config_from_dict(
    d: Mapping[str, Any], *, source: str = "text_encoder/config.json"
) -> CLIPTextConfig:
    """Read a transformers ``CLIPTextConfig`` dict (``text_encoder/config.json`` as is).

    Keys that do not change the encoder's maths (``initializer_range``, ``dtype``, ...) are
    ignored; unsupported values raise :class:`JaxboothError` naming the key.
    """
    _validate_clip_dict(d, source)
    kwargs = {f.name: d[f.name] for f in dataclasses.fields(CLIPTextConfig) if d.get(f.name) is not None}
    if "layer_norm_eps" in kwargs:
        kwargs["layer_norm_eps"] = float(kwargs["layer_norm_eps"])
    if "architectures" in kwargs:
        kwargs["architectures"] = tuple(kwargs["architectures"])
    return CLIPTextConfig(**kwargs)


@struct.dataclass
class CLIPTextOutput:
    """Mirrors transformers ``BaseModelOutputWithPooling`` / ``CLIPTextModelOutput``.

    ``hidden_states`` (when requested) is the embeddings output followed by every encoder
    layer's output, before ``final_layer_norm``; SDXL conditions on ``hidden_states[-2]``.
    ``text_embeds`` is set by the projection variant only.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


class _CLIPModule(nn.Module):
    """Fields every CLIP module shares, declared once and handed down by :meth:`settings`.

    ``dtype`` is the compute dtype, ``param_dtype`` the stored one; ``attention_kernel``
    goes to :func:`attend`; ``gradient_checkpointing`` remats each encoder layer.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_kernel: str = "xla"
    gradient_checkpointing: bool | str = False  # or a blocks.REMAT_POLICIES name

    def settings(self) -> dict[str, Any]:
        return {"config": self.config, "dtype": self.dtype, "param_dtype": self.param_dtype,
                "attention_kernel": self.attention_kernel,
                "gradient_checkpointing": self.gradient_checkpointing}

    def dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
        return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=name)

    def layer_norm(self, name: str) -> nn.LayerNorm:
        # Two-pass variance like torch.nn.LayerNorm; the fast E[x^2]-E[x]^2 form drifts.
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype,
                            param_dtype=self.param_dtype, use_fast_variance=False, name=name)


class CLIPAttention(_CLIPModule):
    """transformers ``CLIPAttention`` (causal self-attention), softmax via :func:`attend`."""

    @nn.compact
    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, length, width = hidden_states.shape
        heads = (batch, length, self.config.num_attention_heads, self.config.head_dim)
        query = self.dense(width, "q_proj")(hidden_states).reshape(heads)
        key = self.dense(width, "k_proj")(hidden_states).reshape(heads)
        value = self.dense(width, "v_proj")(hidden_states).reshape(heads)
        out = attend(query, key, value, kernel=self.attention_kernel, mask=mask, is_causal=True)
        return self.dense(width, "out_proj")(out.reshape(batch, length, width))


class CLIPMLP(_CLIPModule):
    """transformers ``CLIPMLP``: fc1 -> activation -> fc2."""

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden_states = self.dense(self.config.intermediate_size, "fc1")(hidden_states)
        hidden_states = _ACTIVATIONS[self.config.hidden_act](hidden_states)
        return self.dense(self.config.hidden_size, "fc2")(hidden_states)


class CLIPEncoderLayer(_CLIPModule):
    """transformers ``CLIPEncoderLayer``: pre-LN attention and MLP, each with a residual."""

    @nn.compact
    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
        attn = CLIPAttention(**self.settings(), name="self_attn")
        hidden_states = hidden_states + attn(self.layer_norm("layer_norm1")(hidden_states), mask)
        mlp = CLIPMLP(**self.settings(), name="mlp")
        return hidden_states + mlp(self.layer_norm("layer_norm2")(hidden_states))


class _CLIPLayers(_CLIPModule):
    """The ``encoder/layers/<i>`` level of the old Flax tree (``FlaxCLIPLayerCollection``)."""

    @nn.compact
    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        """Returns the input and every layer's output (``num_hidden_layers + 1`` arrays)."""
        # remat per layer: only layer inputs are kept; the backward pass recomputes the rest.
        layer_cls = maybe_remat(CLIPEncoderLayer, self.gradient_checkpointing)
        states = [hidden_states]
        for i in range(self.config.num_hidden_layers):
            states.append(layer_cls(**self.settings(), name=str(i))(states[-1], mask))
        return tuple(states)


class _CLIPEncoder(_CLIPModule):
    """transformers ``CLIPEncoder``; only a naming level (``encoder/layers``) here."""

    @nn.compact
    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        return _CLIPLayers(**self.settings(), name="layers")(hidden_states, mask)


class CLIPTextEmbeddings(_CLIPModule):
    """transformers ``CLIPTextEmbeddings``: token + learned absolute position embeddings."""

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
        tokens = embed(cfg.vocab_size, "token_embedding")(input_ids)
        positions = embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


def compute_eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token whose final state is the pooled output, per sequence.

    Matches transformers ``CLIPTextModel``: with the legacy ``eos_token_id == 2`` it is
    argmax(input_ids) (the EOS id was the largest in CLIP's vocabulary); otherwise the
    first position equal to ``eos_token_id`` (pads may equal EOS, so not the last one).
    """
    if eos_token_id == _LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(_CLIPModule):
    """The ``text_model`` subtree (old ``FlaxCLIPTextTransformer``)."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                 output_hidden_states: bool) -> CLIPTextOutput:
        cfg = self.config
        if input_ids.ndim != 2:
            raise JaxboothError(f"CLIP input_ids must be [batch, length], got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise JaxboothError(
                f"CLIP input length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}; tokenize with max_length={cfg.max_position_embeddings}"
            )
        hidden_states = CLIPTextEmbeddings(**self.settings(), name="embeddings")(input_ids)
        # Padding mask over keys, [batch, 1, 1, kv]; attend() adds the causal part.
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        states = _CLIPEncoder(**self.settings(), name="encoder")(hidden_states, mask)
        last = self.layer_norm("final_layer_norm")(states[-1])
        pooled = last[jnp.arange(last.shape[0]), compute_eos_positions(input_ids, cfg.eos_token_id)]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled,
                              hidden_states=states if output_hidden_states else None)


class FlaxCLIPTextModel(_CLIPModule):
    """transformers ``CLIPTextModel`` in linen; params ``{"text_model": ...}``.

    Fields: ``config``, ``dtype``, ``param_dtype``, ``attention_kernel`` (``xla``,
    ``dot_product``, ``flash``, ``auto``; see :mod:`.attention`) and
    ``gradient_checkpointing`` (remat per encoder layer, for training the text encoder).
    """

    def _text_model(self) -> CLIPTextTransformer:
        return CLIPTextTransformer(**self.settings(), name="text_model")

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False, train: bool = False) -> CLIPTextOutput:
        """``input_ids``/``attention_mask``: int ``[batch, length]``; mask 1 = real token.

        ``train`` is accepted for a call signature shared with the other models; SD/SDXL
        text encoders have no dropout, so it changes nothing.
        """
        del train
        return self._text_model()(jnp.asarray(input_ids, jnp.int32), attention_mask, output_hidden_states)


class FlaxCLIPTextModelWithProjection(FlaxCLIPTextModel):
    """transformers ``CLIPTextModelWithProjection`` (SDXL ``text_encoder_2``).

    Adds ``text_projection`` (no bias) on the pooled output: ``text_embeds``, which SDXL
    uses as its pooled text conditioning. Params ``{"text_model": ..., "text_projection"}``.
    """

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False, train: bool = False) -> CLIPTextOutput:
        del train
        out = self._text_model()(jnp.asarray(input_ids, jnp.int32), attention_mask, output_hidden_states)
        projection = self.dense(self.config.projection_dim, "text_projection", use_bias=False)
        return out.replace(text_embeds=projection(out.pooler_output))


def make_text_encoder(config: CLIPTextConfig, *, with_projection: bool = False,
                      **module_kwargs: Any) -> FlaxCLIPTextModel:
    """The module for ``config``; ``module_kwargs`` are dtype, param_dtype, attention_kernel, ..."""
    cls = FlaxCLIPTextModelWithProjection if with_projection else FlaxCLIPTextModel
    return cls(config, **module_kwargs)


def init_params(config: CLIPTextConfig, rng: jax.Array, with_projection: bool = False, *,
                param_dtype: Any = jnp.float32) -> dict:
    """Random params (flax default inits; real weights come from a checkpoint).

    Jitted: one compile instead of one tiny dispatch per op; call it under
    ``jax.jit(..., out_shardings=...)`` to create the params already sharded.
    """
    model = make_text_encoder(config, with_projection=with_projection, param_dtype=param_dtype)
    return jax.jit(model.init)(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(config: CLIPTextConfig, with_projection: bool = False, *,
                    param_dtype: Any = jnp.float32) -> dict:
    """Param shapes/dtypes as ``jax.ShapeDtypeStruct`` without allocating (``jax.eval_shape``)."""
    return jax.eval_shape(
        lambda rng: init_params(config, rng, with_projection, param_dtype=param_dtype), jax.random.key(0)
    )
