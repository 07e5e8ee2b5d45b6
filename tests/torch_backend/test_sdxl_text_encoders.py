"""SDXL's two text encoders trained on the torch backend (``--train_text_encoder``), as diffusers'
train_dreambooth_lora_sdxl.py does for LoRA: the files, their loading in stock diffusers, the optimizer
groups, checkpoints and resume, validation, and the full (non-LoRA) fine-tune of both encoders."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jaxbooth.cli import main
from tests._sdxl_pipeline import RESOLUTION, write_sdxl_pipeline

pytest.importorskip("peft")

ARGS = ("--backend=torch", f"--resolution={RESOLUTION}", "--train_batch_size=1", "--lr_warmup_steps=0", "--seed=0",
        "--report_to=none", "--log_every_steps=1", "--instance_prompt=a photo of sks toy", "--train_text_encoder")
PROMPT = "a photo of sks toy"
LORA = "pytorch_lora_weights.safetensors"
KOHYA = "pytorch_lora_weights_kohya.safetensors"
LR, TEXT_ENCODER_LR, TEXT_ENCODER_DECAY = 1e-2, 5e-3, 0.02
ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-te") / "pipe")


@contextlib.contextmanager
def recording(runs: dict, name: str) -> Iterator[None]:
    """Keep the run's Trainer and the adapters it starts its loop from (after any resume), and the text
    encoders each validation pipeline was built with."""
    from jaxbooth.lora import AdapterSettings
    from jaxbooth.torch_backend import lora, train, validation

    real_loop, real_pipeline = train.run_loop, validation.make_sdxl_pipeline
    runs[name + "_validation_encoders"] = seen = []

    def run_loop(trainer, start_step):
        runs[name + "_trainer"] = trainer
        if trainer.spec.lora.use_lora:
            encoders = trainer.accelerator.unwrap_model(trainer.text_encoder).components
            runs[name + "_start"] = lora.export_lora_state(
                trainer.accelerator.unwrap_model(trainer.unet), encoders["text_encoder"],
                AdapterSettings.from_spec(trainer.spec, sdxl=True), text_encoder_2=encoders["text_encoder_2"])
        return real_loop(trainer, start_step)

    def make_sdxl_pipeline(**kwargs):
        seen.append(kwargs["text_encoders"])
        return real_pipeline(**kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "run_loop", run_loop)
        patch.setattr(validation, "make_sdxl_pipeline", make_sdxl_pipeline)
        patch.setattr(validation, "NUM_INFERENCE_STEPS", 2)
        yield


def lora_args(sdxl_dir: Path, instances: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "train_dreambooth_lora_sdxl.py", f"--pretrained_model_name_or_path={sdxl_dir}",
            f"--output_dir={out}", f"--instance_data_dir={instances}", *ARGS, f"--learning_rate={LR}",
            f"--text_encoder_lr={TEXT_ENCODER_LR}", f"--adam_weight_decay_text_encoder={TEXT_ENCODER_DECAY}",
            "--max_train_steps=3", "--checkpointing_steps=2", "--output_kohya_format", "--merge_lora_into_pipeline",
            "--gradient_checkpointing", f"--validation_prompt={PROMPT}", "--num_validation_images=1",
            "--validation_epochs=1", *extra]


@pytest.fixture(scope="module")
def runs(sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """lora: train_dreambooth_lora_sdxl.py with --train_text_encoder, 3 steps (checkpoint at 2, validation at
    the end of epoch 1 = step 2), kohya file, merged pipeline, gradient checkpointing; lora_resumed: from its
    checkpoint-2 to step 3. full: a full fine-tune in bf16 of the UNet and both encoders, 2 steps (checkpoint
    at 2); full_resumed: resumed from that checkpoint with nothing left to train, so it saves what it restored."""
    tmp = tmp_path_factory.mktemp("sdxl-te-runs")
    instances = tmp / "instances"
    instances.mkdir()
    for i, (h, w) in enumerate([(64, 96), (80, 64)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), np.uint8)).save(instances / f"{i}.png")
    out: dict = {"tmp": tmp, **{name: tmp / name for name in ("lora", "lora_resumed", "full", "full_resumed")}}
    with recording(out, "lora"):
        assert main(lora_args(sdxl_dir, instances, out["lora"])) == 0
    shutil.copytree(out["lora"] / "checkpoint-2", out["lora_resumed"] / "checkpoint-2")
    with recording(out, "lora_resumed"):
        assert main(lora_args(sdxl_dir, instances, out["lora_resumed"], "--resume_from_checkpoint=latest")) == 0
    full = ["train", f"--pretrained_model_name_or_path={sdxl_dir}", f"--instance_data_dir={instances}", *ARGS,
            "--learning_rate=1e-3", "--mixed_precision=bf16", "--max_train_steps=2", "--checkpointing_steps=2"]
    with recording(out, "full"):
        assert main([*full, f"--output_dir={out['full']}"]) == 0
    shutil.copytree(out["full"] / "checkpoint-2", out["full_resumed"] / "checkpoint-2")
    assert main([*full, f"--output_dir={out['full_resumed']}", "--resume_from_checkpoint=latest"]) == 0
    return out


def load_pipeline(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    from jaxbooth.torch_backend.models import quiet_library_output

    quiet_library_output()
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def token_ids(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(tokenizer(["a photo of sks toy at night", "sks"], padding="max_length", max_length=77,
                           truncation=True, return_tensors="pt").input_ids
                 for tokenizer in (pipeline.tokenizer, pipeline.tokenizer_2))


@torch.no_grad()
def conditioning(encoders: tuple, ids: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeds, pooled embeds): what the UNet sees from these encoders."""
    from jaxbooth.torch_backend.inputs import encode_sdxl_prompt

    for encoder in encoders:
        encoder.eval()
    return encode_sdxl_prompt(encoders, ids)


def trained_encoders(trainer) -> dict:
    return trainer.accelerator.unwrap_model(trainer.text_encoder).components


# --- LoRA -----------------------------------------------------------------------------------------------------------

def test_dreambooth_lora_sdxl_with_text_encoder(runs: dict, sdxl_dir: Path) -> None:
    """diffusers' own test of this mode: unet/text_encoder/text_encoder_2 keys only, both encoders present, and
    the file loads in stock diffusers and samples."""
    from safetensors.torch import load_file

    keys = load_file(runs["lora"] / LORA).keys()
    prefixes = {key.split(".")[0] for key in keys}
    assert prefixes == {"unet", *ENCODERS}
    pipeline = load_pipeline(sdxl_dir)
    pipeline.load_lora_weights(runs["lora"])
    images = pipeline(PROMPT, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_loaded_encoders_equal_the_trained_ones_from_the_file_kohya_and_merged_pipeline(runs: dict,
                                                                                        sdxl_dir: Path) -> None:
    from safetensors.torch import load_file

    out = runs["lora"]
    kohya = {key.split(".")[0].split("_")[1] for key in load_file(out / KOHYA)}
    assert kohya == {"unet", "te1", "te2"}
    base = load_pipeline(sdxl_dir)
    ids = token_ids(base)
    trained = trained_encoders(runs["lora_trainer"])
    want = conditioning((trained["text_encoder"], trained["text_encoder_2"]), ids)
    before = conditioning((base.text_encoder, base.text_encoder_2), ids)
    for got_base, got in zip(before, want, strict=True):
        assert (got - got_base).abs().max() > 1e-4  # both outputs moved: prompt embeds and pooled embeds
    loaded = {}
    for weight_name in (LORA, KOHYA):
        pipeline = load_pipeline(sdxl_dir)
        pipeline.load_lora_weights(out, weight_name=weight_name)
        loaded[weight_name] = pipeline
    loaded["merged"] = load_pipeline(out)  # --merge_lora_into_pipeline: both encoders merged
    for name, pipeline in loaded.items():
        got = conditioning((pipeline.text_encoder, pipeline.text_encoder_2), ids)
        for got_part, want_part in zip(got, want, strict=True):
            torch.testing.assert_close(got_part, want_part, rtol=1e-4, atol=1e-5, msg=name)


def test_optimizer_has_one_group_per_encoder_with_the_text_encoder_lr_and_decay(runs: dict) -> None:
    from jaxbooth.torch_backend import lora

    trainer = runs["lora_trainer"]
    groups = trainer.optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(LR, 1e-4), *[(TEXT_ENCODER_LR, TEXT_ENCODER_DECAY)] * 2]
    encoders = trained_encoders(trainer)
    for group, name in zip(groups[1:], ENCODERS, strict=True):
        layers = lora.adapted_layers(encoders[name]).values()
        want = {id(p) for layer in layers for p in lora.adapter_parameters(layer) if p is not None}
        assert {id(p) for p in group["params"]} == want, name


def test_both_encoders_train_live_with_gradient_checkpointing_and_validate(runs: dict) -> None:
    """Every adapter moved except those of the first encoder's last layer (SDXL reads its penultimate hidden
    states, as diffusers); no prompt was cached; the validation pipeline had the trained encoders."""
    from jaxbooth.torch_backend import lora

    trainer = runs["lora_trainer"]
    encoders = trained_encoders(trainer)
    last = encoders["text_encoder"].config.num_hidden_layers - 1
    for name, encoder in encoders.items():
        assert getattr(encoder, "is_activation_checkpointing", None) or encoder.is_gradient_checkpointing, name
        for path, layer in lora.adapted_layers(encoder).items():
            moved = bool(layer.lora_B["default"].weight.any())
            assert moved != (name == "text_encoder" and f"layers.{last}." in path), (name, path)
    assert trainer.text._cache == {}
    # so under DDP (2+ processes) that layer must count as unused, or the gradient sync waits for it and fails
    assert trainer.accelerator.ddp_handler.find_unused_parameters
    (validated,) = runs["lora_validation_encoders"]
    assert validated[0] is encoders["text_encoder"] and validated[1] is encoders["text_encoder_2"]
    assert (runs["lora"] / "validation" / "step-2.png").is_file()


def test_resume_restores_both_encoders_adapters_exactly(runs: dict) -> None:
    from jaxbooth.lora import files

    checkpoint = files.read_lora_file(runs["lora"] / "checkpoint-2")
    restored = runs["lora_resumed_start"]
    assert set(checkpoint) == set(restored) == {"unet", *ENCODERS}
    for component, layers in checkpoint.items():
        assert layers.keys() == restored[component].keys()
        for path, layer in layers.items():
            np.testing.assert_array_equal(restored[component][path].down, layer.down, err_msg=f"{component}.{path}")
            np.testing.assert_array_equal(restored[component][path].up, layer.up, err_msg=f"{component}.{path}")
    assert any(layer.up.any() for layer in checkpoint["text_encoder_2"].values())  # trained, not the fresh init
    straight, again = (files.read_lora_file(runs[name]) for name in ("lora", "lora_resumed"))
    for component in ENCODERS:  # the resumed step (optimizer state restored too) equals the straight one
        for path, layer in straight[component].items():
            np.testing.assert_array_equal(again[component][path].up, layer.up, err_msg=f"{component}.{path}")


# --- full fine-tune -------------------------------------------------------------------------------------------------

def test_full_run_trains_and_saves_both_encoders(runs: dict, sdxl_dir: Path) -> None:
    from safetensors.torch import load_file

    out = runs["full"]
    pipeline = load_pipeline(out)
    assert type(pipeline.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for name in ENCODERS:
        base = load_file(sdxl_dir / name / "model.safetensors")
        trained = load_file(out / name / "model.safetensors")
        assert base.keys() == trained.keys() and any(not torch.equal(base[k], trained[k]) for k in base), name
        assert (out / "checkpoint-2" / name / "config.json").is_file()
    assert runs["full_trainer"].accelerator.ddp_handler.find_unused_parameters
    groups = runs["full_trainer"].optimizer.param_groups
    assert len(groups) == 3 and {g["lr"] for g in groups} == {1e-3}  # text_encoder_lr unset: the UNet's
    images = pipeline(PROMPT, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_full_resume_restores_both_encoders(runs: dict) -> None:
    from safetensors.torch import load_file

    for name in ("unet/diffusion_pytorch_model", *(f"{e}/model" for e in ENCODERS)):
        want = load_file(runs["full"] / "checkpoint-2" / f"{name}.safetensors")
        got = load_file(runs["full_resumed"] / f"{name}.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


# --- refusals -------------------------------------------------------------------------------------------------------

def test_precomputed_embeddings_cannot_train_the_encoders(sdxl_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "train_dreambooth_lora_sdxl.py", f"--pretrained_model_name_or_path={sdxl_dir}",
                 f"--output_dir={tmp_path / 'out'}", f"--instance_data_dir={tmp_path}", *ARGS,
                 "--pre_compute_text_embeddings"]) == 2
    err = capsys.readouterr().err
    assert "--train_text_encoder" in err and "--pre_compute_text_embeddings" in err and "Traceback" not in err
