"""Optional packages a run needs, found missing before any model loads.

A tracker, an optimizer or a data source that needs a package the user has not installed
would otherwise fail minutes in (after class images, model loading, VAE encoding) or, worse,
fall back silently. ``check_packages`` names every missing package at once with its pip
command. It asks ``importlib.util.find_spec`` only: nothing is imported (wandb and xformers
take seconds to import, and importing runs their side effects).

Standard library only, like ``jaxbooth.spec``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxbooth.errors import JaxboothError

if TYPE_CHECKING:
    from jaxbooth.spec import RunSpec

# accelerate's trackers other than tensorboard and wandb (torch only): each report_to value is
# also the module and the pip name of its package.
ACCELERATE_TRACKERS = ("aim", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "trackio")


@dataclass(frozen=True)
class Requirement:
    """``why`` (an option as the user wrote it) needs one of ``modules``; ``fix`` avoids it."""

    why: str
    modules: tuple[str, ...]  # importable names; any one of them will do
    pip: str
    fix: str


def required_packages(spec: RunSpec, backend: str) -> list[Requirement]:
    """The optional packages this spec needs on ``backend`` ('jax' or 'torch'), installed or not."""
    needs = []
    report_to = spec.logging.report_to
    if report_to in ("wandb", "all"):
        needs.append(Requirement(f"--report_to={report_to}", ("wandb",), "wandb", "--report_to=tensorboard"))
    if spec.data.dataset_name is not None:
        needs.append(Requirement(f"--dataset_name={spec.data.dataset_name}", ("datasets",), "datasets",
                                 "download the images and pass --instance_data_dir"))
    if backend != "torch":
        return needs  # the JAX backend writes TensorBoard files itself and has the rest in optax
    if report_to in ("tensorboard", "all"):  # accelerate takes either writer
        needs.append(Requirement(f"--report_to={report_to}", ("tensorboard", "tensorboardX"), "tensorboard",
                                 "--report_to=none"))
    if report_to in ACCELERATE_TRACKERS:
        needs.append(Requirement(f"--report_to={report_to}", (report_to,), report_to, "--report_to=tensorboard"))
    if spec.lora.use_lora:
        needs.append(Requirement("--use_lora", ("peft",), "peft", "--backend=jax (its LoRA needs no peft)"))
    if spec.optim.use_8bit_adam:
        needs.append(Requirement("--use_8bit_adam", ("bitsandbytes",), "bitsandbytes", "drop --use_8bit_adam"))
    if spec.optim.optimizer == "prodigy":
        needs.append(Requirement("--optimizer=prodigy", ("prodigyopt",), "prodigyopt", "--optimizer=adamw"))
    if spec.precision.enable_xformers_memory_efficient_attention:
        needs.append(Requirement("--enable_xformers_memory_efficient_attention", ("xformers",), "xformers",
                                 "drop that flag (PyTorch SDPA attention is used then)"))
    return needs


def check_packages(spec: RunSpec, backend: str) -> None:
    """Raise one JaxboothError naming every missing package the run needs, with its pip command."""
    missing = [need for need in required_packages(spec, backend) if not any(map(_installed, need.modules))]
    if not missing:
        return
    lines = [f"{need.why} needs the {need.pip} package: pip install {need.pip} (or {need.fix})" for need in missing]
    if len(lines) == 1:
        raise JaxboothError(lines[0])
    every = " ".join(dict.fromkeys(need.pip for need in missing))
    raise JaxboothError(f"{len(lines)} packages this run needs are missing (pip install {every}):\n  - "
                        + "\n  - ".join(lines))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # already imported, with no __spec__
        return True
    except ImportError:
        return False
