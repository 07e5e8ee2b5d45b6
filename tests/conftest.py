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



# Files whose tests take the most CPU (minutes), heaviest first. pytest-xdist's loadfile mode hands whole
# files to workers in collection order, so collecting these first lets the short files fill in behind them
# instead of one worker finishing a long file alone at the end (measured: about a minute of CI's wall time).
HEAVY_FILES = (
    "tests/jax_backend/test_multidevice.py", "tests/jax_backend/test_multidevice_sdxl.py",
    "tests/jax_backend/test_sdxl_train.py", "tests/jax_backend/test_train.py",
    "tests/test_no_secrets.py", "tests/jax_backend/test_lora_train.py", "tests/test_lora_cli.py",
    "tests/test_resume_seed.py", "tests/jax_backend/test_learning.py", "tests/torch_backend/test_sdxl.py",
    "tests/jax_backend/test_class_images.py", "tests/test_datasets_cli.py", "tests/jax_backend/test_train_step.py",
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    rank = {name: index for index, name in enumerate(HEAVY_FILES)}
    root = Path(str(config.rootpath))

    def weight(item) -> int:
        try:
            name = Path(str(item.path)).relative_to(root).as_posix()
        except ValueError:
            return len(HEAVY_FILES)
        return rank.get(name, len(HEAVY_FILES))

    items.sort(key=weight)  # stable: each file keeps its own order
