"""``UNetConfig``: a diffusers UNet ``config.json``, checked and normalised to per-block tuples.

Owns the policy "which diffusers UNet options jaxbooth runs": every key diffusers'
``UNet2DConditionModel`` accepts is either honoured, or accepted because its value does not
change the network, or refused with a :class:`~jaxbooth.errors.JaxboothError` that names the
key, the value and what is supported. Keys diffusers does not know are ignored, as
diffusers ignores them. Pure Python; no jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxbooth.errors import JaxboothError

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection")
ADDITION_EMBED_TYPES = (None, "text_time")

# Keys whose value must be one of these (diffusers' defaults, or values we implement).
_ONLY_VALUES: dict[str, tuple[Any, ...]] = {
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "act_fn": ("silu", "swish"),
    "mid_block_type": MID_BLOCK_TYPES,
    "class_embed_type": CLASS_EMBED_TYPES,
    "addition_embed_type": ADDITION_EMBED_TYPES,
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "cross_attention_norm": (None,),
}
_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "num_class_embeds": None,
    "addition_time_embed_dim": None,
    "upcast_attention": False,
    "time_embedding_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    **{key: values[0] for key, values in _ONLY_VALUES.items()},
    # Accepted at any value because they do not change this network: diffusers passes them
    # only to block types jaxbooth does not build (Simple*/Resnet* blocks, the "text" add-embedding).
    "mid_block_only_cross_attention": None,
    "addition_embed_type_num_heads": 64,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
}

PerBlock = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A supported diffusers UNet config with every per-block option expanded to a tuple.

    Field names are diffusers'. Per-block fields are indexed like ``down_block_types``; the
    ``up_*`` properties give the values in up-block order. Build it with
    :func:`unet_config_from_dict`.
    """

    sample_size: int | tuple[int, int] | None
    in_channels: int
    out_channels: int
    center_input_sample: bool
    flip_sin_to_cos: bool
    freq_shift: float
    down_block_types: tuple[str, ...]
    mid_block_type: str | None
    up_block_types: tuple[str, ...]
    only_cross_attention: tuple[bool, ...]
    block_out_channels: PerBlock
    layers_per_block: PerBlock
    downsample_padding: int
    mid_block_scale_factor: float
    dropout: float
    norm_num_groups: int
    norm_eps: float
    cross_attention_dim: PerBlock
    # Transformer depth of each attention layer: [down block][layer], [up block][layer], mid.
    transformer_layers_per_block: tuple[PerBlock, ...]
    reverse_transformer_layers_per_block: tuple[PerBlock, ...]
    mid_transformer_layers: int
    # Heads per block. diffusers' SD configs call this `attention_head_dim` (see below).
    num_attention_heads: PerBlock
    use_linear_projection: bool
    upcast_attention: bool
    class_embed_type: str | None
    num_class_embeds: int | None
    addition_embed_type: str | None
    addition_time_embed_dim: int | None
    projection_class_embeddings_input_dim: int | None
    time_embedding_dim: int | None
    conv_in_kernel: int
    conv_out_kernel: int

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding every resnet receives (diffusers: ``block_out_channels[0] * 4``)."""
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def up_block_out_channels(self) -> PerBlock:
        return tuple(reversed(self.block_out_channels))

    @property
    def up_layers_per_block(self) -> PerBlock:
        """Resnets per up block: one more than its mirrored down block (it also eats that block's input)."""
        return tuple(n + 1 for n in reversed(self.layers_per_block))

    @property
    def up_num_attention_heads(self) -> PerBlock:
        return tuple(reversed(self.num_attention_heads))

    @property
    def up_only_cross_attention(self) -> tuple[bool, ...]:
        return tuple(reversed(self.only_cross_attention))

    @property
    def encoder_hidden_dim(self) -> int:
        """Feature width of ``encoder_hidden_states`` (the text encoder's hidden size)."""
        return self.cross_attention_dim[-1]


def _error(source: str, key: str, value: Any, supported: str) -> JaxboothError:
    return JaxboothError(
        f"{source}: {key}={value!r} is not supported; jaxbooth supports {supported}. "
        "Fix: use a Stable Diffusion 1.x/2.x/XL-style UNet config, or the torch backend."
    )


def _per_block(source: str, key: str, value: Any, n: int) -> tuple:
    """An int/bool/None (same for every block) or a list with one entry per down block."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise JaxboothError(
                f"{source}: {key} has {len(value)} entries but down_block_types has {n}; "
                f"give one per block or a single value."
            )
        return tuple(value)
    return (value,) * n


def _per_layer(value: int | Sequence[int], layers: int) -> PerBlock:
    """Transformer depths for one block: an int repeats over its layers; a list is per layer."""
    if isinstance(value, int):
        return (value,) * layers
    return tuple(value[:layers])


def _check_values(d: Mapping[str, Any], source: str) -> None:
    for key, allowed in _ONLY_VALUES.items():
        if d[key] not in allowed:
            raise _error(source, key, d[key], " or ".join(repr(v) for v in allowed))
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        for block in d[key]:
            if block not in allowed:
                raise _error(source, key, block, f"block types {allowed}")
    if d["num_attention_heads"] is not None:
        # diffusers' UNet2DConditionModel refuses this key too (issue #2011), so a model using it
        # could not be exported back; the head count belongs in `attention_head_dim`.
        raise _error(
            source,
            "num_attention_heads",
            d["num_attention_heads"],
            "None (put the per-block head counts in attention_head_dim, as diffusers requires)",
        )
    if d["norm_num_groups"] is None:
        raise _error(source, "norm_num_groups", None, "an int (GroupNorm everywhere)")
    if d["addition_embed_type"] == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if d[key] is None:
                raise _error(source, key, None, "an int when addition_embed_type='text_time'")
    if d["class_embed_type"] == "projection" and d["projection_class_embeddings_input_dim"] is None:
        raise _error(source, "projection_class_embeddings_input_dim", None, "an int when class_embed_type='projection'")


def _check_lengths(d: Mapping[str, Any], source: str) -> int:
    n = len(d["down_block_types"])
    for key in ("up_block_types", "block_out_channels"):
        if len(d[key]) != n:
            raise JaxboothError(
                f"{source}: {key} has {len(d[key])} entries but down_block_types has {n} "
                f"({list(d['down_block_types'])}); they must match."
            )
    tlpb = d["transformer_layers_per_block"]
    nested = not isinstance(tlpb, int) and any(not isinstance(t, int) for t in tlpb)
    if nested and d["reverse_transformer_layers_per_block"] is None:
        raise JaxboothError(
            f"{source}: transformer_layers_per_block={tlpb!r} lists depths per layer, so "
            "reverse_transformer_layers_per_block must be given too (as diffusers requires)."
        )
    return n


def _check_cross_attention_dim(config: UNetConfig, source: str) -> None:
    """Every block that cross-attends reads the same encoder_hidden_states, so one width."""
    used = {
        dim
        for dim, kind in zip(config.cross_attention_dim, config.down_block_types, strict=True)
        if "CrossAttn" in kind
    }
    used |= {
        dim
        for dim, kind in zip(reversed(config.cross_attention_dim), config.up_block_types, strict=True)
        if "CrossAttn" in kind
    }
    if config.mid_block_type is not None:
        used.add(config.cross_attention_dim[-1])
    if len(used) > 1:
        raise _error(
            source,
            "cross_attention_dim",
            list(config.cross_attention_dim),
            "one width for all cross-attention blocks",
        )


def _transformer_depths(
    merged: Mapping[str, Any], layers: PerBlock, source: str
) -> tuple[tuple[PerBlock, ...], tuple[PerBlock, ...], int]:
    """Transformer depth per attention layer: down blocks, up blocks (in up order), mid block.

    diffusers reverses ``transformer_layers_per_block`` for the up path unless
    ``reverse_transformer_layers_per_block`` is given (required when depths are per layer).
    """
    n = len(layers)
    tlpb = merged["transformer_layers_per_block"]
    tlpb = (tlpb,) * n if isinstance(tlpb, int) else _per_block(source, "transformer_layers_per_block", tlpb, n)
    reverse = merged["reverse_transformer_layers_per_block"]
    up = (
        tuple(reversed(tlpb))
        if reverse is None
        else _per_block(source, "reverse_transformer_layers_per_block", reverse, n)
    )
    up_layers = tuple(n_layers + 1 for n_layers in reversed(layers))
    down_depths = tuple(_per_layer(t, k) for t, k in zip(tlpb, layers, strict=True))
    up_depths = tuple(_per_layer(t, k) for t, k in zip(up, up_layers, strict=True))
    return down_depths, up_depths, _per_layer(tlpb[-1], 1)[0]


def unet_config_from_dict(d: Mapping[str, Any], *, source: str = "unet/config.json") -> UNetConfig:
    """Check a diffusers ``UNet2DConditionModel`` config dict and build a :class:`UNetConfig`.

    ``source`` names the file in error messages. Raises :class:`JaxboothError` naming the key
    for any value jaxbooth does not implement.
    """
    merged = {**_DEFAULTS, **{k: v for k, v in d.items() if k in _DEFAULTS}}
    _check_values(merged, source)
    n = _check_lengths(merged, source)
    layers = tuple(int(v) for v in _per_block(source, "layers_per_block", merged["layers_per_block"], n))
    # Why `attention_head_dim` means heads: the original SD configs named the head count
    # `attention_head_dim`, and diffusers kept the name for compatibility (issue #2011): in
    # CrossAttn blocks it is the number of heads and the head width is channels // heads.
    heads = _per_block(source, "attention_head_dim", merged["attention_head_dim"], n)
    down_depths, up_depths, mid_depth = _transformer_depths(merged, layers, source)
    config = UNetConfig(
        sample_size=merged["sample_size"],
        in_channels=int(merged["in_channels"]),
        out_channels=int(merged["out_channels"]),
        center_input_sample=bool(merged["center_input_sample"]),
        flip_sin_to_cos=bool(merged["flip_sin_to_cos"]),
        freq_shift=merged["freq_shift"],
        down_block_types=tuple(merged["down_block_types"]),
        mid_block_type=merged["mid_block_type"],
        up_block_types=tuple(merged["up_block_types"]),
        only_cross_attention=tuple(
            bool(v) for v in _per_block(source, "only_cross_attention", merged["only_cross_attention"], n)
        ),
        block_out_channels=tuple(int(c) for c in merged["block_out_channels"]),
        layers_per_block=layers,
        downsample_padding=int(merged["downsample_padding"]),
        mid_block_scale_factor=float(merged["mid_block_scale_factor"]),
        dropout=float(merged["dropout"]),
        norm_num_groups=int(merged["norm_num_groups"]),
        norm_eps=float(merged["norm_eps"]),
        cross_attention_dim=tuple(
            int(c) for c in _per_block(source, "cross_attention_dim", merged["cross_attention_dim"], n)
        ),
        transformer_layers_per_block=down_depths,
        reverse_transformer_layers_per_block=up_depths,
        mid_transformer_layers=mid_depth,
        num_attention_heads=tuple(int(h) for h in heads),
        use_linear_projection=bool(merged["use_linear_projection"]),
        upcast_attention=bool(merged["upcast_attention"]),
        class_embed_type=merged["class_embed_type"],
        num_class_embeds=merged["num_class_embeds"],
        addition_embed_type=merged["addition_embed_type"],
        addition_time_embed_dim=merged["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=merged["projection_class_embeddings_input_dim"],
        time_embedding_dim=merged["time_embedding_dim"],
        conv_in_kernel=int(merged["conv_in_kernel"]),
        conv_out_kernel=int(merged["conv_out_kernel"]),
    )
    _check_cross_attention_dim(config, source)
    return config
