"""Latent and text-embedding caches give what encoding every step gives (up to float rounding)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from jaxbooth import data
from jaxbooth.text import load_tokenizer, make_tokenize_fn
from jaxbooth.torch_backend.inputs import LatentCache, TextConditioner


@pytest.fixture(scope="module")
def batches() -> list[dict]:
    dataset = data.make_dreambooth_dataset(data.example_instance_dir(), data.EXAMPLE_INSTANCE_PROMPT)
    iterator = data.BatchIterator(dataset, resolution=64, batch_size=2, seed=0, center_crop=True)
    return [next(iterator) for _ in range(6)]


def test_latent_cache_equals_encoding_every_step(tiny_model_dir: Path, batches: list[dict]) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae").eval()
    cached = LatentCache(vae, torch.device("cpu"), torch.float32, enabled=True)
    fresh = LatentCache(vae, torch.device("cpu"), torch.float32, enabled=False)
    for batch in batches:
        for got, want in zip(cached.posterior(batch), fresh.posterior(batch), strict=True):
            # the cache encodes one image per call; a batched call rounds differently (~1e-5)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    assert len(cached) == 5  # five example images, each encoded once over three epochs
    assert cached.posterior(batches[0])[0].shape == (2, 4, 32, 32)


def test_text_conditioner_caches_frozen_embeddings_and_frees_the_encoder(tiny_model_dir: Path) -> None:
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval()
    tokenize = make_tokenize_fn(load_tokenizer(tiny_model_dir), 16)
    frozen = TextConditioner(encoder, tokenize, torch.device("cpu"), trained=False, use_attention_mask=True)
    frozen.precompute(["a photo of sks toy", ""])
    frozen.free_encoder()
    got = frozen.embeddings(["a photo of sks toy", "a photo of sks toy"])
    assert got.shape == (2, 16, 32)
    live = TextConditioner(encoder, tokenize, torch.device("cpu"), trained=True, use_attention_mask=True)
    with torch.no_grad():
        torch.testing.assert_close(got, live.embeddings(["a photo of sks toy"] * 2))
    with pytest.raises(RuntimeError, match="not precomputed"):
        frozen.embeddings(["another prompt"])
    ids, mask = tokenize(["a photo of sks toy"])
    assert np.asarray(mask).sum() < 16  # padding exists, so the mask matters



def test_precomputed_embeddings_cover_every_caption_a_row_can_draw(tiny_model_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--pre_compute_text_embeddings frees the encoder, so every shuffle and the dropped caption are encoded
    up front; past the limit of tag orders it is refused, naming the flags, instead of failing mid-run."""
    from jaxbooth import spec as spec_lib
    from jaxbooth.errors import JaxboothError
    from jaxbooth.torch_backend import train

    encoded: list[set] = []

    class Conditioner:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def precompute(self, prompts) -> None:
            encoded.append(set(prompts))

        def free_encoder(self) -> None:
            pass

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    spec = spec_lib.replace_flat(spec_lib.load_spec_from_dict({}), pre_compute_text_embeddings=True)
    run = SimpleNamespace(spec=spec, model_dir=tiny_model_dir)
    models = SimpleNamespace(text_encoder=None)
    monkeypatch.setattr(train, "TextConditioner", Conditioner)
    subset = data.Subset(folder, "sks, dog, red, ball", shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.1)
    train.make_text_conditioner(run, models, None, data.make_dataset([subset]), "cpu")
    assert encoded[0] == {"", *(f"sks, {', '.join(tags)}" for tags in itertools.permutations(["dog", "red", "ball"]))}
    many = data.Subset(folder, ", ".join(f"tag{k}" for k in range(9)), shuffle_caption=True)
    with pytest.raises(JaxboothError, match="--pre_compute_text_embeddings.*--shuffle_caption"):
        train.make_text_conditioner(run, models, None, data.make_dataset([many]), "cpu")
