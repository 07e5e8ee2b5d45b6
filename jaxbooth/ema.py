"""The exponential moving average of trained weights (``--use_ema``, ``--ema_decay``), written once.

Behaviour of diffusers' ``EMAModel`` as ``train_text_to_image.py --use_ema`` runs it (defaults: no
``update_after_step``, no inverse-gamma warmup): after the n-th optimizer step (n = 1, 2, ...) every
trained weight's average moves as ``ema - (1 - d_n) * (ema - weight)`` with the warmup decay
``d_n = min(ema_decay, n / (n + 9))`` and ``d_1 = 0`` (the first step copies the weights). The warmup keeps
an early average from clinging to the pretrained weights. Framework-free: the formulas take Python
numbers, numpy, jax (also traced) or torch arrays; each backend keeps the averages in its own state.
"""

from __future__ import annotations

from typing import Any

from jaxbooth.diffusion import Array, _is_torch, _xp

EMA_LOG = "EMA of the trained weights (decay {decay:g}, warmup min(decay, n / (n + 9))): used for validation " \
          "images and written as the output instead of the raw weights"


def ema_decay(optimizer_step: Any, max_decay: float) -> Any:
    """The decay used after optimizer step ``optimizer_step`` (1-based; a Python int or an integer array):
    0 at step 1, then min(max_decay, n / (n + 9)), as diffusers' ``EMAModel.get_decay``."""
    if isinstance(optimizer_step, int):
        warm = optimizer_step - 1
        return 0.0 if warm <= 0 else min(float(max_decay), (1 + warm) / (10 + warm))
    xp = _xp(optimizer_step)
    warm = (optimizer_step.float() if _is_torch(xp) else optimizer_step.astype(xp.float32)) - 1
    decay = (1 + warm) / (10 + warm)
    if _is_torch(xp):
        return xp.where(warm <= 0, xp.zeros_like(decay), xp.clamp(decay, max=float(max_decay)))
    return xp.where(warm <= 0, 0.0, xp.minimum(decay, xp.float32(max_decay)))


def ema_update(average: Array, weight: Array, decay: Any) -> Array:
    """One EMA step of one weight: ``average - (1 - decay) * (average - weight)``, in the average's dtype."""
    return average - (1 - decay) * (average - weight)
