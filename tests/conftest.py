"""Shared fixtures: an isolated cache, and the tiny pipeline built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
