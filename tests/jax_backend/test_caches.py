"""The latent cache: several random crops per non-square image (one with center_crop), picked per row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import data
from jaxbooth.jax_backend import caches
from jaxbooth.jax_backend.loading import load_models, resolve_model_paths
from jaxbooth.spec import load_spec_from_dict

RESOLUTION = 64


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path):
    spec = load_spec_from_dict({"pretrained_model_name_or_path": str(tiny_model_dir)})
    return load_models(spec, resolve_model_paths(spec))


def image_folder(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Noise images of the given (width, height): every crop offset shows different pixels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(folder / f"img{k}.png")
    return folder


def rows_used(dataset: data.Dataset, index: caches.LatentIndex, *, random_flip: bool, batches: int = 12) -> set[int]:
    iterator = data.BatchIterator(dataset, resolution=RESOLUTION, batch_size=1, seed=3, random_flip=random_flip)
    prompt_index = {example.caption: 0 for example in dataset.examples}
    positions = [(epoch, 0) for epoch in range(batches)]  # one image, one batch per epoch
    return {int(row) for epoch, position in positions
            for row in caches.global_rows(iterator, epoch, position, prompt_index, index)["example_idx"]}


@pytest.mark.parametrize("center_crop", [False, True])
def test_non_square_image_uses_several_crops_unless_center_crop(models, tmp_path: Path, center_crop: bool) -> None:
    dataset = data.make_dreambooth_dataset(image_folder(tmp_path / "img", [(96, 64)]), "a photo of sks toy")
    mean, std, index = caches.encode_latent_cache(models, dataset, resolution=RESOLUTION, center_crop=center_crop,
                                                  random_flip=False, seed=0)
    used = rows_used(dataset, index, random_flip=False)
    if center_crop:
        assert index.num_rows == 1 and used == {0}
        return
    assert index.num_rows == caches.CROPS_PER_IMAGE == len(mean) == len(std)
    assert len(used) > 1, "every training row got the same crop"
    latents = [mean[row] for row in sorted(used)]
    assert all(not np.allclose(latents[0], other) for other in latents[1:]), "the cached crops are the same"


def test_square_image_has_one_crop_and_flip_doubles_it(models, tmp_path: Path) -> None:
    dataset = data.make_dreambooth_dataset(image_folder(tmp_path / "img", [(80, 80), (64, 100)]), "a photo")
    mean, _, index = caches.encode_latent_cache(models, dataset, resolution=RESOLUTION, center_crop=False,
                                                random_flip=True, seed=0)
    assert index.crops.tolist() == [1, caches.CROPS_PER_IMAGE] and index.orientations == 2
    assert len(mean) == index.num_rows == 2 * (1 + caches.CROPS_PER_IMAGE)
    # the flipped row of the square image is the mirror image's latent, not the same one
    assert not np.allclose(mean[index.row(0, False, 0)], mean[index.row(0, True, 0)])


def test_crops_are_the_seeded_random_crops_of_the_image(tmp_path: Path) -> None:
    path = image_folder(tmp_path / "img", [(100, 64)]) / "img0.png"
    crops = caches.example_crops(path, RESOLUTION, center_crop=False, seed=7, index=2, interpolation="bilinear")
    again = caches.example_crops(path, RESOLUTION, center_crop=False, seed=7, index=2, interpolation="bilinear")
    other_seed = caches.example_crops(path, RESOLUTION, center_crop=False, seed=8, index=2, interpolation="bilinear")
    assert len(crops) == caches.CROPS_PER_IMAGE
    np.testing.assert_array_equal(np.stack(crops), np.stack(again))
    assert not np.array_equal(np.stack(crops), np.stack(other_seed))
    whole = np.asarray(Image.open(path), np.float32) / 127.5 - 1.0  # 64 px high already: no resize
    offsets = {int(np.argmin([np.abs(whole[:, x:x + RESOLUTION] - crop).max() for x in range(37)]))
               for crop in crops}
    assert len(offsets) == caches.CROPS_PER_IMAGE  # distinct offsets of the very image


def test_interpolation_mode_reaches_the_image_loader(tmp_path: Path) -> None:
    path = image_folder(tmp_path / "img", [(150, 120)]) / "img0.png"
    kwargs = dict(center_crop=True, seed=0, index=0)
    bilinear = caches.example_crops(path, RESOLUTION, interpolation="bilinear", **kwargs)[0]
    nearest = caches.example_crops(path, RESOLUTION, interpolation="nearest", **kwargs)[0]
    assert not np.allclose(bilinear, nearest)


def test_dataloader_num_workers_decodes_in_threads_in_order() -> None:
    import threading

    seen: list[str] = []

    def decode(index: int) -> int:
        seen.append(threading.current_thread().name)
        return index * index

    assert list(caches.decoded_in_order(9, decode, 0)) == [i * i for i in range(9)]
    assert set(seen) == {threading.current_thread().name}
    seen.clear()
    assert list(caches.decoded_in_order(9, decode, 2)) == [i * i for i in range(9)]
    assert all(name.startswith("jaxbooth-decode") for name in seen)


def test_the_cache_is_the_same_with_loader_threads(models, tmp_path: Path) -> None:
    dataset = data.make_dreambooth_dataset(image_folder(tmp_path / "i", [(80, 64), (64, 96), (64, 64)]), "p")
    kwargs = {"resolution": RESOLUTION, "center_crop": False, "random_flip": True, "seed": 1}
    serial = caches.encode_latent_cache(models, dataset, **kwargs)
    threaded = caches.encode_latent_cache(models, dataset, num_workers=2, **kwargs)
    np.testing.assert_array_equal(serial[0], threaded[0])
    assert serial[2].num_rows == threaded[2].num_rows and serial[2].num_rows > 3
