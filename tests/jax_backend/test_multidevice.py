"""Sharded training gives the same losses on 1 device, 8 devices (data or data x fsdp) and 2 hosts x 4 devices.

Each configuration runs `jaxbooth train` in its own process, because the CPU device count
is fixed when jax starts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

GLOBAL_BATCH = 8
STEPS = 2

RUNNER = """
import sys
import jaxbooth.jax_backend.mesh as mesh_lib
mesh_lib.FSDP_MIN_BYTES = int(sys.argv[1])  # shard even the tiny model's params over fsdp
from jaxbooth.cli import main
sys.exit(main(sys.argv[2:]))
"""


def train_args(tiny: Path, out: Path, per_device_batch: int, *extra: str) -> list[str]:
    return ["train", "--backend=jax", f"--pretrained_model_name_or_path={tiny}", f"--output_dir={out}",
            "--resolution=64", f"--train_batch_size={per_device_batch}", f"--max_train_steps={STEPS}",
            "--learning_rate=1e-4", "--seed=0", "--report_to=none", "--log_every_steps=1",
            "--checkpointing_steps=1000", *extra]


def launch(args: list[str], devices: int, *, fsdp_min_bytes: int = 1 << 20, env_extra: dict | None = None):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(fsdp_min_bytes), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
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


def test_two_hosts_match_one_device(tiny_model_dir, tmp_path, single_device_losses) -> None:
    out = tmp_path / "hosts"
    port = _free_port()
    procs = [launch(train_args(tiny_model_dir, out, GLOBAL_BATCH // 8, f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={pid}"), devices=4)
             for pid in range(2)]
    for proc in procs:
        finish(proc)
    np.testing.assert_allclose(losses(out), single_device_losses, rtol=2e-4)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_full_sdxl_sharded_over_fsdp_4_matches_one_device_at_a_quarter_of_the_bytes(tmp_path: Path) -> None:
    """Full SDXL fine-tune, params and optimizer state sharded over fsdp=4 on 4 devices: the same losses and
    trained UNet as one device, and each device holds under 1/3.5 of the params + optimizer bytes (the
    trainer reads that from the arrays' shards and prints it with the sharding table)."""
    from jaxbooth.tiny import write_tiny_pipeline

    pipe = write_tiny_pipeline(tmp_path / "sdxl", "tiny", seed=0, family="sdxl")
    one, sharded = tmp_path / "one", tmp_path / "fsdp4"
    log_one = finish(launch(train_args(pipe, one, 4), devices=1, fsdp_min_bytes=1024))
    log_sharded = finish(launch(train_args(pipe, sharded, 1, "--fsdp_parallelism=4"), devices=4,
                                fsdp_min_bytes=1024))
    np.testing.assert_allclose(losses(sharded), losses(one), rtol=2e-4)
    weights = "unet/diffusion_pytorch_model.safetensors"
    ours, reference = (safetensors.numpy.load_file(folder / weights) for folder in (sharded, one))
    assert ours.keys() == reference.keys()
    # atol: a tenth of one Adam step (lr 1e-4). Biases in front of a one-channel-per-group GroupNorm have an
    # analytically zero gradient, and Adam turns its float noise into updates of up to ~1e-5 that differ with
    # the reduction order; every other param moves by ~lr per step, so a wrong sharded gradient shows at 1e-4.
    for name, value in reference.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-4, atol=2e-5, err_msg=name)
    (ratio_one,) = re.findall(r"params \+ optimizer state: .* MB \(1/([0-9.]+)\)", log_one)
    (ratio,) = re.findall(r"params \+ optimizer state: .* MB \(1/([0-9.]+)\)", log_sharded)
    assert float(ratio_one) == 1.0 and float(ratio) >= 3.5, (ratio, log_sharded[-3000:])
    assert "sharding of the trained params:" in log_sharded and "unet/down_blocks_0" in log_sharded
