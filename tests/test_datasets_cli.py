"""`jaxbooth train --dataset_name=FOLDER` end to end: the run trains on that dataset's images and
per-image captions (the step count and the encoded prompts show it), ``--repeats`` multiplies an
epoch, and a dataset that does not exist is one error naming it, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth.cli import main

pytest.importorskip("datasets")

CAPTIONS = ["a photo of sks toy on grass", "a photo of sks toy at night", "sks toy, close up"]
ARGS = ["--backend=jax", "--resolution=64", "--train_batch_size=1", "--lr_warmup_steps=0", "--seed=0",
        "--report_to=none", "--log_every_steps=1", "--checkpointing_steps=100", "--instance_prompt=a photo of sks toy"]


def imagefolder(root: Path) -> Path:
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as handle:
        for i, caption in enumerate(CAPTIONS):
            pixels = np.random.default_rng(i).integers(0, 256, (72, 64, 3), np.uint8)
            Image.fromarray(pixels).save(root / f"img_{i}.png")
            handle.write(json.dumps({"file_name": f"img_{i}.png", "text": caption}) + "\n")
    return root


def logged_steps(out: Path) -> int:
    return len((out / "metrics.jsonl").read_text().splitlines())


@pytest.fixture
def encoded_prompts(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The prompts each run's caches encoded (what the step conditions on)."""
    from jaxbooth.jax_backend import caches

    seen: list[list[str]] = []
    build = caches.build_caches

    def spy(*args, **kwargs):
        result = build(*args, **kwargs)
        seen.append(list(result.prompts))
        return result

    monkeypatch.setattr(caches, "build_caches", spy)
    return seen


def test_dataset_name_trains_on_its_images_and_captions_and_repeats_multiply_an_epoch(
        tiny_model_dir: Path, tmp_path: Path, encoded_prompts: list) -> None:
    folder = imagefolder(tmp_path / "ds")
    common = [f"--pretrained_model_name_or_path={tiny_model_dir}", f"--dataset_name={folder}",
              "--caption_column=text", f"--cache_dir={tmp_path / 'hf-cache'}", *ARGS]
    once = tmp_path / "once"
    assert main(["train", *common, f"--output_dir={once}", "--num_train_epochs=1"]) == 0
    assert logged_steps(once) == len(CAPTIONS)  # 3 images, not the 5 bundled ones
    assert encoded_prompts[-1] == sorted(CAPTIONS)
    thrice = tmp_path / "thrice"
    assert main(["train", *common, f"--output_dir={thrice}", "--num_train_epochs=1", "--repeats=3"]) == 0
    assert logged_steps(thrice) == 3 * len(CAPTIONS)


def test_a_missing_dataset_is_one_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxbooth.jax_backend import loading

    monkeypatch.setattr(loading, "load_models", lambda *a, **k: pytest.fail("models loaded for a missing dataset"))
    missing = tmp_path / "no-such-dataset"
    assert main(["train", f"--dataset_name={missing}", f"--output_dir={tmp_path / 'out'}", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "--dataset_name" in err and str(missing) in err and "Traceback" not in err
