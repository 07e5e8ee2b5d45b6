"""scripts/launch_tpu.py: the exact commands of each subcommand's --dry-run, the preemption relaunch policy
against a simulated slice, and the real runner on local stand-in processes. No gcloud or accelerate ever
runs: the module's subprocess is replaced by one that refuses them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("launch_tpu", REPO / "scripts" / "launch_tpu.py")
launch = importlib.util.module_from_spec(_spec)
sys.modules["launch_tpu"] = launch  # dataclasses look their module up while the file executes
_spec.loader.exec_module(launch)

RESUME = "--resume_from_checkpoint=latest"
PROMPT = "--instance_prompt=a photo of sks dog"


@pytest.fixture(autouse=True)
def no_cloud_commands(monkeypatch):
    """The launcher's subprocess module, except that gcloud and accelerate fail the test."""

    def guard(real):
        def call(argv, *args, **kwargs):
            assert Path(argv[0]).name not in ("gcloud", "accelerate"), f"a test tried to run {argv}"
            return real(argv, *args, **kwargs)
        return call

    shim = types.SimpleNamespace(run=guard(subprocess.run), Popen=guard(subprocess.Popen),
                                 PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT)
    monkeypatch.setattr(launch, "subprocess", shim)


def test_tpu_dry_run_prints_every_gcloud_command(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    (tmp_path / "dog").mkdir()
    code = launch.main(["tpu", "--spec", "tpu_configs/v5litepod-16.yaml", "--name", "jb", "--zone", "us-west4-a",
                        "--accelerator-type", "v5litepod-16", "--instance-dir", str(tmp_path / "dog"),
                        "--class-dir", "gs://bucket/dogs", "--setup-command", "echo ready", "--dry-run", "--",
                        "--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5", PROMPT])
    assert code == 0
    z = "--zone=us-west4-a"
    train = ("python3 -m jaxbooth train --config jaxbooth-run/spec/v5litepod-16.yaml "
             "--instance_data_dir=jaxbooth-run/instance --class_data_dir=jaxbooth-run/class "
             "--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 "
             "'\"'\"'--instance_prompt=a photo of sks dog'\"'\"' "
             "--coordinator_address=WORKER0_IP:8482 --num_processes=2")
    expected = f"""\
gcloud compute tpus tpu-vm describe jb {z} --format=json
gcloud compute tpus tpu-vm create jb {z} --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite
gcloud compute tpus tpu-vm describe jb {z} --format=json
gcloud compute tpus tpu-vm ssh jb {z} --worker=all '--command=mkdir -p jaxbooth-run/dist jaxbooth-run/spec \
&& rm -rf jaxbooth-run/instance jaxbooth-run/class'
gcloud compute tpus tpu-vm ssh jb {z} --worker=all '--command=python3 -m pip install -U '"'"'jax[tpu]'"'"' jaxbooth'
gcloud compute tpus tpu-vm ssh jb {z} --worker=all '--command=echo ready'
gcloud compute tpus tpu-vm scp tpu_configs/v5litepod-16.yaml jb:jaxbooth-run/spec/v5litepod-16.yaml {z} --worker=all
gcloud compute tpus tpu-vm scp tpu_configs/base.yaml jb:jaxbooth-run/spec/base.yaml {z} --worker=all
gcloud compute tpus tpu-vm scp {tmp_path / "dog"} jb:jaxbooth-run/instance {z} --worker=all --recurse
gcloud compute tpus tpu-vm ssh jb {z} --worker=all '--command=mkdir -p jaxbooth-run/class && gcloud storage rsync \
gs://bucket/dogs jaxbooth-run/class --recursive'
gcloud compute tpus tpu-vm ssh jb {z} --worker=0 '--command=echo $$ > jaxbooth-run/train.pid && exec {train} \
--process_id=0'
gcloud compute tpus tpu-vm ssh jb {z} --worker=1 '--command=echo $$ > jaxbooth-run/train.pid && exec {train} \
--process_id=1'
"""
    assert capsys.readouterr().out == expected


def test_tpu_dry_run_of_a_queued_spot_slice(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert launch.main(["tpu", "--spec", "tpu_configs/v5p-8.yaml", "--name", "jb", "--zone", "us-east5-a",
                        "--project", "proj", "--accelerator-type", "v5p-8", "--queued", "--spot", "--skip-install",
                        "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    where = "--zone=us-east5-a --project=proj"
    assert lines[:3] == [
        f"gcloud compute tpus queued-resources describe jb {where} --format=json",
        f"gcloud compute tpus queued-resources create jb {where} --node-id=jb --accelerator-type=v5p-8 "
        "--runtime-version=v2-alpha-tpuv5 --spot",
        f"gcloud compute tpus tpu-vm describe jb {where} --format=json"]
    assert not any("pip install" in line for line in lines)  # --skip-install
    # one host: one worker, no coordinator flags
    assert lines[-1] == (f"gcloud compute tpus tpu-vm ssh jb {where} --worker=0 '--command=echo $$ > "
                         "jaxbooth-run/train.pid && exec python3 -m jaxbooth train "
                         "--config jaxbooth-run/spec/v5p-8.yaml'")


def test_gpu_host_dry_run(capsys):
    assert launch.main(["gpu-host", "--spec", "tpu_configs/gpu-80gb.yaml", "--gpus", "0,1,2,3", "--python", "python3",
                        "--install", "--dry-run", "--", "--instance_data_dir=dog", PROMPT]) == 0
    assert capsys.readouterr().out == (
        "python3 -m pip install -U 'jax[cuda12]' jaxbooth\n"
        "env CUDA_VISIBLE_DEVICES=0,1,2,3 python3 -m jaxbooth train --config tpu_configs/gpu-80gb.yaml --backend=jax "
        "--instance_data_dir=dog '--instance_prompt=a photo of sks dog'\n")


def test_accelerate_dry_run(capsys):
    assert launch.main(["accelerate", "--num-processes", "2", "--accelerate-config",
                        "scripts/accelerate_deepspeed_zero2_offload.yaml", "--dry-run", "--",
                        "--instance_data_dir=dog", PROMPT]) == 0
    assert capsys.readouterr().out == (
        "accelerate launch --multi_gpu --num_processes=2 --config_file=scripts/accelerate_deepspeed_zero2_offload.yaml "
        "-m jaxbooth train --backend=torch --instance_data_dir=dog '--instance_prompt=a photo of sks dog'\n")


# --------------------------------------------------------------------------- relaunch policy


class FakeSlice:
    """A slice for the launcher to drive: describe reports ``state``; create/delete change it; each
    training launch returns the next scripted (exit codes, stopped-by-signal, state afterwards)."""

    def __init__(self, attempts, *, workers=2, state="READY"):
        self.attempts, self.workers, self.state = list(attempts), workers, state
        self.commands: list[list[str]] = []
        self.trainings: list[list[list[str]]] = []

    def capture(self, argv):
        self.commands.append(argv)
        if not self.state:
            return ""
        endpoints = [{"ipAddress": f"10.0.0.{i + 1}"} for i in range(self.workers)]
        return json.dumps({"state": self.state, "networkEndpoints": endpoints})

    def run(self, argv):
        self.commands.append(argv)
        self.state = {"create": "READY", "delete": ""}.get(argv[4], self.state)
        return 0

    def run_workers(self, argvs, log_dir):
        self.trainings.append(argvs)
        codes, stopped, after = self.attempts.pop(0)
        self.state = after or self.state
        return launch.Attempt(codes, stopped)

    def verbs(self):
        return [argv[4] for argv in self.commands if argv[4] in ("create", "delete")]

    def installs(self):
        return sum("pip install" in " ".join(argv) for argv in self.commands)


def tpu_args(*extra: str) -> list[str]:
    return ["tpu", "--spec", str(REPO / "tpu_configs" / "v5p-32.yaml"), "--name", "jb", "--zone", "z",
            "--accelerator-type", "v5p-32", "--poll-seconds", "0", *extra, "--", PROMPT]


def test_preempted_slice_is_recreated_and_the_run_resumes():
    fake = FakeSlice([([launch.SSH_LOST] * 2, False, "PREEMPTED"), ([0, 0], False, None)])
    assert launch.main(tpu_args(), runner=fake, sleep=lambda s: None) == 0
    first, second = fake.trainings
    assert [argv[-1].endswith(f"--process_id={i}") for i, argv in enumerate(first)] == [True, True]
    assert [argv[-1].endswith(f"--process_id={i} {RESUME}") for i, argv in enumerate(second)] == [True, True]
    assert all("--coordinator_address=10.0.0.1:8482 --num_processes=2" in argv[-1] for argv in first + second)
    assert fake.verbs() == ["delete", "create"]
    assert fake.installs() == 2  # the new workers were set up again


def test_distributed_auto_leaves_the_peers_to_jax():
    fake = FakeSlice([([0, 0], False, None)])
    assert launch.main(tpu_args("--distributed", "auto"), runner=fake, sleep=lambda s: None) == 0
    commands = [argv[-1] for argv in fake.trainings[0]]
    assert [c.endswith(" --multi_host") and "--coordinator_address" not in c for c in commands] == [True, True]


def test_launcher_gives_up_after_max_restarts():
    # trainers that fail as their chips vanish: the slice's state, not the exit status, says preempted
    fake = FakeSlice([([1, 1], False, "PREEMPTED")] * 3)
    assert launch.main(tpu_args("--max-restarts", "2"), runner=fake, sleep=lambda s: None) == 1
    assert len(fake.trainings) == 3
    assert [RESUME in t[0][-1] for t in fake.trainings] == [False, True, True]


def test_saved_on_sigterm_relaunches_on_the_same_slice():
    # exit 0 after "stopped by signal" is a preemption, not the end; the slice survived, so the
    # leftovers are stopped and training resumes without creating anything
    fake = FakeSlice([([0, 0], True, None), ([0, 0], False, None)])
    assert launch.main(tpu_args(), runner=fake, sleep=lambda s: None) == 0
    assert fake.verbs() == [] and fake.installs() == 1
    assert any("kill $p" in argv[-1] for argv in fake.commands)
    assert RESUME in fake.trainings[1][0][-1]


def test_a_training_error_is_not_relaunched():
    fake = FakeSlice([([2, 2], False, None)])
    assert launch.main(tpu_args(), runner=fake, sleep=lambda s: None) == 2
    assert len(fake.trainings) == 1


def test_launcher_waits_for_a_new_slice_to_become_ready():
    class Slow(FakeSlice):
        polls = 0

        def capture(self, argv):
            if self.state == "READY" and self.polls < 2:  # CREATING twice, then READY
                self.polls += 1
                self.commands.append(argv)
                return json.dumps({"state": "CREATING"})
            return super().capture(argv)

    fake, slept = Slow([([0, 0], False, None)], state=""), []
    assert launch.main(tpu_args(), runner=fake, sleep=slept.append) == 0
    assert fake.verbs() == ["create"] and slept == [0.0, 0.0]


def test_gpu_host_relaunches_after_sigterm_with_resume(tmp_path):
    class Local:
        def __init__(self):
            self.launched, self.results = [], [launch.Attempt([0], True), launch.Attempt([0], False)]

        def run(self, argv):
            raise AssertionError("no install without --install")

        def run_workers(self, argvs, log_dir):
            self.launched += argvs
            return self.results.pop(0)

    local = Local()
    assert launch.main(["gpu-host", "--python", "python3", "--log-dir", str(tmp_path), "--", PROMPT],
                       runner=local) == 0
    assert [RESUME in argv for argv in local.launched] == [False, True]


def test_local_outcomes():
    assert launch.local_outcome(launch.Attempt([0], False)) == launch.DONE
    assert launch.local_outcome(launch.Attempt([0], True)) == launch.PREEMPTED
    assert launch.local_outcome(launch.Attempt([-15], False)) == launch.PREEMPTED
    assert launch.local_outcome(launch.Attempt([1], False)) == launch.FAILED


def test_stop_marker_is_what_both_trainers_log():
    for path in ("jaxbooth/jax_backend/train.py", "jaxbooth/torch_backend/loop.py"):
        assert launch.STOP_MARKER in (REPO / path).read_text(), path


def test_host_counts_match_the_tpu_config_headers():
    import re

    for path in sorted((REPO / "tpu_configs").glob("v*.yaml")):
        hosts = int(re.search(r"hosts: (\d+)", path.read_text()).group(1))
        assert launch.slice_hosts(path.stem) == hosts, path.name


def test_a_spec_extending_a_file_outside_its_folder_is_refused(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("backend: jax\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run.yaml").write_text("extends: ../base.yaml\n")
    assert launch.main(["tpu", "--spec", str(tmp_path / "runs" / "run.yaml"), "--name", "jb", "--zone", "z",
                        "--accelerator-type", "v5p-8", "--dry-run"]) == 1
    assert "jaxbooth spec --config" in capsys.readouterr().err


def test_real_runner_streams_worker_0_and_logs_every_worker(tmp_path, capsys):
    say = "import sys; print(sys.argv[1]); sys.exit(int(sys.argv[2]))"
    attempt = launch.Runner().run_workers(
        [[sys.executable, "-c", say, "[jaxbooth] stopped by signal after step 3", "0"],
         [sys.executable, "-c", say, "worker one", "1"]], tmp_path)
    assert attempt == launch.Attempt([0, 1], True)
    assert "stopped by signal after step 3" in capsys.readouterr().out
    assert (tmp_path / "worker-1.log").read_text() == "worker one\n"


def test_finished_run_fetches_the_output_from_worker_0_then_deletes_the_slice(tmp_path):
    fake = FakeSlice([([0, 0], False, None)])
    args = tpu_args("--output-dir", "/mnt/shared/dog", "--fetch-output", str(tmp_path / "dog"), "--delete-when-done")
    assert launch.main(args, runner=fake, sleep=lambda s: None) == 0
    assert all("--output_dir=/mnt/shared/dog" in argv[-1] for argv in fake.trainings[0])
    fetch, delete = fake.commands[-2:]
    assert fetch[4:7] == ["scp", "jb:/mnt/shared/dog", str(tmp_path / "dog")] and "--worker=0" in fetch
    assert delete[4] == "delete" and fake.state == ""
