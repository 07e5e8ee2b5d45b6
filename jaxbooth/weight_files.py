"""Finding and reading a diffusers component's safetensors files with numpy alone.

Framework-free, so the JAX loader (``jax_backend/pretrained.py``) and the shared LoRA layer
(``jaxbooth/lora``: merging into base weights, reading LoRA files) read weights one way:
variant and sharded files named as diffusers/transformers save them, shards checked to be
there, and bfloat16 (SDXL checkpoints) through a raw parser when safetensors' numpy loader
cannot make it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth.errors import JaxboothError
from jaxbooth.hub import WEIGHT_STEMS


def strict_safetensors_files(folder: Path, variant: str | None) -> list[Path] | None:
    """The safetensors files of exactly ``variant`` (single file or every shard of an index)."""
    dot_variant = f".{variant}" if variant else ""
    for stem in WEIGHT_STEMS:
        single = folder / f"{stem}{dot_variant}.safetensors"
        if single.is_file():
            return [single]
        # diffusers/transformers `_add_variant` put the variant before the last suffix.
        index = folder / f"{stem}.safetensors.index{dot_variant}.json"
        if index.is_file():
            return shards_from_index(index)
    return None


def shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise JaxboothError(f"{index}: not a valid shard index ({error!r}). Fix: re-download the "
                            "checkpoint.") from error
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [str(s.name) for s in shards if not s.is_file()]
    if absent:
        raise JaxboothError(f"{index}: lists shards that are not in {index.parent}: {absent}. Fix: finish "
                            "the download (a partial snapshot) or re-save the checkpoint.")
    return shards


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes, ``__metadata__``), no tensor data."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > 100_000_000:
            raise ValueError(f"header size {size} is implausible")
        return json.loads(handle.read(size))


def _raw_dtypes() -> dict[str, Any]:
    import ml_dtypes  # a jax dependency; gives numpy a bfloat16

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}


def read_safetensors_raw(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a safetensors file with numpy alone: 8-byte header size, JSON header, raw data.

    A fallback for safetensors releases whose numpy loader cannot make ``bfloat16``
    arrays (SDXL checkpoints ship bf16); ``ml_dtypes.bfloat16`` is what jax uses.
    """
    dtypes = _raw_dtypes()
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    tensors: dict[str, np.ndarray] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise JaxboothError(f"{path}: tensor {key} has dtype {info['dtype']}, which jaxbooth cannot "
                                f"read; supported: {sorted(dtypes)}. Fix: re-save the weights in float32/16.")
        begin, end = info["data_offsets"]
        tensors[key] = np.array(data[begin:end].view(dtypes[info["dtype"]]).reshape(info["shape"]))
    del data  # unmap; the arrays above are copies
    return tensors


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors (file dtypes kept); an error naming the file when it is damaged."""
    import safetensors.numpy

    try:
        return dict(safetensors.numpy.load_file(str(path)))
    except Exception as error:  # bf16 on older safetensors (TypeError) or a damaged file
        try:
            return read_safetensors_raw(path)
        except (OSError, ValueError, KeyError, struct.error) as raw_error:
            raise JaxboothError(f"{path}: not a readable safetensors file ({error}; {raw_error}). "
                                "Fix: re-download the file.") from error
