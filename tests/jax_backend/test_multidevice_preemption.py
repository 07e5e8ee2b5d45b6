"""SIGTERM to one host of two stops both at one step with one checkpoint, and the resumed run equals an unbroken one.

Its own file (not test_multidevice.py's), so pytest-xdist can run it beside those runs on the other worker.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.jax_backend.test_multidevice import GLOBAL_BATCH, _free_port, finish, launch, losses, train_args

STEPS = 6  # long enough for the preemption to land mid-run


@pytest.fixture(scope="module")
def unbroken_losses(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    out = tmp_path_factory.mktemp("unbroken") / "out"
    finish(launch(train_args(tiny_model_dir, out, GLOBAL_BATCH, steps=STEPS), devices=1))
    return losses(out)


def _wait_for_line(proc: subprocess.Popen, text: str) -> list[str]:
    """Read a launched run's stderr until a line holding ``text``; the lines read."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the run ended before logging {text!r}:\n{''.join(lines)[-3000:]}")


def test_sigterm_to_one_host_stops_both_at_one_step_and_the_resume_equals_an_unbroken_run(
        tiny_model_dir, tmp_path, unbroken_losses) -> None:
    out = tmp_path / "preempted"
    port = _free_port()

    def host(pid: int, *extra: str) -> subprocess.Popen:
        return launch(train_args(tiny_model_dir, out, GLOBAL_BATCH // 8, f"--coordinator_address=127.0.0.1:{port}",
                                 "--num_processes=2", f"--process_id={pid}", *extra, steps=STEPS), devices=4)

    procs = [host(0), host(1)]
    head = _wait_for_line(procs[0], "params + optimizer state")  # before the first step: mid-run, surely
    procs[1].send_signal(signal.SIGTERM)  # host 1 only, as a preemption notice may reach one VM of a slice
    logs = [finish(proc) for proc in procs]  # both exit 0: neither waits forever in a collective
    stopped = [line for line in "".join(head) .splitlines() + logs[0].splitlines() if "stopped by signal" in line]
    assert len(stopped) == 1, logs[0][-3000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 1 <= step < STEPS
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{step}"] and (out / checkpoints[0] / "jaxbooth_checkpoint.json").is_file()
    assert not (out / "unet").exists()  # stopped, not finished

    port = _free_port()
    for proc in [host(0, "--resume_from_checkpoint=latest"), host(1, "--resume_from_checkpoint=latest")]:
        finish(proc)
    np.testing.assert_allclose(losses(out), unbroken_losses, rtol=2e-4)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
