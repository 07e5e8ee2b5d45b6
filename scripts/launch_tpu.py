#!/usr/bin/env python3
"""Launch ``jaxbooth train`` on a Cloud TPU slice, a multi-GPU host, or under ``accelerate``; relaunch on preemption.

  tpu         create or reuse a TPU VM slice (``--queued``: a queued resource), install jaxbooth on every
              worker without torch (its base install: the ``torch`` extra is what pulls torch) plus
              ``jax[tpu]``, copy the spec and the instance/class images there, run ``jaxbooth train`` on all
              workers, stream worker 0's output (every worker's goes to LOG_DIR/worker-N.log), and when the
              slice is preempted recreate it and relaunch with ``--resume_from_checkpoint=latest``; at the end
              optionally copy the output back (``--fetch-output``) and delete the slice.
  gpu-host    ``jaxbooth train`` on this machine's GPUs with JAX: one process sees them all.
  accelerate  the torch backend under ``accelerate launch``, one process per GPU.

Every external command comes from a function below that returns an argv list (the gcloud ones
from ``Gcloud``); ``--dry-run`` prints them one per line, shell-quoted, and runs nothing. Standard
library only: it runs where gcloud runs, without jaxbooth installed. docs/tpu_pod.md walks through it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

# What both backends log after SIGTERM made them save a checkpoint and exit 0 (jax_backend/train.py,
# torch_backend/loop.py): such a run is not finished, it was preempted.
STOP_MARKER = "stopped by signal after step"
SSH_LOST = 255  # ssh's own exit status: the connection to the worker dropped
COORDINATOR_PORT = 8482  # the port jax.distributed's own Cloud TPU discovery uses
RESUME = "--resume_from_checkpoint=latest"
# accelerator-type prefix -> (runtime version, chips per host, whether "-N" counts TensorCores, 2 per chip).
# From cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e,runtimes}; only --dry-run uses the host counts: a real
# run reads the workers from the slice itself.
GENERATIONS = {"v4": ("tpu-ubuntu2204-base", 4, True), "v5litepod": ("v2-alpha-tpuv5-lite", 8, False),
               "v5p": ("v2-alpha-tpuv5", 4, True), "v6e": ("v2-alpha-tpuv6e", 8, False)}
READY, ACTIVE = "READY", "ACTIVE"
GONE_STATES = {"PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDED", "SUSPENDING", "FAILED"}


class LaunchError(Exception):
    """A problem the user fixes (bad flag, failed command); printed as one line, exit status 1."""


def log(message: str) -> None:
    print(f"[launch_tpu] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- gcloud commands


@dataclasses.dataclass(frozen=True)
class Gcloud:
    """The gcloud command lines, all in one place (``gcloud compute tpus ...``)."""

    name: str
    zone: str
    project: str | None = None

    def _tpus(self, *words: str, flags: Sequence[str] = ()) -> list[str]:
        where = [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])
        return ["gcloud", "compute", "tpus", *words, *where, *flags]

    def describe(self) -> list[str]:
        return self._tpus("tpu-vm", "describe", self.name, flags=["--format=json"])

    def create(self, accelerator: str, version: str, spot: bool) -> list[str]:
        flags = [f"--accelerator-type={accelerator}", f"--version={version}"] + (["--spot"] if spot else [])
        return self._tpus("tpu-vm", "create", self.name, flags=flags)

    def delete(self) -> list[str]:
        return self._tpus("tpu-vm", "delete", self.name, flags=["--quiet"])

    def queued_describe(self) -> list[str]:
        return self._tpus("queued-resources", "describe", self.name, flags=["--format=json"])

    def queued_create(self, accelerator: str, version: str, spot: bool) -> list[str]:
        flags = [f"--node-id={self.name}", f"--accelerator-type={accelerator}", f"--runtime-version={version}"]
        return self._tpus("queued-resources", "create", self.name, flags=flags + (["--spot"] if spot else []))

    def queued_delete(self) -> list[str]:  # --force deletes its TPU VM first
        return self._tpus("queued-resources", "delete", self.name, flags=["--force", "--quiet"])

    def ssh(self, command: str, worker: int | str = "all") -> list[str]:
        return self._tpus("tpu-vm", "ssh", self.name, flags=[f"--worker={worker}", f"--command={command}"])

    def scp(self, local: str, remote: str, recurse: bool = False) -> list[str]:
        flags = ["--worker=all"] + (["--recurse"] if recurse else [])
        return self._tpus("tpu-vm", "scp", local, f"{self.name}:{remote}", flags=flags)

    def fetch(self, remote: str, local: str) -> list[str]:
        return self._tpus("tpu-vm", "scp", f"{self.name}:{remote}", local, flags=["--worker=0", "--recurse"])


# --------------------------------------------------------------------------- running commands


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One training launch: each process's exit status, and whether worker 0 logged STOP_MARKER."""

    returncodes: list[int]
    stopped: bool


def _found(argv: list[str]) -> list[str]:
    if shutil.which(argv[0]) is None:
        raise LaunchError(f"{argv[0]}: command not found; install it (gcloud: the Google Cloud CLI) or fix PATH")
    return argv


class Runner:
    """Runs commands for real. Tests pass their own object with the same three methods."""

    def run(self, argv: list[str]) -> int:
        return subprocess.run(_found(argv)).returncode

    def capture(self, argv: list[str]) -> str | None:
        """stdout of a query; "" when it failed (e.g. the slice does not exist); None means unknown."""
        result = subprocess.run(_found(argv), capture_output=True, text=True)
        return result.stdout if result.returncode == 0 else ""

    def run_workers(self, argvs: list[list[str]], log_dir: Path) -> Attempt:
        """All commands at once; the first's output streams here, each goes to log_dir/worker-N.log."""
        log_dir.mkdir(parents=True, exist_ok=True)
        procs = [subprocess.Popen(_found(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
                 for argv in argvs]
        stopped = threading.Event()

        def pump(index: int, proc: subprocess.Popen) -> None:
            with open(log_dir / f"worker-{index}.log", "a") as out:
                for line in proc.stdout:
                    out.write(line)
                    if index == 0:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                        if STOP_MARKER in line:
                            stopped.set()

        threads = [threading.Thread(target=pump, args=item, daemon=True) for item in enumerate(procs)]
        for thread in threads:
            thread.start()
        try:
            codes = [proc.wait() for proc in procs]
        except KeyboardInterrupt:
            for proc in procs:
                proc.terminate()
            raise
        for thread in threads:
            thread.join()
        return Attempt(codes, stopped.is_set())


class DryRunner:
    """Prints each command, shell-quoted, one per line; runs nothing and reports success."""

    def _print(self, argv: list[str]) -> None:
        print(shlex.join(argv), flush=True)

    def run(self, argv: list[str]) -> int:
        self._print(argv)
        return 0

    def capture(self, argv: list[str]) -> str | None:
        self._print(argv)
        return None

    def run_workers(self, argvs: list[list[str]], log_dir: Path) -> Attempt:
        for argv in argvs:
            self._print(argv)
        return Attempt([0] * len(argvs), False)


def must(runner, argv: list[str]) -> None:
    code = runner.run(argv)
    if code != 0:
        raise LaunchError(f"exit status {code}: {shlex.join(argv)}")


# --------------------------------------------------------------------------- relaunch policy

DONE, PREEMPTED, FAILED = "done", "preempted", "failed"


def local_outcome(attempt: Attempt) -> str:
    """A local run: preempted when it saved on SIGTERM and exited 0, or SIGTERM killed it first."""
    code = attempt.returncodes[0]
    if code == 0:
        return PREEMPTED if attempt.stopped else DONE
    return PREEMPTED if code in (143, -15) else FAILED


def tpu_outcome(attempt: Attempt, state: Callable[[], str | None], up: str = READY) -> str:
    """A slice run: preempted when the trainer saved on SIGTERM, the slice is not ``up``, or ssh lost it."""
    if all(code == 0 for code in attempt.returncodes):
        return PREEMPTED if attempt.stopped else DONE
    if state() not in (up, None) or SSH_LOST in attempt.returncodes:
        return PREEMPTED
    return FAILED


def relaunch(start: Callable[[bool], Attempt], outcome: Callable[[Attempt], str], recover: Callable[[], None],
             *, max_restarts: int, resume: bool) -> int:
    """Start; after a preemption ``recover()`` and start again resuming, at most ``max_restarts`` times."""
    restarts = 0
    while True:
        attempt = start(resume or restarts > 0)
        verdict = outcome(attempt)
        if verdict == DONE:
            return 0
        if verdict == FAILED:
            code = next(c for c in attempt.returncodes if c != 0)
            log(f"training failed (exit status {code}); not relaunching: fix the error above and rerun")
            return code if 0 < code < 256 else 1
        if restarts >= max_restarts:
            log(f"preempted again after {max_restarts} restart(s); giving up (rerun with --resume to go on)")
            return 1
        restarts += 1
        log(f"preempted; relaunching with {RESUME} ({restarts}/{max_restarts})")
        recover()


# --------------------------------------------------------------------------- the TPU slice


def slice_hosts(accelerator: str) -> int:
    """Hosts of a known accelerator type (v5p-32 -> 4); 1 for types not in GENERATIONS."""
    match = re.fullmatch(r"(v\w+?)-(\d+)", accelerator)
    if not match or match.group(1) not in GENERATIONS:
        return 1
    _, per_host, counts_cores = GENERATIONS[match.group(1)]
    chips = int(match.group(2)) // (2 if counts_cores else 1)
    return max(1, chips // per_host)


def runtime_version(accelerator: str) -> str:
    prefix = accelerator.rsplit("-", 1)[0]
    if prefix not in GENERATIONS:
        raise LaunchError(f"--accelerator-type={accelerator}: no default runtime for {prefix!r}; pass --version "
                          "(cloud.google.com/tpu/docs/runtimes)")
    return GENERATIONS[prefix][0]


def spec_files(spec: Path) -> list[Path]:
    """The spec and every file it ``extends:``, relative to the spec's folder (the remote layout)."""
    chain, path = [], spec.resolve()
    while path not in chain:
        if not path.is_file():
            raise LaunchError(f"{path}: spec file not found")
        chain.append(path)
        match = re.search(r"^extends:\s*[\"']?([^\"'#\s]+)", path.read_text(), re.M)
        if not match:
            break
        path = (path.parent / match.group(1)).resolve()
    root = spec.resolve().parent
    outside = [p for p in chain if not p.is_relative_to(root)]
    if outside:
        raise LaunchError(f"{spec}: extends {outside[0]}, outside the spec's folder; write one resolved file with "
                          f"`jaxbooth spec --config {spec} > run.yaml` and launch that")
    return [p.relative_to(root) for p in chain]


class TpuLaunch:
    """One run on one slice: make sure it is up, set its workers up, train, recover from preemption."""

    def __init__(self, args: argparse.Namespace, runner, sleep: Callable[[float], None] = time.sleep):
        self.args, self.runner, self.sleep = args, runner, sleep
        self.g = Gcloud(args.name, args.zone, args.project)
        self.version = args.version or runtime_version(args.accelerator_type)
        self.remote = args.remote_dir
        self.spec = spec_files(Path(args.spec))
        if args.fetch_output and not args.output_dir:
            raise LaunchError("--fetch-output needs --output-dir (the folder to copy back)")
        self.up = ACTIVE if args.queued else READY
        self.workers, self.worker0_ip = 1, ""

    # ---- slice state
    def _describe(self, argv: list[str]) -> dict | None:
        out = self.runner.capture(argv)
        if out is None:
            return None
        try:
            return json.loads(out) if out.strip() else {}
        except ValueError:
            raise LaunchError(f"unreadable output of {shlex.join(argv)}") from None

    def state(self) -> str | None:
        """The node's (or queued resource's) state; "" when it does not exist; None when unknown (dry run)."""
        if self.args.queued:
            found = self._describe(self.g.queued_describe())
            return None if found is None else (found.get("state") or {}).get("state", "")
        found = self._describe(self.g.describe())
        return None if found is None else found.get("state", "")

    def ensure_slice(self) -> bool:
        """Reuse a live slice, or (re)create it and wait for it; True when it is new (workers need set-up)."""
        state = self.state()
        if state == self.up:
            self._read_workers()
            return False
        if state in GONE_STATES:
            log(f"{self.args.name} is {state}: deleting it to create it again")
            must(self.runner, self.g.queued_delete() if self.args.queued else self.g.delete())
            state = ""
        if not state:  # not there (or, in a dry run, unknown)
            create = self.g.queued_create if self.args.queued else self.g.create
            must(self.runner, create(self.args.accelerator_type, self.version, self.args.spot))
        if state is not None:
            self._wait_until_up()
        self._read_workers()
        return True

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.args.max_wait_minutes * 60
        while (state := self.state()) != self.up:
            if state in GONE_STATES or time.monotonic() > deadline:
                query = self.g.queued_describe() if self.args.queued else self.g.describe()
                raise LaunchError(f"{self.args.name} is {state or 'missing'}, not {self.up}; see `{shlex.join(query)}`")
            log(f"{self.args.name} is {state or 'not there yet'}; waiting for {self.up}")
            self.sleep(self.args.poll_seconds)

    def _read_workers(self) -> None:
        node = self._describe(self.g.describe())
        endpoints = [e.get("ipAddress", "") for e in (node or {}).get("networkEndpoints", [])]
        self.workers = self.args.workers or len(endpoints) or slice_hosts(self.args.accelerator_type)
        self.worker0_ip = endpoints[0] if endpoints else "WORKER0_IP"

    # ---- worker set-up
    def setup_workers(self) -> None:
        a, r, remote = self.args, self.runner, self.remote
        folders = sorted({str(PurePosixPath(remote, "spec", p.parent)) for p in self.spec} | {f"{remote}/dist"})
        must(r, self.g.ssh(f"mkdir -p {' '.join(map(shlex.quote, folders))} && "
                           f"rm -rf {shlex.quote(remote + '/instance')} {shlex.quote(remote + '/class')}"))
        if not a.skip_install:
            package = a.package
            if Path(package).is_file():  # a wheel or sdist built here: copy it, install the copy
                must(r, self.g.scp(package, f"{remote}/dist/"))
                package = f"{remote}/dist/{Path(package).name}"
            must(r, self.g.ssh(shlex.join([a.remote_python, "-m", "pip", "install", "-U", a.jax_package, package])))
        if a.setup_command:
            must(r, self.g.ssh(a.setup_command))
        root = Path(a.spec).parent
        for rel in self.spec:
            must(r, self.g.scp(str(root / rel), f"{remote}/spec/{rel.as_posix()}"))
        for local, name in ((a.instance_dir, "instance"), (a.class_dir, "class")):
            if not local:
                continue
            if local.startswith("gs://"):  # straight from the bucket to every worker
                must(r, self.g.ssh(f"mkdir -p {shlex.quote(f'{remote}/{name}')} && " + shlex.join(
                    ["gcloud", "storage", "rsync", local, f"{remote}/{name}", "--recursive"])))
            else:
                must(r, self.g.scp(local, f"{remote}/{name}", recurse=True))

    # ---- training
    def train_argv(self, worker: int, resume: bool) -> list[str]:
        a, remote = self.args, self.remote
        argv = [a.remote_python, "-m", "jaxbooth", "train", "--config", f"{remote}/spec/{self.spec[0].as_posix()}"]
        argv += [f"--instance_data_dir={remote}/instance"] if a.instance_dir else []
        argv += [f"--class_data_dir={remote}/class"] if a.class_dir else []
        argv += [f"--output_dir={a.output_dir}"] if a.output_dir else []
        argv += list(a.train_args)
        if self.workers > 1 and a.distributed == "explicit":
            argv += [f"--coordinator_address={self.worker0_ip}:{COORDINATOR_PORT}",
                     f"--num_processes={self.workers}", f"--process_id={worker}"]
        elif self.workers > 1:
            argv += ["--multi_host"]
        return argv + ([RESUME] if resume else [])

    def start(self, resume: bool) -> Attempt:
        # the pid file lets stop_leftovers() end a trainer whose ssh session dropped
        commands = [f"echo $$ > {self.remote}/train.pid && exec {shlex.join(self.train_argv(i, resume))}"
                    for i in range(self.workers)]
        return self.runner.run_workers([self.g.ssh(c, worker=i) for i, c in enumerate(commands)],
                                       Path(self.args.log_dir))

    def stop_leftovers(self) -> None:
        """SIGTERM any trainer still running (so it saves) and wait for it: the relaunch needs the chips."""
        pid = f"{self.remote}/train.pid"
        must(self.runner, self.g.ssh(f"p=$(cat {pid} 2>/dev/null) && kill $p 2>/dev/null && "
                                     "while kill -0 $p 2>/dev/null; do sleep 1; done; true"))

    def recover(self) -> None:
        if self.ensure_slice():
            self.setup_workers()
        else:
            self.stop_leftovers()

    def run(self) -> int:
        created = self.ensure_slice()
        if created or not self.args.reuse_setup:
            self.setup_workers()
        code = relaunch(self.start, lambda attempt: tpu_outcome(attempt, self.state, self.up), self.recover,
                        max_restarts=self.args.max_restarts, resume=self.args.resume)
        if code == 0 and self.args.fetch_output:  # worker 0 wrote the pipeline (process 0 saves)
            must(self.runner, self.g.fetch(self.args.output_dir, self.args.fetch_output))
        if code == 0 and self.args.delete_when_done:
            must(self.runner, self.g.queued_delete() if self.args.queued else self.g.delete())
        return code


# --------------------------------------------------------------------------- one host


def gpu_host_argv(args: argparse.Namespace, resume: bool) -> list[str]:
    """``jaxbooth train`` with JAX over this host's GPUs (``--gpus`` picks them via CUDA_VISIBLE_DEVICES)."""
    env = ["env", f"CUDA_VISIBLE_DEVICES={args.gpus}"] if args.gpus else []
    spec = ["--config", args.spec] if args.spec else []
    return [*env, args.python, "-m", "jaxbooth", "train", *spec, "--backend=jax", *args.train_args,
            *([RESUME] if resume else [])]


def gpu_install_argv(args: argparse.Namespace) -> list[str]:
    return [args.python, "-m", "pip", "install", "-U", args.jax_package, args.package]


def accelerate_argv(args: argparse.Namespace, resume: bool) -> list[str]:
    """The torch backend, one process per GPU (jaxbooth/torch_backend/train.py's launch recipe)."""
    launch = ["accelerate", "launch"]
    launch += ["--multi_gpu"] if args.num_processes > 1 else []
    launch += [f"--num_processes={args.num_processes}"]
    launch += [f"--config_file={args.accelerate_config}"] if args.accelerate_config else []
    spec = ["--config", args.spec] if args.spec else []
    return [*launch, "-m", "jaxbooth", "train", *spec, "--backend=torch", *args.train_args,
            *([RESUME] if resume else [])]


def run_local(args: argparse.Namespace, runner, build: Callable[[argparse.Namespace, bool], list[str]]) -> int:
    if getattr(args, "install", False):
        must(runner, gpu_install_argv(args))
    return relaunch(lambda resume: runner.run_workers([build(args, resume)], Path(args.log_dir)), local_outcome,
                    lambda: None, max_restarts=args.max_restarts, resume=args.resume)


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="launch_tpu.py", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="Arguments after -- go to `jaxbooth train` as they are.")
    subs = top.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--dry-run", action="store_true", help="print the commands, one per line; run nothing")
        sub.add_argument("--max-restarts", type=int, default=3, help="relaunches after preemption (default 3)")
        sub.add_argument("--resume", action="store_true", help=f"pass {RESUME} from the first launch on")
        sub.add_argument("--log-dir", default="launch-logs", help="where each worker's output is saved")
        sub.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `jaxbooth train` flags")

    tpu = subs.add_parser("tpu", help="a TPU VM slice (or queued resource), all workers")
    tpu.add_argument("--spec", required=True, help="run spec YAML (e.g. tpu_configs/v5p-8.yaml)")
    tpu.add_argument("--name", required=True, help="TPU VM name (and queued-resource id with --queued)")
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project")
    tpu.add_argument("--accelerator-type", required=True, help="e.g. v5p-8, v4-32, v5litepod-16, v6e-8")
    tpu.add_argument("--version", help="TPU runtime; default: the one the Cloud TPU docs name for the generation")
    tpu.add_argument("--queued", action="store_true", help="request the slice as a queued resource")
    tpu.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, preemptible)")
    tpu.add_argument("--workers", type=int, help="worker count; default: read from the slice")
    tpu.add_argument("--distributed", choices=("explicit", "auto"), default="explicit",
                     help="explicit: pass --coordinator_address/--num_processes/--process_id per worker; "
                          "auto: pass --multi_host, jax.distributed discovers the slice")
    tpu.add_argument("--package", default="jaxbooth",
                     help="pip requirement for jaxbooth, or a wheel/sdist file here (copied to the workers)")
    tpu.add_argument("--jax-package", default="jax[tpu]", help="JAX with the TPU runtime (default jax[tpu])")
    tpu.add_argument("--skip-install", action="store_true", help="workers already have jaxbooth")
    tpu.add_argument("--reuse-setup", action="store_true",
                     help="on a slice that already exists, skip installing and copying (it was set up before)")
    tpu.add_argument("--setup-command", help="shell command run on every worker after the install "
                                             "(e.g. mount the shared folder for --output-dir)")
    tpu.add_argument("--instance-dir", help="local folder or gs:// prefix of the instance images")
    tpu.add_argument("--class-dir", help="local folder or gs:// prefix of the class images")
    tpu.add_argument("--remote-dir", default="jaxbooth-run", help="folder on each worker, under its home")
    tpu.add_argument("--remote-python", default="python3", help="the workers' Python (e.g. a venv's)")
    tpu.add_argument("--poll-seconds", type=float, default=30.0)
    tpu.add_argument("--max-wait-minutes", type=float, default=720.0, help="for the slice to come up")
    tpu.add_argument("--output-dir", help="output_dir on the workers (multi-host: a folder all of them share)")
    tpu.add_argument("--fetch-output", metavar="LOCAL", help="after a finished run, copy --output-dir here from "
                                                              "worker 0")
    tpu.add_argument("--delete-when-done", action="store_true",
                     help="delete the slice (and its disks) after a finished run, after --fetch-output")
    common(tpu)

    gpu = subs.add_parser("gpu-host", help="this machine's GPUs with JAX, one process")
    gpu.add_argument("--spec", help="run spec YAML (e.g. tpu_configs/gpu-80gb.yaml)")
    gpu.add_argument("--gpus", help="CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all)")
    gpu.add_argument("--python", default=sys.executable, help="the Python that has jaxbooth")
    gpu.add_argument("--install", action="store_true", help="pip install JAX for CUDA and jaxbooth first")
    gpu.add_argument("--package", default="jaxbooth")
    gpu.add_argument("--jax-package", default="jax[cuda12]", help="JAX with CUDA (default jax[cuda12])")
    common(gpu)

    acc = subs.add_parser("accelerate", help="the torch backend under accelerate launch")
    acc.add_argument("--spec", help="run spec YAML for the torch backend")
    acc.add_argument("--num-processes", type=int, default=1, help="one per GPU")
    acc.add_argument("--accelerate-config", help="accelerate config file (e.g. scripts/"
                                                 "accelerate_deepspeed_zero2_offload.yaml)")
    common(acc)
    return top


def main(argv: Sequence[str] | None = None, runner=None, sleep: Callable[[float], None] = time.sleep) -> int:
    args = parser().parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    runner = runner or (DryRunner() if args.dry_run else Runner())
    try:
        if args.command == "tpu":
            return TpuLaunch(args, runner, sleep).run()
        return run_local(args, runner, gpu_host_argv if args.command == "gpu-host" else accelerate_argv)
    except LaunchError as error:
        log(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; the workers' trainers were sent SIGTERM by their ssh sessions closing")
        return 130


if __name__ == "__main__":
    sys.exit(main())
