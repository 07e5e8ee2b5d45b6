"""Smoke tests of the benchmark scripts: they start, parse their flags and print one JSON line.

Nothing here asserts on wall time (STYLE.md: benchmarks are scripts, not timed tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("name", ["bench_unet.py", "bench_train.py", "bench_torch_memory.py", "bench_device.py"])
def test_help(name: str) -> None:
    proc = run_script(name, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_bench_train_rejects_bad_step_counts() -> None:
    proc = run_script("bench_train.py", "--n1", "5", "--n2", "5", timeout=120)
    assert proc.returncode == 2
    assert "--n2 must be larger than --n1" in proc.stderr


@pytest.mark.requires_torch
def test_bench_unet_tiny_prints_one_json_line() -> None:
    pytest.importorskip("diffusers")
    proc = run_script("bench_unet.py", "--tiny", "--steps", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["bench"] == "unet" and record["config"]["size"] == "tiny"
    (result,) = record["results"]
    assert result["batch"] == 1
    assert result["flops_per_step"] > 0
    assert result["flax"]["samples_per_s"] > 0 and result["torch"]["samples_per_s"] > 0
    assert result["forward_max_abs_diff_torch"] < 1e-2  # the torch model really holds the exported Flax weights


def test_bench_torch_memory_runs_every_recipe_on_a_small_unet() -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("bitsandbytes")
    proc = run_script("bench_torch_memory.py", "--shape", "tiny", "--steps", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    record = json.loads(line)
    assert record["bench"] == "torch_memory" and record["shape"] == "tiny"
    assert sorted(record["recipes"]) == ["adam8bit", "adamw", "checkpointing", "checkpointing+adam8bit"]
    for result in record["recipes"].values():
        assert result["peak_gb"] > 0 and result["s_per_step"] > 0 and result["params"] > 100_000


def test_bench_torch_memory_refuses_the_real_shape_without_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real shape would run")
    proc = run_script("bench_torch_memory.py", "--recipes", "adamw", timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
