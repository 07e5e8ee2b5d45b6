"""The JAX half of the built-in tiny pipeline: random weights from the Flax initialisers."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxbooth import tiny
from jaxbooth.jax_backend.tiny_weights import COMPONENTS, write_random_components
from jaxbooth.text import write_tiny_clip_tokenizer


def test_components_are_those_of_the_tiny_pipeline_byte_for_byte(tiny_model_dir: Path, tmp_path: Path) -> None:
    vocab_size = write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    configs = {"unet": tiny.unet_config("tiny"), "vae": tiny.vae_config("tiny"),
               "text_encoder": tiny.clip_config("tiny", vocab_size)}
    write_random_components(tmp_path, configs, seed=0)  # the fixture's size and seed
    for component in COMPONENTS:
        files = sorted(p.name for p in (tiny_model_dir / component).iterdir())
        assert files == sorted(p.name for p in (tmp_path / component).iterdir())
        for name in files:
            assert (tmp_path / component / name).read_bytes() == (tiny_model_dir / component / name).read_bytes()


def test_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="text_encoder"):
        write_random_components(tmp_path, {"unet": tiny.unet_config("tiny"), "vae": tiny.vae_config("tiny")}, 0)
