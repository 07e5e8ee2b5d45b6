"""`jaxbooth doctor [TRAIN FLAGS...]`: what this machine and a run spec will meet, before a long run starts.

Prints the installed frameworks, the devices JAX (and torch) see with their memory, the processes
and the mesh the spec asks for, where the compilation cache is and how big, what ``backend: auto``
would choose and why; then the checks that commonly fail an hour in (no Hub token for
``--push_to_hub``, an output folder that cannot be written, too little disk for the checkpoints).
The flags are ``jaxbooth train``'s: the same spec is checked. Exit status 1 when a check fails.

A multi-host process joins its run first (``jaxbooth.distributed``), as ``jaxbooth train`` does, so
``doctor`` on every worker of a pod slice shows the whole slice.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from jaxbooth import distributed
from jaxbooth import spec as spec_lib
from jaxbooth.errors import JaxboothError

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "diffusers", "transformers",
            "accelerate", "peft", "bitsandbytes", "xformers", "deepspeed", "huggingface_hub")
GB = 1 << 30


def size_text(nbytes: float) -> str:
    for unit, scale in (("GB", GB), ("MB", 1 << 20)):
        if nbytes >= scale / 10:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1024:.0f} KB"


@dataclass
class Report:
    """Lines to print, and the failed checks (each with its fix)."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, label: str, value: Any) -> None:
        self.lines.append(f"{label:<22} {value}")

    def fail(self, message: str) -> None:
        self.problems.append(message)


def package_versions(version: Callable[[str], str] = metadata.version) -> dict[str, str | None]:
    """Installed versions, read from the distributions' metadata (nothing is imported)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def jax_devices(spec: spec_lib.RunSpec, report: Report) -> None:
    """JAX's view, after joining a multi-host run as ``jaxbooth train`` would."""
    try:
        from jaxbooth.jax_backend import mesh
    except ImportError:
        report.add("jax devices", "jax is not installed")
        return
    import jax

    mode = distributed.multi_host_mode(spec)
    report.add("multi-host", "no (one process)" if mode is None else f"yes, {mode[0]}: {mode[1]}")
    mesh.initialize_distributed(spec)
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    report.add("jax devices", f"{len(devices)} x {', '.join(kinds)} ({devices[0].platform}), "
                              f"{jax.local_device_count()} on this process")
    report.add("processes", f"{jax.process_count()} (this is {jax.process_index()})")
    memory = device_memory(jax.local_devices()[0])
    report.add("memory per device", "unknown" if memory is None else size_text(memory))


def device_memory(device: Any) -> int | None:
    """Bytes a JAX device can hold (``memory_stats``; None where the platform does not say, e.g. CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some plugins raise instead of returning None
        return None
    return stats.get("bytes_limit")


def torch_devices(report: Report, versions: dict[str, str | None]) -> None:
    if versions.get("torch") is None:
        report.add("torch devices", "torch is not installed (the torch extra: pip install 'jaxbooth[torch]')")
        return
    import torch

    if not torch.cuda.is_available():
        report.add("torch devices", "cpu only (no CUDA device)")
        return
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    report.add("torch devices", ", ".join(f"{p.name} {p.total_memory / GB:.0f} GB" for p in props))


def mesh_line(spec: spec_lib.RunSpec, device_count: int, report: Report) -> str:
    try:
        data, fsdp = spec_lib.mesh_shape(spec, device_count)
    except JaxboothError as error:
        report.fail(f"the mesh: {error}")
        return "cannot be built here (see below)"
    batch = spec_lib.effective_batch_size(spec, data * fsdp)
    return f"data {data} x fsdp {fsdp} over {device_count} device(s); global batch {batch} per optimizer step"


def cache_dir(spec: spec_lib.RunSpec) -> Path:
    """Where the JAX backend keeps compiled steps (``train.configure_jax``'s rule)."""
    from jaxbooth.tiny import default_cache_dir

    return Path(spec.precision.compilation_cache_dir or default_cache_dir() / "xla")


def folder_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``; (0, 0) when it does not exist."""
    total = count = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
                count += 1
            except OSError:
                continue
    return total, count


def hub_token_problem(spec: spec_lib.RunSpec, get_token: Callable[[], str | None] | None = None) -> str | None:
    """--push_to_hub without any token (flag, HF_TOKEN or a saved login) fails only after training."""
    if not spec.hub.push_to_hub or spec.hub.hub_token:
        return None
    if get_token is None:
        from huggingface_hub import get_token
    if get_token():
        return None
    return ("--push_to_hub: no Hub token found (no --hub_token, HF_TOKEN or saved login); the upload would fail after "
            "training. Run `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN")


def writable_problem(output_dir: Path) -> str | None:
    """The output folder (or the nearest existing folder above it) must take a file."""
    folder = output_dir.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".jaxbooth-doctor-"):
            pass
    except OSError as error:
        return f"--output_dir={output_dir}: cannot write in {folder} ({error.strerror}); choose a writable folder"
    return None


def checkpoint_bytes(spec: spec_lib.RunSpec, model_dir: Path | None) -> int | None:
    """A rough disk need for the kept checkpoints: the pipeline's trained weights, x3 with Adam's two moments
    (the state), per kept checkpoint. None when the model is not on disk to measure."""
    if model_dir is None or not model_dir.is_dir():
        return None
    trained = ["unet"] + (["text_encoder", "text_encoder_2"] if spec.model.train_text_encoder else [])
    weights = sum(folder_size(model_dir / name)[0] for name in trained)
    if spec.lora.use_lora:
        weights = weights // 50  # adapters and their moments: a small fraction of the base
    every = spec.checkpointing.checkpointing_steps or 0
    steps = spec.optim.max_train_steps or 0
    count = (steps // every if every else 0) or 1
    kept = min(count, spec.checkpointing.checkpoints_total_limit or count)
    return 3 * weights * kept


def disk_problem(spec: spec_lib.RunSpec, need: int | None, free_bytes: Callable[[Path], int] | None = None
                 ) -> str | None:
    if need is None:
        return None
    folder = Path(spec.checkpointing.output_dir).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = (free_bytes or (lambda p: shutil.disk_usage(p).free))(folder)
    if free >= need:
        return None
    return (f"--output_dir={spec.checkpointing.output_dir}: about {size_text(need)} of checkpoints to keep, "
            f"{size_text(free)} free; set --checkpoints_total_limit, raise --checkpointing_steps or free disk")


def local_model_dir(spec: spec_lib.RunSpec) -> Path | None:
    name = spec.model.pretrained_model_name_or_path
    if name is None:
        from jaxbooth.tiny import builtin_tiny_model

        return builtin_tiny_model()
    path = Path(name)
    return path if path.is_dir() else None


def diagnose(argv: Sequence[str]) -> Report:
    """The report for a ``jaxbooth train`` command line (no flags: the defaults, the built-in tiny model)."""
    from jaxbooth import api
    from jaxbooth.spec import choose_backend, load_spec_with_keys

    spec, _ = load_spec_with_keys(list(argv), prog="jaxbooth doctor")
    report = Report()
    import jaxbooth

    versions = package_versions()
    report.add("jaxbooth", jaxbooth.__version__)
    report.add("packages", ", ".join(f"{n} {v}" for n, v in versions.items() if v is not None))
    missing = [n for n, v in versions.items() if v is None]
    if missing:
        report.add("not installed", ", ".join(missing))
    if spec.backend != "torch":
        jax_devices(spec, report)
    torch_devices(report, versions)
    device = api.probe_device()  # what `jaxbooth train`'s backend: auto decides with
    report.add("mesh (jax)", mesh_line(spec, device.count, report))
    cache = cache_dir(spec)
    size, files = folder_size(cache)
    report.add("compilation cache", f"{cache} ({size_text(size)} in {files} files)")
    family, source = api.detected_model_family(spec)
    try:
        backend, reason = choose_backend(spec, device, model_family=family, family_source=source)
        report.add("backend", reason)
    except JaxboothError as error:
        report.fail(str(error))
    for problem in (hub_token_problem(spec), writable_problem(Path(spec.checkpointing.output_dir)),
                    disk_problem(spec, checkpoint_bytes(spec, local_model_dir(spec)))):
        if problem is not None:
            report.fail(problem)
    return report


def cmd_doctor(argv: Sequence[str]) -> int:
    if any(flag in ("-h", "--help") for flag in argv):
        print("usage: jaxbooth doctor [TRAIN FLAGS...]\n\n" + (__doc__ or "").split("\n\n", 1)[1], end="")
        return 0
    report = diagnose(argv)
    print("\n".join(report.lines))
    if not report.problems:
        print("checks                 ok (Hub token, output folder, disk for checkpoints)")
        return 0
    for problem in report.problems:
        print(f"problem: {problem}")
    return 1
