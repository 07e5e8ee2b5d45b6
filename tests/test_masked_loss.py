"""``--masked_loss``: the alpha channel weights the loss, through the same geometry as the pixels, on both backends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import diffusion, loss_options
from jaxbooth.cli import main
from jaxbooth.data import masks


def rgba(path: Path, alpha: np.ndarray, size: tuple[int, int]) -> Path:
    """An RGBA image of (h, w) ``size`` whose alpha is ``alpha`` resized (nearest) to it."""
    h, w = size
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    a = np.asarray(Image.fromarray(alpha.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST))
    Image.fromarray(np.dstack([rgb, a]), "RGBA").save(path)
    return path


def left_half_transparent(path: Path, size: tuple[int, int] = (64, 96)) -> Path:
    alpha = np.full(size, 255, np.uint8)
    alpha[:, : size[1] // 2] = 0
    return rgba(path, alpha, size)


def test_the_mask_follows_the_resize_flip_and_crop(tmp_path: Path) -> None:
    alpha = masks.alpha_channel(left_half_transparent(tmp_path / "a.png"))  # 64 x 96, left 48 columns clear
    resized = masks.short_side_size((64, 96), 32)
    assert resized == (32, 48)
    left = masks.loss_mask(alpha, resized, (0, 0), (32, 32), False, interpolation="nearest")
    assert left.shape == (4, 4) and (left[:, :3] == 0).all() and (left[:, 3] == 1).all()
    right = masks.loss_mask(alpha, resized, (0, 16), (32, 32), False, interpolation="nearest")
    assert (right[:, :1] == 0).all() and (right[:, 1:] == 1).all()
    mirrored = masks.loss_mask(alpha, resized, (0, 0), (32, 32), True, interpolation="nearest")
    assert (mirrored[:, :2] == 1).all() and (mirrored[:, 3] == 0).all()  # the clear half is on the right now
    opaque = tmp_path / "b.png"
    Image.new("RGB", (40, 40), (10, 20, 30)).save(opaque)
    assert masks.alpha_channel(opaque) is None
    assert (masks.loss_mask(None, (32, 32), (0, 0), (32, 32), False, interpolation="bilinear") == 1).all()
    with pytest.raises(Exception, match="multiple of the VAE"):
        masks.loss_mask(None, (36, 36), (0, 0), (36, 36), False, interpolation="bilinear")


def test_batch_and_cache_masks_are_the_same_rows(tmp_path: Path) -> None:
    """The torch path (a batch's rows) and the JAX path (cache rows by example, orientation, crop) agree."""
    from jaxbooth.jax_backend import caches

    path = left_half_transparent(tmp_path / "a.png")
    dataset = type("D", (), {"examples": [type("E", (), {"path": path})()]})()
    index = caches.LatentIndex.from_counts([2], 2, original_sizes=np.array([[64, 96]] * 4),
                                           crops_top_left=np.array([[0, 0], [0, 16], [0, 16], [0, 0]]))
    cached = caches.loss_mask_array(dataset, index, (32, 32), lambda e: (32, 48), "nearest")
    assert cached.shape == (4, 4, 4, 1)
    batch = {"pixel_values": np.zeros((4, 32, 32, 3), np.float32), "original_size": np.array([[64, 96]] * 4),
             "crop_top_left": index.crops_top_left, "flipped": np.array([False, False, True, True])}
    from_batch = masks.batch_loss_masks([path] * 4, batch, resolution=32, interpolation="nearest")
    for row, (flipped, crop) in enumerate([(False, 0), (False, 1), (True, 0), (True, 1)]):
        assert index.row(0, flipped, crop) == row
        np.testing.assert_array_equal(cached[row, ..., 0], from_batch[row])


def test_the_mask_weights_the_per_element_loss() -> None:
    rng = np.random.default_rng(0)
    pred, x0, noise = (rng.standard_normal((2, 4, 4, 4)).astype(np.float32) for _ in range(3))
    t = np.array([10, 500])
    tables = diffusion.NoiseTables(*(np.asarray(x, np.float32) for x in (
        np.linspace(1.0, 0.1, 1000), np.linspace(0.05, 0.99, 1000), np.linspace(400.0, 0.01, 1000))))
    options = loss_options.LossOptions()
    plain, _ = loss_options.loss_from_prediction(pred, x0, noise, t, tables, options)
    ones, _ = loss_options.loss_from_prediction(pred, x0, noise, t, tables, options, np.ones((2, 4, 4, 1)))
    zeros, _ = loss_options.loss_from_prediction(pred, x0, noise, t, tables, options, np.zeros((2, 4, 4, 1)))
    half = np.ones((2, 4, 4, 1), np.float32)
    half[:, :, :2] = 0
    masked, _ = loss_options.loss_from_prediction(pred, x0, noise, t, tables, options, half)
    target = diffusion.training_target(x0, noise, t, tables, "epsilon")
    np.testing.assert_allclose(float(ones), float(plain), rtol=1e-6)
    assert float(zeros) == 0.0
    np.testing.assert_allclose(float(masked), float((((pred - target) ** 2) * half).mean()), rtol=1e-6)


@pytest.fixture(scope="module")
def clear_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clear")
    for k in range(2):
        rgba(folder / f"{k}.png", np.zeros((8, 8), np.uint8), (48, 40))
    return folder


@pytest.mark.parametrize("backend", ["jax", pytest.param("torch", marks=pytest.mark.requires_torch)])
def test_a_fully_transparent_subject_trains_on_nothing(backend: str, clear_images: Path, tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    """Every pixel clear: the masked loss is exactly 0 on both backends (unmasked it is not)."""
    if backend == "torch":
        pytest.importorskip("torch")
    out = tmp_path / "out"
    assert main(["train", f"--backend={backend}", f"--pretrained_model_name_or_path={tiny_model_dir}",
                 f"--output_dir={out}", f"--instance_data_dir={clear_images}", "--instance_prompt=a photo of sks toy",
                 "--resolution=32", "--train_batch_size=1", "--max_train_steps=1", "--lr_warmup_steps=0",
                 "--report_to=none", "--log_every_steps=1", "--checkpointing_steps=100", "--random_flip",
                 "--masked_loss"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train/loss"] == 0.0, record
