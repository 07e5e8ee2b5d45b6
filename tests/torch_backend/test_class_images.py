"""Class-image generation on the torch backend: diffusers' pipeline call, one generator per image.

Names, resume, batch-size independence and the process split are checked over both backends
in tests/test_shared_outputs.py; here, what only the torch side does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jaxbooth.class_images import image_seed
from jaxbooth.spec import load_spec
from jaxbooth.torch_backend import class_images


class RecordingPipeline:
    """Records each call's prompts and generator seeds; images from the generators' first draw."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[int]]] = []

    def __call__(self, prompts, generator):
        self.calls.append((list(prompts), [g.initial_seed() for g in generator]))
        images = [Image.fromarray(np.full((8, 8, 3), int(torch.randint(0, 255, (1,), generator=g)), np.uint8))
                  for g in generator]
        return type("Output", (), {"images": images})()


def spec_for(class_dir, num: int, batch: int = 2):
    return load_spec(["--with_prior_preservation", f"--class_data_dir={class_dir}", "--class_prompt=a toy",
                      f"--num_class_images={num}", f"--sample_batch_size={batch}"])


def test_pipeline_gets_sample_batch_size_prompts_and_one_seeded_generator_per_image(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = RecordingPipeline()
    monkeypatch.setattr(class_images, "load_generation_pipeline", lambda *a: pipeline)
    written = class_images.generate_class_images(spec_for(tmp_path / "cls", 5, batch=2), tmp_path,
                                                 device=torch.device("cpu"), seed=3)
    assert [len(prompts) for prompts, _ in pipeline.calls] == [2, 2, 1]
    assert all(prompt == "a toy" for prompts, _ in pipeline.calls for prompt in prompts)
    assert [s for _, seeds in pipeline.calls for s in seeds] == [image_seed(3, i) for i in range(5)]
    assert sorted(p.name.split("-")[0] for p in written) == ["0", "1", "2", "3", "4"]


def test_no_pipeline_is_loaded_when_the_folder_is_full_or_the_share_is_empty(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args):
        raise AssertionError("loaded a pipeline with nothing to generate")

    monkeypatch.setattr(class_images, "load_generation_pipeline", fail)
    folder = tmp_path / "cls"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "user.png")
    assert class_images.generate_class_images(spec_for(folder, 1), tmp_path, device=torch.device("cpu"), seed=0) == []
    # 1 missing image, 2 processes: process 1's share is empty
    assert class_images.generate_class_images(spec_for(folder, 2), tmp_path, device=torch.device("cpu"), seed=0,
                                              process_index=1, num_processes=2) == []


def test_generation_precision_follows_diffusers_defaults() -> None:
    assert class_images.generation_dtype(None, torch.device("cpu")) == torch.float32
    assert class_images.generation_dtype(None, torch.device("cuda")) == torch.float16
    assert class_images.generation_dtype("bf16", torch.device("cpu")) == torch.bfloat16
