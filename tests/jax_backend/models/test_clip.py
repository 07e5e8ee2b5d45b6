"""Proves models/clip.py: parity with transformers CLIPTextModel(+WithProjection), weight I/O.

Tiny random torch models (LayerNorms and biases perturbed away from 1/0, so a wrong
norm/bias mapping fails) are converted with the shared rules in weights.py and compared
in float32 at max|a-b|/max|b| <= 1e-4.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.models import clip
from jaxbooth.jax_backend.weights import flatten_tree, flax_to_torch_state, torch_state_to_flax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.requires_torch

RTOL = 1e-4
TINY = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=5,
    vocab_size=1000,
    max_position_embeddings=77,
    projection_dim=24,
)
# SD 1.x-like: legacy eos_token_id=2 (pool at argmax(ids)), quick_gelu.
LEGACY = dict(TINY, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1)
# SD 2.x / SDXL-like: the real EOS id inside the vocabulary, exact gelu.
MODERN = dict(TINY, hidden_act="gelu", eos_token_id=999, bos_token_id=998, pad_token_id=1)
CASES = {"legacy_quick_gelu": LEGACY, "modern_gelu": MODERN}
TOKENIZER_EOS, TOKENIZER_BOS = 999, 998  # the tokenizer's ids, whatever the config says
SEQ_LEN = 16


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def torch_config(d: dict, with_projection: bool):
    arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    return transformers.CLIPTextConfig(**d, architectures=[arch], attn_implementation="eager")


@functools.cache
def torch_model(case: str, with_projection: bool):
    """A seeded tiny reference model with LayerNorm scales/biases and linear biases randomised."""
    torch.manual_seed(0)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model = cls(torch_config(CASES[case], with_projection)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def torch_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def flax_params(model, config: clip.CLIPTextConfig, with_projection: bool) -> dict:
    return torch_state_to_flax(
        torch_state(model), clip.abstract_params(config, with_projection), renames=clip.TORCH_TO_FLAX_RENAMES
    )


def make_inputs(pad_id: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three prompts: one filling the window, two shorter ones padded after their EOS."""
    rng = np.random.default_rng(seed)
    ids = np.full((3, SEQ_LEN), pad_id, np.int64)
    mask = np.zeros((3, SEQ_LEN), np.int64)
    for row, length in enumerate((SEQ_LEN, 7, 11)):
        ids[row, :length] = [TOKENIZER_BOS, *rng.integers(3, 990, length - 2), TOKENIZER_EOS]
        mask[row, :length] = 1
    return ids, mask


def setup_case(case: str, with_projection: bool, **module_kwargs):
    model = torch_model(case, with_projection)
    config = clip.clip_config_from_dict(model.config.to_dict())
    params = flax_params(model, config, with_projection)
    module = clip.make_text_encoder(config, with_projection=with_projection, **module_kwargs)
    return model, config, module, params


def apply(module, params, ids, mask=None, *, hidden=False):
    """Jitted forward: one compile beats hundreds of eager per-op dispatches."""
    forward = jax.jit(functools.partial(module.apply, output_hidden_states=hidden))
    return forward({"params": params}, ids, mask)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_param_tree_uses_old_transformers_flax_names():
    config = clip.clip_config_from_dict(LEGACY)
    paths = {"/".join(p) for p in flatten_tree(clip.abstract_params(config, with_projection=True))}
    for expected in (
        "text_model/encoder/layers/0/self_attn/q_proj/kernel",
        "text_model/encoder/layers/4/mlp/fc2/bias",
        "text_model/encoder/layers/2/layer_norm1/scale",
        "text_model/embeddings/token_embedding/embedding",
        "text_model/embeddings/position_embedding/embedding",
        "text_model/final_layer_norm/scale",
        "text_projection/kernel",
    ):
        assert expected in paths
    assert "text_projection/bias" not in paths
    plain = {"/".join(p) for p in flatten_tree(clip.abstract_params(config))}
    assert plain == {p for p in paths if not p.startswith("text_projection")}


def test_abstract_params_match_init_params():
    config = clip.clip_config_from_dict(dict(MODERN, num_hidden_layers=2))
    abstract = clip.abstract_params(config, with_projection=True)
    real = clip.init_params(config, jax.random.key(1), with_projection=True)
    spec = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert spec(abstract) == spec(real)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("with_projection", [False, True], ids=["CLIPTextModel", "WithProjection"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_transformers(case, with_projection, masked):
    model, config, module, params = setup_case(case, with_projection)
    ids, mask = make_inputs(pad_id=TOKENIZER_EOS if case == "legacy_quick_gelu" else 0)
    with torch.no_grad():
        ref = model(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if masked else None, output_hidden_states=True
        )
    out = apply(module, params, ids, mask if masked else None, hidden=True)
    errors = {
        "last_hidden_state": rel_err(out.last_hidden_state, ref.last_hidden_state),
        "penultimate": rel_err(out.hidden_states[-2], ref.hidden_states[-2]),
    }
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    pairs = zip(out.hidden_states, ref.hidden_states, strict=True)
    errors["all_hidden_states"] = max(rel_err(a, b) for a, b in pairs)
    if with_projection:
        errors["text_embeds"] = rel_err(out.text_embeds, ref.text_embeds)
        # transformers' projection output has no pooler_output; recompute it from the inner model.
        with torch.no_grad():
            inner = model.text_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if masked else None)
        errors["pooler_output"] = rel_err(out.pooler_output, inner.pooler_output)
    else:
        assert out.text_embeds is None
        errors["pooler_output"] = rel_err(out.pooler_output, ref.pooler_output)
    print(case, "projection" if with_projection else "plain", "masked" if masked else "unmasked", errors)
    assert max(errors.values()) <= RTOL, errors


def test_pooling_takes_first_eos_even_below_the_largest_id():
    """eos_token_id != 2: the pooled token is the first EOS, not argmax(ids) (transformers PR #24773)."""
    d = dict(MODERN, eos_token_id=500)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(torch_config(d, False)).eval()
    config = clip.clip_config_from_dict(d)
    params = flax_params(model, config, False)
    ids = np.array([[998, 10, 500, 900, 500, 7], [998, 700, 800, 3, 500, 500]])
    assert np.array_equal(clip.compute_eos_positions(jnp.asarray(ids), 500), [2, 4])
    assert np.array_equal(clip.compute_eos_positions(jnp.asarray(ids), 2), [0, 0])
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).pooler_output
    out = apply(clip.FlaxCLIPTextModel(config), params, ids)
    assert rel_err(out.pooler_output, ref) <= RTOL
    assert rel_err(out.pooler_output, out.last_hidden_state[np.arange(2), np.array([2, 4])]) == 0.0


def grad_errors(got: dict, ref: dict) -> dict[str, float]:
    """Per-tensor max|a-b| / max|b|, with a floor of 1e-3 x the largest gradient.

    The floor is for k_proj.bias: it shifts every score of a query row equally, so softmax
    cancels it; its true gradient is 0 and both sides hold only rounding noise.
    """
    floor = 1e-3 * max(float(np.max(np.abs(g))) for g in ref.values())
    return {
        k: float(np.max(np.abs(np.asarray(got[k]) - g)) / max(float(np.max(np.abs(g))), floor)) for k, g in ref.items()
    }


def _weighted_loss(last, penultimate, pooled, weights):
    return sum((x * w).sum() for x, w in zip((last, penultimate, pooled), weights, strict=True))


@pytest.mark.parametrize("with_projection", [False, True], ids=["CLIPTextModel", "WithProjection"])
def test_gradients_match_transformers(with_projection):
    case = "modern_gelu" if with_projection else "legacy_quick_gelu"
    model, config, module, params = setup_case(case, with_projection)
    ids, mask = make_inputs(pad_id=0, seed=1)
    rng = np.random.default_rng(2)
    pooled_width = config.projection_dim if with_projection else config.hidden_size
    weights = [
        rng.standard_normal(s).astype(np.float32)
        for s in (ids.shape + (config.hidden_size,),) * 2 + ((ids.shape[0], pooled_width),)
    ]

    model.zero_grad()
    ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    ref_pooled = ref.text_embeds if with_projection else ref.pooler_output
    _weighted_loss(
        ref.last_hidden_state, ref.hidden_states[-2], ref_pooled, [torch.from_numpy(w) for w in weights]
    ).backward()
    ref_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}

    def loss_fn(p, remat_module):
        out = remat_module.apply({"params": p}, ids, mask, output_hidden_states=True)
        pooled = out.text_embeds if with_projection else out.pooler_output
        return _weighted_loss(out.last_hidden_state, out.hidden_states[-2], pooled, weights)

    grads = jax.jit(jax.grad(loss_fn), static_argnums=1)(params, module)
    prefix = "" if with_projection else "text_model."  # transformers 5 CLIPTextModel keys lack it
    got = flax_to_torch_state(grads, renames=clip.FLAX_TO_TORCH_RENAMES)
    assert set(got) == {prefix + k for k in ref_grads}
    errors = grad_errors({k: got[prefix + k] for k in ref_grads}, ref_grads)
    (emb,) = [k for k in errors if k.endswith("token_embedding.weight")]
    print("grad rel errors: token_embedding", errors[emb], "max", max(errors.values()))
    assert max(errors.values()) <= RTOL, {k: e for k, e in errors.items() if e > RTOL}


def test_gradient_checkpointing_keeps_outputs_and_gradients():
    config = clip.clip_config_from_dict(dict(MODERN, num_hidden_layers=2))
    abstract = clip.abstract_params(config)
    rng = np.random.default_rng(3)  # numpy: eager jax.random would compile once per shape
    params = jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(a.dtype), abstract)
    ids, mask = make_inputs(pad_id=0)

    def loss_fn(p, module):
        out = module.apply({"params": p}, ids, mask, output_hidden_states=True)
        return (out.last_hidden_state**2).sum() + out.hidden_states[-2].sum() + out.pooler_output.sum()

    plain, remat = (clip.make_text_encoder(config, gradient_checkpointing=flag) for flag in (False, True))
    grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
    (loss, grads), (remat_loss, remat_grads) = grad_fn(params, plain), grad_fn(params, remat)
    assert rel_err(remat_loss, loss) <= 1e-6
    flat = lambda tree: {"/".join(k): v for k, v in flatten_tree(tree).items()}
    # recomputation may fuse and round differently, hence not bit-identical
    assert max(grad_errors(flat(remat_grads), flat(grads)).values()) <= 1e-5


@pytest.mark.parametrize("with_projection", [False, True], ids=["CLIPTextModel", "WithProjection"])
def test_torch_flax_torch_round_trip_is_bit_identical(with_projection):
    model = torch_model("legacy_quick_gelu", with_projection)
    config = clip.clip_config_from_dict(LEGACY)
    state = {k: v for k, v in torch_state(model).items() if not k.endswith("position_ids")}
    # Published SD checkpoints prefix every key with "text_model."; transformers 5
    # CLIPTextModel.state_dict() does not. Both must come back in the published layout.
    published = {
        k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in state.items()
    }
    for source in (state, published):
        params = torch_state_to_flax(
            source, clip.abstract_params(config, with_projection), renames=clip.TORCH_TO_FLAX_RENAMES
        )
        back = flax_to_torch_state(params, renames=clip.FLAX_TO_TORCH_RENAMES)
        assert set(back) == set(published)
        for key, value in published.items():
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


@pytest.mark.parametrize("with_projection", [False, True], ids=["CLIPTextModel", "WithProjection"])
def test_exported_weights_load_in_transformers(tmp_path, with_projection):
    model, config, _, params = setup_case("modern_gelu", with_projection)
    state = flax_to_torch_state(params, renames=clip.FLAX_TO_TORCH_RENAMES)
    safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    cls = type(model)
    loaded, info = cls.from_pretrained(str(tmp_path), attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = make_inputs(pad_id=0)
    with torch.no_grad():
        a = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        b = loaded.eval()(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert torch.equal(a, b)


def test_dot_product_kernel_matches_xla_kernel():
    _, config, module, params = setup_case("modern_gelu", True)
    fused = clip.make_text_encoder(config, with_projection=True, attention_kernel="dot_product")
    ids, mask = make_inputs(pad_id=0)
    a = apply(module, params, ids, mask, hidden=True)
    b = apply(fused, params, ids, mask, hidden=True)
    for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(a), strict=True):
        assert rel_err(x, y) <= 1e-5


def test_bfloat16_compute_stays_close_to_float32():
    _, config, module, params = setup_case("legacy_quick_gelu", False)
    ids, mask = make_inputs(pad_id=TOKENIZER_EOS)
    ref = apply(module, params, ids, mask)
    out = apply(clip.make_text_encoder(config, dtype=jnp.bfloat16), params, ids, mask)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= 5e-2


def test_config_reads_transformers_config_json():
    d = torch_config(MODERN, with_projection=True).to_dict()
    config = clip.clip_config_from_dict(json.loads(json.dumps(d)))
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "projection_dim",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "eos_token_id",
        "bos_token_id",
        "pad_token_id",
    ):
        assert getattr(config, key) == d[key], key
    assert config.has_projection and config.architectures == ("CLIPTextModelWithProjection",)
    assert not clip.clip_config_from_dict(LEGACY).has_projection
    hash(config)  # static module field


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"hidden_size": 30}, "num_attention_heads"),
        ({"architectures": ["CLIPVisionModel"]}, "architectures"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"eos_token_id": [2, 3]}, "eos_token_id"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"text_config": {}}, "text_config"),
    ],
)
def test_unsupported_config_raises_naming_the_key(change, key):
    with pytest.raises(JaxboothError, match=key):
        clip.clip_config_from_dict(dict(LEGACY, **change))


def test_input_longer_than_position_table_raises():
    config = clip.clip_config_from_dict(dict(LEGACY, max_position_embeddings=8))
    params = clip.abstract_params(config)
    with pytest.raises(JaxboothError, match="max_position_embeddings"):
        jax.eval_shape(
            clip.FlaxCLIPTextModel(config).apply, {"params": params}, jax.ShapeDtypeStruct((1, 9), jnp.int32)
        )
