"""Helpers for parity tests of the Flax UNet/VAE against diffusers' PyTorch classes.

Torch is imported by the tests that use these helpers, not here, so the module stays
importable on a torch-free install.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# XLA's CPU backend spends most of a tiny model's test time in LLVM optimisation; these
# options cut compile time several-fold and do not change float semantics (no fast-math),
# so parity against torch is still a fair test. Only applied on CPU.
FAST_CPU_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


def compile_fast(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """``jax.jit(fn)`` compiled for ``args``' shapes, with :data:`FAST_CPU_COMPILE` on CPU."""
    options = FAST_CPU_COMPILE if jax.default_backend() == "cpu" else None
    return jax.jit(fn).lower(*args).compile(options)


def rel_error(actual: Any, expected: Any) -> float:
    """``max|a - b| / max|b|``: the acceptance metric (<= 1e-4 in float32)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def to_nchw(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))


def perturb_(torch_model: Any, seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    """Add noise to every parameter in place and return the state dict as numpy.

    Norm scales start at 1 and biases at 0; perturbing them makes a swapped scale/bias or a
    dropped affine visible in the parity tests.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in torch_model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return {key: value.detach().numpy().copy() for key, value in torch_model.state_dict().items()}


def assert_state_dicts_identical(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same keys, and every array equal bit for bit with the same shape and dtype."""
    assert sorted(actual) == sorted(expected), sorted(set(actual) ^ set(expected))
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype and got.shape == value.shape, (key, got.shape, value.shape)
        assert np.array_equal(got, value), key
