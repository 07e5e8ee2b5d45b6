"""The scripts in examples/ run as written: train from Python, then sample with the Flax pipeline (issue 22's
acceptance: `jaxbooth.train(...)` and `FlaxStableDiffusionPipeline.from_pretrained(output)` in one process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_train_then_generate_writes_a_sample_of_the_trained_pipeline(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Same training keys as tests/test_api.py's run, so a session that ran it first reuses its compiled step."""
    script = REPO / "examples" / "train_then_generate.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path), f"--model={tiny_model_dir}",
                           "--resolution=64", "--steps=2"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("trained 2 steps on jax: loss ") and str(tmp_path / "trained") in lines[0], lines
    assert lines[-1] == str(tmp_path / "sample.png")
    assert (tmp_path / "trained" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    image = np.asarray(Image.open(tmp_path / "sample.png"))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 0
