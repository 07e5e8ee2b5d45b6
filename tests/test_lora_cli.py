"""LoRA through the CLI on both backends: diffusers' own test_dreambooth_lora.py cases, each LoRA
option's effect on the output, and the two backends tracking one loss.

diffusers' cases (examples/dreambooth/test_dreambooth_lora.py, SD) run with
``jaxbooth train train_dreambooth_lora.py`` in place of ``accelerate launch train_dreambooth_lora.py``,
on the project's tiny pipeline and bundled images instead of hf-internal-testing's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from jaxbooth.cli import main

BACKENDS = ("jax", "torch")
LORA_FILE = "pytorch_lora_weights.safetensors"
# the flags diffusers' LoRA test cases pass (less the model and image folders, which are ours)
CASE_ARGS = ["--resolution=64", "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=5.0e-04",
             "--scale_lr", "--lr_scheduler=constant", "--lr_warmup_steps=0"]


def lora_train(backend: str, model_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "train_dreambooth_lora.py", f"--backend={backend}",
                 f"--pretrained_model_name_or_path={model_dir}", f"--output_dir={out}", "--instance_prompt=photo",
                 "--seed=0", *extra])


def lora_keys(folder: Path) -> list[str]:
    with safetensors.safe_open(str(folder / LORA_FILE), "np") as handle:
        return list(handle.keys())


def checkpoints(folder: Path) -> set[str]:
    return {name for name in os.listdir(folder) if "checkpoint" in name}


# ------------------------------------------------------------------ diffusers' test_dreambooth_lora.py (SD)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dreambooth_lora(backend: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert lora_train(backend, tiny_model_dir, tmp_path, *CASE_ARGS, "--max_train_steps=2") == 0
    assert (tmp_path / LORA_FILE).is_file()
    keys = lora_keys(tmp_path)
    assert keys and all("lora" in key for key in keys)
    assert all(key.startswith("unet") for key in keys)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dreambooth_lora_with_text_encoder(backend: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert lora_train(backend, tiny_model_dir, tmp_path, *CASE_ARGS, "--max_train_steps=2",
                      "--train_text_encoder") == 0
    keys = lora_keys(tmp_path)
    assert any(key.startswith("text_encoder") for key in keys)
    assert all(key.startswith(("unet", "text_encoder")) for key in keys)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dreambooth_lora_checkpointing_checkpoints_total_limit(backend: str, tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    assert lora_train(backend, tiny_model_dir, tmp_path, "--resolution=64", "--train_batch_size=1",
                      "--gradient_accumulation_steps=1", "--max_train_steps=6", "--checkpoints_total_limit=2",
                      "--checkpointing_steps=2") == 0
    assert checkpoints(tmp_path) == {"checkpoint-4", "checkpoint-6"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_dreambooth_lora_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(
        backend: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    common = ["--resolution=64", "--train_batch_size=1", "--gradient_accumulation_steps=1", "--checkpointing_steps=2"]
    assert lora_train(backend, tiny_model_dir, tmp_path, *common, "--max_train_steps=4") == 0
    assert checkpoints(tmp_path) == {"checkpoint-2", "checkpoint-4"}
    assert lora_train(backend, tiny_model_dir, tmp_path, *common, "--max_train_steps=8",
                      "--resume_from_checkpoint=checkpoint-4", "--checkpoints_total_limit=2") == 0
    assert checkpoints(tmp_path) == {"checkpoint-6", "checkpoint-8"}
    # each checkpoint holds the LoRA file, loadable mid-run
    assert lora_keys(tmp_path / "checkpoint-6") == lora_keys(tmp_path)


# ------------------------------------------------------------------ every LoRA option acts, on both backends

@pytest.fixture(scope="module", params=BACKENDS)
def with_options(request: pytest.FixtureRequest, tiny_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One run per backend with every LoRA option away from its default (tests/test_spec_coverage.py
    counts this run as the proof for each of them)."""
    out = tmp_path_factory.mktemp(f"lora-options-{request.param}")
    assert lora_train(request.param, tiny_model_dir, out, "--resolution=64", "--train_batch_size=1",
                      "--max_train_steps=2", "--report_to=none", "--use_lora", "--rank=8", "--lora_alpha=16",
                      "--lora_target_modules", "to_q", "to_v", "--train_text_encoder",
                      # out_proj too: diffusers' kohya loader cannot type a text-encoder LoRA without it
                      "--lora_text_encoder_target_modules", "q_proj", "out_proj", "--output_kohya_format",
                      "--merge_lora_into_pipeline") == 0
    return request.param, out


def test_rank_alpha_and_targets_shape_the_adapters(with_options: tuple[str, Path]) -> None:
    _, out = with_options
    tensors = safetensors.numpy.load_file(str(out / LORA_FILE))
    unet = [key for key in tensors if key.startswith("unet.")]
    text = [key for key in tensors if key.startswith("text_encoder.")]
    assert unet and text
    assert all(".to_q." in key or ".to_v." in key for key in unet), unet
    assert all(".q_proj." in key or ".out_proj." in key for key in text), text
    assert any(".q_proj." in key for key in text) and not any(".k_proj." in key for key in text), text
    downs = [key for key in tensors if ".down." in key or "lora_A" in key]
    assert downs and all(tensors[key].shape[0] == 8 for key in downs)
    with safetensors.safe_open(str(out / LORA_FILE), "np") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 8 and metadata["unet.lora_alpha"] == 16
    assert sorted(metadata["unet.target_modules"]) == ["to_q", "to_v"]


def test_kohya_file_and_merged_pipeline_are_written(with_options: tuple[str, Path]) -> None:
    _, out = with_options
    kohya = safetensors.numpy.load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert any(key.startswith("lora_unet_") and key.endswith(".lora_down.weight") for key in kohya)
    assert any(key.startswith("lora_te_") and key.endswith(".alpha") for key in kohya)
    assert all(float(value) == 16 for key, value in kohya.items() if key.endswith(".alpha"))
    for name in ("model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json"):
        assert (out / name).is_file(), name


@pytest.mark.requires_torch
def test_output_loads_in_stock_diffusers_both_ways_alike(with_options: tuple[str, Path], tiny_model_dir: Path) -> None:
    """The LoRA file on the base, the kohya file on the base, and the merged pipeline: one UNet output."""
    import torch
    from diffusers import StableDiffusionPipeline

    _, out = with_options
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10]),
              torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1)))

    def unet_output(pipe) -> np.ndarray:
        with torch.no_grad():
            return pipe.unet(inputs[0], inputs[1], inputs[2][..., :pipe.unet.config.cross_attention_dim]).sample.numpy()

    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    before = unet_output(base)
    base.load_lora_weights(out)
    with_lora = unet_output(base)
    kohya = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    kohya.load_lora_weights(out, weight_name="pytorch_lora_weights_kohya.safetensors")
    merged = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert not np.allclose(before, with_lora, atol=1e-6), "training left the adapters at zero"
    scale = np.abs(with_lora).max()
    np.testing.assert_allclose(unet_output(kohya), with_lora, atol=1e-5 * scale)
    np.testing.assert_allclose(unet_output(merged), with_lora, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_trains_and_writes_magnitudes(backend: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert lora_train(backend, tiny_model_dir, tmp_path, "--resolution=64", "--train_batch_size=1",
                      "--max_train_steps=2", "--report_to=none", "--use_dora") == 0
    keys = lora_keys(tmp_path)
    assert any("magnitude" in key for key in keys)


# ------------------------------------------------------------------ one spec, two backends, one loss


def _losses(out: Path) -> np.ndarray:
    return np.array([json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()])


def test_the_same_lora_spec_tracks_the_same_loss_on_both_backends(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Ten steps of one LoRA spec on each backend: the same start (the shared adapter init leaves the
    base model's output untouched), the same loss scale, both falling.

    The backends draw noise and timesteps from different RNGs, so steps are compared in aggregate,
    as the full fine-tune's parity test does.
    """
    common = ["--resolution=64", "--train_batch_size=2", "--max_train_steps=10", "--learning_rate=1e-2",
              "--lr_warmup_steps=0", "--report_to=none", "--log_every_steps=1", "--center_crop"]
    runs = {backend: _losses(tmp_path / backend) for backend in BACKENDS
            if lora_train(backend, tiny_model_dir, tmp_path / backend, *common) == 0}
    print({name: np.round(values, 4).tolist() for name, values in runs.items()})
    assert set(runs) == set(BACKENDS)
    assert len(runs["jax"]) == len(runs["torch"]) == 10
    assert 0.5 < runs["torch"].mean() / runs["jax"].mean() < 2, runs
    for losses in runs.values():
        assert losses[5:].mean() < losses[:5].mean(), runs
