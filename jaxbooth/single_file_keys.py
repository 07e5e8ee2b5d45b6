"""Key tables: diffusers component state dicts -> the original Stable Diffusion (LDM / SGM) layout.

The layout A1111 and ComfyUI load, and that diffusers' ``from_single_file`` reads back: the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text encoders under
``cond_stage_model.`` (SD 1.x: transformers' CLIP names; SD 2.x: OpenCLIP names with fused q/k/v) or
``conditioner.embedders.N.`` (SDXL). Every key is translated by a rule or refused by name: a layout these
rules do not cover (an extra embedding, per-block layer counts) is an error, never a silently dropped weight.
numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from jaxbooth.errors import JaxboothError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

# ---------------------------------------------------------------- UNet

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL's text_time
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _unknown(component: str, key: str) -> JaxboothError:
    return JaxboothError(f"{component}: weight {key!r} has no place in the original Stable Diffusion layout (an "
                         "architecture jaxbooth's single-file export does not know). Fix: use the diffusers folder "
                         "itself, or convert this model with a tool made for its architecture.")


def _resnet(rest: str, component: str, key: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET:
        raise _unknown(component, key)
    return f"{_RESNET[head]}.{tail}"


def _layers_per_block(keys: list[str]) -> int:
    """Resnets per down block, the same in every block (the original layout numbers blocks by it)."""
    counts: dict[tuple[str, int], set[int]] = {}
    for key in keys:
        match = _BLOCK.match(key)
        if match and match.group(3) == "resnets":
            counts.setdefault((match.group(1), int(match.group(2))), set()).add(int(match.group(4)))
    down = {len(v) for (kind, _), v in counts.items() if kind == "down_blocks"}
    up = {len(v) for (kind, _), v in counts.items() if kind == "up_blocks"}
    if len(down) != 1 or up != {next(iter(down)) + 1}:
        raise JaxboothError(f"unet: resnets per block down {sorted(down)}, up {sorted(up)}; the original layout needs "
                            "the same layers_per_block in every block (up blocks one more). Fix: use the diffusers "
                            "folder itself.")
    return next(iter(down))


def unet_keys(keys: list[str]) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> original key (without ``model.diffusion_model.``)."""
    per = _layers_per_block(keys) + 1  # input/output block slots per level: resnets plus a down/upsample slot
    attended_up = {int(m.group(2)) for m in map(_BLOCK.match, keys)
                   if m and m.group(1) == "up_blocks" and m.group(3) == "attentions"}
    mapping = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            mapping[key] = f"{_UNET_TOP[module]}.{param}"
            continue
        block, mid = _BLOCK.match(key), _MID.match(key)
        if block:
            kind, level, part, index, rest = block.groups()
            mapping[key] = _unet_block_key(kind, int(level), part, int(index), rest, per, attended_up, key)
        elif mid:
            part, index, rest = mid.group(1), int(mid.group(2)), mid.group(3)
            if part == "resnets" and index < 2:
                mapping[key] = f"middle_block.{2 * index}.{_resnet(rest, 'unet', key)}"
            elif part == "attentions" and index == 0:
                mapping[key] = f"middle_block.1.{rest}"
            else:
                raise _unknown("unet", key)
        else:
            raise _unknown("unet", key)
    return mapping


def _unet_block_key(kind: str, level: int, part: str, index: int, rest: str, per: int, attended_up: set[int],
                    key: str) -> str:
    """A down/up block's key: resnet j of level i sits in slot ``1 + i * per + j`` (input) or ``i * per + j``
    (output); the downsampler takes the level's last input slot, the upsampler follows the last output resnet
    (after its attention, when the level has one)."""
    if part in ("downsamplers", "upsamplers") and index != 0:
        raise _unknown("unet", key)
    if kind == "down_blocks":
        slot = 1 + level * per + index
        if part == "resnets":
            return f"input_blocks.{slot}.0.{_resnet(rest, 'unet', key)}"
        if part == "attentions":
            return f"input_blocks.{slot}.1.{rest}"
        if part == "downsamplers" and rest.startswith("conv."):
            return f"input_blocks.{(level + 1) * per}.0.op.{rest.removeprefix('conv.')}"
        raise _unknown("unet", key)
    slot = level * per + index
    if part == "resnets":
        return f"output_blocks.{slot}.0.{_resnet(rest, 'unet', key)}"
    if part == "attentions":
        return f"output_blocks.{slot}.1.{rest}"
    if part == "upsamplers":
        return f"output_blocks.{level * per + per - 1}.{2 if level in attended_up else 1}.{rest}"
    raise _unknown("unet", key)


# ---------------------------------------------------------------- VAE

_VAE_TOP = {"conv_in", "conv_out", "quant_conv", "post_quant_conv"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                  # diffusers' names before 0.17's attention processor rewrite
                  "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_VAE_BLOCK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)"
                        r"\.(\d+)\.(.+)$")
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def vae_keys(keys: list[str]) -> dict[str, str]:
    """diffusers AutoencoderKL key -> original key (without ``first_stage_model.``); decoder levels count down."""
    levels = 1 + max((int(m.group(3)) for m in map(_VAE_BLOCK.match, keys) if m and m.group(1) == "decoder"),
                     default=-1)
    mapping = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        coder, _, inner = module.partition(".")
        if module in _VAE_TOP or (coder in ("encoder", "decoder") and inner in ("conv_in", "conv_out")):
            mapping[key] = key
        elif coder in ("encoder", "decoder") and inner == "conv_norm_out":
            mapping[key] = f"{coder}.norm_out.{param}"
        elif block := _VAE_BLOCK.match(key):
            coder, _, level, part, index, rest = block.groups()
            level, index = int(level), int(index)
            place = f"encoder.down.{level}" if coder == "encoder" else f"decoder.up.{levels - 1 - level}"
            if part == "resnets":
                mapping[key] = f"{place}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            elif index == 0 and (part, coder) in (("downsamplers", "encoder"), ("upsamplers", "decoder")):
                mapping[key] = f"{place}.{part[:-2]}.{rest}"  # downsample. / upsample.
            else:
                raise _unknown("vae", key)
        elif mid := _VAE_MID.match(key):
            coder, part, index, rest = mid.group(1), mid.group(2), int(mid.group(3)), mid.group(4)
            name, _, param = rest.rpartition(".")
            if part == "resnets" and index < 2:
                mapping[key] = f"{coder}.mid.block_{index + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            elif part == "attentions" and index == 0 and name in _VAE_ATTENTION:
                mapping[key] = f"{coder}.mid.attn_1.{_VAE_ATTENTION[name]}.{param}"
            else:
                raise _unknown("vae", key)
        else:
            raise _unknown("vae", key)
    return mapping


def vae_to_original(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The VAE in the original layout: the mid-block attention's linear weights become 1x1 convs."""
    out = {}
    for key, new in vae_keys(list(state)).items():
        value = state[key]
        if ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value.reshape(*value.shape, *(1,) * (4 - value.ndim))
        out[new] = value
    return out


# ---------------------------------------------------------------- text encoders

def clip_canonical(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A transformers CLIP text state dict with the ``text_model.`` prefix on every encoder key (transformers
    5.6+ saves ``CLIPTextModel`` without it); ``position_ids`` buffers dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"] = value
    return out


_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def open_clip_to_original(state: Mapping[str, np.ndarray], component: str) -> dict[str, np.ndarray]:
    """A CLIP text encoder (canonical keys) in OpenCLIP's names: ``transformer.resblocks.N``, q/k/v fused into
    ``attn.in_proj_weight`` / ``in_proj_bias`` (q, k, v stacked on the output axis), ``text_projection`` as
    OpenCLIP's ``[hidden, projection]`` matrix (the transpose of transformers' linear weight)."""
    out: dict[str, np.ndarray] = {}
    fused: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(value.T)
        elif layer := _CLIP_LAYER.match(key):
            index, module, param = int(layer.group(1)), layer.group(2), layer.group(3)
            if module.startswith("self_attn.") and module.removeprefix("self_attn.") in _QKV:
                fused.setdefault((index, param), {})[module.removeprefix("self_attn.")] = value
            elif module in _OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{index}.{_OPEN_CLIP_LAYER[module]}.{param}"] = value
            else:
                raise _unknown(component, key)
        else:
            raise _unknown(component, key)
    for (index, param), parts in sorted(fused.items()):
        if set(parts) != set(_QKV):
            raise JaxboothError(f"{component}: layer {index} lacks {sorted(set(_QKV) - set(parts))} {param}; "
                                "the weights are incomplete. Fix: re-save the text encoder.")
        out[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = np.concatenate([parts[p] for p in _QKV])
    return out


def prefixed(prefix: str, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}{key}": value for key, value in state.items()}
