"""The LoRA output folder (LoRA file, kohya file, card, resolved spec, merged pipeline) and checkpoint files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from jaxbooth import output
from jaxbooth.lora import AdapterSettings, read_lora_file
from jaxbooth.lora.files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from jaxbooth.lora.outputs import write_checkpoint_lora, write_lora_output
from jaxbooth.spec import load_spec
from tests import test_lora_files as lora_files
from tests.test_lora_files import _assert_same, fixed_outputs, random_state, rel_err

tiny_base = lora_files.tiny_base  # fixtures shared with the file tests
torch_env = lora_files.torch_env


def test_the_lora_file_layer_imports_no_framework() -> None:
    code = ("import sys, jaxbooth.lora, jaxbooth.lora.outputs, jaxbooth.lora.kohya, jaxbooth.lora.card; print(sorted("
            "m for m in ('jax', 'torch', 'flax', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _spec(tiny_model_dir: Path, *flags: str) -> Any:
    return load_spec(["train_dreambooth_lora.py", f"--pretrained_model_name_or_path={tiny_model_dir}", "--rank=3",
                      "--lora_alpha=6", "--instance_prompt=a photo of sks toy", *flags])


def _write(out: Path, spec: Any, state: Any, tiny_model_dir: Path) -> Path:
    return write_lora_output(out, state, settings=AdapterSettings.from_spec(spec), spec=spec, base_dir=tiny_model_dir,
                             vae_dir=None, steps=5, backend="jax", instance_prompt=spec.data.instance_prompt,
                             validation_images=["validation/step_5_0.png"])


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_lora_output_holds_the_file_the_card_and_the_spec(tiny_model_dir: Path, tiny_base: dict,
                                                            tmp_path: Path) -> None:
    spec = _spec(tiny_model_dir)
    settings = AdapterSettings.from_spec(spec)
    state = random_state(tiny_base, settings)
    (tmp_path / KOHYA_WEIGHTS_NAME).write_bytes(b"a previous run's")
    assert _write(tmp_path, spec, state, tiny_model_dir) == tmp_path
    assert _files(tmp_path) == {LORA_WEIGHTS_NAME, "README.md", output.SPEC_FILENAME}
    _assert_same(read_lora_file(tmp_path), state)  # a folder means its pytorch_lora_weights.safetensors
    assert read_lora_file(tmp_path / LORA_WEIGHTS_NAME)["unet"][next(iter(state["unet"]))].alpha == 6.0
    assert load_spec(["--config", str(tmp_path / output.SPEC_FILENAME)]) == spec

    card = (tmp_path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    # a local base is named in the text only: the Hub refuses a base_model that is no model id
    assert "base_model" not in front and f"`{tiny_model_dir}`" in card
    assert front["instance_prompt"] == "a photo of sks toy"
    assert {"lora", "dreambooth", "diffusers", "jaxbooth"} <= set(front["tags"])
    assert front["library_name"] == "diffusers"
    assert "Rank 3, alpha 6 (scale 2), UNet targets to_k, to_q, to_v, to_out.0." in card  # no add_k_proj in SD
    assert "Only the UNet got adapters" in card
    assert f'StableDiffusionPipeline.from_pretrained("{tiny_model_dir}")' in card
    assert 'pipe.load_lora_weights("path/to/this/folder")' in card
    assert "![sample](validation/step_5_0.png)" in card
    assert KOHYA_WEIGHTS_NAME not in card and "plain pipeline" not in card


def test_a_checkpoint_gets_the_lora_file(tiny_base: dict, tmp_path: Path) -> None:
    settings = AdapterSettings(rank=3, alpha=6.0)
    state = random_state(tiny_base, settings)
    path = write_checkpoint_lora(tmp_path / "checkpoint-5", state, settings)
    assert path == tmp_path / "checkpoint-5" / LORA_WEIGHTS_NAME
    assert _files(tmp_path) == {f"checkpoint-5/{LORA_WEIGHTS_NAME}"}
    _assert_same(read_lora_file(path), state)


def test_skip_save_text_encoder_leaves_it_out_of_the_merged_pipeline(tiny_model_dir: Path, tiny_base: dict,
                                                                     tmp_path: Path) -> None:
    spec = _spec(tiny_model_dir, "--train_text_encoder", "--merge_lora_into_pipeline", "--skip_save_text_encoder")
    state = random_state(tiny_base, AdapterSettings.from_spec(spec))
    _write(tmp_path, spec, state, tiny_model_dir)
    assert not (tmp_path / "text_encoder").exists()
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder"] == [None, None]
    assert read_lora_file(tmp_path / LORA_WEIGHTS_NAME).keys() == {"unet", "text_encoder"}  # the file keeps them
    assert "pass the base model's as `text_encoder=`" in (tmp_path / "README.md").read_text()


@pytest.mark.requires_torch
def test_the_merged_pipeline_equals_the_base_with_the_lora_loaded(torch_env: Any, tiny_model_dir: Path,
                                                                  tiny_base: dict, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    torch = torch_env
    spec = _spec(tiny_model_dir, "--train_text_encoder", "--output_kohya_format", "--merge_lora_into_pipeline")
    state = random_state(tiny_base, AdapterSettings.from_spec(spec), seed=7)
    _write(tmp_path, spec, state, tiny_model_dir)
    files = _files(tmp_path)
    assert {LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME, "README.md", output.SPEC_FILENAME, "model_index.json",
            "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
            "text_encoder/model.safetensors", "vae/config.json", "scheduler/scheduler_config.json",
            "tokenizer/vocab.json"} <= files
    assert not [name for name in files if ".tmp" in name]
    card = (tmp_path / "README.md").read_text()
    assert "lora" in yaml.safe_load(card.split("---")[1])["tags"]
    assert "The text encoder got adapters too (q_proj, k_proj, v_proj, out_proj)" in card
    assert "plain pipeline" in card and KOHYA_WEIGHTS_NAME in card

    merged = StableDiffusionPipeline.from_pretrained(tmp_path)
    with_lora = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    before = fixed_outputs(torch, with_lora.unet, with_lora.text_encoder)
    with_lora.load_lora_weights(tmp_path)
    want = fixed_outputs(torch, with_lora.unet, with_lora.text_encoder)
    got = fixed_outputs(torch, merged.unet, merged.text_encoder)
    for name, g, w, b in zip(("unet", "text_encoder"), got, want, before, strict=True):
        assert rel_err(b, w) > 0.05, f"{name}: the adapters hardly change the output; the test could not fail"
        assert rel_err(g, w) <= 1e-5, f"{name}: the merged pipeline and the LoRA-loaded one disagree"
    np.testing.assert_array_equal(merged.vae.state_dict()["decoder.conv_out.weight"].numpy(),
                                  with_lora.vae.state_dict()["decoder.conv_out.weight"].numpy())
