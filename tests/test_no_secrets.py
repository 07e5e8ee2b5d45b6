"""No secret in any file a run writes or in anything it prints, on either backend.

A run with checkpoints, validation images, class-image generation and TensorBoard logs is
given ``--hub_token`` and ``HF_TOKEN`` in its environment, as a user who logged in would
have; then every byte it wrote (output folder, class images) and printed is searched for
both tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FLAG_TOKEN = "hf_FlagTokenMustNeverLeak123"
ENV_TOKEN = "hf_EnvTokenMustNeverLeak456"


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_TOKEN": ENV_TOKEN, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "jaxbooth", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def files_containing(root: Path, secrets: tuple[str, ...]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            payload = path.read_bytes()
            hits += [f"{path}: {s}" for s in secrets if s.encode() in payload]
    return hits


@pytest.mark.parametrize("backend", ["jax", pytest.param("torch", marks=pytest.mark.requires_torch)])
def test_no_token_in_any_written_file_or_output(backend: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    if backend == "torch":
        pytest.importorskip("torch")
    out, class_dir = tmp_path / "out", tmp_path / "class"
    common = [f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={out}", "--resolution=64",
              "--train_batch_size=1", "--lr_warmup_steps=0", f"--hub_token={FLAG_TOKEN}",
              "--checkpointing_steps=1", "--validation_prompt=a photo of sks toy", "--validation_steps=2",
              "--num_validation_images=1", "--with_prior_preservation", f"--class_data_dir={class_dir}",
              "--class_prompt=a photo of a toy", "--num_class_images=1", "--sample_batch_size=1",
              "--report_to=tensorboard", "--log_every_steps=1", f"--backend={backend}"]
    first = run_cli(["train", *common, "--max_train_steps=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli(["train", *common, "--max_train_steps=2", "--resume_from_checkpoint=latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    printed = run_cli(["spec", *common], tmp_path)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert (out / "checkpoint-1").is_dir() and list((out / "validation").rglob("*.png")), "the run wrote too little"
    secrets = (FLAG_TOKEN, ENV_TOKEN)
    assert files_containing(tmp_path, secrets) == []
    for result in (first, resumed, printed):
        for secret in secrets:
            assert secret not in result.stdout + result.stderr
