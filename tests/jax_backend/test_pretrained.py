"""jaxbooth.jax_backend.pretrained: diffusers/transformers checkpoints in, diffusers layout out.

Tiny torch reference models (diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``,
transformers ``CLIPTextModel[WithProjection]``) are saved with ``save_pretrained`` in
every layout the loader claims to read (plain, sharded, fp16 variant, bf16, old Flax
msgpack); the claims are: loading is exact, exporting reloads in torch with no missing or
unexpected keys and bit-identical tensors, and every broken checkpoint is one clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import pretrained
from jaxbooth.jax_backend.weights import flatten_tree
from tests._logs import logged_warning

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
MODEL_MODULES = {"unet": "unet", "vae": "vae", "text_encoder": "clip", "text_encoder_2": "clip"}
CLIP_KWARGS = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                   num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000,
                   projection_dim=32)


def require_model(component: str) -> None:
    """The UNet/VAE modules are written in parallel; skip (with the reason) until they exist."""
    pytest.importorskip(f"jaxbooth.jax_backend.models.{MODEL_MODULES[component]}",
                        reason=f"Flax model module for {component} not available")


def make_torch_model(component: str, seed: int = 0):
    """A tiny random torch reference model for ``component``."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    if component == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    return cls(CLIPTextConfig(**CLIP_KWARGS))


def torch_class(component: str):
    if component == "unet":
        from diffusers import UNet2DConditionModel as cls
    elif component == "vae":
        from diffusers import AutoencoderKL as cls
    elif component == "text_encoder":
        from transformers import CLIPTextModel as cls
    else:
        from transformers import CLIPTextModelWithProjection as cls
    return cls


def numpy_state(model) -> dict[str, np.ndarray]:
    """A torch model's persistent state as numpy (bf16 through float32, which is exact)."""
    import torch

    def to_numpy(t: torch.Tensor) -> np.ndarray:
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()

    state = model.state_dict()
    return {k: to_numpy(v.detach().cpu()) for k, v in state.items() if not k.endswith("position_ids")}


def assert_trees_equal(a: dict, b: dict) -> None:
    flat_a, flat_b = flatten_tree(a), flatten_tree(b)
    assert sorted(flat_a) == sorted(flat_b)
    for path, value in flat_a.items():
        other = flat_b[path]
        assert value.dtype == other.dtype, path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(other), err_msg="/".join(path))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Cache of :func:`saved` entries, built on first use (module scope: torch saves are slow)."""
    return {"root": tmp_path_factory.mktemp("checkpoints")}


def saved(checkpoints: dict, component: str) -> dict:
    """The torch model of ``component`` and pipeline folders per layout (plain, sharded, fp16 variant)."""
    require_model(component)
    torch = pytest.importorskip("torch")
    if component not in checkpoints:
        root = checkpoints["root"]
        model = make_torch_model(component)
        model.save_pretrained(root / "plain" / component)
        model.save_pretrained(root / "sharded" / component, max_shard_size="20KB")
        half = make_torch_model(component).to(torch.float16)
        half.save_pretrained(root / "fp16" / component, variant="fp16")
        checkpoints[component] = {"model": model, "half": half, "root": root}
    return checkpoints[component]


@pytest.mark.parametrize("component", COMPONENTS)
def test_export_reloads_in_torch_bit_identical_with_no_missing_keys(checkpoints: dict, component: str,
                                                                    tmp_path: Path) -> None:
    entry = saved(checkpoints, component)
    config, config_dict, params = pretrained.load_pretrained(entry["root"] / "plain", component)
    out = pretrained.save_diffusers_component(params, config_dict, tmp_path, component)
    assert json.loads((out / "config.json").read_text()) == config_dict
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    reloaded, info = torch_class(component).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original, again = numpy_state(entry["model"]), numpy_state(reloaded)
    assert sorted(original) == sorted(again)
    for key, value in original.items():
        assert again[key].dtype == value.dtype, key
        np.testing.assert_array_equal(again[key], value, err_msg=key)


@pytest.mark.parametrize("component", COMPONENTS)
def test_sharded_checkpoint_loads_equal_to_unsharded(checkpoints: dict, component: str) -> None:
    entry = saved(checkpoints, component)
    sharded = entry["root"] / "sharded" / component
    assert list(sharded.glob("*.safetensors.index.json")), "fixture did not shard"
    *_, plain = pretrained.load_pretrained(entry["root"] / "plain", component)
    *_, from_shards = pretrained.load_pretrained(entry["root"] / "sharded", component)
    assert_trees_equal(plain, from_shards)


@pytest.mark.parametrize("component", COMPONENTS)
def test_fp16_variant_loads_as_fp16_values(checkpoints: dict, component: str) -> None:
    entry = saved(checkpoints, component)
    state = pretrained.read_state_dict(entry["root"] / "fp16" / component, variant="fp16")
    reference = numpy_state(entry["half"])
    assert state.keys() >= reference.keys()
    for key, value in reference.items():
        assert state[key].dtype == np.float16, key
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    *_, params = pretrained.load_pretrained(entry["root"] / "fp16", component, variant="fp16")
    assert {np.asarray(v).dtype for v in flatten_tree(params).values()} == {np.dtype(np.float16)}


def test_sharded_fp16_variant_uses_the_variant_index_name(tmp_path: Path) -> None:
    require_model("unet")
    torch = pytest.importorskip("torch")
    model = make_torch_model("unet").to(torch.float16)
    model.save_pretrained(tmp_path / "unet", variant="fp16", max_shard_size="50KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    state = pretrained.read_state_dict(tmp_path / "unet", variant="fp16")
    reference = numpy_state(model)
    assert sorted(state) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


def test_missing_variant_falls_back_to_plain_with_a_warning(checkpoints: dict) -> None:
    entry = saved(checkpoints, "text_encoder")
    with logged_warning("no 'fp16' variant weights"):
        *_, params = pretrained.load_pretrained(entry["root"] / "plain", "text_encoder", variant="fp16")
    *_, plain = pretrained.load_pretrained(entry["root"] / "plain", "text_encoder")
    assert_trees_equal(params, plain)


def test_bf16_weights_read_as_ml_dtypes_bfloat16_and_raw_reader_agrees(tmp_path: Path) -> None:
    require_model("text_encoder")
    torch = pytest.importorskip("torch")
    import ml_dtypes
    from safetensors.numpy import load_file

    from jaxbooth.weight_files import read_safetensors_raw

    model = make_torch_model("text_encoder").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "text_encoder")
    *_, params = pretrained.load_pretrained(tmp_path, "text_encoder")
    assert {np.asarray(v).dtype for v in flatten_tree(params).values()} == {np.dtype(ml_dtypes.bfloat16)}
    file = tmp_path / "text_encoder" / "model.safetensors"
    raw, library = read_safetensors_raw(file), load_file(file)
    assert sorted(raw) == sorted(library)
    for key in library:
        assert raw[key].dtype == library[key].dtype and raw[key].shape == library[key].shape, key
        np.testing.assert_array_equal(raw[key].view(np.uint16), library[key].view(np.uint16), err_msg=key)
    reference = numpy_state(model)
    for key, value in reference.items():
        np.testing.assert_array_equal(raw[key].view(np.uint16), value.view(np.uint16), err_msg=key)


def test_dtype_argument_casts_every_leaf(checkpoints: dict) -> None:
    entry = saved(checkpoints, "text_encoder")
    *_, params = pretrained.load_pretrained(entry["root"] / "plain", "text_encoder", dtype="bfloat16")
    assert {str(np.asarray(v).dtype) for v in flatten_tree(params).values()} == {"bfloat16"}


@pytest.mark.parametrize("component", COMPONENTS)
def test_old_flax_msgpack_checkpoint_loads_and_equals(checkpoints: dict, component: str,
                                                      tmp_path: Path) -> None:
    entry = saved(checkpoints, component)
    _, config_dict, params = pretrained.load_pretrained(entry["root"] / "plain", component)
    old = tmp_path / component
    pretrained.save_flax_msgpack(params, old, pretrained.component_kind(component).msgpack_name)
    (old / "config.json").write_text(json.dumps(config_dict))
    kind, files = pretrained.find_weight_files(old)
    assert kind == "msgpack" and files[0].name in pretrained.MSGPACK_NAMES
    *_, loaded = pretrained.load_pretrained(tmp_path, component)
    assert_trees_equal(params, loaded)


def test_msgpack_of_a_linen_variables_dict_is_unwrapped(checkpoints: dict, tmp_path: Path) -> None:
    entry = saved(checkpoints, "text_encoder")
    config, config_dict, params = pretrained.load_pretrained(entry["root"] / "plain", "text_encoder")
    pretrained.save_flax_msgpack({"params": params}, tmp_path, "flax_model.msgpack")
    abstract = pretrained.abstract_params_for("text_encoder", config, config_dict)
    assert_trees_equal(params, pretrained.read_flax_msgpack(tmp_path, abstract))


def test_msgpack_with_missing_and_misshaped_leaves_lists_them(checkpoints: dict, tmp_path: Path) -> None:
    entry = saved(checkpoints, "text_encoder")
    config, config_dict, params = pretrained.load_pretrained(entry["root"] / "plain", "text_encoder")
    layer = params["text_model"]["encoder"]["layers"]["0"]
    del layer["self_attn"]["q_proj"]["bias"]
    layer["mlp"]["fc1"]["kernel"] = layer["mlp"]["fc1"]["kernel"][:, :5]
    layer["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    pretrained.save_flax_msgpack(params, tmp_path, "flax_model.msgpack")
    abstract = pretrained.abstract_params_for("text_encoder", config, config_dict)
    with pytest.raises(JaxboothError) as info:
        pretrained.read_flax_msgpack(tmp_path, abstract)
    message = str(info.value)
    assert "flax_model.msgpack" in message
    assert "missing from the checkpoint (1)" in message and "layers/0/self_attn/q_proj/bias" in message
    assert "not used by the model (1)" in message and "layers/0/extra/kernel" in message
    assert "layers/0/mlp/fc1/kernel: checkpoint (32, 5), model (32, 37)" in message


def _edit_checkpoint(src: Path, dst: Path, component: str, edit) -> None:
    """Copy a component folder and rewrite its single safetensors file through ``edit(state)``."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src / component, dst / component)
    file = next((dst / component).glob("*.safetensors"))
    state = dict(load_file(file))
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("damage", ["deleted", "extra", "wrong_shape"])
def test_damaged_safetensors_checkpoint_error_lists_the_key(checkpoints: dict, component: str, damage: str,
                                                             tmp_path: Path) -> None:
    entry = saved(checkpoints, component)
    victim = sorted(k for k, v in numpy_state(entry["model"]).items() if v.ndim == 2)[0]

    def edit(state: dict) -> None:
        if damage == "deleted":
            del state[victim]
        elif damage == "extra":
            state["made_up.layer.weight"] = np.zeros((3, 3), np.float32)
        else:
            state[victim] = np.zeros((7, *state[victim].shape[1:]), state[victim].dtype)

    _edit_checkpoint(entry["root"] / "plain", tmp_path, component, edit)
    with pytest.raises(JaxboothError, match="do not fit the model config") as info:
        pretrained.load_pretrained(tmp_path, component)
    message = str(info.value)
    expected = {"deleted": "missing from the checkpoint (1)", "extra": "made_up.layer.weight (3, 3)",
                "wrong_shape": f"{victim} -> "}[damage]
    assert expected in message and str(tmp_path / component) in message


def test_vae_with_pre_0_14_attention_names_loads_equal(checkpoints: dict, tmp_path: Path) -> None:
    """Old diffusers VAE files name the mid-block attention query/key/value/proj_attn."""
    entry = saved(checkpoints, "vae")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(state: dict) -> None:
        for key in [k for k in state if ".attentions." in k]:
            new_key = key
            for new, old in old_names.items():
                new_key = new_key.replace(f".{new}.", f".{old}.")
            state[new_key] = state.pop(key)
        assert any(".proj_attn." in k for k in state)

    _edit_checkpoint(entry["root"] / "plain", tmp_path, "vae", rename)
    *_, plain = pretrained.load_pretrained(entry["root"] / "plain", "vae")
    *_, old = pretrained.load_pretrained(tmp_path, "vae")
    assert_trees_equal(plain, old)


def test_allow_missing_lets_a_deleted_key_through(checkpoints: dict, tmp_path: Path) -> None:
    entry = saved(checkpoints, "text_encoder_2")
    _edit_checkpoint(entry["root"] / "plain", tmp_path, "text_encoder_2",
                     lambda state: state.pop("text_projection.weight"))
    *_, params = pretrained.load_pretrained(tmp_path, "text_encoder_2", allow_missing=("^text_projection/",))
    assert "text_projection" not in params


def test_text_encoder_2_and_architectures_pick_the_projection_variant(checkpoints: dict) -> None:
    entry = saved(checkpoints, "text_encoder_2")
    *_, params = pretrained.load_pretrained(entry["root"] / "plain", "text_encoder_2")
    assert params["text_projection"]["kernel"].shape == (32, 32)
    assert pretrained.uses_projection("text_encoder_2", {})
    assert pretrained.uses_projection("text_encoder", {"architectures": ["CLIPTextModelWithProjection"]})
    assert not pretrained.uses_projection("text_encoder_2", {"architectures": ["CLIPTextModel"]})
    assert not pretrained.uses_projection("text_encoder", {})


def test_missing_component_folder_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    with pytest.raises(JaxboothError) as info:
        pretrained.load_pretrained(tmp_path, "unet")
    assert str(tmp_path / "unet") in str(info.value) and "['vae']" in str(info.value)


def test_missing_config_and_unknown_component_are_errors(tmp_path: Path) -> None:
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(JaxboothError, match="config.json: not found") as info:
        pretrained.load_pretrained(tmp_path, "text_encoder")
    assert str(tmp_path / "text_encoder" / "config.json") in str(info.value)
    with pytest.raises(JaxboothError, match="'safety_checker' is not one of"):
        pretrained.load_pretrained(tmp_path, "safety_checker")


@pytest.mark.parametrize("files, expected", [
    ([], "no weights found"),
    (["pytorch_model.bin"], "convert once with torch"),
    (["model.fp16.safetensors"], "pass --variant fp16"),
])
def test_folder_without_usable_weights_says_what_it_found_and_the_fix(tmp_path: Path, files: list[str],
                                                                     expected: str) -> None:
    require_model("text_encoder")
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**CLIP_KWARGS, "architectures": ["CLIPTextModel"]}))
    for name in files:
        (folder / name).write_bytes(b"")
    with pytest.raises(JaxboothError, match=expected) as info:
        pretrained.load_pretrained(tmp_path, "text_encoder")
    assert str(folder) in str(info.value)


def test_shard_index_pointing_at_a_missing_shard_names_it(checkpoints: dict, tmp_path: Path) -> None:
    entry = saved(checkpoints, "text_encoder")
    shutil.copytree(entry["root"] / "sharded" / "text_encoder", tmp_path / "text_encoder")
    next((tmp_path / "text_encoder").glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(JaxboothError, match="model-00002-of-"):
        pretrained.load_pretrained(tmp_path, "text_encoder")


def test_save_accepts_jax_arrays_casts_and_replaces_stale_shards(checkpoints: dict, tmp_path: Path) -> None:
    import jax

    entry = saved(checkpoints, "text_encoder")
    _, config_dict, params = pretrained.load_pretrained(entry["root"] / "plain", "text_encoder")
    shutil.copytree(entry["root"] / "sharded" / "text_encoder", tmp_path / "text_encoder")  # an earlier save
    pretrained.save_diffusers_component(jax.device_put(params), config_dict, tmp_path, "text_encoder",
                                        dtype=np.float16)
    names = sorted(p.name for p in (tmp_path / "text_encoder").iterdir())
    assert names == ["config.json", "model.safetensors"]
    state = pretrained.read_state_dict(tmp_path / "text_encoder")
    assert {v.dtype for v in state.values()} == {np.dtype(np.float16)}


def test_load_and_save_never_import_torch(tmp_path: Path) -> None:
    """The JAX path reads and writes checkpoints with safetensors/numpy only."""
    require_model("text_encoder")
    script = textwrap.dedent(f"""
        import sys
        import jax
        from jaxbooth.jax_backend import pretrained
        from jaxbooth.jax_backend.models import clip
        config_dict = {{**{CLIP_KWARGS!r}, "architectures": ["CLIPTextModel"],
                        "model_type": "clip_text_model"}}
        params = clip.init_params(clip.clip_config_from_dict(config_dict), jax.random.key(0))
        pretrained.save_diffusers_component(params, config_dict, {str(tmp_path)!r}, "text_encoder")
        pretrained.load_pretrained({str(tmp_path)!r}, "text_encoder")
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
