"""``jaxbooth.train(...)``: DreamBooth from Python (a notebook, a script), the path ``jaxbooth train`` runs too.

Three ways in, one run: a ``RunSpec``; a YAML run spec (what ``--config`` reads); or keyword
arguments named as the command line's flags (``max_train_steps=400``), alone or over a YAML file,
with ``script=`` selecting a diffusers script's defaults as ``jaxbooth train SCRIPT.py`` does. After
the spec is typed and validated, ``run`` resolves the backend, checks optional packages, fills the
open keys and hands over to the backend: ``cli.cmd_train`` calls the same ``run``, so the command
line and Python never drift apart. Every user error is a ``JaxboothError`` with the command line's
message; nothing here raises ``SystemExit``. Frameworks are imported only when a run starts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxbooth import log
from jaxbooth.checkpoints import TrainingStopped
from jaxbooth.errors import JaxboothError

if TYPE_CHECKING:
    from jaxbooth.spec import DeviceInfo, RunSpec

__all__ = ["TrainResult", "last_metrics_record", "probe_device", "resolve_backend", "resolve_spec", "run", "train"]

# Keys a command line has that are no spec key: what to do instead, from Python.
_NOT_KEYS = {
    "help": "jaxbooth.train has no help option: help(jaxbooth.train) describes the call, "
            "`jaxbooth train --help` lists every key",
    "h": "jaxbooth.train has no -h option: help(jaxbooth.train) describes the call, "
         "`jaxbooth train --help` lists every key",
    "preset": "pass the diffusers script as script=..., e.g. jaxbooth.train(script='train_dreambooth_lora.py', ...)",
}


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left: its output folder (a diffusers pipeline, or a LoRA folder), the backend that
    ran it, the optimizer steps the trained weights have had (a resumed run counts those before the resume),
    and the last metrics logged (``metrics.jsonl``'s last record without ``step`` and ``time``: ``train/loss``,
    ``train/lr``, ``perf/steps_per_sec``...; empty when no step was ever logged in ``output_dir``). Process 0
    writes ``metrics.jsonl``: on a multi-host run the other processes see it only on a shared file system."""

    output_dir: Path
    backend: str
    steps: int
    metrics: dict[str, float]


def train(config: RunSpec | str | os.PathLike | None = None, *, script: str | None = None,
          **keys: Any) -> TrainResult:
    """Fine-tune as ``jaxbooth train`` does; returns a ``TrainResult`` once the output is written.

    ``config``: a ``RunSpec`` (``jaxbooth.load_spec([...])``) or a YAML run spec path. ``keys``: spec keys by
    their command-line names, as Python values (``True``, ``400``, ``1e-4``, a list for list keys, ``Path``
    for paths); over a YAML file they win, as flags win over ``--config``. ``script``: a diffusers
    DreamBooth script (``"train_dreambooth_lora.py"``) whose defaults and mode apply. Raises
    ``JaxboothError`` for any mistake in the input, before a model loads where possible.
    """
    if not log.get_logger().handlers and not logging.getLogger().handlers:
        log.setup_logging()  # a notebook shows the CLI's [jaxbooth] lines; a configured logging setup is kept
    spec, given = resolve_spec(config, script=script, **keys)
    try:
        return run(spec, given)
    except TrainingStopped as stop:  # a preemption: the command line exits 0, Python gets an error naming the resume
        raise JaxboothError(f"training stopped by a signal after step {stop.step} (its checkpoint is saved); "
                            "continue it with resume_from_checkpoint='latest'") from None


def resolve_spec(config: RunSpec | str | os.PathLike | None = None, *, script: str | None = None,
                 **keys: Any) -> tuple[RunSpec, set[str]]:
    """The validated spec of a ``train`` call and the keys it sets itself (as ``given_keys``: the script's
    defaults, the YAML file's keys and ``keys``; for a ``RunSpec``, the keys that differ from the defaults)."""
    from jaxbooth.spec import RunSpec, default_flat
    from jaxbooth.spec.loading import command_line_items, spec_from_items
    from jaxbooth.spec.presets import SCRIPT_PRESETS, preset_items, script_name

    if script is not None:
        script = script_name(script)
    if isinstance(config, RunSpec):
        if script is not None:
            raise JaxboothError(f"script={script!r} with a RunSpec: the spec is already resolved; load it with the "
                                f"script's defaults instead, jaxbooth.load_spec(['{script}', ...])")
        defaults = default_flat()
        items = [(name, value, f"--{name}") for name, value in config.flat().items() if value != defaults[name]]
        if not keys:
            return config, {name for name, _, _ in items}
    elif config is None:
        items = preset_items(script)
    elif isinstance(config, (str, os.PathLike)):
        if Path(config).name in SCRIPT_PRESETS or f"{Path(config).name}.py" in SCRIPT_PRESETS:
            raise JaxboothError(f"{os.fspath(config)}: a diffusers script, not a run spec; pass it as "
                                f"jaxbooth.train(script={os.fspath(config)!r}, ...)")
        items = command_line_items([f"--config={os.fspath(config)}"], preset=script)
    else:
        raise JaxboothError(f"jaxbooth.train: config={config!r} is neither a RunSpec nor a YAML file path; pass one "
                            "of them, or only keyword arguments")
    items += [_keyword_item(name, value) for name, value in keys.items()]
    return spec_from_items(items)


def _keyword_item(name: str, value: Any) -> tuple[str, Any, str]:
    """A keyword argument typed as its spec key, with the message the same flag gets on the command line."""
    from jaxbooth.spec import FIELDS
    from jaxbooth.spec.coercion import coerce, suggest_key

    key = name.replace("-", "_")
    if key in _NOT_KEYS:
        raise JaxboothError(f"{name}: {_NOT_KEYS[key]}")
    info = FIELDS.get(key)
    if info is None:
        raise JaxboothError(f"--{name}: unknown option{suggest_key(key, list(FIELDS))}")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    elif isinstance(value, (list, tuple)):
        value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
    return key, coerce(info, value, f"--{key}"), f"--{key}"


def run(spec: RunSpec, given: Set[str] = frozenset()) -> TrainResult:
    """Train a loaded spec: backend, packages, open keys, then the backend's ``train``. ``given`` are the keys
    the user set (``spec.given_keys``), so ``fill_defaults`` never mistakes a default for a choice."""
    from jaxbooth import single_file
    from jaxbooth.preflight import check_packages
    from jaxbooth.run_defaults import fill_defaults
    from jaxbooth.sample_prompts import spec_sample_prompts

    backend = resolve_backend(spec)
    check_packages(spec, backend)  # before any model loads: every missing package at once
    single_file.check_spec(spec)  # a DeepFloyd IF run has no single-file form: say so before training
    spec_sample_prompts(spec)  # a bad --sample_prompts file too, naming its line
    spec = fill_defaults(spec, given)
    out = Path(spec.checkpointing.output_dir).absolute()
    metrics_file = _metrics_path(out)
    start = metrics_file.stat().st_size if metrics_file.is_file() else 0
    resumed = _resumed_step(out, spec.checkpointing.resume_from_checkpoint)
    backend_train(backend)(spec)
    record = last_metrics_record(out, start=start)
    if record is None:  # nothing logged now: resumed at (or past) the last step, or a stand-in trainer
        steps = resumed
        earlier = last_metrics_record(out)
        record = earlier if earlier is not None and int(earlier.get("step", -1)) == resumed else None
    else:
        steps = int(record["step"])
    metrics = {} if record is None else {k: float(v) for k, v in record.items() if k not in ("step", "time")}
    return TrainResult(output_dir=out, backend=backend, steps=steps, metrics=metrics)


def backend_train(backend: str) -> Callable[[RunSpec], Any]:
    """The ``train(spec)`` of a backend, imported now (so jax never loads for a torch run, and vice versa)."""
    if backend == "jax":
        from jaxbooth.jax_backend.train import train as jax_train

        return jax_train
    try:
        from jaxbooth.torch_backend.train import train as torch_train
    except ImportError as error:
        raise JaxboothError(f"backend torch is not available here ({error}); install the torch extra: "
                            "pip install 'jaxbooth[torch]'") from None
    return torch_train


def probe_device() -> DeviceInfo:
    """What the default JAX device is, for ``backend: auto`` (torch's view if jax is absent)."""
    from jaxbooth.spec import DeviceInfo

    try:
        import jax

        devices = jax.devices()
        memory = None
        if devices[0].platform == "gpu":
            stats = devices[0].memory_stats() or {}
            memory = stats.get("bytes_limit")
        return DeviceInfo(platform=devices[0].platform, memory_bytes=memory, count=len(devices))
    except ImportError:
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory
            return DeviceInfo(platform="gpu", memory_bytes=memory, count=torch.cuda.device_count())
        return DeviceInfo(platform="cpu", memory_bytes=None, count=1)


def resolve_backend(spec: RunSpec) -> str:
    """The backend to run: an explicit one as given (``load_spec`` has checked it against the
    capability table; the backend's load refuses a pipeline it does not train), ``auto`` decided
    from the options, the model's family (its ``model_index.json``, unless ``--model_family`` is
    set) and the device."""
    from jaxbooth.spec import choose_backend

    if spec.backend != "auto":
        return spec.backend
    family, source = detected_model_family(spec)
    join_multi_host_run(spec)  # JAX forbids asking for devices before jax.distributed.initialize
    backend, reason = choose_backend(spec, probe_device(), model_family=family, family_source=source)
    log.info(reason)
    return backend


def detected_model_family(spec: RunSpec) -> tuple[str | None, str | None]:
    """(family, where it was read) from the model's ``model_index.json`` with ``model_family: auto``; else
    (None, None): the spec's own ``model_family`` decides."""
    from jaxbooth import pipelines

    if spec.model.model_family != "auto":
        return None, None
    detected = pipelines.detected_family(spec)
    if detected is None:
        return None, None
    family, index_dir = detected
    return family, pipelines.family_source(index_dir)


def join_multi_host_run(spec: RunSpec) -> None:
    """Before ``backend: auto`` probes JAX's devices on one host of several, join the run (as the JAX
    backend would at start-up). Without jax installed there is nothing to join: torch's launcher does it."""
    from jaxbooth import distributed

    if distributed.multi_host_mode(spec) is None:
        return
    try:
        from jaxbooth.jax_backend import mesh
    except ImportError:
        return
    mesh.initialize_distributed(spec)


def last_metrics_record(output_dir: str | os.PathLike, *, start: int = 0) -> dict[str, Any] | None:
    """The last complete record of ``output_dir/metrics.jsonl`` (both backends write it through
    ``output.MetricsLog``), reading from byte ``start`` on; None when there is none there."""
    path = _metrics_path(Path(output_dir))
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:  # a half-written last line of a killed run
            continue
        if isinstance(record, dict) and "step" in record:
            return record
    return None


def _metrics_path(output_dir: Path) -> Path:
    from jaxbooth.output import METRICS_FILENAME

    return output_dir / METRICS_FILENAME


def _resumed_step(output_dir: Path, resume_from: str | None) -> int:
    """The optimizer step of the checkpoint the run will resume from; 0 for a fresh run."""
    from jaxbooth.checkpoints import find_resume_checkpoint, read_marker

    checkpoint = find_resume_checkpoint(output_dir, resume_from)
    return 0 if checkpoint is None else int(read_marker(checkpoint)["step"])
