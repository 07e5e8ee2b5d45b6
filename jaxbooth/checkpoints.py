"""Checkpoint folders as both backends lay them out: naming, the marker, completeness, resume, retention.

``OUTPUT_DIR/checkpoint-N/`` is complete once its marker ``jaxbooth_checkpoint.json`` exists;
it is written last, so a checkpoint killed mid-write is never resumed from. The marker
(``checkpoint_record``) holds the optimizer step, the run's seed, the data position and the
resolved spec, never the Hub token. Framework-free (never jax or torch).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxbooth import log as jaxbooth_log
from jaxbooth.errors import JaxboothError

PREFIX = "checkpoint-"
MARKER = "jaxbooth_checkpoint.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_record(step: int, data_state: Mapping[str, Any], spec: Any, seed: int) -> dict[str, Any]:
    """The marker's content: ``{"step", "seed", "data", "spec"}``.

    ``step`` counts optimizer steps; ``seed`` is the run's, so a relaunch without ``--seed``
    resumes with it (``run_defaults.choose_seed``); ``data`` is the batch iterator's
    ``state_dict()``; ``spec`` the resolved spec with the Hub token left out (as
    ``write_resolved_spec``): checkpoints get copied and shared.
    """
    from jaxbooth import spec as spec_lib

    return {"step": int(step), "seed": int(seed), "data": dict(data_state),
            "spec": spec_lib.shareable_spec_dict(spec)}


def write_marker(checkpoint_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write ``checkpoint_dir/jaxbooth_checkpoint.json`` atomically, last: it makes the checkpoint complete.

    A ``hub_token`` in the record's spec is dropped here too, whoever built the record.
    """
    from jaxbooth import spec as spec_lib
    from jaxbooth.output import atomic_write_text

    record = dict(record)
    if isinstance(record.get("spec"), Mapping):
        record["spec"] = spec_lib.without_hub_token(record["spec"])
    path = Path(checkpoint_dir) / MARKER
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def read_marker(checkpoint_dir: Path) -> dict[str, Any]:
    """The record of a complete checkpoint; a missing or damaged marker is an error naming the file."""
    path = Path(checkpoint_dir) / MARKER
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise JaxboothError(f"{path}: cannot read the checkpoint marker ({error}); resume from another checkpoint "
                            "or start a new output_dir") from None
    if not isinstance(record, dict) or not {"step", "data"} <= record.keys():
        raise JaxboothError(f"{path}: not a jaxbooth checkpoint marker (needs step and data); resume from another "
                            "checkpoint or start a new output_dir")
    return record


def list_checkpoints(output_dir: Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (not complete_only or (path / MARKER).is_file()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_path(output_dir: Path, resume_from: str | None) -> Path | None:
    """``latest`` -> newest complete checkpoint; a name or path -> that one (it must be complete).

    As in diffusers, ``latest`` with no checkpoint yet starts a fresh run (and says so).
    """
    path = find_resume_checkpoint(output_dir, resume_from)
    if path is None and resume_from == "latest":
        jaxbooth_log.info(f"--resume_from_checkpoint=latest: no complete checkpoint in {output_dir}; "
                          "starting a new run")
    return path


def find_resume_checkpoint(output_dir: Path, resume_from: str | None) -> Path | None:
    """``resolve_resume_path`` without the log line, for looking ahead before the run starts."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume_from)
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume_from
    if not (path / MARKER).is_file():
        complete = [p.name for _, p in list_checkpoints(output_dir)]
        raise JaxboothError(f"--resume_from_checkpoint={resume_from}: {path} is not a complete jaxbooth checkpoint "
                            f"(no {MARKER}); complete ones in {output_dir}: {complete or 'none'}; "
                            "use one of them or 'latest'")
    return path


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep`` (checkpoints_total_limit)."""
    if not keep:
        return []
    complete = list_checkpoints(output_dir)
    removed = [path for _, path in complete[: max(0, len(complete) - keep)]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def clear_incomplete(output_dir: Path) -> list[Path]:
    """Remove checkpoint folders without the marker (a run killed while saving)."""
    removed = []
    for _, path in list_checkpoints(output_dir, complete_only=False):
        if not (path / MARKER).is_file():
            jaxbooth_log.info(f"removing {path}: an interrupted checkpoint (no {MARKER})")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class TrainingStopped(Exception):
    """A signal stopped training after saving the checkpoint of optimizer step ``step``.

    Raised by both backends' loops instead of ``SystemExit``: ``jaxbooth train`` exits 0 on it (a
    preemption is no failure; the scheduler relaunches with ``--resume_from_checkpoint=latest``), and
    ``jaxbooth.train`` turns it into a ``JaxboothError`` naming the resume, so Python callers never see an exit.
    """

    def __init__(self, step: int):
        super().__init__(f"stopped by signal after step {step}; resume with --resume_from_checkpoint=latest")
        self.step = step


class StopOnSignal:
    """SIGTERM (TPU preemption, ``kill``) asks a training loop to checkpoint after this step and exit 0."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.requested = True
        jaxbooth_log.info(f"received signal {signum}: saving a checkpoint after this step")

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
