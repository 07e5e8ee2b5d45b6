"""DeepFloyd IF prior preservation end to end on the torch backend: stage I makes its class images with the
IF pipeline itself (64 px) and trains on them with the prior loss; stage II, pointed at the same class folder,
upscales those images (downsized to 64 px) with its own pipeline to 256 px and trains on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.torch_backend._deepfloyd_seed import run_seed, write_images

pytest.importorskip("diffusers")

COMMON = ("--instance_prompt=a sks dog", "--class_prompt=a dog", "--with_prior_preservation",
          "--train_batch_size=1", "--max_train_steps=1", "--learning_rate=1e-5", "--report_to=none",
          "--pre_compute_text_embeddings", "--tokenizer_max_length=77", "--text_encoder_use_attention_mask",
          "--sample_batch_size=2")


def logged_losses(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r for r in records if "train/prior_loss" in r)


class FewSteps:
    """A pipeline that samples with 2 steps (the IF pipelines' 100 / 50 are slow for nothing on a CPU)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, *args, **kwargs):
        return self.pipeline(*args, num_inference_steps=2, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.pipeline, name)


def test_class_images_come_from_each_stage_and_train_the_prior_loss(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxbooth.tiny_if import write_if_pipeline
    from jaxbooth.torch_backend import class_images

    real_load = class_images.load_generation_pipeline
    monkeypatch.setattr(class_images, "load_generation_pipeline", lambda *a, **k: FewSteps(real_load(*a, **k)))

    stage1 = write_if_pipeline(tmp_path / "if-1", "if-stage1")
    stage2 = write_if_pipeline(tmp_path / "if-2", "if-stage2")
    instance, classes = tmp_path / "dog", tmp_path / "class"
    write_images(instance, 2, 256)
    assert run_seed(["train_dreambooth.py", f"--pretrained_model_name_or_path={stage1}", "--resolution=64",
                     f"--instance_data_dir={instance}", f"--class_data_dir={classes}", "--num_class_images=2",
                     f"--output_dir={tmp_path / 'out-1'}", *COMMON]) == 0
    made = sorted(classes.iterdir())
    assert len(made) == 2 and all(Image.open(p).size == (64, 64) for p in made)
    assert logged_losses(tmp_path / "out-1")["train/prior_loss"] > 0

    assert run_seed(["train_dreambooth.py", f"--pretrained_model_name_or_path={stage2}", "--resolution=256",
                     "--class_labels_conditioning=timesteps", f"--instance_data_dir={instance}",
                     f"--class_data_dir={classes}", "--num_class_images=4", f"--output_dir={tmp_path / 'out-2'}",
                     *COMMON]) == 0
    upscaled = sorted(set(classes.iterdir()) - set(made))
    assert len(upscaled) == 2 and all(Image.open(p).size == (256, 256) for p in upscaled)
    assert logged_losses(tmp_path / "out-2")["train/prior_loss"] > 0
