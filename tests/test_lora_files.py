"""The LoRA file layer: diffusers / peft / kohya files written and read back, merge math, and
stock diffusers loading our files onto the tiny pipeline exactly as our own merge predicts."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.lora import AdapterSettings, LoraLayer, LoraState, is_target
from jaxbooth.lora import kohya as kohya_lib
from jaxbooth.lora.files import (
    KOHYA_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    METADATA_KEY,
    adapter_metadata,
    read_header,
    read_lora_file,
    save_safetensors,
    write_lora_file,
)
from jaxbooth.lora.merge import component_module_paths, merge_into_state_dict, read_component_weights

UNET_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
TE_OUT_FLAT = "encoder.layers.1.self_attn.out_proj"  # transformers 5's CLIPTextModel spelling, no text_model.
MODULES = {"unet": [UNET_Q, UNET_OUT, "down_blocks.0.attentions.0.proj_in"],
           "text_encoder": [TE_Q, "text_model." + TE_OUT_FLAT, "text_model.encoder.layers.0.mlp.fc1"]}


def _layer(rng: np.random.Generator, out: int, inp: int, rank: int, alpha: float, dora: bool = False,
           std: float = 0.1) -> LoraLayer:
    magnitude = rng.uniform(0.5, 2.0, out).astype(np.float32) if dora else None
    return LoraLayer(down=rng.normal(0, std, (rank, inp)).astype(np.float32),
                     up=rng.normal(0, std, (out, rank)).astype(np.float32), alpha=alpha, magnitude=magnitude)


def _small_state(dora: bool = False, odd_alpha: bool = True) -> LoraState:
    """rank 2, alpha 5 (scale 2.5); one UNet layer with its own alpha (a per-module exception)."""
    rng = np.random.default_rng(1)
    return {"unet": {UNET_Q: _layer(rng, 6, 5, 2, 5.0, dora), UNET_OUT: _layer(rng, 6, 7, 2, 3.0 if odd_alpha else 5.0,
                                                                                 dora)},
            "text_encoder": {TE_Q: _layer(rng, 4, 4, 2, 5.0, dora), TE_OUT_FLAT: _layer(rng, 4, 4, 2, 5.0, dora)}}


SETTINGS = AdapterSettings(rank=2, alpha=5.0, train_text_encoder=True)


def _assert_same(got: LoraState, want: LoraState) -> None:
    canon = {c: {("text_model." + p if c == "text_encoder" and p.startswith("encoder.") else p): v
                 for p, v in layers.items()} for c, layers in want.items()}
    assert {c: sorted(v) for c, v in got.items()} == {c: sorted(v) for c, v in canon.items()}
    for component, layers in canon.items():
        for path, layer in layers.items():
            back = got[component][path]
            assert back.down.dtype == np.float32 and back.up.dtype == np.float32
            np.testing.assert_array_equal(back.down, layer.down)
            np.testing.assert_array_equal(back.up, layer.up)
            assert back.alpha == pytest.approx(layer.alpha), f"{component}.{path}"
            if layer.magnitude is None:
                assert back.magnitude is None
            else:
                np.testing.assert_array_equal(back.magnitude, layer.magnitude)


def test_the_file_has_the_diffusers_scripts_keys_and_adapter_metadata(tmp_path: Path) -> None:
    path = write_lora_file(tmp_path / LORA_WEIGHTS_NAME, _small_state(), SETTINGS)
    header = read_header(path)
    keys = set(header) - {"__metadata__"}
    assert keys == {
        f"unet.{UNET_Q}.lora.down.weight", f"unet.{UNET_Q}.lora.up.weight",
        f"unet.{UNET_OUT}.lora.down.weight", f"unet.{UNET_OUT}.lora.up.weight",
        f"text_encoder.{TE_Q}.lora_linear_layer.down.weight", f"text_encoder.{TE_Q}.lora_linear_layer.up.weight",
        f"text_encoder.text_model.{TE_OUT_FLAT}.lora_linear_layer.down.weight",
        f"text_encoder.text_model.{TE_OUT_FLAT}.lora_linear_layer.up.weight"}
    assert all(header[k]["dtype"] == "F32" for k in keys)
    assert header["__metadata__"]["format"] == "pt"
    metadata = json.loads(header["__metadata__"][METADATA_KEY])
    assert metadata["unet.r"] == 2 and metadata["unet.lora_alpha"] == 5.0 and metadata["unet.use_dora"] is False
    assert metadata["unet.target_modules"] == ["to_q", "to_out.0"]  # targets that match nothing are dropped
    assert metadata["unet.alpha_pattern"] == {UNET_OUT: 3.0}
    assert metadata["text_encoder.target_modules"] == ["q_proj", "out_proj"]
    assert "text_encoder.alpha_pattern" not in metadata


@pytest.mark.parametrize("naming", ["diffusers", "peft", "kohya"])
def test_each_format_round_trips_with_alpha_other_than_rank(naming: str, tmp_path: Path) -> None:
    state = _small_state()
    path = tmp_path / "lora.safetensors"
    if naming == "diffusers":
        write_lora_file(path, state, SETTINGS)
    elif naming == "peft":  # peft's own names, diffusers' metadata carrying the alphas
        tensors = {f"{c}.{p}.lora_{ab}.weight": getattr(layer, field) for c, layers in state.items()
                   for p, layer in layers.items() for ab, field in (("A", "down"), ("B", "up"))}
        save_safetensors(path, tensors, {METADATA_KEY: json.dumps(adapter_metadata(state, SETTINGS))})
    else:
        save_safetensors(path, kohya_lib.to_kohya(state), {"format": "pt"})
    module_paths = MODULES if naming == "kohya" else None
    _assert_same(read_lora_file(path, module_paths), state)


def test_kohya_names_and_alpha_tensors() -> None:
    tensors = kohya_lib.to_kohya(_small_state())
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert tensors[f"{name}.alpha"].shape == () and tensors[f"{name}.alpha"].dtype == np.float32
    assert float(tensors[f"{name}.alpha"]) == 3.0
    assert tensors[f"{name}.lora_down.weight"].shape == (2, 7) and tensors[f"{name}.lora_up.weight"].shape == (6, 2)
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in tensors
    assert len(tensors) == 4 * 3
    with pytest.raises(ValueError, match="DoRA"):
        kohya_lib.to_kohya(_small_state(dora=True))


def test_dora_round_trips_through_the_diffusers_file(tmp_path: Path) -> None:
    state = _small_state(dora=True)
    path = write_lora_file(tmp_path / LORA_WEIGHTS_NAME, state, SETTINGS)
    metadata = json.loads(read_header(path)["__metadata__"][METADATA_KEY])
    assert metadata["unet.use_dora"] is True and metadata["text_encoder.use_dora"] is True
    assert f"unet.{UNET_Q}.lora_magnitude_vector" in read_header(path)
    _assert_same(read_lora_file(path), state)


def test_unprefixed_peft_keys_without_metadata_get_alpha_equal_to_rank(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    layer = _layer(rng, 6, 5, 3, 99.0)
    path = save_safetensors(tmp_path / "adapter.safetensors", {
        f"base_model.model.{UNET_Q}.lora_A.weight": layer.down, f"base_model.model.{UNET_Q}.lora_B.weight": layer.up,
        f"{TE_Q}.lora_A.weight": layer.down[:, :4], f"{TE_Q}.lora_B.weight": layer.up[:4]}, {})
    state = read_lora_file(path)
    assert state["unet"][UNET_Q].alpha == 3.0 and state["text_encoder"][TE_Q].alpha == 3.0


def test_unreadable_files_and_foreign_keys_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(JaxboothError, match="no-such.safetensors"):
        read_lora_file(tmp_path / "no-such.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(JaxboothError, match="damaged.safetensors.*not a readable safetensors"):
        read_lora_file(damaged)
    kohya_file = save_safetensors(tmp_path / "k.safetensors", kohya_lib.to_kohya(_small_state()), {})
    with pytest.raises(JaxboothError, match="k.safetensors.*module paths"):
        read_lora_file(kohya_file)
    with pytest.raises(JaxboothError, match=r"k\.safetensors: kohya key 'lora_unet_down_blocks_0_attentions_0_"
                                            r"transformer_blocks_0_attn1_to_q\.(alpha|lora_down\.weight)'"):
        read_lora_file(kohya_file, {"unet": [UNET_OUT], "text_encoder": MODULES["text_encoder"]})
    diffusers_file = write_lora_file(tmp_path / "d.safetensors", _small_state(), SETTINGS)
    with pytest.raises(JaxboothError, match="d.safetensors.*the model does not have"):
        read_lora_file(diffusers_file, {"unet": [UNET_Q], "text_encoder": MODULES["text_encoder"]})
    odd = save_safetensors(tmp_path / "odd.safetensors", {"unet.conv_in.hada_w1_a": np.zeros((2, 2), np.float32)}, {})
    with pytest.raises(JaxboothError, match="odd.safetensors.*unet.conv_in.hada_w1_a"):
        read_lora_file(odd)


def test_merge_adds_the_scaled_product_and_keeps_the_base_dtype() -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 1, (6, 5)).astype(np.float16)
    layer = _layer(rng, 6, 5, 2, 5.0, std=0.5)
    base = {f"{UNET_Q}.weight": weight, f"{UNET_Q}.bias": np.ones(6, np.float16)}
    merged = merge_into_state_dict(base, {UNET_Q: layer}, multiplier=0.5)
    want = weight.astype(np.float64) + 0.5 * 2.5 * (layer.up.astype(np.float64) @ layer.down.astype(np.float64))
    assert merged[f"{UNET_Q}.weight"].dtype == np.float16
    np.testing.assert_allclose(merged[f"{UNET_Q}.weight"], want.astype(np.float16))
    assert merged[f"{UNET_Q}.bias"] is base[f"{UNET_Q}.bias"]
    assert base[f"{UNET_Q}.weight"] is weight  # the input is left alone
    with pytest.raises(JaxboothError, match="no .*to_out.0.weight"):
        merge_into_state_dict(base, {UNET_OUT: layer})


def test_dora_merge_gives_each_row_its_magnitude() -> None:
    rng = np.random.default_rng(4)
    weight = rng.normal(0, 1, (6, 5)).astype(np.float32)
    layer = _layer(rng, 6, 5, 2, 5.0, dora=True, std=0.5)
    merged = merge_into_state_dict({f"{TE_Q}.weight": weight}, {TE_Q: layer})[f"{TE_Q}.weight"]
    np.testing.assert_allclose(np.linalg.norm(merged, axis=1), layer.magnitude, rtol=1e-6)
    direction = weight + 2.5 * layer.up @ layer.down
    np.testing.assert_allclose(merged / np.linalg.norm(merged, axis=1, keepdims=True),
                               direction / np.linalg.norm(direction, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ stock diffusers loads our files


@pytest.fixture
def torch_env() -> Iterator[Any]:
    """torch with one thread (two OpenMP threads on a shared 2-core box are far slower), diffusers and peft."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir: Path) -> dict[str, Any]:
    """The tiny pipeline's module paths and numpy weights."""
    return {"paths": component_module_paths(tiny_model_dir),
            "weights": {c: read_component_weights(tiny_model_dir / c) for c in ("unet", "text_encoder")}}


def random_state(tiny_base: Mapping[str, Any], settings: AdapterSettings, *, seed: int = 0) -> LoraState:
    """Nonzero adapters on every target of the tiny model (up and down ~ N(0, 0.1): the outputs move
    by tens of percent, so a lost alpha or a swapped layer shows far above float32 noise)."""
    rng = np.random.default_rng(seed)
    state: LoraState = {}
    for component in settings.components:
        state[component] = {}
        for path in tiny_base["paths"][component]:
            if is_target(path, settings.targets(component)):
                out, inp = tiny_base["weights"][component][f"{path}.weight"].shape
                state[component][path] = _layer(rng, out, inp, settings.rank, settings.alpha, settings.use_dora)
    return state


def fixed_outputs(torch: Any, unet: Any, text_encoder: Any) -> tuple[Any, Any]:
    """The UNet's and the text encoder's outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), context).sample, text_encoder(ids)[0]


def merged_models(torch: Any, tiny_model_dir: Path, tiny_base: Mapping[str, Any], state: LoraState) -> tuple[Any, Any]:
    """The tiny UNet and text encoder with ``merge_into_state_dict``'s weights loaded."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    for model, component in ((unet, "unet"), (text_encoder, "text_encoder")):
        merged = merge_into_state_dict(tiny_base["weights"][component], state.get(component, {}))
        flat = component == "text_encoder" and not hasattr(model, "text_model")  # transformers 5
        model.load_state_dict({(k.removeprefix("text_model.") if flat else k): torch.from_numpy(np.array(v))
                               for k, v in merged.items()})
    return unet, text_encoder


def rel_err(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.requires_torch
@pytest.mark.parametrize("case", ["diffusers", "kohya", "dora"])
def test_stock_diffusers_loads_our_file_as_merge_into_state_dict_predicts(
        case: str, torch_env: Any, tiny_model_dir: Path, tiny_base: dict, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    torch = torch_env
    settings = AdapterSettings(rank=3, alpha=7.0, use_dora=case == "dora", train_text_encoder=True)
    state = random_state(tiny_base, settings)
    assert len(state["unet"]) == 48 and len(state["text_encoder"]) == 20
    write_lora_file(tmp_path / LORA_WEIGHTS_NAME, state, settings)
    if case == "kohya":
        save_safetensors(tmp_path / KOHYA_WEIGHTS_NAME, kohya_lib.to_kohya(state), {"format": "pt"})
        assert read_lora_file(tmp_path / KOHYA_WEIGHTS_NAME, tiny_base["paths"]).keys() == state.keys()
    want = fixed_outputs(torch, *merged_models(torch, tiny_model_dir, tiny_base, state))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    before = fixed_outputs(torch, pipe.unet, pipe.text_encoder)
    if case == "kohya":
        pipe.load_lora_weights(tmp_path, weight_name=KOHYA_WEIGHTS_NAME)
    else:
        pipe.load_lora_weights(tmp_path)
    got = fixed_outputs(torch, pipe.unet, pipe.text_encoder)
    for name, g, w, b in zip(("unet", "text_encoder"), got, want, before, strict=True):
        assert rel_err(b, w) > 0.05, f"{name}: the adapters hardly change the output; the test could not fail"
        assert rel_err(g, w) <= 1e-5, f"{name}: diffusers' LoRA and our merge disagree ({rel_err(g, w):.2e})"


@pytest.mark.requires_torch
def test_custom_targets_load_in_diffusers(torch_env: Any, tiny_model_dir: Path, tiny_base: dict,
                                          tmp_path: Path) -> None:
    """Targets outside diffusers' attention table (the feed-forward, the CLIP MLP) still load: one naming per
    component (diffusers' own writer would mix two, and its reader then skips one)."""
    from diffusers import StableDiffusionPipeline

    torch = torch_env
    settings = AdapterSettings(rank=2, alpha=3.0, unet_targets=("ff.net.2", "to_v"), text_encoder_targets=("fc1",),
                               train_text_encoder=True)
    state = random_state(tiny_base, settings, seed=5)
    write_lora_file(tmp_path / LORA_WEIGHTS_NAME, state, settings)
    want = fixed_outputs(torch, *merged_models(torch, tiny_model_dir, tiny_base, state))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(tmp_path)
    got = fixed_outputs(torch, pipe.unet, pipe.text_encoder)
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5
