"""`jaxbooth train --backend=torch` end to end on the tiny pipeline: outputs, checkpoints, resume."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxbooth.checkpoints import MARKER, resolve_resume_path
from tests.torch_backend._helpers import metrics, run_train, unet_state

METRIC_NAMES = {"train/loss", "train/instance_loss", "train/prior_loss", "train/lr", "train/grad_norm",
                "perf/steps_per_sec"}


def checkpoint_names(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("torch-train") / "out"
    assert run_train(tiny_model_dir, out, "--max_train_steps=4", "--checkpointing_steps=2") == 0
    return out


def test_train_writes_the_jax_backend_layout(trained: Path, tiny_model_dir: Path) -> None:
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
                 "scheduler/scheduler_config.json", "README.md", "jaxbooth_run.yaml", "metrics.jsonl"):
        assert (trained / name).is_file(), name
    assert checkpoint_names(trained) == ["checkpoint-2", "checkpoint-4"]
    records = metrics(trained)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(METRIC_NAMES <= r.keys() for r in records)
    assert all(r["train/prior_loss"] == 0 and r["train/lr"] == pytest.approx(1e-4) for r in records)
    base, final = unet_state(tiny_model_dir), unet_state(trained)
    assert base.keys() == final.keys()
    assert any(not torch.equal(base[k], final[k]) for k in base), "training changed no weight"
    te = "text_encoder/model.safetensors"  # frozen: copied from the base pipeline, byte for byte
    assert (trained / te).read_bytes() == (tiny_model_dir / te).read_bytes()
    card = (trained / "README.md").read_text()
    assert "torch backend" in card and "a photo of sks toy" in card


def test_checkpoint_holds_state_unet_and_marker_written_last(trained: Path) -> None:
    ckpt = trained / "checkpoint-2"
    record = json.loads((ckpt / MARKER).read_text())
    assert record["step"] == 2 and record["data"]["position"] >= 0 and record["seed"] == 0
    assert record["spec"]["hub"]["hub_token"] is None
    assert record["spec"]["backend"] == "torch" and record["spec"]["checkpointing"]["checkpointing_steps"] == 2
    assert (ckpt / "state" / "optimizer.bin").is_file() and (ckpt / "state" / "scheduler.bin").is_file()
    # the weights live once, in diffusers layout, not again inside state/
    assert not list((ckpt / "state").glob("model*.safetensors"))
    newest = max(p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file() and p.name != MARKER)
    assert (ckpt / MARKER).stat().st_mtime_ns >= newest


def test_checkpoint_unet_and_final_pipeline_load_in_diffusers(trained: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(trained, subfolder="checkpoint-2/unet")
    assert list(unet.config.block_out_channels) == [32, 64]
    pipe = StableDiffusionPipeline.from_pretrained(trained)
    image = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_half_then_resume_equals_straight_run(tiny_model_dir: Path, trained: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, then resume (latest) for 2 more: same weights and losses."""
    out = tmp_path / "resumed"
    assert run_train(tiny_model_dir, out, "--max_train_steps=2", "--checkpointing_steps=2") == 0
    assert run_train(tiny_model_dir, out, "--max_train_steps=4", "--checkpointing_steps=2",
                     "--resume_from_checkpoint=latest") == 0
    straight, resumed = unet_state(trained), unet_state(out)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    losses = [r["train/loss"] for r in metrics(out)]
    assert len(losses) == 4
    np.testing.assert_allclose(losses[2:], [r["train/loss"] for r in metrics(trained)][2:], rtol=1e-6)


def test_resume_with_gradient_accumulation_continues_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """2 micro-steps per update: the accumulation window and the data position survive a resume."""
    args = ("--gradient_accumulation_steps=2", "--checkpointing_steps=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(tiny_model_dir, straight, "--max_train_steps=2", *args) == 0
    assert run_train(tiny_model_dir, resumed, "--max_train_steps=1", *args) == 0
    assert run_train(tiny_model_dir, resumed, "--max_train_steps=2", "--resume_from_checkpoint=latest", *args) == 0
    a, b = unet_state(straight), unet_state(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert json.loads((resumed / "checkpoint-2" / MARKER).read_text())["data"]["position"] == 4 % 5


def test_a_jax_backend_checkpoint_is_refused_with_a_clear_error(tiny_model_dir: Path, trained: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "foreign"
    shutil.copytree(trained / "checkpoint-2", out / "checkpoint-2")
    shutil.rmtree(out / "checkpoint-2" / "state")
    (out / "checkpoint-2" / "state").mkdir()  # an orbax state/ folder, as the jax backend writes
    assert run_train(tiny_model_dir, out, "--max_train_steps=3", "--resume_from_checkpoint=latest") == 2
    assert "--backend=jax" in capsys.readouterr().err


def test_total_limit_keeps_the_newest_across_a_resume(tiny_model_dir: Path, trained: Path, tmp_path: Path) -> None:
    """{2, 4} on disk; resume from checkpoint-4 to step 8 with limit 2 -> {6, 8}."""
    out = tmp_path / "limited"
    shutil.copytree(trained, out)
    assert run_train(tiny_model_dir, out, "--max_train_steps=8", "--checkpointing_steps=2",
                     "--resume_from_checkpoint=checkpoint-4", "--checkpoints_total_limit=2") == 0
    assert checkpoint_names(out) == ["checkpoint-6", "checkpoint-8"]
    assert json.loads((out / "checkpoint-8" / MARKER).read_text())["step"] == 8


def test_checkpoint_without_marker_is_never_latest(tiny_model_dir: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    shutil.copytree(trained, out)
    (out / "checkpoint-4" / MARKER).unlink()  # as if killed mid-write
    assert resolve_resume_path(out, "latest") == out / "checkpoint-2"
    assert run_train(tiny_model_dir, out, "--max_train_steps=2", "--resume_from_checkpoint=checkpoint-4") == 2
    # latest resumes from checkpoint-2 (nothing left to train) and clears the broken folder
    assert run_train(tiny_model_dir, out, "--max_train_steps=2", "--resume_from_checkpoint=latest") == 0
    assert checkpoint_names(out) == ["checkpoint-2"]


def test_sigterm_saves_a_checkpoint_and_exits_zero(tiny_model_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxbooth.torch_backend import loop

    real_step = loop.optimizer_step

    def step_then_preempt(trainer, micro_step):
        metrics = real_step(trainer, micro_step)
        signal.raise_signal(signal.SIGTERM)  # arrives mid-run, like a preemption notice
        return metrics

    monkeypatch.setattr(loop, "optimizer_step", step_then_preempt)
    out = tmp_path / "preempted"
    assert run_train(tiny_model_dir, out, "--max_train_steps=5", "--checkpointing_steps=100") == 0
    assert checkpoint_names(out) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / MARKER).is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
