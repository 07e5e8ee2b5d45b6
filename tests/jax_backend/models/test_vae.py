"""FlaxAutoencoderKL against diffusers' AutoencoderKL on the same random weights."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.models import vae as vae_lib
from jaxbooth.jax_backend.weights import flatten_tree, flax_to_torch_state, torch_state_to_flax
from tests.jax_backend.models._diffusers_parity import (
    assert_state_dicts_identical,
    compile_fast,
    perturb_,
    rel_error,
    to_nchw,
    to_nhwc,
)

TOL = 1e-4

# What `jaxbooth tiny-model` ships.
TINY_VAE = {
    "block_out_channels": (32, 64),
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "sample_size": 64,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": TINY_VAE,
    "no_quant_no_attention": {
        **TINY_VAE,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": False,
    },
}


@dataclasses.dataclass
class Case:
    torch_model: Any
    state: dict[str, np.ndarray]
    config: vae_lib.VAEConfig
    params: dict


@functools.cache
def build_case(name: str) -> Case:
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch_model = diffusers.AutoencoderKL(**CONFIGS[name]).eval()
    state = perturb_(torch_model, seed=1)
    config = vae_lib.vae_config_from_dict(dict(torch_model.config))
    params = torch_state_to_flax(state, vae_lib.abstract_params(config), renames=vae_lib.TORCH_TO_FLAX_RENAMES)
    return Case(torch_model, state, config, jax.tree_util.tree_map(jnp.asarray, params))


@pytest.mark.requires_torch
def test_vae_encode_matches_torch_posterior() -> None:
    import torch

    case = build_case("tiny")
    images = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        posterior = case.torch_model.encode(torch.tensor(images)).latent_dist
    model = vae_lib.FlaxAutoencoderKL(case.config)
    encode = lambda p, x: model.apply({"params": p}, x, method=model.encode)
    ours = compile_fast(encode, case.params, to_nhwc(images))(case.params, to_nhwc(images))
    errors = {
        "mean": rel_error(to_nchw(ours.mean), posterior.mean.numpy()),
        "logvar": rel_error(to_nchw(ours.logvar), posterior.logvar.numpy()),
    }
    print(f"vae encode: relative errors {errors}")
    assert all(err <= TOL for err in errors.values()), errors


@pytest.mark.requires_torch
def test_vae_decode_matches_torch_output_and_latent_grad() -> None:
    import torch

    case = build_case("tiny")
    rng = np.random.RandomState(0)
    latents = rng.randn(2, 4, 8, 8).astype(np.float32)
    weight = rng.randn(2, 3, 16, 16).astype(np.float32)
    z = torch.tensor(latents, requires_grad=True)
    image = case.torch_model.decode(z).sample
    (image * torch.tensor(weight)).sum().backward()

    model = vae_lib.FlaxAutoencoderKL(case.config)

    def loss(params: dict, z_nhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = model.apply({"params": params}, z_nhwc, method=model.decode)
        return jnp.sum(out * to_nhwc(weight)), out

    args = (case.params, to_nhwc(latents))
    (_, out), d_latents = compile_fast(jax.value_and_grad(loss, argnums=1, has_aux=True), *args)(*args)
    errors = {
        "image": rel_error(to_nchw(out), image.detach().numpy()),
        "d_latents": rel_error(to_nchw(d_latents), z.grad.numpy()),
    }
    print(f"vae decode: relative errors {errors}")
    assert all(err <= TOL for err in errors.values()), errors


@pytest.mark.requires_torch
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_vae_torch_state_round_trips_bit_exact(name: str) -> None:
    case = build_case(name)
    exported = flax_to_torch_state(case.params, renames=vae_lib.FLAX_TO_TORCH_RENAMES)
    assert_state_dicts_identical(exported, case.state)


def test_vae_params_use_the_old_flax_names() -> None:
    """Old diffusers Flax checkpoints (``flax_model.msgpack``) must load without renames."""
    config = vae_lib.vae_config_from_dict(TINY_VAE)
    paths = {"/".join(path) for path in flatten_tree(vae_lib.abstract_params(config))}
    for name in ("query", "key", "value", "proj_attn", "group_norm"):
        assert f"encoder/mid_block/attentions_0/{name}/" + ("scale" if name == "group_norm" else "bias") in paths
    assert "decoder/up_blocks_0/upsamplers_0/conv/kernel" in paths
    assert "encoder/down_blocks_0/downsamplers_0/conv/kernel" in paths
    assert {"quant_conv/kernel", "post_quant_conv/kernel"} <= paths


def test_vae_renames_accept_pre_0_14_torch_attention_names() -> None:
    """diffusers < 0.14 saved the VAE attention as query/key/value/proj_attn in torch too."""
    abstract = vae_lib.abstract_params(vae_lib.vae_config_from_dict(TINY_VAE))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    state = flax_to_torch_state(zeros, renames=vae_lib.FLAX_TO_TORCH_RENAMES)
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in state
    old_style = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    params = torch_state_to_flax(old_style, abstract, renames=vae_lib.TORCH_TO_FLAX_RENAMES)
    assert set(flatten_tree(params)) == set(flatten_tree(abstract))


def test_vae_scaling_factor_is_exposed_from_config() -> None:
    """Exposed only: the encode/decode parity tests above show neither applies it (as in diffusers)."""
    config = vae_lib.vae_config_from_dict({**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": False})
    model = vae_lib.FlaxAutoencoderKL(config)
    assert model.scaling_factor == 0.13025 and model.shift_factor is None
    assert vae_lib.vae_config_from_dict({**TINY_VAE, "shift_factor": 0.0609}).shift_factor == 0.0609


def test_diagonal_gaussian_clips_logvar_and_samples() -> None:
    moments = jnp.concatenate([jnp.full((1, 2, 2, 4), 3.0), jnp.full((1, 2, 2, 4), 50.0)], axis=-1)
    posterior = vae_lib.DiagonalGaussian.from_moments(moments)
    assert float(posterior.logvar.max()) == 20.0
    assert float(posterior.mode().mean()) == 3.0
    rng = jax.random.key(0)
    noise = jax.random.normal(rng, (1, 2, 2, 4))
    np.testing.assert_allclose(posterior.sample(rng), 3.0 + np.exp(10.0) * noise, rtol=1e-6)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("act_fn", "gelu"),
        ("down_block_types", ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")),
        ("up_block_types", ("UpDecoderBlock2D",)),
    ],
)
def test_vae_config_rejects_unsupported_value_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(JaxboothError, match=key):
        vae_lib.vae_config_from_dict({**TINY_VAE, key: value})


SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "scaling_factor": 0.18215,
}


@pytest.mark.requires_torch
def test_vae_params_fit_the_real_sd_vae_layout() -> None:
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        torch_model = diffusers.AutoencoderKL(**{k: v for k, v in SD_VAE_CONFIG.items() if not k.startswith("_")})
    state = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in torch_model.state_dict().items()}
    abstract = vae_lib.abstract_params(vae_lib.vae_config_from_dict(SD_VAE_CONFIG))
    torch_state_to_flax(state, abstract, renames=vae_lib.TORCH_TO_FLAX_RENAMES)  # raises on any mismatch
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract))
    assert count == sum(p.numel() for p in torch_model.parameters())
