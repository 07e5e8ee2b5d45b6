"""LoRA, framework-free: settings, the adapter record both backends hand over, init, files.

Both backends train low-rank adapters their own way (peft on torch, a pytree beside the
frozen params on JAX) and meet here: ``LoraState`` (component -> module path -> ``LoraLayer``,
in torch's layout) is what a backend exports and what the files, the kohya conversion, the
merged pipeline and ``jaxbooth generate`` read. Imports numpy only; never jax or torch.
"""

from jaxbooth.lora.files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, read_lora_file, write_lora_file
from jaxbooth.lora.layers import LoraLayer, LoraState
from jaxbooth.lora.merge import merge_into_state_dict
from jaxbooth.lora.settings import TEXT_ENCODER_TARGETS, UNET_TARGETS, AdapterSettings, is_target

__all__ = ["KOHYA_WEIGHTS_NAME", "LORA_WEIGHTS_NAME", "TEXT_ENCODER_TARGETS", "UNET_TARGETS", "AdapterSettings",
           "LoraLayer", "LoraState", "is_target", "merge_into_state_dict", "read_lora_file", "write_lora_file"]
