"""The seed guide's four DeepFloyd IF command lines, as written, and what the IF tests share to run them.

The commands are copied from the guide's DeepFloyd IF section (``accelerate launch`` / ``python`` and the
script name included); ``seed_argv`` substitutes the ``$VARIABLES`` with local paths and replaces only the
step counts a test names, so every other flag runs as the guide gives it.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

STAGE1_LORA = r"""
accelerate launch train_dreambooth_lora.py \
  --report_to wandb \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --output_dir=$OUTPUT_DIR \
  --instance_prompt="a sks dog" \
  --resolution=64 \
  --train_batch_size=4 \
  --gradient_accumulation_steps=1 \
  --learning_rate=5e-6 \
  --scale_lr \
  --max_train_steps=1200 \
  --validation_prompt="a sks dog" \
  --validation_epochs=25 \
  --checkpointing_steps=100 \
  --pre_compute_text_embeddings \
  --tokenizer_max_length=77 \
  --text_encoder_use_attention_mask
"""

STAGE2_LORA = r"""
python train_dreambooth_lora.py \
    --report_to wandb \
    --pretrained_model_name_or_path=$MODEL_NAME \
    --instance_data_dir=$INSTANCE_DIR \
    --output_dir=$OUTPUT_DIR \
    --instance_prompt="a sks dog" \
    --resolution=256 \
    --train_batch_size=4 \
    --gradient_accumulation_steps=1 \
    --learning_rate=1e-6 \
    --max_train_steps=2000 \
    --validation_prompt="a sks dog" \
    --validation_epochs=100 \
    --checkpointing_steps=500 \
    --pre_compute_text_embeddings \
    --tokenizer_max_length=77 \
    --text_encoder_use_attention_mask \
    --validation_images $VALIDATION_IMAGES \
    --class_labels_conditioning=timesteps
"""

STAGE1_FULL = r"""
accelerate launch train_dreambooth.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --output_dir=$OUTPUT_DIR \
  --instance_prompt="a photo of sks dog" \
  --resolution=64 \
  --train_batch_size=4 \
  --gradient_accumulation_steps=1 \
  --learning_rate=1e-7 \
  --max_train_steps=150 \
  --validation_prompt "a photo of sks dog" \
  --validation_steps 25 \
  --text_encoder_use_attention_mask \
  --tokenizer_max_length 77 \
  --pre_compute_text_embeddings \
  --use_8bit_adam \
  --set_grads_to_none \
  --skip_save_text_encoder \
  --push_to_hub
"""

STAGE2_FULL = r"""
accelerate launch train_dreambooth.py \
  --report_to wandb \
  --pretrained_model_name_or_path=$MODEL_NAME \
  --instance_data_dir=$INSTANCE_DIR \
  --output_dir=$OUTPUT_DIR \
  --instance_prompt="a sks dog" \
  --resolution=256 \
  --train_batch_size=2 \
  --gradient_accumulation_steps=6 \
  --learning_rate=5e-6 \
  --max_train_steps=2000 \
  --validation_prompt="a sks dog" \
  --validation_steps=150 \
  --checkpointing_steps=500 \
  --pre_compute_text_embeddings \
  --tokenizer_max_length=77 \
  --text_encoder_use_attention_mask \
  --validation_images $VALIDATION_IMAGES \
  --class_labels_conditioning timesteps \
  --push_to_hub
"""

STEP_COUNTS = ("max_train_steps", "validation_epochs", "validation_steps", "checkpointing_steps")


def seed_argv(command: str, variables: Mapping[str, str], **steps: int) -> list[str]:
    """``jaxbooth train`` arguments of a seed command: from the script name on, ``$VARIABLES`` replaced
    (``VALIDATION_IMAGES`` expands to several words, as in the shell) and the named step counts set."""
    text = command.replace("\\\n", " ")
    for name in sorted(variables, key=len, reverse=True):
        text = text.replace(f"${name}", variables[name])
    assert "$" not in text, f"unsubstituted variable in {text}"
    words = shlex.split(text)
    words = words[next(i for i, word in enumerate(words) if word.endswith(".py")):]
    for key, value in steps.items():
        assert key in STEP_COUNTS, f"{key} is not a step count"
        flag = f"--{key}"
        at = [i for i, word in enumerate(words) if word == flag or word.startswith(flag + "=")]
        assert len(at) == 1, f"{flag} is not in the command once"
        i = at[0]
        if words[i] == flag:
            words[i + 1] = str(value)
        else:
            words[i] = f"{flag}={value}"
    return words


def write_images(folder: Path, count: int, size: int, seed: int = 0, name: str = "{i}.png") -> list[Path]:
    """``count`` random RGB PNGs of ``size`` px (smooth, so box-downsampling keeps structure)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        paths.append(folder / name.format(i=i + 1))
        image.save(paths[-1])
    return paths


@contextlib.contextmanager
def fake_hub() -> Iterator[list]:
    """huggingface_hub's create_repo and upload_folder, recorded: yields [(repo id, folder)]."""
    import huggingface_hub

    uploads: list = []

    def create_repo(repo_id: str, **kwargs):
        return mock.Mock(repo_id=repo_id)

    def upload_folder(*, repo_id: str, folder_path: str, **kwargs) -> None:
        uploads.append((repo_id, Path(folder_path)))

    with mock.patch.object(huggingface_hub, "create_repo", create_repo), \
            mock.patch.object(huggingface_hub, "upload_folder", upload_folder):
        yield uploads


class TrainingSpy:
    """Records, per micro-step, the pixels the batch gave, the loss inputs, the UNet's input and output and the
    loss (wrapping ``loop.denoising_loss`` and ``PixelSource.posterior``), stage II's upscaler draws, the
    trainer, and VAE loads."""

    def __init__(self, mp: pytest.MonkeyPatch):
        from diffusers import AutoencoderKL

        from jaxbooth.torch_backend import inputs, loop, train

        self.calls: list[dict] = []
        self.pixels: list[tuple] = []
        self.vae_loads: list = []
        self.trainers: list = []
        self.upscaler_draws: list[tuple] = []
        real_draw = loop.draw_upscaler_inputs
        real_loss, real_posterior, real_loop = loop.denoising_loss, inputs.PixelSource.posterior, train.run_loop
        real_vae = AutoencoderKL.from_pretrained

        def denoising_loss(unet, x0, noise, timesteps, hidden, tables, options, **kwargs):
            record = {"x0": x0.detach().clone(), "noise": noise.detach().clone(), "timesteps": timesteps.clone(),
                      **{k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}}

            def spied_unet(sample, t, states, **unet_kwargs):
                out = unet(sample, t, states, **unet_kwargs)
                record.update(input=sample.detach().clone(), pred=out[0].detach().clone(),
                              unet_timesteps=t.detach().clone(), class_labels=unet_kwargs.get("class_labels"))
                return out

            loss, aux = real_loss(spied_unet, x0, noise, timesteps, hidden, tables, options, **kwargs)
            record["loss"] = loss.detach().clone()
            self.calls.append(record)
            return loss, aux

        def posterior(source, batch):
            pixels, std = real_posterior(source, batch)
            self.pixels.append((batch["pixel_values"].copy(), pixels.detach().clone(), std))
            return pixels, std

        def run_loop(trainer, start_step):
            self.trainers.append(trainer)
            return real_loop(trainer, start_step)

        def load_vae(*args, **kwargs):
            self.vae_loads.append(args)
            return real_vae(*args, **kwargs)

        def draw_upscaler_inputs(*args, **kwargs):
            levels, noise = real_draw(*args, **kwargs)
            self.upscaler_draws.append((levels.clone(), noise.clone()))
            return levels, noise

        mp.setattr(loop, "denoising_loss", denoising_loss)
        mp.setattr(loop, "draw_upscaler_inputs", draw_upscaler_inputs)
        mp.setattr(inputs.PixelSource, "posterior", posterior)
        mp.setattr(train, "run_loop", run_loop)
        mp.setattr(AutoencoderKL, "from_pretrained", load_vae)


@contextlib.contextmanager
def offline_wandb(folder: Path) -> Iterator[None]:
    """``--report_to wandb`` without a network: offline runs under ``folder/wandb``. wandb keeps its settings
    (the run folder among them) in a process-wide singleton, so it is torn down on entry and exit: each
    module's runs then land in that module's folder."""
    import wandb

    wandb.teardown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(folder))
        mp.setenv("WANDB_SILENT", "true")
        try:
            yield
        finally:
            wandb.teardown()


def run_seed(argv: list[str]) -> int:
    """``jaxbooth train <argv>`` in this process, through the real CLI entry point (backend auto)."""
    from jaxbooth.cli import main

    return main(["train", *argv])
