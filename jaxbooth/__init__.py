"""jaxbooth: DreamBooth fine-tuning of Stable-Diffusion-family models, JAX/Flax first.

The public Python surface is ``__all__``; each name is imported on first use, so ``import jaxbooth``
stays fast and loads no framework (jax, flax, torch, diffusers, transformers) until a name needs one.
Submodules (``jaxbooth.spec``, ``jaxbooth.cli``...) import as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from jaxbooth.api import TrainResult, train
    from jaxbooth.errors import JaxboothError
    from jaxbooth.jax_backend.flax_pipeline import FlaxStableDiffusionPipeline, FlaxStableDiffusionXLPipeline
    from jaxbooth.spec import RunSpec, load_spec

# public name -> the module that defines it
_EXPORTS = {
    "train": "jaxbooth.api",
    "TrainResult": "jaxbooth.api",
    "load_spec": "jaxbooth.spec",
    "RunSpec": "jaxbooth.spec",
    "JaxboothError": "jaxbooth.errors",
    "FlaxStableDiffusionPipeline": "jaxbooth.jax_backend.flax_pipeline",
    "FlaxStableDiffusionXLPipeline": "jaxbooth.jax_backend.flax_pipeline",
}

__all__ = ["__version__", "train", "TrainResult", "load_spec", "RunSpec", "JaxboothError",
           "FlaxStableDiffusionPipeline", "FlaxStableDiffusionXLPipeline"]  # a literal, for type checkers and linters


def __getattr__(name: str) -> Any:
    """An exported name, imported on first use (then cached as a module global)."""
    module = _EXPORTS.get(name)
    if module is None:  # not exported: AttributeError, so `from jaxbooth import spec` imports the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
