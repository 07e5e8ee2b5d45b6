"""`jaxbooth generate` on a LoRA: the base found from the LoRA's folder, adapters merged at --lora_scale.

The LoRA is built by hand with nonzero adapters on the tiny model (so it changes the images),
written with the shared file writer, and sampled through `jaxbooth.cli.main` as a user would.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import cli
from jaxbooth.jax_backend import lora_loading, pretrained
from jaxbooth.lora import AdapterSettings, LoraState, is_target
from jaxbooth.lora import files as lora_files

PROMPT = "a photo of sks toy"
FAST = ["--steps", "2", "--resolution", "64", "--guidance", "3"]
SETTINGS = AdapterSettings(rank=4, alpha=8.0, train_text_encoder=True)


def make_lora(base_dir: Path, *, seed: int = 0) -> LoraState:
    """Adapters on every target layer of the tiny UNet and text encoder, with a nonzero ``up``."""
    rng = np.random.default_rng(seed)
    state: LoraState = {}
    for component in SETTINGS.components:
        weights = pretrained.read_state_dict(base_dir / component)
        state[component] = {}
        for path in sorted(lora_loading.module_paths(weights)):
            if is_target(path, SETTINGS.targets(component)) and f"{path}.weight" in weights:
                layer = SETTINGS.initial_layer(component, path, weights[f"{path}.weight"], seed)
                up = rng.normal(0.0, 0.5, layer.up.shape).astype(np.float32)
                state[component][path] = dataclasses.replace(layer, up=up)
    return state


def lora_folder(folder: Path, state: LoraState, base: Path | None) -> Path:
    """A LoRA output folder as training leaves it: the LoRA file and (with ``base``) the run spec naming the base."""
    folder.mkdir(parents=True, exist_ok=True)
    lora_files.write_lora_file(folder / lora_files.LORA_WEIGHTS_NAME, state, SETTINGS)
    if base is not None:
        (folder / "jaxbooth_run.yaml").write_text(f"model:\n  pretrained_model_name_or_path: {base}\n")
    return folder


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    status = cli.main(["generate", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lora_folder(tmp_path_factory.mktemp("lora") / "out", make_lora(tiny_model_dir), tiny_model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    """``images(model, *flags)`` -> the uint8 image `jaxbooth generate` writes; each combination sampled once."""
    root, done = tmp_path_factory.mktemp("samples"), {}

    def sample(model: Path, *flags: str) -> np.ndarray:
        key = (str(model), *flags)
        if key not in done:
            out = root / str(len(done))
            status = cli.main(["generate", str(model), PROMPT, *FAST, "--out", str(out), *flags])
            assert status == 0
            (written,) = sorted(out.glob("*.png"))
            done[key] = np.asarray(Image.open(written))
        return done[key]

    return sample


def test_lora_scale_zero_samples_the_base_model(tiny_model_dir: Path, lora_dir: Path, images) -> None:
    base = images(tiny_model_dir)
    assert base.shape == (64, 64, 3)
    np.testing.assert_array_equal(images(lora_dir, "--lora_scale", "0"), base)


def test_lora_scale_one_is_the_default_and_changes_the_image(tiny_model_dir: Path, lora_dir: Path, images) -> None:
    adapted = images(lora_dir)  # no --lora_scale: 1.0
    assert np.abs(adapted.astype(int) - images(tiny_model_dir).astype(int)).mean() > 1.0


def test_kohya_file_samples_like_the_diffusers_file(tiny_model_dir: Path, lora_dir: Path, images,
                                                    tmp_path: Path) -> None:
    from jaxbooth.lora import kohya

    kohya_file = tmp_path / lora_files.KOHYA_WEIGHTS_NAME
    state = lora_files.read_lora_file(lora_dir / lora_files.LORA_WEIGHTS_NAME)
    lora_files.save_safetensors(kohya_file, kohya.to_kohya(state), {"format": "pt"})
    (tmp_path / "README.md").write_text(f"---\nbase_model: {tiny_model_dir}\ntags:\n- lora\n---\n# a LoRA\n")
    np.testing.assert_array_equal(images(kohya_file), images(lora_dir))


def test_merged_weights_are_base_plus_scaled_delta(tiny_model_dir: Path, lora_dir: Path) -> None:
    """The text encoder gets its adapters too, exactly ``W + s * (alpha/rank) * up @ down``; the rest is the base."""
    state = lora_files.read_lora_file(lora_dir / lora_files.LORA_WEIGHTS_NAME)
    source = lora_loading.generate_source(str(lora_dir), lora_scale=0.5)
    assert source.model_dir == tiny_model_dir.resolve()
    _, _, merged = source.load(source.model_dir, "text_encoder", dtype=np.float32)
    _, _, base = pretrained.load_pretrained(tiny_model_dir, "text_encoder", dtype=np.float32)
    layer = state["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj"]
    q_proj = ("text_model", "encoder", "layers", "0", "self_attn", "q_proj", "kernel")

    def leaf(tree: dict, path: tuple[str, ...]) -> np.ndarray:
        for key in path:
            tree = tree[key]
        return np.asarray(tree)

    expected = leaf(base, q_proj) + 0.5 * (SETTINGS.alpha / SETTINGS.rank) * (layer.up @ layer.down).T
    np.testing.assert_allclose(leaf(merged, q_proj), expected, rtol=1e-5, atol=1e-6)
    bias = (*q_proj[:-1], "bias")
    np.testing.assert_array_equal(leaf(merged, bias), leaf(base, bias))


def test_base_comes_from_the_flag_or_the_model_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    lora_file = tmp_path / "my_lora.safetensors"
    assert lora_loading.find_base_model(lora_file, "owner/base") == lora_loading.BaseModel("owner/base",
                                                                                          "--pretrained_model_name_or_path")
    (tmp_path / "README.md").write_text("---\nlicense: mit\nbase_model:\n- owner/sd-base\n---\n# card\n")
    found = lora_loading.find_base_model(lora_file, None)
    assert (found.name, found.origin) == ("owner/sd-base", str(tmp_path / "README.md"))
    (tmp_path / "jaxbooth_run.yaml").write_text("model:\n  pretrained_model_name_or_path: ./from-spec\n"
                                                "  revision: v2\n  variant: fp16\n")
    assert lora_loading.find_base_model(lora_file, None)[::2] == ("./from-spec", "v2")


def test_missing_base_is_a_clean_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    folder = lora_folder(tmp_path / "no-base", make_lora(tiny_model_dir), base=None)
    status, _, err = run(capsys, str(folder), PROMPT, *FAST, "--out", str(tmp_path / "o"))
    assert status != 0
    assert "--pretrained_model_name_or_path" in err and str(folder) in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    gone = lora_folder(tmp_path / "moved-base", make_lora(tiny_model_dir), base=tmp_path / "deleted-base")
    status, _, err = run(capsys, str(gone), PROMPT, *FAST, "--out", str(tmp_path / "o"))
    assert status != 0 and "deleted-base" in err and "jaxbooth_run.yaml" in err and "Traceback" not in err


def test_adapters_that_match_no_base_layer_are_an_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    state = make_lora(tiny_model_dir)
    path, layer = next(iter(state["unet"].items()))
    state["unet"] = {path.replace("down_blocks.", "down_blocks.9", 1): layer}
    folder = lora_folder(tmp_path / "other-model", state, tiny_model_dir)
    status, _, err = run(capsys, str(folder), PROMPT, *FAST, "--out", str(tmp_path / "o"))
    assert status != 0 and "down_blocks.9" in err and lora_files.LORA_WEIGHTS_NAME in err and "Traceback" not in err


@pytest.mark.parametrize("flags", [["--lora_scale", "0.5"], ["--pretrained_model_name_or_path", "owner/base"]])
def test_lora_flags_on_a_plain_pipeline_are_an_error(tiny_model_dir: Path, tmp_path: Path, capsys, flags) -> None:
    status, _, err = run(capsys, str(tiny_model_dir), PROMPT, *FAST, "--out", str(tmp_path / "o"), *flags)
    assert status != 0 and flags[0] in err and "model_index.json" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_merged_lora_output_points_at_its_lora_file(tiny_model_dir: Path, lora_dir: Path, tmp_path: Path,
                                                     capsys) -> None:
    """A LoRA output with merge_lora_into_pipeline is a full pipeline: sampled as stored, the error says
    how to scale its adapters instead."""
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    shutil.copy(lora_dir / lora_files.LORA_WEIGHTS_NAME, merged)
    status, _, err = run(capsys, str(merged), PROMPT, "--lora_scale", "0.5", "--out", str(tmp_path / "o"))
    assert status != 0 and str(merged / lora_files.LORA_WEIGHTS_NAME) in err
    assert lora_loading.generate_source(str(merged)).model_dir == merged.resolve()


def test_help_documents_the_lora_flags(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert "--lora_scale" in out and "--pretrained_model_name_or_path" in out and "kohya" in out
