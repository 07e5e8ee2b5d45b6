"""Inputs and tools for tests/test_spec_coverage.py: folders, the base spec, and the stop harness.

The base spec is the default spec as the CLI hands it to a backend (``run_defaults.fill_defaults``
fills model, data, prompt, seed and the tiny model's resolution), on the tiny pipeline and the
bundled example images, so every probe runs in milliseconds to a second on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from jaxbooth import data
from jaxbooth import spec as spec_lib

INSTANCE_PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of toy"


class Stop(Exception):
    """Raised by a spy to end a backend phase once it reached the call a probe looks at."""


@dataclasses.dataclass
class Env:
    """Folders every probe may read; ``fresh`` hands out an empty folder per call."""

    root: Path
    tiny: Path
    _counter: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    def fresh(self, name: str = "run") -> Path:
        path = self.root / "fresh" / f"{name}-{next(self._counter)}"
        path.mkdir(parents=True)
        return path

    @cached_property
    def tiny_copy(self) -> Path:
        """The tiny pipeline under a second path (a different --pretrained_model_name_or_path)."""
        return Path(shutil.copytree(self.tiny, self.root / "tiny-copy"))

    @cached_property
    def two_images(self) -> Path:
        """Two of the bundled instance images (a different --instance_data_dir)."""
        folder = self.root / "two-images"
        folder.mkdir()
        for path in sorted(data.example_instance_dir().iterdir())[:2]:
            shutil.copy(path, folder / path.name)
        return folder

    def class_folder(self, name: str, count: int) -> Path:
        """``count`` of the bundled class images, in a folder of its own."""
        folder = self.root / f"class-{name}"
        if not folder.exists():
            folder.mkdir()
            for path in sorted(data.example_class_dir().iterdir())[:count]:
                shutil.copy(path, folder / path.name)
        return folder

    @cached_property
    def with_bad_image(self) -> Path:
        """Two good images and one that does not decode (--skip_bad_images)."""
        folder = self.root / "with-bad-image"
        shutil.copytree(self.two_images, folder)
        (folder / "broken.png").write_bytes(b"not an image")
        return folder

    @cached_property
    def tokenizer16(self) -> Path:
        """The tiny tokenizer with model_max_length 16 (a different --tokenizer_name)."""
        folder = Path(shutil.copytree(self.tiny / "tokenizer", self.root / "tokenizer16"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 16}))
        return folder

    @cached_property
    def hf_dataset(self) -> Path:
        """A local Hugging Face dataset: parquet files with images stored as bytes, two image and two
        caption columns, and two configs ("default" and "other", with different rows)."""
        import pytest
        from PIL import Image

        datasets = pytest.importorskip("datasets")

        def png(seed: int) -> bytes:
            pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            return buffer.getvalue()

        root = self.root / "hf-dataset"
        for config, seeds in (("default", (0, 1)), ("other", (2, 3, 4))):
            table = datasets.Dataset.from_dict({
                "image": [{"bytes": png(s), "path": None} for s in seeds],
                "image_b": [{"bytes": png(s + 10), "path": None} for s in seeds],
                "text": [f"sks toy {s}" for s in seeds], "text_b": [f"other caption {s}" for s in seeds]})
            table = table.cast_column("image", datasets.Image()).cast_column("image_b", datasets.Image())
            (root / config).mkdir(parents=True)
            table.to_parquet(str(root / config / "train-00000.parquet"))
        (root / "README.md").write_text(
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: default/*.parquet\n"
            "- config_name: other\n  data_files:\n  - split: train\n    path: other/*.parquet\n---\n")
        return root

    @cached_property
    def jax_models(self) -> Any:
        """The tiny pipeline as the JAX load phase hands it over (float32, no remat)."""
        from tests._loaded import loaded_models

        return loaded_models(self.tiny)

    @cached_property
    def torch_models(self) -> Any:
        """The tiny pipeline's torch models (``torch_backend.models.Models``)."""
        from jaxbooth.text import load_tokenizer
        from jaxbooth.torch_backend import models

        return models.load_models(self.tiny, tokenizer=load_tokenizer(self.tiny))


def base_values(env: Env) -> dict[str, Any]:
    """What ``fill_defaults`` decides for a bare ``jaxbooth train`` (a fixed seed instead of a random one)."""
    return {"pretrained_model_name_or_path": str(env.tiny), "instance_data_dir": str(data.example_instance_dir()),
            "instance_prompt": INSTANCE_PROMPT, "resolution": 64, "seed": 0,
            "output_dir": str(env.root / "output")}


def resolve(value: Any, env: Env) -> Any:
    """Account values that depend on the test folders are callables of the env."""
    return value(env) if callable(value) else value


def make_spec(env: Env, overrides: Mapping[str, Any]) -> spec_lib.RunSpec:
    """A validated spec: the base values, then ``overrides`` (callables resolved against ``env``)."""
    values = {**base_values(env), **{key: resolve(value, env) for key, value in overrides.items()}}
    return spec_lib.load_spec_from_dict(values)


@contextlib.contextmanager
def stop_at(owner: Any, name: str, *, call_through: bool = True) -> Iterator[dict[str, Any]]:
    """Replace ``owner.name`` by a spy that records its arguments (and, with ``call_through``, the
    real result) and raises :class:`Stop`; the block must reach it."""
    real = getattr(owner, name)
    seen: dict[str, Any] = {}

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(args=args, kwargs=kwargs)
        if call_through:
            seen["result"] = real(*args, **kwargs)
        raise Stop

    with mock.patch.object(owner, name, spy):
        try:
            yield seen
        except Stop:
            pass
    if "args" not in seen:
        raise AssertionError(f"the backend phase never called {getattr(owner, '__name__', owner)}.{name}")


def recorder(calls: list, result: Callable[..., Any] = lambda *a, **k: None) -> Callable[..., Any]:
    """A stand-in that appends (args, kwargs) to ``calls`` and returns ``result(*args, **kwargs)``."""
    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return result(*args, **kwargs)

    return record


def fingerprint(array: Any) -> tuple:
    """Shape, dtype and the sha1 of the bytes: compares arrays exactly and prints briefly."""
    import hashlib

    array = np.ascontiguousarray(np.asarray(array))
    return tuple(array.shape), str(array.dtype), hashlib.sha1(array.tobytes()).hexdigest()[:12]


def dataset_summary(dataset: data.Dataset) -> tuple:
    """Which files with which captions, in which role, and how many items per epoch."""
    rows = tuple((example.path.name, str(example.path.parent), example.caption,
                  dataset.subsets[example.subset].is_class) for example in dataset.examples)
    return rows, len(dataset), len(dataset.instance_items), len(dataset.class_items)
