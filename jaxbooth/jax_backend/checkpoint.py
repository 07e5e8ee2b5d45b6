"""Checkpoints in the layout diffusers users know, written asynchronously with orbax.

``OUTPUT_DIR/checkpoint-N/`` holds ``state/`` (orbax: params, optimizer state, step, RNG),
``unet/`` (and ``text_encoder/``, SDXL's ``text_encoder_2/`` too, when trained) in diffusers' PyTorch layout, so
``UNet2DConditionModel.from_pretrained(OUTPUT_DIR, subfolder="checkpoint-N/unet")`` works
while training goes on (with LoRA: ``pytorch_lora_weights.safetensors`` instead, for
``pipe.load_lora_weights(".../checkpoint-N")``; the state then holds the adapters only, the
base comes from the base model again on resume), and ``jaxbooth_checkpoint.json`` (step, seed,
data position, resolved spec without the Hub token).
That json is written last: a checkpoint without it (killed mid-write) is never resumed
from, and is cleared away by the next run.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxbooth import log
from jaxbooth import spec as spec_lib
from jaxbooth.checkpoints import (
    MARKER,
    PREFIX,
    StopOnSignal,
    TrainingStopped,  # noqa: F401 (re-exported: the loop raises checkpoint.TrainingStopped)
    checkpoint_record,
    clear_incomplete,
    list_checkpoints,
    prune_checkpoints,
    read_marker,
    resolve_resume_path,
    write_marker,
)
from jaxbooth.errors import JaxboothError

__all__ = ["MARKER", "CheckpointWriter", "StopOnSignal", "list_checkpoints", "maybe_resume", "resolve_resume_path",
           "restore"]


def _log(message: str) -> None:
    if jax.process_index() == 0:
        log.info(message)


def restore(path: Path, state: Any, shardings: Any) -> tuple[Any, dict]:
    """Restore the train state into the shardings of ``state``; returns (state, marker record)."""
    target = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    try:
        restored = ocp.StandardCheckpointer().restore(path.absolute() / "state", target)
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise JaxboothError(f"{path}: the saved train state does not fit this run ({error}); resume with the "
                            "same model and options, or start a new output_dir") from None
    return restored, read_marker(path)


def maybe_resume(spec: spec_lib.RunSpec, output_dir: Path, state: Any, shardings: Any,
                 iterator) -> tuple[Any, Path | None]:
    path = resolve_resume_path(output_dir, spec.checkpointing.resume_from_checkpoint)
    if path is None:
        return state, None
    state, record = restore(path, state, shardings)
    iterator.load_state_dict(record["data"])
    return state, path


class CheckpointWriter:
    """Saves in the background: the loop only waits for the device-to-host copy.

    One save is in flight at a time. ``keep`` (checkpoints_total_limit) prunes the oldest
    complete checkpoints once a new one is complete, across resumes too.
    """

    def __init__(self, output_dir: Path, keep: int | None):
        self.output_dir, self.keep = output_dir, keep
        self._checkpointer = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if jax.process_index() == 0:
            clear_incomplete(output_dir)

    def save(self, step: int, state: Any, data_state: dict, spec: spec_lib.RunSpec, *, seed: int,
             export: Callable[[Path, Any], None], gather: Callable[[Any], Any]) -> None:
        self.wait()
        path = self.output_dir / f"{PREFIX}{step}"
        if jax.process_index() == 0 and path.exists():
            shutil.rmtree(path)
        self._checkpointer.save(path.absolute() / "state", args=ocp.args.StandardSave(state))
        params_host = gather(state)
        record = checkpoint_record(step, data_state, spec, seed)
        self._thread = threading.Thread(target=self._finish, args=(path, params_host, record, export), daemon=True)
        self._thread.start()

    def _finish(self, path: Path, params_host: Any, record: dict, export: Callable) -> None:
        try:
            self._checkpointer.wait_until_finished()
            if jax.process_index() != 0:
                return
            export(path, params_host)
            write_marker(path, record)
            prune_checkpoints(self.output_dir, self.keep)
            _log(f"saved {path}")
        except BaseException as error:  # surfaced on the main thread by wait()
            self._error = error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise JaxboothError(f"saving a checkpoint failed: {error}") from error


class PreemptionWatch:
    """Whether to checkpoint and stop after an optimizer step, agreed by every process.

    One process: a SIGTERM handler (``StopOnSignal``). Several: the signal may reach one host
    only, and a host that stopped alone would leave the others waiting in the next collective
    (or the checkpoint save) forever. JAX's preemption sync manager, started by
    ``jax.distributed.initialize``, catches SIGTERM on any host, and
    ``multihost_utils.reached_preemption_sync_point(step)`` turns true on every host at the same
    step; no Python handler is installed then, as it would replace the one that notifies the peers.
    Call ``requested(step)`` after every optimizer step, on every process, from the same start.
    """

    def __init__(self) -> None:
        self.multi_process = jax.process_count() > 1
        self._signal = None if self.multi_process else StopOnSignal()

    def __enter__(self) -> PreemptionWatch:
        if self._signal is not None:
            self._signal.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._signal is not None:
            self._signal.__exit__(*exc)

    def requested(self, step: int) -> bool:
        if self._signal is not None:
            return self._signal.requested
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            _log(f"a host received SIGTERM: every process saves a checkpoint after step {step}")
            return True
        return False

