"""Fixtures of the torch backend tests."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two OpenMP threads on a shared 2-core CI box make torch CPU ops ~20x slower (spinning)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
