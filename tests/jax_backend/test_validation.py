"""Validation images during training (`validation.py`) on the tiny pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxbooth import spec as spec_lib
from jaxbooth.jax_backend import validation
from jaxbooth.jax_backend.loaded import LoadedModels
from jaxbooth.jax_backend.schedulers import DDPMSampler
from jaxbooth.jax_backend.validation import Validator, image_grid, make_validator
from tests._loaded import loaded_models

PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path) -> LoadedModels:
    """The trainer's hand-off (host params)."""
    return loaded_models(tiny_model_dir)


@pytest.fixture(scope="module")
def unet_params(models: LoadedModels):
    """The UNet params as the loop holds them: on device."""
    return jax.device_put(models.unet_params)


@pytest.fixture(scope="module")
def validator(models: LoadedModels, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Validator:
    return Validator(model_dir=tiny_model_dir, output_dir=tmp_path_factory.mktemp("out"),
                     tokenizer=models.tokenizer, text_encoder=models.text_encoder, text_params=models.text_params,
                     unet=models.unet, vae_config=models.vae_config, vae_params=models.vae_params,
                     validation_prompt=PROMPT, num_validation_images=3, schedule=("steps", 5), seed=0,
                     num_inference_steps=2, scheduler_config=models.scheduler_config)


def test_run_writes_grid_singles_and_tensorboard_images(validator: Validator, unet_params) -> None:
    from jaxbooth.tensorboard import EventWriter

    writer = EventWriter(validator.out_dir.parent / "logs")
    with jax.transfer_guard("disallow"):  # as in the train loop: frozen params are placed explicitly
        grid = validator.run(10, unet_params, writer=writer)
    writer.close()
    assert grid == validator.out_dir / "step-10.png"  # validation_files' names, shared with torch
    assert validator.written == ["validation/step-10.png"]
    assert Image.open(grid).size == (128, 128)  # 3 images of 64 px in a 2 x 2 grid
    singles = sorted((validator.out_dir / "step-10").glob("*.png"))
    assert [p.name for p in singles] == ["0.png", "1.png", "2.png"]
    arrays = [np.asarray(Image.open(p)) for p in singles]
    assert all(a.shape == (64, 64, 3) for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1]), "validation images share their noise"
    events = list((validator.out_dir.parent / "logs").glob("events.out.tfevents.*"))
    assert events and max(p.stat().st_size for p in events) > 1000  # holds the encoded images
    assert validator.sampler.vae_params is None, "the VAE stayed on device after validation"


def test_params_given_at_run_time_are_the_ones_sampled(validator: Validator, models: LoadedModels,
                                                       unet_params) -> None:
    base = validator.generate(unet_params)
    again = validator.generate(unet_params)
    changed = jax.tree.map(lambda x: x * 1.5, unet_params)
    other = validator.generate(changed)
    assert np.array_equal(np.asarray(base[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(base[0]), np.asarray(other[0]))
    text_changed = jax.tree.map(lambda x: jax.device_put(np.asarray(x) * 0.5), models.text_params)
    assert not np.array_equal(np.asarray(base[0]), np.asarray(validator.generate(unet_params, text_changed)[0]))


def test_only_process_zero_writes(validator: Validator, unet_params, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    grid = validator.run(20, unet_params)
    assert not grid.exists() and not grid.with_suffix("").exists()


def test_should_run_follows_validation_steps_and_epochs(validator: Validator) -> None:
    assert [s for s in range(0, 16) if validator.should_run(s)] == [5, 10, 15]
    by_epoch = Validator.__new__(Validator)
    by_epoch.schedule = ("epochs", 2)
    assert [e for e in range(0, 8) if by_epoch.should_run(100, epochs_done=e)] == [1, 3, 5, 7]
    assert not by_epoch.should_run(100)  # mid-epoch


def test_validation_scheduler_is_kept_and_unknown_names_fail() -> None:
    assert validation.validation_sampler_name("DDPMScheduler") == "DDPMScheduler"  # no substitute
    assert validation.validation_sampler_name("DPMSolverMultistepScheduler") == "DPMSolverMultistepScheduler"
    with pytest.raises(Exception, match="did you mean"):
        validation.validation_sampler_name("DPMSolverMultistepSchedulr")
    config = validation.validation_scheduler_config({"variance_type": "learned_range", "beta_start": 0.1})
    assert config == {"variance_type": "fixed_small", "beta_start": 0.1}


def test_ddpm_validation_samples_ancestrally(models: LoadedModels, tiny_model_dir: Path, unet_params,
                                             tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """validation_scheduler=DDPMScheduler runs diffusers' ancestral DDPM, not a stand-in: the
    sampler is DDPM (its learned variance read as fixed_small, as log_validation does), nothing
    is noted on stderr, and the images are reproducible from the seed."""
    ddpm = Validator(model_dir=tiny_model_dir, output_dir=tmp_path, tokenizer=models.tokenizer,
                     text_encoder=models.text_encoder, text_params=models.text_params, unet=models.unet,
                     vae_config=models.vae_config, vae_params=models.vae_params, validation_prompt=PROMPT,
                     num_validation_images=2, validation_scheduler="DDPMScheduler", seed=0, num_inference_steps=2,
                     scheduler_config={**models.scheduler_config, "variance_type": "learned_range"})
    assert isinstance(ddpm.sampler.sampler(2), DDPMSampler)
    first, again = ddpm.generate(unet_params), ddpm.generate(unet_params)
    arrays = [np.asarray(image) for image in first]
    assert [a.shape for a in arrays] == [(64, 64, 3)] * 2 and not np.array_equal(arrays[0], arrays[1])
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(arrays, again, strict=True))
    assert "DDPM" not in capfd.readouterr().err


def test_image_grid_shape() -> None:
    tiles = [Image.new("RGB", (4, 3), (k * 40, 0, 0)) for k in range(5)]
    grid = image_grid(tiles)
    assert grid.size == (12, 6)  # 3 columns x 2 rows
    assert grid.getpixel((4, 0)) == (40, 0, 0) and grid.getpixel((8, 3)) == (0, 0, 0)  # last cell empty


def test_make_validator_from_the_loaded_models(models: LoadedModels, tiny_model_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_lib.load_spec([f"--pretrained_model_name_or_path={tiny_model_dir}"])
    assert make_validator(spec, models, output_dir=tmp_path, seed=0) is None
    spec = spec_lib.load_spec([f"--pretrained_model_name_or_path={tiny_model_dir}", f"--validation_prompt={PROMPT}",
                               "--validation_epochs=3", "--num_validation_images=2",
                               "--validation_scheduler=DDPMScheduler"])

    def no_second_load(*args, **kwargs):
        raise AssertionError("make_validator loaded the tokenizer again instead of using LoadedModels'")

    monkeypatch.setattr("jaxbooth.text.load_tokenizer", no_second_load)
    marked = {**models.scheduler_config, "steps_offset": 7}  # the hand-off's config is the one used
    made = make_validator(spec, dataclasses.replace(models, scheduler_config=marked), output_dir=tmp_path, seed=7,
                          mesh=None)
    assert made is not None and made.schedule == ("epochs", 3) and made.num_images == 2 and made.seed == 7
    assert made.sampler.sampler_name == "DDPMScheduler" and made.steps == 25
    assert made.sampler.scheduler_config["steps_offset"] == 7
    with pytest.raises(ValueError, match="vae_params"):
        make_validator(spec, dataclasses.replace(models, vae_params=None), output_dir=tmp_path, seed=0)
