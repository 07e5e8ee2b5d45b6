"""The DreamBooth options of diffusers' train_dreambooth.py, each trained for a couple of steps."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from jaxbooth.data import EXAMPLE_CLASS_PROMPT, example_class_dir
from tests.torch_backend._helpers import metrics, run_train, unet_state

CLASS_FILE = re.compile(r"^(\d+)-([0-9a-f]{40})\.jpg$")


def test_prior_preservation_generates_missing_class_images_and_trains_text_encoder(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """1 class image on disk, num_class_images=3: 2 are generated ({index}-{sha1}.jpg), then the
    prior loss, Min-SNR, offset noise and text-encoder training all run."""
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    shutil.copy(sorted(example_class_dir().iterdir())[0], class_dir / "toy.png")
    out = tmp_path / "out"
    assert run_train(tiny_model_dir, out, "--max_train_steps=2", "--checkpointing_steps=2",
                     "--with_prior_preservation", f"--class_data_dir={class_dir}",
                     f"--class_prompt={EXAMPLE_CLASS_PROMPT}", "--num_class_images=3", "--sample_batch_size=2",
                     "--prior_generation_precision=fp32", "--train_text_encoder", "--snr_gamma=5.0",
                     "--offset_noise") == 0
    generated = sorted(p.name for p in class_dir.iterdir() if p.name != "toy.png")
    assert [CLASS_FILE.match(name).group(1) for name in generated] == ["1", "2"], generated
    assert all(Image.open(class_dir / name).size == (64, 64) for name in generated)
    assert not [p for p in class_dir.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert all(r["train/prior_loss"] > 0 for r in metrics(out))
    te = "text_encoder/model.safetensors"
    assert (out / te).read_bytes() != (tiny_model_dir / te).read_bytes()
    assert (out / "checkpoint-2" / "text_encoder" / "model.safetensors").is_file()
    # a second run finds enough class images and generates none
    before = sorted(class_dir.iterdir())
    assert run_train(tiny_model_dir, tmp_path / "out2", "--max_train_steps=1", "--with_prior_preservation",
                     f"--class_data_dir={class_dir}", f"--class_prompt={EXAMPLE_CLASS_PROMPT}",
                     "--num_class_images=3") == 0
    assert sorted(class_dir.iterdir()) == before


def test_precomputed_embeddings_attention_mask_and_validation_images(tiny_model_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """The text encoder is freed after encoding (validation then uses stored embeddings); a
    shorter tokenizer_max_length and the attention mask reach the encoder."""
    out = tmp_path / "out"
    assert run_train(tiny_model_dir, out, "--max_train_steps=2", "--checkpointing_steps=100",
                     "--pre_compute_text_embeddings", "--tokenizer_max_length=16",
                     "--text_encoder_use_attention_mask", "--validation_prompt=a photo of sks toy on a table",
                     "--num_validation_images=2", "--validation_steps=1") == 0
    for step in (1, 2):
        grid = Image.open(out / "validation" / f"step-{step}.png")
        assert grid.size == (128, 64)  # two 64 px images side by side
        assert sorted(p.name for p in (out / "validation" / f"step-{step}").iterdir()) == ["0.png", "1.png"]
    assert "validation/step-2.png" in (out / "README.md").read_text()
    assert len(metrics(out)) == 2
    assert "validation images for step 2" in capsys.readouterr().err


def test_bf16_accumulation_scaled_lr_and_cosine_warmup(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bf16 autocast keeps float32 master weights; 2 micro-steps per update; lr 1e-4 x 2 (scale_lr)
    warms up over 1 step, then follows diffusers' cosine schedule."""
    out = tmp_path / "out"
    assert run_train(tiny_model_dir, out, "--max_train_steps=3", "--checkpointing_steps=100", "--mixed_precision=bf16",
                     "--gradient_accumulation_steps=2", "--scale_lr", "--lr_scheduler=cosine",
                     "--lr_warmup_steps=1", "--max_grad_norm=0.5", "--adam_weight_decay=0.0") == 0
    records = metrics(out)
    assert [r["train/lr"] for r in records] == pytest.approx([0.0, 2e-4, 1e-4])
    assert all(r["train/grad_norm"] > 0 for r in records)
    weights = unet_state(out)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    base = unet_state(tiny_model_dir)
    assert any(not torch.equal(base[k], weights[k]) for k in base)


def test_validation_every_epoch_and_tensorboard(tiny_model_dir: Path, tmp_path: Path) -> None:
    """validation_epochs=2: 5 instance images at batch 5 is one step per epoch, and diffusers'
    LoRA scripts validate after 0-based epochs 0, 2, 4...: after step 1 and 3, not 2. Images and
    metrics also go to tensorboard (report_to's default)."""
    out = tmp_path / "out"
    assert run_train(tiny_model_dir, out, "--max_train_steps=3", "--train_batch_size=5", "--checkpointing_steps=100",
                     "--validation_prompt=a photo of sks toy", "--num_validation_images=1",
                     "--validation_epochs=2", "--report_to=tensorboard") == 0
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-1", "step-1.png", "step-3",
                                                                        "step-3.png"]
    assert list((out / "logs" / "dreambooth").glob("events.out.tfevents.*")), "no tensorboard events"


def test_skip_save_text_encoder_writes_a_pipeline_without_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "out"
    assert run_train(tiny_model_dir, out, "--max_train_steps=1", "--skip_save_text_encoder") == 0
    assert not (out / "text_encoder").exists()
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == [None, None]
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    assert StableDiffusionPipeline.from_pretrained(out, text_encoder=text_encoder).text_encoder is text_encoder


def test_bad_options_are_one_clear_error(tiny_model_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    assert run_train(tiny_model_dir, tmp_path / "a", "--max_train_steps=1", "--lr_scheduler=piecewise_constant") == 2
    assert "--lr_scheduler=piecewise_constant" in capsys.readouterr().err
    assert run_train(tiny_model_dir, tmp_path / "b", "--max_train_steps=1", "--mixed_precision=fp16") == 2
    err = capsys.readouterr().err
    assert "--mixed_precision=fp16" in err and "Traceback" not in err


def test_options_the_torch_backend_lacks_are_refused_by_name(tiny_model_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    assert run_train(tiny_model_dir, tmp_path / "a", "--max_train_steps=1", "--class_labels_conditioning=timesteps"
                     ) == 2
    assert "--class_labels_conditioning=timesteps: " in capsys.readouterr().err
    assert run_train(tiny_model_dir, tmp_path / "b", "--max_train_steps=1", "--fsdp_parallelism=2") == 2
    assert "--fsdp_parallelism=2 is only supported by the jax backend" in capsys.readouterr().err
