"""`jaxbooth train --backend=jax` end to end on the tiny pipeline and the bundled images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from jaxbooth.cli import main
from jaxbooth.validation_files import grid_path
from tests.jax_backend.test_loading import rescaled_vae_pipeline

TINY_ARGS = ["--backend=jax", "--resolution=64", "--train_batch_size=1", "--learning_rate=1e-4",
             "--lr_warmup_steps=0", "--seed=0", "--report_to=none", "--log_every_steps=1"]


def run_train(tiny_model_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={out}",
                 *TINY_ARGS, *extra])


def unet_weights(folder: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def losses(out: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "out"
    assert run_train(tiny_model_dir, out, "--max_train_steps=4", "--checkpointing_steps=2") == 0
    return out


def test_train_writes_a_diffusers_pipeline_and_checkpoints(trained: Path, tiny_model_dir: Path) -> None:
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json", "README.md", "jaxbooth_run.yaml"):
        assert (trained / name).is_file(), name
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert len(losses(trained)) == 4
    base, final = unet_weights(tiny_model_dir), unet_weights(trained)
    assert base.keys() == final.keys()
    assert any(not np.array_equal(base[k], final[k]) for k in base), "training changed no weight"
    # the frozen text encoder is copied, not retrained
    te = "text_encoder/model.safetensors"
    assert (trained / te).read_bytes() == (tiny_model_dir / te).read_bytes()


@pytest.mark.requires_torch
def test_checkpoint_unet_and_final_pipeline_load_in_diffusers(trained: Path) -> None:
    pytest.importorskip("torch")
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(trained, subfolder="checkpoint-2/unet")
    assert unet.config.block_out_channels == (32, 64) or list(unet.config.block_out_channels) == [32, 64]
    pipe = StableDiffusionPipeline.from_pretrained(trained, safety_checker=None)
    image = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_resume_continues_exactly(tiny_model_dir: Path, trained: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, then resume from checkpoint-2 for 2 more; limits hold across resume."""
    out = tmp_path / "resumed"
    assert run_train(tiny_model_dir, out, "--max_train_steps=2", "--checkpointing_steps=2") == 0
    assert run_train(tiny_model_dir, out, "--max_train_steps=4", "--checkpointing_steps=2",
                     "--resume_from_checkpoint=latest", "--checkpoints_total_limit=1") == 0
    straight, resumed = unet_weights(trained), unet_weights(out)
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    np.testing.assert_allclose(losses(out)[-2:], losses(trained)[-2:], rtol=1e-6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]


def test_total_limit_holds_across_a_resume(tiny_model_dir: Path, trained: Path, tmp_path: Path) -> None:
    """4 steps every 2 -> {2, 4}; resuming from checkpoint-4 to 8 with a limit of 2 -> {6, 8}."""
    import shutil

    out = tmp_path / "limit"
    shutil.copytree(trained, out)
    assert run_train(tiny_model_dir, out, "--max_train_steps=8", "--checkpointing_steps=2",
                     "--resume_from_checkpoint=checkpoint-4", "--checkpoints_total_limit=2") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir: Path, tmp_path: Path) -> None:
    import os
    import signal
    import time

    out = tmp_path / "preempted"
    args = ["train", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={out}", *TINY_ARGS,
            "--max_train_steps=100000", "--checkpointing_steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "jaxbooth", *args], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    deadline = time.time() + 600
    for line in proc.stderr:
        if "step 2/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    from jaxbooth.checkpoints import list_checkpoints

    saved = list_checkpoints(out)
    assert saved and saved[-1][0] >= 2, err[-2000:]
    assert "resume with --resume_from_checkpoint=latest" in err


def test_interrupted_checkpoint_is_never_latest(trained: Path, tmp_path: Path) -> None:
    import shutil

    from jaxbooth.jax_backend import checkpoint

    out = tmp_path / "out"
    shutil.copytree(trained / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(trained / "checkpoint-4", out / "checkpoint-4")
    (out / "checkpoint-4" / checkpoint.MARKER).unlink()  # as if killed mid-write
    assert checkpoint.resolve_resume_path(out, "latest") == out / "checkpoint-2"


def test_prior_preservation_text_encoder_training_and_validation(tiny_model_dir: Path, tmp_path: Path) -> None:
    from jaxbooth.data import example_class_dir

    out = tmp_path / "prior"
    assert run_train(tiny_model_dir, out, "--max_train_steps=2", "--checkpointing_steps=100",
                     "--with_prior_preservation", f"--class_data_dir={example_class_dir()}",
                     "--class_prompt=a photo of a toy", "--num_class_images=5", "--train_text_encoder",
                     "--snr_gamma=5.0", "--offset_noise", "--random_flip", "--mixed_precision=bf16",
                     "--gradient_checkpointing",
                     "--validation_prompt=a photo of sks toy", "--num_validation_images=2",
                     "--validation_steps=2") == 0
    assert grid_path(out, 2).is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/prior_loss"] > 0 for r in records)
    te = "text_encoder/model.safetensors"
    assert (out / te).read_bytes() != (tiny_model_dir / te).read_bytes()


def test_text_encoder_group_lr_and_the_override_vae(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--text_encoder_lr is the text encoder's own lr (tiny here: it stays put while the UNet moves at
    --learning_rate), and the --pretrained_vae_model_name_or_path VAE is the one exported."""
    vae = rescaled_vae_pipeline(tiny_model_dir, tmp_path / "other-vae")
    out = tmp_path / "groups"
    assert run_train(tiny_model_dir, out, "--max_train_steps=1", "--checkpointing_steps=100", "--train_text_encoder",
                     "--text_encoder_lr=1e-30", "--adam_weight_decay_text_encoder=0.5",
                     f"--pretrained_vae_model_name_or_path={vae}") == 0
    te = "text_encoder/model.safetensors"
    base_te, final_te = (safetensors.numpy.load_file(folder / te) for folder in (tiny_model_dir, out))
    assert max(np.abs(final_te[k] - base_te[k]).max() for k in base_te) < 1e-20
    base, final = unet_weights(tiny_model_dir), unet_weights(out)
    assert max(np.abs(final[k] - base[k]).max() for k in base) > 1e-5
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae_file).read_bytes() == (vae / vae_file).read_bytes()


def test_bad_flag_is_one_clear_error_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "jaxbooth", "train", "--learning_rat=1e-4",
                           f"--output_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "learning_rate" in proc.stderr and "Traceback" not in proc.stderr
