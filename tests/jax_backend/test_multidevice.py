"""Sharded training gives the same losses on 1 device, 8 devices (data or data x fsdp) and 2 hosts x 4 devices.

Each configuration runs `jaxbooth train` in its own process, because the CPU device count
is fixed when jax starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GLOBAL_BATCH = 8
STEPS = 2

RUNNER = """
import sys
import jaxbooth.jax_backend.mesh as mesh_lib
mesh_lib.FSDP_MIN_BYTES = int(sys.argv[1])  # shard even the tiny model's params over fsdp
from jaxbooth.cli import main
sys.exit(main(sys.argv[2:]))
"""


def train_args(tiny: Path, out: Path, per_device_batch: int, *extra: str, backend: str = "jax",
               steps: int = STEPS) -> list[str]:
    return ["train", f"--backend={backend}", f"--pretrained_model_name_or_path={tiny}", f"--output_dir={out}",
            "--resolution=64", f"--train_batch_size={per_device_batch}", f"--max_train_steps={steps}",
            "--learning_rate=1e-4", "--seed=0", "--report_to=none", "--log_every_steps=1",
            "--checkpointing_steps=1000", *extra]


def launch(args: list[str], devices: int, *, fsdp_min_bytes: int = 1 << 20, env_extra: dict | None = None):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(fsdp_min_bytes), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """Wait for a launched run; its stdout and stderr (the trainer's log)."""
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def losses(out: Path) -> np.ndarray:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return np.array([json.loads(line)["train/loss"] for line in lines])


@pytest.fixture(scope="module")
def single_device_losses(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    out = tmp_path_factory.mktemp("one") / "out"
    finish(launch(train_args(tiny_model_dir, out, GLOBAL_BATCH), devices=1))
    return losses(out)


def test_eight_devices_data_parallel_match_one_device(tiny_model_dir, tmp_path, single_device_losses) -> None:
    out = tmp_path / "eight"
    finish(launch(train_args(tiny_model_dir, out, GLOBAL_BATCH // 8), devices=8))
    np.testing.assert_allclose(losses(out), single_device_losses, rtol=2e-4)


def test_fsdp_sharded_params_match_one_device(tiny_model_dir, tmp_path, single_device_losses) -> None:
    out = tmp_path / "fsdp"
    proc = launch(train_args(tiny_model_dir, out, GLOBAL_BATCH // 8, "--fsdp_parallelism=4"), devices=8,
                  fsdp_min_bytes=1024)
    finish(proc)
    np.testing.assert_allclose(losses(out), single_device_losses, rtol=2e-4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_hosts_with_backend_auto_match_one_device(tiny_model_dir, tmp_path, single_device_losses) -> None:
    out = tmp_path / "hosts"
    port = _free_port()
    # backend auto probes the devices: it must join the run first (JAX refuses initialize after a device query)
    procs = [launch(train_args(tiny_model_dir, out, GLOBAL_BATCH // 8, f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={pid}", backend="auto"), devices=4)
             for pid in range(2)]
    for proc in procs:
        finish(proc)
    np.testing.assert_allclose(losses(out), single_device_losses, rtol=2e-4)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


