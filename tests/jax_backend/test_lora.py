"""JAX LoRA as a param-tree transform (``jax_backend.lora``): init, merge, conversions, and the
train step training the adapters only, on a one-block UNet."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbooth import diffusion
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import lora as lora_lib
from jaxbooth.jax_backend import mesh as mesh_lib
from jaxbooth.jax_backend import optim
from jaxbooth.jax_backend.models import unet as unet_lib
from jaxbooth.jax_backend.train import init_state
from jaxbooth.jax_backend.train_step import LossOptions, gradient_step, make_train_step
from jaxbooth.jax_backend.weights import flatten_tree
from jaxbooth.lora import UNET_TARGETS, AdapterSettings

CONFIG = {"block_out_channels": (32,), "layers_per_block": 1, "sample_size": 8, "in_channels": 4,
          "out_channels": 4, "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",),
          "cross_attention_dim": 16, "attention_head_dim": 4}
ATTN = ("down_blocks_0", "attentions_0", "transformer_blocks_0")


@pytest.fixture(scope="module")
def unet():
    config = unet_lib.unet_config_from_dict(CONFIG)
    model = unet_lib.FlaxUNet2DConditionModel(config)
    return model, jax.device_get(unet_lib.init_params(config, jax.random.PRNGKey(0)))


def unet_inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32), jnp.asarray([10, 500]),
            jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32))


def made_up(adapters: dict, seed: int = 1) -> dict:
    """Nonzero adapters of the same shapes (trained-looking), DoRA magnitudes moved off their start."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x * (1 + 0.1 * rng.standard_normal(x.shape)) + 0.05 * rng.standard_normal(x.shape))
                        .astype(np.float32), adapters)


def test_targets_are_the_attention_projections_by_torch_path(unet) -> None:
    _, params = unet
    paths = lora_lib.target_paths(params, UNET_TARGETS, "unet")
    assert (*ATTN, "attn1", "to_out_0") in paths
    assert paths[(*ATTN, "attn1", "to_out_0")] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert {p[-1] for p in paths} == {"to_q", "to_k", "to_v", "to_out_0"}
    assert len(paths) == 4 * 2 * 4  # 4 projections x attn1/attn2 x (down, up 2? mid) blocks
    only_q = lora_lib.target_paths(params, ("attn2.to_q",), "unet")
    assert all(p[-2:] == ("attn2", "to_q") for p in only_q) and only_q


def test_targets_that_are_not_linear_layers_or_match_nothing_are_refused(unet) -> None:
    _, params = unet
    with pytest.raises(JaxboothError, match="lora_target_modules.*'conv1'.*not a linear layer"):
        lora_lib.target_paths(params, ("to_q", "conv1"), "unet")
    with pytest.raises(JaxboothError, match="lora_text_encoder_target_modules.*none of"):
        lora_lib.target_paths(params, ("q_proj",), "text_encoder")


def test_init_gives_exactly_the_base_unet(unet) -> None:
    model, params = unet
    settings = AdapterSettings(rank=2, alpha=3.0)
    adapters = lora_lib.init_adapters({"unet": params}, settings, seed=0)
    merged = lora_lib.merge(params, adapters["unet"], settings.scale)
    base_flat, merged_flat = flatten_tree(params), flatten_tree(merged)
    assert base_flat.keys() == merged_flat.keys()
    for key, value in base_flat.items():
        np.testing.assert_array_equal(np.asarray(merged_flat[key]), value, err_msg="/".join(key))
    x, t, ctx = unet_inputs()
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply({"params": merged}, x, t, ctx), apply({"params": params}, x, t, ctx))
    # the shared init: the same numbers as AdapterSettings.initial_layer, in Flax layout
    torch_path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    kernel = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]
    want = settings.initial_layer("unet", torch_path, np.asarray(kernel).T, 0)
    got = adapters["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]
    np.testing.assert_array_equal(got["down"], want.down.T)
    assert got["down"].shape == (16, 2) and got["up"].shape == (2, 32) and not got["up"].any()


def test_merge_is_the_low_rank_update_and_dora_rescales_columns(unet) -> None:
    _, params = unet
    for use_dora in (False, True):
        settings = AdapterSettings(rank=2, alpha=6.0, use_dora=use_dora)
        adapters = made_up(lora_lib.init_adapters({"unet": params}, settings, seed=0))["unet"]
        merged = lora_lib.merge(params, adapters, settings.scale)
        layer = adapters["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_v"]
        kernel = np.asarray(params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_v"]["kernel"])
        want = kernel + 3.0 * layer["down"] @ layer["up"]
        if use_dora:
            want = want * (layer["magnitude"] / np.linalg.norm(want, axis=0))[None]
        got = merged["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_v"]["kernel"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, kernel, atol=1e-3)
        # the jitted merger (validation) gives the same tree
        jitted = lora_lib.make_merger(settings.scale)({"unet": params}, {"unet": adapters})["unet"]
        for key, value in flatten_tree(merged).items():
            np.testing.assert_allclose(flatten_tree(jitted)[key], value, rtol=1e-6, atol=1e-7, err_msg="/".join(key))


def test_lora_state_round_trip_in_torch_layout(unet) -> None:
    _, params = unet
    settings = AdapterSettings(rank=2, alpha=4.0, use_dora=True)
    adapters = made_up(lora_lib.init_adapters({"unet": params}, settings, seed=0))
    state = lora_lib.to_lora_state(jax.device_get(adapters), settings)
    layer = state["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"]
    assert layer.down.shape == (2, 32) and layer.up.shape == (32, 2) and layer.magnitude.shape == (32,)
    assert layer.alpha == 4.0
    back = lora_lib.adapters_from_state(state, {"unet": params}, settings.scale)
    want = flatten_tree(adapters)
    assert flatten_tree(back).keys() == want.keys()
    for path, got in flatten_tree(back).items():
        np.testing.assert_array_equal(got, want[path], err_msg="/".join(path))
    # another alpha is folded into up: the merged weights are the same
    other = lora_lib.adapters_from_state(state, {"unet": params}, scale=0.5)
    a = lora_lib.merge(params, back["unet"], settings.scale)
    b = lora_lib.merge(params, other["unet"], 0.5)
    for key, value in flatten_tree(a).items():
        np.testing.assert_allclose(flatten_tree(b)[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(JaxboothError, match="names no linear layer"):
        lora_lib.adapters_from_state({"unet": {"mid_block.nope.to_q": layer}}, {"unet": params}, 1.0)


def _step_setup(params, settings: AdapterSettings):
    tables = diffusion.NoiseTables(*(np.asarray(x, np.float32) for x in (
        np.linspace(1.0, 0.1, 1000), np.linspace(0.05, 0.99, 1000), np.linspace(400.0, 0.01, 1000))))
    rng = np.random.default_rng(0)
    frozen = {"latent_mean": jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32),
              "latent_std": jnp.full((3, 8, 8, 4), 0.1, jnp.float32),
              "text_embeddings": jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32),
              "base": {"unet": jax.tree.map(jnp.asarray, params)}}
    batch = {"example_idx": jnp.asarray([2, 0], jnp.int32), "prompt_idx": jnp.asarray([1, 0], jnp.int32)}
    return tables, frozen, batch


@pytest.mark.parametrize("use_dora", [False, True])
def test_steps_train_the_adapters_only(unet, use_dora: bool) -> None:
    """DoRA also runs in bf16 compute with remat: the merged kernels go through the cast and the remat."""
    model, params = unet
    if use_dora:
        model = unet_lib.FlaxUNet2DConditionModel(model.config, dtype=jnp.bfloat16, gradient_checkpointing=True)
    settings = AdapterSettings(rank=2, alpha=2.0, use_dora=use_dora)
    adapters = lora_lib.init_adapters({"unet": params}, settings, seed=0)
    tables, frozen, batch = _step_setup(params, settings)
    base_before = jax.device_get(frozen["base"])
    tx = optim.make_optimizer(learning_rate_schedule=1e-2, max_grad_norm=1.0)
    static = dict(unet_apply=model.apply, text_apply=None, tables=tables, options=LossOptions(snr_gamma=5.0),
                  merge=lora_lib.step_merge(settings.scale))
    state, _ = init_state(adapters, tx, mesh_lib.make_mesh((1, 1)), seed=3)
    grads, _ = jax.eval_shape(lambda s, f, b: gradient_step(s, f, b, **static), state, frozen, batch)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)  # no base leaf has a gradient
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    opt_bytes = optim.count_optimizer_state_bytes(state.opt_state)
    assert 2 * adapter_bytes <= opt_bytes < 2 * adapter_bytes + 1024 and opt_bytes < base_bytes / 10

    step = jax.jit(make_train_step(tx=tx, lr_schedule=lambda s: 1e-2, **static))
    losses = []
    for _ in range(3):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["grad_norm"]) > 0
    assert np.isfinite(losses).all()
    for path, before in flatten_tree(base_before).items():
        np.testing.assert_array_equal(np.asarray(flatten_tree(frozen["base"])[path]), before)
    trained = jax.device_get(state.params)
    changed = {p[-1] for p, v in flatten_tree(trained).items() if not np.array_equal(v, flatten_tree(adapters)[p])}
    assert changed == ({"down", "up", "magnitude"} if use_dora else {"down", "up"})
    x, t, ctx = unet_inputs()
    moved = model.apply({"params": lora_lib.merge(params, trained["unet"], settings.scale)}, x, t, ctx)
    assert np.abs(np.asarray(moved) - np.asarray(model.apply({"params": params}, x, t, ctx))).max() > 1e-4


class _Validator:
    def __init__(self) -> None:
        self.seen: list = []

    def should_run(self, step: int, epochs_done: int | None = None) -> bool:
        return True

    def run(self, step: int, unet_params, text_params=None, *, writer=None) -> None:
        self.seen.append((step, jax.device_get(unet_params), text_params))


class _Writer:
    """CheckpointWriter's contract, synchronously, without orbax: export what gather returns."""

    def __init__(self, root) -> None:
        self.root, self.saved = root, []

    def save(self, step, state, data_state, spec, *, seed, export, gather) -> None:
        path = self.root / f"checkpoint-{step}"
        path.mkdir(parents=True)
        export(path, gather(state))
        self.saved.append(path)

    def wait(self) -> None:
        pass


def test_the_loop_validates_merged_params_and_checkpoints_the_lora_file(unet, tmp_path) -> None:
    """run_loop with LoRA: validation sees the adapters merged into frozen["base"], and each checkpoint
    holds the LoRA file of the adapters at that step."""
    from jaxbooth import data
    from jaxbooth.jax_backend import train
    from jaxbooth.lora.files import LORA_WEIGHTS_NAME, read_lora_file
    from jaxbooth.run_defaults import fill_defaults
    from jaxbooth.spec import load_spec_from_dict

    _, params = unet
    spec = fill_defaults(load_spec_from_dict({"use_lora": True, "rank": 2, "lora_alpha": 4.0, "max_train_steps": 2,
                                              "checkpointing_steps": 1, "report_to": "none",
                                              "output_dir": str(tmp_path / "out"),
                                              "pretrained_model_name_or_path": str(tmp_path / "unused")}))
    settings = AdapterSettings.from_spec(spec)
    run = train.prepare_inputs(spec, SimpleNamespace(model_dir=tmp_path / "unused"))
    start = lora_lib.init_adapters({"unet": params}, settings, seed=0)
    states = [made_up(start, seed) for seed in (1, 2)]

    def compiled(state, frozen, batch):
        step = int(state.step)
        return state.replace(step=state.step + 1, params=states[step]), {"loss": jnp.float32(0.5)}

    iterator = data.BatchIterator(run.dataset, resolution=spec.data.resolution, batch_size=1, seed=0)
    rows = lambda it, epoch, position: {"example_idx": np.zeros(1, np.int32)}  # noqa: E731
    mesh = mesh_lib.make_mesh((1, 1))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=start, opt_state=None, rng=None)
    frozen = {"base": {"unet": params}}
    validator, writer = _Validator(), _Writer(tmp_path / "out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.Progress, "report", lambda *a, **k: None)
        train.run_loop(run, compiled, state, frozen, iterator, rows, {"example_idx": mesh_lib.batch_sharding(mesh)},
                       writer, None, validator)
    assert [step for step, _, _ in validator.seen] == [1, 2]
    for (_, unet_params, text_params), adapters in zip(validator.seen, states, strict=True):
        assert text_params is None
        want = lora_lib.merge(params, adapters["unet"], settings.scale)
        for path, value in flatten_tree(want).items():
            np.testing.assert_allclose(flatten_tree(unet_params)[path], value, rtol=1e-6, atol=1e-7)
    assert [p.name for p in writer.saved] == ["checkpoint-1", "checkpoint-2"]
    for path, adapters in zip(writer.saved, states, strict=True):
        layers = read_lora_file(path / LORA_WEIGHTS_NAME)["unet"]
        for name, layer in lora_lib.to_lora_state(adapters, settings)["unet"].items():
            np.testing.assert_array_equal(layers[name].down, layer.down)
            np.testing.assert_array_equal(layers[name].up, layer.up)
            assert layers[name].alpha == 4.0
