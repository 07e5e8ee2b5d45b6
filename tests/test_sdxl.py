"""Shared SDXL conditioning (jaxbooth.sdxl): time-id layout, the flipped-crop offset, family detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import data, sdxl


def test_time_ids_are_original_then_crop_then_target_per_row() -> None:
    ids = sdxl.add_time_ids([[480, 640], [64, 64]], [[0, 37], [0, 0]], 64)
    assert ids.dtype == np.float32 and ids.shape == (2, 6)
    np.testing.assert_array_equal(ids, [[480, 640, 0, 37, 64, 64], [64, 64, 0, 0, 64, 64]])
    with pytest.raises(ValueError, match="2 original sizes but 1 crop"):
        sdxl.add_time_ids([[1, 2], [3, 4]], [[0, 0]], 64)


@pytest.fixture(scope="module")
def stock_sdxl(tmp_path_factory: pytest.TempPathFactory):
    """A tiny SDXL pipeline written and loaded by stock diffusers."""
    pytest.importorskip("torch")
    from diffusers import StableDiffusionXLPipeline

    from tests._sdxl_pipeline import write_sdxl_pipeline

    folder = write_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")
    return folder, StableDiffusionXLPipeline.from_pretrained(folder)


@pytest.mark.requires_torch
def test_time_ids_match_diffusers_pipeline_add_time_ids(stock_sdxl) -> None:
    import torch

    _, pipe = stock_sdxl
    theirs = pipe._get_add_time_ids((480, 640), (3, 37), (64, 64), dtype=torch.float32,
                                    text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    np.testing.assert_array_equal(theirs.numpy(), sdxl.add_time_ids([[480, 640]], [[3, 37]], 64))


def wide_image(path: Path, size: tuple[int, int] = (96, 64)) -> Path:
    """A wide image whose columns all differ, so a crop is identified by its pixels."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_a_mirrored_crop_is_the_crop_diffusers_records_after_flipping(tmp_path: Path) -> None:
    """diffusers resizes, flips, then crops, and records that crop's offset; a cache that mirrors
    a crop of the unflipped image must record the offset flipped_crop_top_left gives."""
    path = wide_image(tmp_path / "wide.png")
    resized, original = data.load_resized(path, 64)
    assert original == (64, 96) and resized.width == 96
    for seed in range(4):
        pixels, offset = data.crop_pixels(resized, 64, center_crop=False, crop_rng=np.random.default_rng(seed))
        mirrored_offset = sdxl.flipped_crop_top_left(offset, resized.width, 64)
        flipped = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = mirrored_offset[1]
        expected = np.asarray(flipped.crop((left, 0, left + 64, 64)), np.float32) / 255.0 * 2.0 - 1.0
        np.testing.assert_allclose(pixels[:, ::-1], expected, atol=1e-6)
    # and the shared loader, flipping first, records exactly that offset for that mirrored crop
    for seed in range(4):
        got, size, crop = data.load_image_with_info(path, 64, center_crop=False, flip=True,
                                                    crop_rng=np.random.default_rng(seed))
        unflipped_left = resized.width - 64 - crop[1]
        again = np.asarray(resized.crop((unflipped_left, 0, unflipped_left + 64, 64)), np.float32) / 255.0 * 2 - 1
        np.testing.assert_allclose(got, again[:, ::-1], atol=1e-6)
        assert sdxl.flipped_crop_top_left((0, unflipped_left), resized.width, 64) == crop


def test_sdxl_pipelines_are_recognised_from_model_index_json(tmp_path: Path) -> None:
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert sdxl.is_sdxl_pipeline(tmp_path / "xl") and not sdxl.is_sdxl_pipeline(tmp_path / "sd")
    assert not sdxl.is_sdxl_pipeline(tmp_path / "missing")


PROMPTS = ["a photo of sks dog", "a dog"]


def diffusers_conditioning(pipe) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    return embeds.numpy(), pooled.numpy()


def assert_close_relative(ours: np.ndarray, theirs: np.ndarray, tolerance: float = 1e-4) -> None:
    assert ours.shape == theirs.shape
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= tolerance * scale, (np.abs(ours - theirs).max(), scale)


@pytest.mark.requires_torch
def test_jax_sdxl_conditioning_equals_diffusers_encode_prompt(stock_sdxl) -> None:
    from jaxbooth.jax_backend import encode, pretrained
    from jaxbooth.jax_backend.models import clip
    from jaxbooth.text import load_tokenizer, make_tokenize_fn

    folder, pipe = stock_sdxl
    encoders, params, tokenizers = [], [], []
    for component, tokenizer in zip(sdxl.TEXT_ENCODERS, sdxl.TOKENIZERS, strict=True):
        config, _, weights = pretrained.load_pretrained(folder, component)
        encoders.append(clip.make_text_encoder(config, with_projection=config.has_projection))
        params.append(weights)
        tokenizers.append(make_tokenize_fn(load_tokenizer(folder, subfolder=tokenizer)))
    embeds, pooled = encode.encode_sdxl_prompts(tuple(encoders), tuple(params), tuple(tokenizers), PROMPTS)
    theirs_embeds, theirs_pooled = diffusers_conditioning(pipe)
    assert_close_relative(np.asarray(embeds), theirs_embeds)
    assert_close_relative(np.asarray(pooled), theirs_pooled)


@pytest.mark.requires_torch
def test_torch_sdxl_conditioning_equals_diffusers_encode_prompt(stock_sdxl) -> None:
    import torch

    from jaxbooth.text import make_tokenize_fn
    from jaxbooth.torch_backend.inputs import encode_sdxl_prompt

    _, pipe = stock_sdxl
    ids = tuple(torch.from_numpy(make_tokenize_fn(tokenizer)(PROMPTS)[0]).long()
                for tokenizer in (pipe.tokenizer, pipe.tokenizer_2))
    with torch.no_grad():
        embeds, pooled = encode_sdxl_prompt((pipe.text_encoder, pipe.text_encoder_2), ids)
    theirs_embeds, theirs_pooled = diffusers_conditioning(pipe)
    assert_close_relative(embeds.numpy(), theirs_embeds, 1e-6)
    assert_close_relative(pooled.numpy(), theirs_pooled, 1e-6)


@pytest.mark.requires_torch
def test_generate_takes_an_sdxl_pipeline_and_merges_a_lora_into_both_text_encoders(stock_sdxl,
                                                                                   tmp_path: Path) -> None:
    """`jaxbooth generate` samples SDXL (tests/jax_backend/test_sdxl_sample.py): a pipeline loads as stored,
    and a LoRA on an SDXL base merges into the UNet and both text encoders, nothing else."""
    import jax

    from jaxbooth.jax_backend import lora_loading, pretrained
    from tests.jax_backend.test_sdxl_sample import sdxl_lora

    folder, _ = stock_sdxl
    plain = lora_loading.generate_source(str(folder))
    assert plain.model_dir == folder and plain.load is pretrained.load_pretrained
    merged = lora_loading.generate_source(str(sdxl_lora(folder, tmp_path / "lora")))
    assert merged.model_dir == folder
    for component in ("unet", *sdxl.TEXT_ENCODERS, "vae"):
        base, ours = (jax.tree.leaves(load(folder, component)[2]) for load in (pretrained.load_pretrained, merged.load))
        changed = any(not np.array_equal(a, b) for a, b in zip(base, ours, strict=True))
        assert changed == (component != "vae"), component


@pytest.mark.parametrize("options", [{"tokenizer_max_length": 16},
                                     {"text_encoder_use_attention_mask": True}, {"skip_save_text_encoder": True}])
def test_both_backends_refuse_the_same_sdxl_options_from_one_list(options: dict) -> None:
    from jaxbooth.spec import load_spec_from_dict

    (key,) = options
    assert sdxl.option_problems(load_spec_from_dict({})) == []
    (problem,) = sdxl.option_problems(load_spec_from_dict(options))
    assert problem.startswith(f"--{key}:") and f"Drop --{key}" in problem
    assert sdxl.option_problems(load_spec_from_dict({"train_text_encoder": True})) == []  # both backends train it


def test_latent_statistics_are_both_or_neither_per_channel() -> None:
    from jaxbooth.errors import JaxboothError

    assert sdxl.latent_statistics(None, None, 4, "vae/config.json") is None
    mean, std = sdxl.latent_statistics([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4], 4, "vae/config.json")
    assert mean.dtype == np.float32 and std.tolist() == [1, 2, 3, 4]
    with pytest.raises(JaxboothError, match="vae/config.json: the VAE sets only one"):
        sdxl.latent_statistics([0.0] * 4, None, 4, "vae/config.json")
    with pytest.raises(JaxboothError, match="need 4 values"):
        sdxl.latent_statistics([0.0] * 3, [1.0] * 3, 4, "vae/config.json")
    assert sdxl.latent_shift(0.1159, is_sdxl=True) == 0.0 and sdxl.latent_shift(0.1159, is_sdxl=False) == 0.1159
