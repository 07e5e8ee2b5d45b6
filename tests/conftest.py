"""Shared fixtures: an isolated cache, and the tiny pipeline built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests are dominated by XLA compile time of tiny models; these CPU options cut it by about a
# third without changing float semantics. Set before jax is imported; subprocesses inherit it.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the built-in tiny model and the XLA cache out of the user's ~/.cache."""
    root = tmp_path_factory.mktemp("jaxbooth-cache")
    os.environ["JAXBOOTH_CACHE"] = str(root)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` random-weight SD pipeline, in diffusers format."""
    from jaxbooth.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("pipes") / "tiny", "tiny", seed=0)


