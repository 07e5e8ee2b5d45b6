"""`jaxbooth tiny-model`: an offline random-weight SD pipeline that diffusers itself loads and runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxbooth import tiny
from jaxbooth.errors import JaxboothError


def test_tiny_pipeline_has_every_component(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert component in index and (tiny_model_dir / component).is_dir(), component
    te = json.loads((tiny_model_dir / "text_encoder" / "config.json").read_text())
    vocab = json.loads((tiny_model_dir / "tokenizer" / "vocab.json").read_text())
    assert te["vocab_size"] == len(vocab)
    assert vocab["<|endoftext|>"] == te["eos_token_id"] and vocab["<|startoftext|>"] == te["bos_token_id"]


@pytest.mark.requires_torch
def test_diffusers_loads_and_runs_the_tiny_pipeline(tiny_model_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    ids = pipe.tokenizer(["a photo of sks toy", "a photo of a dog"]).input_ids
    assert ids[0] != ids[1]
    image = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.requires_torch
def test_diffusers_loads_and_runs_the_tiny_sdxl_pipeline(tmp_path: Path) -> None:
    """`tiny-model --family sdxl`: written without torch, every weight loads in stock diffusers, and it runs."""
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    proc = subprocess.run([sys.executable, "-m", "jaxbooth", "tiny-model", str(tmp_path / "xl"), "--family", "sdxl"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = Path(proc.stdout.strip())
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (out / component).is_dir(), component
    _, info = UNet2DConditionModel.from_pretrained(out / "unet", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _, info = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    image = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_sdxl_sizes_match_the_peer_harness_shapes() -> None:
    small = tiny.sdxl_unet_config("small")
    assert small["cross_attention_dim"] == 2 * tiny.clip_config("small", 1000)["hidden_size"] == 256
    assert small["transformer_layers_per_block"] == [1, 2, 2] and small["addition_embed_type"] == "text_time"
    first, second = tiny.sdxl_clip_configs("small", 1000)
    assert small["projection_class_embeddings_input_dim"] == 6 * small["addition_time_embed_dim"] + \
        second["projection_dim"]


def test_unknown_family_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(JaxboothError, match="family 'if' is not one of"):
        tiny.write_tiny_pipeline(tmp_path / "x", family="if")


def test_sizes_match_the_peer_harness_shapes() -> None:
    """Benchmarks compare like with like: the peer harness builds these exact shapes."""
    assert tiny.unet_config("small")["block_out_channels"] == [64, 128, 256]
    assert tiny.vae_config("small")["block_out_channels"] == [32, 64, 64]
    assert tiny.clip_config("small", 1000)["hidden_size"] == 128
    assert tiny.RESOLUTION == {"tiny": 64, "small": 128}


def test_unknown_size_is_a_clear_cli_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "jaxbooth", "tiny-model", str(tmp_path / "x"), "--size", "huge"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_jax_path_imports_no_torch() -> None:
    code = ("import sys, jaxbooth.cli, jaxbooth.jax_backend.train, jaxbooth.jax_backend.generate; "
            "print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
