"""The diffusers guide's low-memory recipes, as written, on the tiny pipeline (2 steps each at 64 px).

16 GB: --gradient_checkpointing --use_8bit_adam
12 GB: --use_8bit_adam --gradient_checkpointing --enable_xformers_memory_efficient_attention --set_grads_to_none
 8 GB: DeepSpeed ZeRO-2 with the optimizer offloaded to the CPU (scripts/accelerate_deepspeed_zero2_offload.yaml)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from jaxbooth.errors import JaxboothError
from tests.torch_backend._helpers import metrics, run_train

RECIPE_ARGS = ("--resolution=64", "--train_batch_size=1", "--max_train_steps=2", "--report_to=none",
               "--checkpointing_steps=100")
REPO = Path(__file__).resolve().parents[2]
DEEPSPEED_CONFIG = REPO / "scripts" / "accelerate_deepspeed_zero2_offload.yaml"


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Runs train.run_loop for real and keeps the Trainer, to inspect the models afterwards."""
    from jaxbooth.torch_backend import train

    seen: dict = {}
    real_loop = train.run_loop

    def keep(trainer, start_step):
        seen["trainer"] = trainer
        return real_loop(trainer, start_step)

    monkeypatch.setattr(train, "run_loop", keep)
    return seen


def test_16gb_recipe_gradient_checkpointing_and_8bit_adam(tiny_model_dir: Path, tmp_path: Path, captured: dict,
                                                          capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("bitsandbytes")
    assert run_train(tiny_model_dir, tmp_path / "out", "--gradient_checkpointing", "--use_8bit_adam",
                     *RECIPE_ARGS) == 0
    trainer = captured["trainer"]
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert unet.is_gradient_checkpointing
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer).__name__ == "AdamW8bit"
    # bitsandbytes keeps large tensors' Adam moments in 8 bits (small ones stay 32-bit)
    assert any(state.get("state1") is not None and state["state1"].dtype == torch.uint8
               for state in optimizer.state.values())
    assert len(metrics(tmp_path / "out")) == 2
    assert "bitsandbytes AdamW8bit" in capsys.readouterr().err


def test_12gb_recipe_without_xformers_sets_grads_to_none(tiny_model_dir: Path, tmp_path: Path,
                                                          captured: dict) -> None:
    """The 12 GB recipe on CPU, less xFormers (CUDA only; its GPU test is below)."""
    pytest.importorskip("bitsandbytes")
    assert run_train(tiny_model_dir, tmp_path / "out", "--use_8bit_adam", "--gradient_checkpointing",
                     "--set_grads_to_none", *RECIPE_ARGS) == 0
    unet = captured["trainer"].accelerator.unwrap_model(captured["trainer"].unet)
    assert all(p.grad is None for p in unet.parameters()), "set_grads_to_none left gradient tensors behind"
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_xformers_where_it_cannot_run_is_refused_before_models_load(tiny_model_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Not installed: preflight names the package; installed but no CUDA: the flag and the device."""
    from jaxbooth import preflight
    from jaxbooth.torch_backend import models

    assert run_train(tiny_model_dir, tmp_path / "a", "--enable_xformers_memory_efficient_attention",
                     *RECIPE_ARGS) == 2
    err = capsys.readouterr().err
    if preflight._installed("xformers"):
        assert "need a CUDA device" in err
    else:
        assert "pip install xformers" in err
    monkeypatch.setattr(preflight, "_installed", lambda module: True)
    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("models loaded before the refusal"))
    assert run_train(tiny_model_dir, tmp_path / "b", "--enable_xformers_memory_efficient_attention",
                     *RECIPE_ARGS) == 2
    err = capsys.readouterr().err
    assert "--enable_xformers_memory_efficient_attention: xFormers kernels need a CUDA device" in err


def test_without_set_grads_to_none_gradients_are_zeroed(tiny_model_dir: Path, tmp_path: Path, captured: dict) -> None:
    assert run_train(tiny_model_dir, tmp_path / "out", *RECIPE_ARGS) == 0
    unet = captured["trainer"].accelerator.unwrap_model(captured["trainer"].unet)
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_deepspeed_config_is_the_guides_zero2_cpu_offload_recipe() -> None:
    config = yaml.safe_load(DEEPSPEED_CONFIG.read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["mixed_precision"] == "fp16"
    ds = config["deepspeed_config"]
    assert ds["zero_stage"] == 2 and ds["offload_optimizer_device"] == "cpu"
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(DEEPSPEED_CONFIG))  # accelerate itself accepts the file
    assert loaded.deepspeed_config["zero_stage"] == 2


def test_deepspeed_rejects_8bit_adam_and_text_encoder_training() -> None:
    from jaxbooth.spec import load_spec
    from jaxbooth.torch_backend.memory import check_deepspeed

    plugin = object()
    with pytest.raises(JaxboothError, match="--use_8bit_adam"):
        check_deepspeed(load_spec(["--use_8bit_adam"]), plugin)
    with pytest.raises(JaxboothError, match="--train_text_encoder"):
        check_deepspeed(load_spec(["--train_text_encoder"]), plugin)
    check_deepspeed(load_spec(["--use_8bit_adam"]), None)


def _launch_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def test_8gb_recipe_deepspeed_zero2_cpu_offload(tiny_model_dir: Path, tmp_path: Path) -> None:
    """accelerate launch with the shipped DeepSpeed config (on CPU: DeepSpeed's CPU accelerator,
    fp32, DeepSpeedCPUAdam built on first use, which takes minutes once)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DEEPSPEED_CONFIG)]
    if not torch.cuda.is_available():
        command.append("--mixed_precision=no")  # DeepSpeed has no fp16 on its CPU accelerator
    command += ["-m", "jaxbooth", "train", "--backend=torch", f"--pretrained_model_name_or_path={tiny_model_dir}",
                f"--output_dir={out}", "--seed=0", "--checkpointing_steps=2", "--log_every_steps=1",
                *RECIPE_ARGS[:-1]]
    proc = subprocess.run(command, capture_output=True, text=True, env=_launch_env(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DeepSpeedCPUAdam under DeepSpeed ZeRO-2" in proc.stderr
    assert len(metrics(out)) == 2
    state = out / "checkpoint-2" / "state"
    assert (state / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(out, subfolder="checkpoint-2/unet")
    # the DeepSpeed engine state resumes too
    proc = subprocess.run([*command, "--max_train_steps=3", "--resume_from_checkpoint=latest"], capture_output=True,
                          text=True, env=_launch_env(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_two_processes_with_accelerate_launch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Data parallel over two CPU processes (gloo), with prior preservation: class images are
    generated by both processes, one output and one metrics log are written by rank 0."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
               "--mixed_precision=no", "-m", "jaxbooth", "train", "--backend=torch",
               f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={out}", "--seed=0",
               "--checkpointing_steps=2", "--log_every_steps=1", "--with_prior_preservation",
               f"--class_data_dir={tmp_path / 'class'}", "--class_prompt=a photo of a toy", "--num_class_images=3",
               *RECIPE_ARGS[:-1]]
    proc = subprocess.run(command, capture_output=True, text=True, env=_launch_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on 2 process(es)" in proc.stderr
    assert proc.stderr.count("done: 2 optimizer steps") == 1
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "checkpoint-2" / "jaxbooth_checkpoint.json").is_file()
    # the two processes split the class images between them: indices 0, 1, 2, once each
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "class").iterdir()) == ["0", "1", "2"]


@pytest.mark.gpu
def test_xformers_kernels_train_on_gpu(tiny_model_dir: Path, tmp_path: Path, captured: dict) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: xFormers kernels do not run on CPU")
    pytest.importorskip("xformers", reason="xformers is not installed")
    assert run_train(tiny_model_dir, tmp_path / "out", "--enable_xformers_memory_efficient_attention",
                     "--mixed_precision=fp16", *RECIPE_ARGS) == 0
    unet = captured["trainer"].accelerator.unwrap_model(captured["trainer"].unet)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"XFormersAttnProcessor"}
