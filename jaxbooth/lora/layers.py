"""The adapter record both backends export: one ``LoraLayer`` per adapted linear layer."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted linear layer, in torch's (peft's) layout.

    ``down`` is peft's ``lora_A.weight`` ``[rank, in_features]``, ``up`` its ``lora_B.weight``
    ``[out_features, rank]``; the layer adds ``(alpha / rank) * up @ down`` to the base weight
    ``[out_features, in_features]``. ``magnitude`` (DoRA only) is peft's
    ``lora_magnitude_vector`` ``[out_features]``: the merged weight's rows are rescaled to it.
    """

    down: np.ndarray
    up: np.ndarray
    alpha: float
    magnitude: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or self.up.ndim != 2 or self.down.shape[0] != self.up.shape[1]:
            raise ValueError(f"LoraLayer: down {self.down.shape} and up {self.up.shape} are not [rank, in] and "
                             "[out, rank] of one rank")
        if self.magnitude is not None and self.magnitude.shape != (self.up.shape[0],):
            raise ValueError(f"LoraLayer: magnitude {self.magnitude.shape} is not [out_features={self.up.shape[0]}]")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, multiplier: float = 1.0) -> np.ndarray:
        """``multiplier * (alpha / rank) * up @ down`` in float32, ``[out, in]`` (before DoRA's rescale)."""
        return (multiplier * self.scale) * (self.up.astype(np.float32) @ self.down.astype(np.float32))


# component ("unet", "text_encoder") -> torch module path -> layer, e.g.
# state["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"],
# state["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj"].
LoraState = dict[str, dict[str, LoraLayer]]
