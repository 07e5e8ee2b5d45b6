"""Aspect-ratio buckets end to end (``--enable_bucket``) on the tiny pipeline: a folder of three aspect
ratios trains with one shape a batch and no image cropped to a square; JAX compiles one step per bucket
used and resumes exactly across a bucket change; torch batches come in the buckets' shapes."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.jax_backend.test_train import losses, unet_weights

# (h, w): three image shapes, two buckets (48x80 and 64x64), so a run compiles two steps; seed 2 visits
# 48x80, 48x80, 64x64 in its first three steps (a bucket change across a resume at step 2)
SIZES = [(48, 96), (60, 100), (48, 96), (64, 64), (64, 64)]
BUCKET_KEYS = ["--enable_bucket", "--min_bucket_reso=32", "--max_bucket_reso=128", "--bucket_reso_steps=16"]
BUCKET_ARGS = [*BUCKET_KEYS, "--resolution=64", "--train_batch_size=1", "--learning_rate=1e-3",
               "--lr_warmup_steps=0", "--seed=2", "--report_to=none", "--log_every_steps=1",
               "--instance_prompt=a photo of sks thing", "--random_flip"]
COMPILED = re.compile(r"compiled the train step for bucket (\d+)x(\d+)")


def mixed_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train(tiny_model_dir: Path, out: Path, images: Path, *extra: str) -> list[str]:
    from jaxbooth.cli import main

    handler = _Lines()
    logger = logging.getLogger("jaxbooth")
    logger.addHandler(handler)
    try:
        assert main(["train", "--backend=jax", f"--pretrained_model_name_or_path={tiny_model_dir}",
                     f"--output_dir={out}", f"--instance_data_dir={images}", *BUCKET_ARGS, *extra]) == 0
    finally:
        logger.removeHandler(handler)
    return handler.lines


@pytest.fixture(scope="module")
def jax_runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """3 steps straight (checkpoint at 2), then checkpoint-2 resumed for the last step; what each
    batch's step was compiled for, and the caches built."""
    from jaxbooth.jax_backend import bucket_steps, caches

    root = tmp_path_factory.mktemp("buckets_jax")
    images = mixed_folder(root / "images")
    shapes: list[tuple[int, int]] = []
    built: list = []
    real_call, real_build = bucket_steps.BucketSteps.__call__, caches.build_caches

    def call(self, state, frozen, batch):
        shapes.append(self.current)
        return real_call(self, state, frozen, batch)

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bucket_steps.BucketSteps, "__call__", call)
        patch.setattr(caches, "build_caches", build)
        straight = _train(tiny_model_dir, root / "straight", images, "--max_train_steps=3", "--checkpointing_steps=2")
        resumed_dir = root / "resumed"
        resumed_dir.mkdir()
        shutil.copytree(root / "straight" / "checkpoint-2", resumed_dir / "checkpoint-2")
        resumed = _train(tiny_model_dir, resumed_dir, images, "--max_train_steps=3", "--checkpointing_steps=2",
                         "--resume_from_checkpoint=latest")
    return {"root": root, "shapes": shapes, "caches": built, "straight": straight, "resumed": resumed}


def test_jax_caches_one_latent_set_per_bucket_and_no_image_is_squared(jax_runs: dict) -> None:
    built = jax_runs["caches"][0]
    assert sorted(built.buckets) == [(48, 80), (64, 64)]
    for (h, w), bucket in built.buckets.items():
        assert bucket.arrays["latent_mean"].shape[1:3] == (h // 2, w // 2)  # the tiny VAE halves
        members = np.flatnonzero(bucket.latent_index.crops)
        for example in members:  # a square bucket holds only the square image
            size = SIZES[int(example)]
            assert (h == w) == (size[0] == size[1])


def test_jax_one_compile_per_bucket_and_exact_resume(jax_runs: dict) -> None:
    assert BUCKET_KEYS == ["--enable_bucket", "--min_bucket_reso=32", "--max_bucket_reso=128",
                           "--bucket_reso_steps=16"]  # what both runs set
    shapes = jax_runs["shapes"]
    straight, resumed = shapes[:3], shapes[3:]
    assert resumed == straight[2:]  # the resumed step is the straight run's third, in its bucket
    assert straight[2] != straight[1] and straight[0] == straight[1]  # a bucket change across the resume
    compiled = [tuple(map(int, m.groups())) for line in jax_runs["straight"] for m in [COMPILED.search(line)] if m]
    assert sorted(compiled) == sorted(set(straight)), "one compile per bucket shape used, none twice"
    summary = [tuple(map(int, m.groups())) for line in jax_runs["resumed"] for m in [COMPILED.search(line)] if m]
    assert summary == resumed
    root = jax_runs["root"]
    want, got = unet_weights(root / "straight"), unet_weights(root / "resumed")
    for key in want:
        np.testing.assert_array_equal(want[key], got[key], err_msg=key)
    np.testing.assert_allclose(losses(root / "resumed")[-1:], losses(root / "straight")[-1:], rtol=1e-6)


def test_jax_rows_train_on_the_row_captions(tmp_path: Path) -> None:
    """The JAX row plan draws each row's caption as the iterator does (centre crops: no crop draw on either
    side), a dropped one the cached empty prompt; past the cache limit the rows carry their token ids."""
    from jaxbooth import data
    from jaxbooth.jax_backend import caches

    images = mixed_folder(tmp_path / "images")
    dataset = data.make_dataset([data.Subset(images, "sks, red, round, shiny", shuffle_caption=True, keep_tokens=1,
                                             caption_dropout_rate=0.4)])
    it = data.BatchIterator(dataset, resolution=64, batch_size=5, seed=1, center_crop=True)
    prompts = caches.cached_prompts(dataset)
    assert len(prompts) == 1 + 6 and "" in prompts  # every order of the 3 shuffled tags, and the dropped caption
    index = caches.LatentIndex.from_counts([1] * len(dataset.examples), 1)
    table = {p: i for i, p in enumerate(prompts)}
    drawn = []
    for position in range(it.num_batches_per_epoch * 3):
        rows = caches.global_rows(it, 0, position % it.num_batches_per_epoch, table, index)
        drawn += [prompts[i] for i in rows["prompt_idx"]]
        assert drawn[-5:] == [str(c) for c in it.load_batch(0, position % it.num_batches_per_epoch)["caption"]]
    assert "" in drawn and len(set(drawn)) > 2
    many = data.make_dataset([data.Subset(images, ", ".join(f"t{i}" for i in range(9)), shuffle_caption=True)])
    assert caches.cached_prompts(many) is None  # 9! orders: the step encodes each row's ids
    it = data.BatchIterator(many, resolution=64, batch_size=5, seed=1, center_crop=True)
    rows = caches.global_rows(it, 0, 0, {p: 0 for p in ["t0"]}, index,
                              tokenize=lambda captions: {"input_ids": np.array([[len(c), hash(c) % 97]
                                                                                for c in captions])})
    captions = [str(c) for c in it.load_batch(0, 0)["caption"]]
    np.testing.assert_array_equal(rows["input_ids"], [[len(c), hash(c) % 97] for c in captions])


class _Stop(Exception):
    pass


SMALL = (40, 56)  # (h, w), under 64^2 pixels: bucket_no_upscale keeps it, in its own 32x48 bucket


def test_jax_no_upscale_caches(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A JAX run with --bucket_no_upscale up to its caches (VAE stood in by the pixels): the small image
    is cached at its own size's bucket, never enlarged; the large ones shrink to about 64^2 pixels."""
    from jaxbooth.cli import main
    from jaxbooth.jax_backend import caches, encode
    from tests._coverage_probes import _pixels_as_latents

    images = mixed_folder(tmp_path / "images")
    Image.new("RGB", SMALL[::-1], (200, 10, 10)).save(images / "small.png")
    built: list = []
    real = caches.build_caches

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        raise _Stop

    with pytest.MonkeyPatch.context() as patch, pytest.raises(_Stop):
        patch.setattr(caches, "build_caches", build)
        patch.setattr(encode, "encode_pixel_stream", _pixels_as_latents)
        main(["train", "--backend=jax", f"--pretrained_model_name_or_path={tiny_model_dir}",
              f"--output_dir={tmp_path / 'out'}", f"--instance_data_dir={images}", *BUCKET_ARGS,
              "--bucket_no_upscale"])
    cached = built[0].buckets
    assert sorted(cached) == [(32, 48), (32, 64), (48, 80), (64, 64)]
    small = sorted(images.iterdir()).index(images / "small.png")
    index = cached[(32, 48)].latent_index
    assert np.flatnonzero(index.crops).tolist() == [small]
    assert (index.original_sizes == SMALL).all()
    assert cached[(32, 48)].arrays["latent_mean"].shape[1:3] == (32, 48)  # pixels as latents: a 32x48 crop
    for bucket in cached.values():
        rows = bucket.latent_index
        assert (rows.crops_top_left[:, 0] < 16).all() and (rows.crops_top_left[:, 1] < 16).all()  # minimal crops


@pytest.mark.requires_torch
@pytest.mark.parametrize("no_upscale", [False, True], ids=["upscale", "bucket_no_upscale"])
def test_torch_batches_in_bucket_shapes(tiny_model_dir: Path, tmp_path: Path, no_upscale: bool) -> None:
    """Torch steps: each batch one bucket shape (the pixels the UNet trained on), none squared; with
    --bucket_no_upscale (an epoch, so every image comes) no image is enlarged."""
    pytest.importorskip("torch")
    from jaxbooth.cli import main
    from jaxbooth.torch_backend import train as torch_train

    assert BUCKET_KEYS == ["--enable_bucket", "--min_bucket_reso=32", "--max_bucket_reso=128",
                           "--bucket_reso_steps=16"]  # what the run sets

    images = mixed_folder(tmp_path / "images")
    if no_upscale:
        Image.new("RGB", SMALL[::-1], (200, 10, 10)).save(images / "small.png")
    batches: list[dict] = []
    real = torch_train.make_iterator

    def make_iterator(*args, **kwargs):
        iterator = real(*args, **kwargs)
        load = iterator.load_batch

        def spy(epoch: int, position: int) -> dict:
            batches.append(load(epoch, position))
            return batches[-1]

        iterator.load_batch = spy
        return iterator

    extra = ["--bucket_no_upscale", "--max_train_steps=6"] if no_upscale else ["--max_train_steps=3"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_train, "make_iterator", make_iterator)
        assert main(["train", "--backend=torch", f"--pretrained_model_name_or_path={tiny_model_dir}",
                     f"--output_dir={tmp_path / 'out'}", f"--instance_data_dir={images}", *BUCKET_ARGS,
                     *extra]) == 0
    assert len(batches) >= (6 if no_upscale else 3)
    for batch in batches:
        h, w = batch["pixel_values"].shape[1:3]
        assert (batch["target_size"] == (h, w)).all()
        assert (batch["resized_size"] >= (h, w)).all()  # covers the bucket, and is cropped minimally:
        if no_upscale:  # ... by less than bucket_reso_steps on each side
            assert (batch["resized_size"] - (h, w) < 16).all()
        else:  # ... only along the side that overhangs
            assert (batch["resized_size"] == (h, w)).any(axis=1).all()
        for size in batch["original_size"]:
            assert (h == w) == (size[0] == size[1])
        if no_upscale:
            assert (batch["resized_size"] <= batch["original_size"]).all()  # never enlarged
        else:
            assert (h, w) in {(48, 80), (64, 64)}
    assert len({b["pixel_values"].shape for b in batches}) > 1
    if no_upscale:
        assert (40, 56) in {tuple(size) for b in batches for size in b["original_size"]}
