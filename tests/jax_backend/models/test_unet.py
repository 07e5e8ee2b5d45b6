"""FlaxUNet2DConditionModel against diffusers' UNet2DConditionModel on the same random weights."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.models import unet as unet_lib
from jaxbooth.jax_backend.weights import flax_to_torch_state, torch_state_to_flax
from tests.jax_backend.models._diffusers_parity import (
    assert_state_dicts_identical,
    compile_fast,
    perturb_,
    rel_error,
    to_nchw,
    to_nhwc,
)

TOL = 1e-4

# What `jaxbooth tiny-model` ships; the sizes diffusers' own UNet tests use.
TINY_SD1 = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": TINY_SD1,
    # Cross-attention in both blocks so both per-block head counts are used (and reversed).
    "sd2": {
        **TINY_SD1,
        "down_block_types": ("CrossAttnDownBlock2D",) * 2,
        "up_block_types": ("CrossAttnUpBlock2D",) * 2,
        "use_linear_projection": True,
        "attention_head_dim": [2, 4],
        "upcast_attention": True,
        "cross_attention_dim": 48,
    },
    "sdxl": {
        **TINY_SD1,
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 2],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 8 * 6 + 32,
        "use_linear_projection": True,
    },
    "class_timestep": {**TINY_SD1, "class_embed_type": "timestep"},
    "only_cross": {**TINY_SD1, "only_cross_attention": True},
}


@dataclasses.dataclass
class Case:
    """One tiny config: the perturbed torch model, its numpy state and the converted Flax params."""

    torch_model: Any
    state: dict[str, np.ndarray]
    config: unet_lib.UNetConfig
    params: dict


@functools.cache
def build_case(name: str) -> Case:
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch_model = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    state = perturb_(torch_model, seed=1)
    config = unet_lib.unet_config_from_dict(dict(torch_model.config))
    params = torch_state_to_flax(state, unet_lib.abstract_params(config))
    return Case(torch_model, state, config, jax.tree_util.tree_map(jnp.asarray, params))


def make_inputs(name: str, height: int = 16, width: int = 16, batch: int = 2) -> dict[str, np.ndarray]:
    """Random NCHW torch-side inputs for config ``name``."""
    rng = np.random.RandomState(0)
    cfg = CONFIGS[name]
    inputs = {
        "sample": rng.randn(batch, cfg["in_channels"], height, width).astype(np.float32),
        "timestep": np.array([10, 700][:batch], np.int64),
        "encoder_hidden_states": rng.randn(batch, 7, cfg["cross_attention_dim"]).astype(np.float32),
        "out_weight": rng.randn(batch, cfg["out_channels"], height, width).astype(np.float32),
    }
    if cfg.get("addition_embed_type") == "text_time":
        inputs["text_embeds"] = rng.randn(batch, 32).astype(np.float32)
        inputs["time_ids"] = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1))
        inputs["time_ids"][1] += 8
    if cfg.get("class_embed_type") == "timestep":
        inputs["class_labels"] = np.array([3, 250][:batch], np.int64)
    return inputs


def torch_reference(case: Case, inputs: dict[str, np.ndarray], grads: bool = False) -> dict[str, np.ndarray]:
    """diffusers' output (and d(sum(out * w))/d(sample, encoder_hidden_states)), NCHW."""
    import torch

    sample = torch.tensor(inputs["sample"], requires_grad=grads)
    context = torch.tensor(inputs["encoder_hidden_states"], requires_grad=grads)
    kwargs: dict[str, Any] = {}
    if "text_embeds" in inputs:
        kwargs["added_cond_kwargs"] = {k: torch.tensor(inputs[k]) for k in ("text_embeds", "time_ids")}
    if "class_labels" in inputs:
        kwargs["class_labels"] = torch.tensor(inputs["class_labels"])
    if "encoder_attention_mask" in inputs:
        kwargs["encoder_attention_mask"] = torch.tensor(inputs["encoder_attention_mask"])
    timestep = torch.tensor(inputs["timestep"])
    with torch.set_grad_enabled(grads):
        out = case.torch_model(sample, timestep, context, **kwargs).sample
        result = {"out": out.detach().numpy()}
        if grads:
            (out * torch.tensor(inputs["out_weight"])).sum().backward()
            result["d_sample"] = sample.grad.numpy()
            result["d_context"] = context.grad.numpy()
    return result


def flax_forward(case: Case, inputs: dict[str, np.ndarray], grads: bool = False, **model_kw: Any) -> dict:
    """Our output (and the same input gradients), converted back to NCHW; one compile."""
    model = unet_lib.FlaxUNet2DConditionModel(case.config, **model_kw)
    kwargs: dict[str, Any] = {}
    if "text_embeds" in inputs:
        kwargs["added_cond_kwargs"] = {k: inputs[k] for k in ("text_embeds", "time_ids")}
    for key in ("class_labels", "encoder_attention_mask"):
        if key in inputs:
            kwargs[key] = inputs[key]
    timestep, weight = inputs["timestep"], to_nhwc(inputs["out_weight"])

    def loss(params: dict, sample: jax.Array, context: jax.Array, kw: dict) -> tuple[jax.Array, jax.Array]:
        out = model.apply({"params": params}, sample, timestep, context, **kw)
        return jnp.sum(out * weight), out

    args = (case.params, to_nhwc(inputs["sample"]), inputs["encoder_hidden_states"], kwargs)
    if not grads:
        return {"out": to_nchw(compile_fast(lambda *a: loss(*a)[1], *args)(*args))}
    (_, out), (d_sample, d_context) = compile_fast(jax.value_and_grad(loss, argnums=(1, 2), has_aux=True), *args)(*args)
    return {"out": to_nchw(out), "d_sample": to_nchw(d_sample), "d_context": np.asarray(d_context)}


def assert_parity(name: str, ours: dict, reference: dict) -> None:
    errors = {key: rel_error(ours[key], reference[key]) for key in reference}
    print(f"{name}: relative errors {errors}")
    assert all(err <= TOL for err in errors.values()), errors


@functools.cache
def sd1_flax_output() -> np.ndarray:
    return flax_forward(build_case("sd1"), make_inputs("sd1"))["out"]


@pytest.mark.requires_torch
@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_unet_matches_torch_outputs_and_input_grads(name: str) -> None:
    case, inputs = build_case(name), make_inputs(name)
    assert_parity(name, flax_forward(case, inputs, grads=True), torch_reference(case, inputs, grads=True))


@pytest.mark.requires_torch
def test_unet_matches_torch_on_sd2_config_with_scalar_timestep() -> None:
    case, inputs = build_case("sd2"), make_inputs("sd2")
    inputs["timestep"] = np.array(321, np.int64)
    assert_parity("sd2", flax_forward(case, inputs), torch_reference(case, inputs))


@pytest.mark.requires_torch
def test_unet_matches_torch_on_class_embedding_at_non_multiple_size() -> None:
    # 13x15 is not a multiple of the total stride: the up path must resize to the skip's size.
    case, inputs = build_case("class_timestep"), make_inputs("class_timestep", height=13, width=15)
    assert_parity("class_timestep", flax_forward(case, inputs), torch_reference(case, inputs))


@pytest.mark.requires_torch
def test_unet_matches_torch_on_only_cross_attention_with_encoder_mask() -> None:
    case, inputs = build_case("only_cross"), make_inputs("only_cross")
    inputs["encoder_attention_mask"] = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int64)
    assert_parity("only_cross", flax_forward(case, inputs), torch_reference(case, inputs))


@pytest.mark.requires_torch
def test_unet_dot_product_kernel_matches_xla() -> None:
    ours = flax_forward(build_case("sd1"), make_inputs("sd1"), attention_kernel="dot_product")["out"]
    assert rel_error(ours, sd1_flax_output()) <= 1e-5


@pytest.mark.requires_torch
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_torch_state_round_trips_bit_exact(name: str) -> None:
    case = build_case(name)
    exported = flax_to_torch_state(case.params, renames=unet_lib.FLAX_TO_TORCH_RENAMES)
    assert_state_dicts_identical(exported, case.state)


def test_unet_gradient_checkpointing_keeps_outputs_and_grads() -> None:
    # One cross-attention block keeps the two param-gradient compiles cheap while still
    # covering remat of resnets and transformer blocks in down, mid and up paths.
    config = unet_lib.unet_config_from_dict(
        {
            **TINY_SD1,
            "block_out_channels": (32,),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D",),
            "up_block_types": ("CrossAttnUpBlock2D",),
        }
    )
    params = unet_lib.init_params(config, 0)
    rng = np.random.RandomState(0)
    sample, context = rng.randn(1, 8, 8, 4).astype(np.float32), rng.randn(1, 5, 32).astype(np.float32)

    def run(remat: bool) -> tuple[jax.Array, dict]:
        model = unet_lib.FlaxUNet2DConditionModel(config, gradient_checkpointing=remat)

        def loss(p: dict) -> tuple[jax.Array, jax.Array]:
            out = model.apply({"params": p}, sample, jnp.array([5]), context, train=True)
            return jnp.sum(out**2), out

        assert ("remat" in str(jax.make_jaxpr(loss)(params))) == remat
        (_, out), grads = compile_fast(jax.value_and_grad(loss, has_aux=True), params)(params)
        return out, grads

    (out_plain, grads_plain), (out_remat, grads_remat) = run(False), run(True)
    assert rel_error(out_remat, out_plain) <= 1e-6
    # One scale for the whole tree: some grads (a conv bias right before a GroupNorm) are ~0
    # and would make a per-leaf relative error meaningless.
    assert jax.tree_util.tree_structure(grads_remat) == jax.tree_util.tree_structure(grads_plain)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads_plain))
    for (path, plain), remat in zip(
        jax.tree_util.tree_leaves_with_path(grads_plain), jax.tree_util.tree_leaves(grads_remat), strict=True
    ):
        assert float(jnp.abs(remat - plain).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)


def test_unet_config_reads_attention_head_dim_as_head_count() -> None:
    config = unet_lib.unet_config_from_dict(CONFIGS["sd2"])
    assert config.num_attention_heads == (2, 4)
    assert config.up_num_attention_heads == (4, 2)
    assert config.cross_attention_dim == (48, 48)


def test_unet_config_expands_sdxl_transformer_depths() -> None:
    config = unet_lib.unet_config_from_dict(CONFIGS["sdxl"])
    assert config.transformer_layers_per_block == ((1, 1), (2, 2))
    assert config.reverse_transformer_layers_per_block == ((2, 2, 2), (1, 1, 1))
    assert config.mid_transformer_layers == 2
    assert config.time_embed_dim == 128


def test_unet_config_accepts_keys_that_do_not_change_the_network() -> None:
    config = unet_lib.unet_config_from_dict(
        {
            **TINY_SD1,
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.19.0",
            "mid_block_only_cross_attention": True,
            "addition_embed_type_num_heads": 8,
            "resnet_skip_time_act": True,
            "upcast_attention": None,  # SDXL's config.json writes null
            "some_future_key": 1,
        }
    )
    assert config.upcast_attention is False


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("time_embedding_type", "fourier"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("addition_embed_type", "text_image"),
        ("class_embed_type", "simple_projection"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("dual_cross_attention", True),
        ("encoder_hid_dim", 64),
        ("attention_type", "gated"),
        ("num_attention_heads", 8),
        ("down_block_types", ("DownBlock2D", "AttnDownBlock2D")),
        ("up_block_types", ("SimpleCrossAttnUpBlock2D", "UpBlock2D")),
        ("act_fn", "gelu"),
        ("time_cond_proj_dim", 32),
        ("addition_time_embed_dim", None),  # with addition_embed_type="text_time" below
    ],
)
def test_unet_config_rejects_unsupported_value_naming_the_key(key: str, value: Any) -> None:
    raw = {**TINY_SD1, key: value}
    if key == "addition_time_embed_dim":
        raw.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=80)
    with pytest.raises(JaxboothError, match=key) as info:
        unet_lib.unet_config_from_dict(raw, source="unet/config.json")
    assert "unet/config.json" in str(info.value)


def test_unet_config_rejects_mismatched_block_lists() -> None:
    with pytest.raises(JaxboothError, match="attention_head_dim has 3 entries"):
        unet_lib.unet_config_from_dict({**TINY_SD1, "attention_head_dim": [2, 4, 8]})
    with pytest.raises(JaxboothError, match="up_block_types"):
        unet_lib.unet_config_from_dict({**TINY_SD1, "up_block_types": ("UpBlock2D",)})


def test_unet_requires_added_cond_kwargs_for_text_time() -> None:
    config = unet_lib.unet_config_from_dict(CONFIGS["sdxl"])
    model = unet_lib.FlaxUNet2DConditionModel(config)
    with pytest.raises(ValueError, match="text_embeds"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 4)), 1, jnp.zeros((1, 1, 32))))


SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = {
    **SD15_CONFIG,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "sample_size": 96,
}
SDXL_BASE_CONFIG = {
    **SD15_CONFIG,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


@pytest.mark.requires_torch
@pytest.mark.parametrize("raw", [SD15_CONFIG, SD21_CONFIG, SDXL_BASE_CONFIG], ids=["sd15", "sd21", "sdxl"])
def test_unet_params_fit_real_checkpoint_layouts(raw: dict[str, Any]) -> None:
    """Every tensor of the full-size torch model maps onto our tree with the right shape (no memory:
    meta-device torch model, zero-stride numpy stand-ins)."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        torch_model = diffusers.UNet2DConditionModel(**{k: v for k, v in raw.items() if not k.startswith("_")})
    state = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in torch_model.state_dict().items()}
    abstract = unet_lib.abstract_params(unet_lib.unet_config_from_dict(raw))
    torch_state_to_flax(state, abstract)  # raises on any missing, unexpected or mis-shaped tensor
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract))
    assert count == sum(p.numel() for p in torch_model.parameters())


def test_unet_bfloat16_compute_keeps_float32_params() -> None:
    config = unet_lib.unet_config_from_dict(CONFIGS["sdxl"])
    model = unet_lib.FlaxUNet2DConditionModel(config, dtype=jnp.bfloat16)
    abstract = unet_lib.abstract_params(config)
    cond = {"text_embeds": jnp.zeros((2, 32)), "time_ids": jnp.zeros((2, 6))}
    out = jax.eval_shape(
        lambda p: model.apply({"params": p}, jnp.zeros((2, 8, 8, 4)), 3, jnp.zeros((2, 7, 32)), added_cond_kwargs=cond),
        abstract,
    )
    assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract)} == {jnp.dtype(jnp.float32)}
