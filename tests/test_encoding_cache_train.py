"""Disk caches in real runs of both backends: a repeated run encodes nothing, a changed image re-encodes only
itself, and what one backend wrote the other reads (counted from the runs' "encoded N, read M" log lines)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

PROMPT = "a photo of sks toy"
IMAGES = 3
_SUMMARY = re.compile(r"^(VAE latents|text embeddings): encoded (\d+), read (\d+) from the disk cache")


def _write_image(path: Path, seed: int) -> None:
    """A 40 x 40 image: at resolution 32 it resizes to one 32 x 32 crop (offset (0, 0)) on both backends."""
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


class _Infos(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _Counts:
    """The disk-cache counts the code inside logs: {"VAE latents": (encoded, read), "text embeddings": ...}."""

    def __enter__(self) -> dict[str, tuple[int, int]]:
        self.handler, self.counts = _Infos(), {}
        logging.getLogger("jaxbooth").addHandler(self.handler)
        return self.counts

    def __exit__(self, *exc) -> None:
        logging.getLogger("jaxbooth").removeHandler(self.handler)
        for message in self.handler.messages:
            if match := _SUMMARY.match(message):
                self.counts[match.group(1)] = (int(match.group(2)), int(match.group(3)))


def _run(backend: str, args: list[str], out: Path) -> dict[str, tuple[int, int]]:
    """One CLI run in this process, and its disk-cache counts."""
    from jaxbooth.cli import main

    with _Counts() as counts:
        assert main(["train", f"--backend={backend}", f"--output_dir={out}", *args]) == 0
    return counts


def _jax_caches(flags: dict, model: Path, disk: bool) -> tuple[dict[str, tuple[int, int]], object]:
    """The JAX run's encode phase alone (``caches.build_caches``: what a third training run would encode)."""
    from jaxbooth import data, spec
    from jaxbooth.jax_backend import caches
    from tests._loaded import loaded_models

    run_spec = spec.load_spec_from_dict({**flags, "cache_latents_to_disk": disk, "cache_text_embeddings_to_disk": disk})
    with _Counts() as counts:
        built = caches.build_caches(run_spec, loaded_models(model), data.dataset_from_spec(run_spec), seed=0)
    return counts, built


@pytest.fixture(scope="module")
def cache_runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """torch twice, then JAX on torch's cache; image 0 rewritten, the JAX encode phase again (and once without
    the cache, for the values); image 1 rewritten, torch again.

    Every run sets --cache_latents_to_disk, --cache_text_embeddings_to_disk and --encoding_cache_dir, and takes
    all three images in its one step (batch 3), so each run needs every image's latents and the one prompt's
    embeddings."""
    import torch

    root = tmp_path_factory.mktemp("encoding-cache")
    images = root / "images"
    images.mkdir()
    for i in range(IMAGES):
        _write_image(images / f"{i}.png", seed=i)
    flags = {"pretrained_model_name_or_path": str(tiny_model_dir), "instance_data_dir": str(images),
             "instance_prompt": PROMPT, "resolution": 32, "train_batch_size": IMAGES, "max_train_steps": 1,
             "center_crop": True, "seed": 0, "learning_rate": 1e-4, "lr_warmup_steps": 0, "report_to": "none",
             "checkpointing_steps": 1000, "encoding_cache_dir": str(root / "cache")}
    args = [f"--{key}={value}" for key, value in flags.items()] + ["--cache_latents_to_disk",
                                                                   "--cache_text_embeddings_to_disk"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a shared 2-core box spin (see tests/torch_backend/conftest.py)
    try:
        runs = {"torch 1": _run("torch", args, root / "t1"), "torch 2": _run("torch", args, root / "t2"),
                "jax 1": _run("jax", args, root / "j1")}
        _write_image(images / "0.png", seed=100)
        runs["jax 2"], cached = _jax_caches(flags, tiny_model_dir, disk=True)
        _, fresh = _jax_caches(flags, tiny_model_dir, disk=False)
        _write_image(images / "1.png", seed=101)
        runs["torch 3"] = _run("torch", args, root / "t3")
    finally:
        torch.set_num_threads(threads)
    return {"runs": runs, "cache": root / "cache", "cached": cached, "fresh": fresh}


def test_a_repeated_run_encodes_nothing(cache_runs: dict) -> None:
    runs = cache_runs["runs"]
    assert runs["torch 1"] == {"VAE latents": (IMAGES, 0), "text embeddings": (1, 0)}, runs
    assert runs["torch 2"] == {"VAE latents": (0, IMAGES), "text embeddings": (0, 1)}, runs


def test_jax_reads_the_cache_torch_wrote_without_encoding(cache_runs: dict) -> None:
    runs = cache_runs["runs"]
    assert runs["jax 1"] == {"VAE latents": (0, IMAGES), "text embeddings": (0, 1)}, runs


def test_a_changed_image_re_encodes_only_itself_on_either_backend(cache_runs: dict) -> None:
    runs = cache_runs["runs"]
    assert runs["jax 2"] == {"VAE latents": (1, IMAGES - 1), "text embeddings": (0, 1)}, runs
    # torch reads image 0's new entry, which the JAX run wrote
    assert runs["torch 3"] == {"VAE latents": (1, IMAGES - 1), "text embeddings": (0, 1)}, runs
    entries = list((cache_runs["cache"] / "latents").rglob("*.npz"))
    assert len(entries) == IMAGES + 2  # the old entries stay (another run may still want them)


def test_entries_torch_wrote_are_what_the_jax_encoders_give(cache_runs: dict) -> None:
    """Images 1 and 2 and the prompt came from the first torch run's entries; JAX encoding them afresh agrees
    to the backends' VAE / CLIP parity (tests/jax_backend/models: 1e-4 relative)."""
    cached, fresh = cache_runs["cached"], cache_runs["fresh"]
    for name in ("latent_mean", "latent_std", "text_embeddings"):
        np.testing.assert_allclose(cached.frozen[name], fresh.frozen[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert not np.array_equal(cached.frozen["latent_mean"], fresh.frozen["latent_mean"])  # torch's numbers, not JAX's


def test_jax_encodes_only_misses_per_bucket_shape_and_each_key_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rows of two shapes (aspect-ratio buckets) and a repeated key: every miss encoded once, in fixed-shape
    padded batches, equal to the plain stream's; a second pass reads everything."""
    from jaxbooth import encoding_cache as ec
    from jaxbooth.jax_backend import encode
    from tests._loaded import loaded_models

    models = loaded_models(tiny_model_dir)
    rng = np.random.default_rng(0)
    square = [rng.uniform(-1, 1, (32, 32, 3)).astype(np.float32) for _ in range(2)]
    wide = [rng.uniform(-1, 1, (32, 48, 3)).astype(np.float32)]
    rows = [("a", square[0]), ("w", wide[0]), ("b", square[1]), ("a", square[0])]
    store = ec.EncodingStore(tmp_path, ec.LATENTS, "vae")
    got = encode.encode_pixel_rows_cached(models.vae, models.vae_params, rows, store)
    assert (store.encoded, store.read) == (3, 0)
    want_square = encode.encode_pixel_stream(models.vae, models.vae_params, square)
    want_wide = encode.encode_pixel_stream(models.vae, models.vae_params, wide)
    for (mean, std), want in zip(got, [(0, want_square), (0, want_wide), (1, want_square), (0, want_square)],
                                 strict=True):
        row, (want_mean, want_std) = want
        np.testing.assert_allclose(mean, want_mean[row], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std, want_std[row], rtol=1e-5, atol=1e-6)
    again = ec.EncodingStore(tmp_path, ec.LATENTS, "vae")
    mean, _ = encode.encode_pixel_stream_cached(models.vae, models.vae_params, rows[::2], again)
    assert (again.encoded, again.read) == (0, 2)
    np.testing.assert_array_equal(mean, np.stack([got[0][0], got[2][0]]))


def test_sdxl_prompt_embeddings_torch_writes_and_jax_reads(tmp_path: Path) -> None:
    """SDXL: torch's SdxlTextConditioner stores both encoders' embeddings and the pooled one; the JAX encode reads
    them with nothing encoded (same keys and encoder identity) and they match its own to CLIP parity."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from jaxbooth import spec as spec_lib
    from jaxbooth.jax_backend import encode, loading
    from jaxbooth.text import load_tokenizer, make_tokenize_fn
    from jaxbooth.torch_backend import inputs
    from tests._sdxl_pipeline import write_sdxl_pipeline

    model = write_sdxl_pipeline(tmp_path / "sdxl")
    spec = spec_lib.load_spec_from_dict({"pretrained_model_name_or_path": str(model), "encoding_cache_dir":
                                         str(tmp_path / "cache"), "cache_text_embeddings_to_disk": True})
    prompts = ["a photo of sks dog", "a dog"]
    tokenize_fns = tuple(make_tokenize_fn(load_tokenizer(model, subfolder=name)) for name in ("tokenizer",
                                                                                            "tokenizer_2"))
    encoders = (CLIPTextModel.from_pretrained(model / "text_encoder").eval(),
                CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2").eval())
    _, torch_store = inputs.disk_stores(spec, model_dir=model, vae_dir=None, vae_dtype=torch.float32,
                                        text_dtype=torch.float32, is_sdxl=True)
    inputs.SdxlTextConditioner(encoders, tokenize_fns, torch.device("cpu"), resolution=64,
                               disk=torch_store).precompute(prompts)
    assert (torch_store.encoded, torch_store.read) == (2, 0)
    _, reread = inputs.disk_stores(spec, model_dir=model, vae_dir=None, vae_dtype=torch.float32,
                                   text_dtype=torch.float32, is_sdxl=True)
    without_encoders = inputs.SdxlTextConditioner((None, None), tokenize_fns, torch.device("cpu"), resolution=64,
                                                  disk=reread)
    embeds, pooled = without_encoders.embeddings(prompts)
    assert (reread.encoded, reread.read) == (0, 2) and embeds.shape[0] == pooled.shape[0] == 2

    models = loading.load_models(spec, loading.resolve_model_paths(spec))
    _, jax_store = encode.disk_stores(spec, models)
    args = ((models.text_encoder, models.text_encoder_2), (models.text_params, models.text_params_2), tokenize_fns,
            prompts)
    read = encode.encode_sdxl_prompts(*args, disk=jax_store)
    assert (jax_store.encoded, jax_store.read) == (0, 2)
    for got, want, torch_got in zip(read, encode.encode_sdxl_prompts(*args), (embeds, pooled), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got, torch_got.numpy())
