"""Which layers get adapters and how: diffusers' LoRA script's choices, from the run spec."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from jaxbooth.lora.layers import LoraLayer

# diffusers train_dreambooth_lora.py: attention projections; add_k/add_v only where a UNet has
# added key/value projections (IF, UnCLIP); peft skips names that match nothing.
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def is_target(module_path: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target names: the path is the name or ends in ``.name``."""
    return any(module_path == name or module_path.endswith(f".{name}") for name in targets)


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """rank, alpha (None in the spec: equal to rank, as diffusers), dropout, DoRA, targets."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    use_dora: bool = False
    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS
    train_text_encoder: bool = False
    # The pipeline's text encoders, in order: SDXL has two, both trained with --train_text_encoder.
    text_encoders: tuple[str, ...] = ("text_encoder",)

    @classmethod
    def from_spec(cls, spec: Any, *, sdxl: bool = False) -> AdapterSettings:
        """``sdxl``: the pipeline is SDXL (see ``jaxbooth.sdxl.is_sdxl_pipeline``), so both encoders get adapters."""
        from jaxbooth import sdxl as sdxl_lib
        from jaxbooth.spec import lora_scale_alpha

        lora = spec.lora
        return cls(rank=int(lora.rank), alpha=float(lora_scale_alpha(spec)),
                   dropout=float(lora.lora_dropout), use_dora=bool(lora.use_dora),
                   unet_targets=tuple(lora.lora_target_modules or UNET_TARGETS),
                   text_encoder_targets=tuple(lora.lora_text_encoder_target_modules or TEXT_ENCODER_TARGETS),
                   train_text_encoder=bool(spec.model.train_text_encoder),
                   text_encoders=sdxl_lib.TEXT_ENCODERS if sdxl else ("text_encoder",))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", *self.text_encoders) if self.train_text_encoder else ("unet",)

    def targets(self, component: str) -> tuple[str, ...]:
        return self.unet_targets if component == "unet" else self.text_encoder_targets

    def peft_config(self, component: str, *, present: Iterable[str] | None = None) -> dict[str, Any]:
        """peft ``LoraConfig`` keyword arguments for ``component`` (also the file's adapter metadata).

        ``present``: the component's module paths; targets that match none of them are dropped
        (peft refuses a target list where a name matches nothing only when all do).
        """
        targets = list(self.targets(component))
        if present is not None:
            paths = list(present)
            targets = [name for name in targets if any(is_target(path, [name]) for path in paths)]
        return {"r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "init_lora_weights": "gaussian", "target_modules": targets, "use_dora": self.use_dora}

    def initial_layer(self, component: str, module_path: str, base_weight: np.ndarray, seed: int) -> LoraLayer:
        """The starting adapter of one layer, the same on both backends for one seed.

        peft's ``init_lora_weights="gaussian"``: ``down ~ N(0, 1/rank)`` (std 1/rank), ``up = 0``,
        so training starts from the base model exactly. Drawn in numpy from (seed, component,
        path), never from a framework RNG, so a JAX and a torch run of one spec start alike.
        ``base_weight`` is the layer's weight ``[out, in]`` (torch layout): DoRA's magnitude
        starts at its row norms, as peft's.
        """
        out_features, in_features = base_weight.shape
        digest = hashlib.sha256(f"{seed}/{component}/{module_path}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        down = rng.normal(0.0, 1.0 / self.rank, size=(self.rank, in_features)).astype(np.float32)
        up = np.zeros((out_features, self.rank), np.float32)
        magnitude = None
        if self.use_dora:
            magnitude = np.linalg.norm(base_weight.astype(np.float32), axis=1).astype(np.float32)
        return LoraLayer(down=down, up=up, alpha=self.alpha, magnitude=magnitude)
