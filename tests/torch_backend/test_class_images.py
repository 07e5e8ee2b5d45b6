"""Class-image generation: diffusers' file names, resumable after an interruption, split over processes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jaxbooth.spec import load_spec
from jaxbooth.torch_backend import class_images

NAME = re.compile(r"^(\d+)-([0-9a-f]{40})\.jpg$")


class FakePipeline:
    """Images from the generator's seed; dies after ``fail_after`` images, like a killed job."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after, self.made = fail_after, 0

    def __call__(self, prompts, generator):
        images = []
        for g in generator:
            if self.fail_after is not None and self.made >= self.fail_after:
                raise KeyboardInterrupt("killed")
            value = int(torch.randint(0, 255, (1,), generator=g))
            images.append(Image.fromarray(np.full((8, 8, 3), value, np.uint8)))
            self.made += 1
        return type("Output", (), {"images": images})()


def spec_for(class_dir: Path, num: int, batch: int = 2):
    return load_spec(["--with_prior_preservation", f"--class_data_dir={class_dir}", "--class_prompt=a toy",
                      f"--num_class_images={num}", f"--sample_batch_size={batch}"])


def test_names_carry_index_and_pixel_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(class_images, "load_generation_pipeline", lambda *a: FakePipeline())
    written = class_images.generate_class_images(spec_for(tmp_path / "cls", 3), tmp_path, device=torch.device("cpu"),
                                                 seed=0)
    assert [NAME.match(p.name).group(1) for p in written] == ["0", "1", "2"]
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert class_images.class_image_name(7, image) == f"7-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg"


def test_an_interrupted_generation_resumes_with_the_same_images(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    monkeypatch.setattr(class_images, "load_generation_pipeline", lambda *a: FakePipeline())
    class_images.generate_class_images(spec_for(straight_dir, 5), tmp_path, device=torch.device("cpu"), seed=0)
    monkeypatch.setattr(class_images, "load_generation_pipeline", lambda *a: FakePipeline(fail_after=3))
    with pytest.raises(KeyboardInterrupt):
        class_images.generate_class_images(spec_for(resumed_dir, 5), tmp_path, device=torch.device("cpu"), seed=0)
    assert len(list(resumed_dir.iterdir())) == 2  # the first batch of 2 was saved as it was made
    monkeypatch.setattr(class_images, "load_generation_pipeline", lambda *a: FakePipeline())
    class_images.generate_class_images(spec_for(resumed_dir, 5), tmp_path, device=torch.device("cpu"), seed=0)
    assert sorted(p.name for p in resumed_dir.iterdir()) == sorted(p.name for p in straight_dir.iterdir())


def test_processes_split_the_missing_images() -> None:
    parts = [class_images.my_indices(7, p, 3) for p in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(7))


def test_generation_precision_follows_diffusers_defaults() -> None:
    assert class_images.generation_dtype(None, torch.device("cpu")) == torch.float32
    assert class_images.generation_dtype(None, torch.device("cuda")) == torch.float16
    assert class_images.generation_dtype("bf16", torch.device("cpu")) == torch.bfloat16
