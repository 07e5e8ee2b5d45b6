"""Aspect-ratio buckets, pure parts: kohya's shape list and assignment, the bucketed batch iterator
(one shape a batch, host split, resume), SDXL time ids with the bucket as target size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import data, sdxl
from jaxbooth.data import buckets
from jaxbooth.data.buckets import BucketSettings
from jaxbooth.errors import JaxboothError

SMALL = BucketSettings(resolution=64, min_reso=32, max_reso=128, steps=16)
FINE = BucketSettings(resolution=64, min_reso=32, max_reso=128, steps=8)


def test_shapes_are_step_multiples_within_bounds_and_about_the_target_area() -> None:
    shapes = buckets.bucket_shapes(SMALL)
    assert (64, 64) in shapes and (32, 128) in shapes and (128, 32) in shapes and (80, 48) in shapes
    for h, w in shapes:
        assert h % 16 == 0 and w % 16 == 0 and 32 <= min(h, w) and max(h, w) <= 128
        assert h * w <= 64 * 64
        assert (w, h) in shapes  # both orientations
    assert len(set(shapes)) == len(shapes)


def test_kohya_default_shapes_at_512() -> None:
    """kohya's list at 512 px (min 256, max 1024, steps 64), read off its make_bucket_resolutions."""
    shapes = buckets.bucket_shapes(BucketSettings(512, 256, 1024, 64))
    wh = {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
          (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)}
    assert set(shapes) == {(h, w) for w, h in wh} | set(wh)
    assert shapes == [(h, w) for w, h in sorted((w, h) for h, w in shapes)]  # kohya's order (ties in argmin)


def test_an_image_goes_to_the_nearest_aspect_and_is_cropped_only_on_its_long_overhang() -> None:
    settings = BucketSettings(512, 256, 1024, 64)
    bucket, resized = buckets.select_bucket((768, 1024), settings)  # 4:3 landscape, (h, w)
    assert bucket == (448, 576)  # w/h 1.29, nearest 1.33
    assert resized == (448, 597)  # the height matches; 21 px of width to crop, none of height
    bucket, resized = buckets.select_bucket((512, 512), settings)
    assert bucket == resized == (512, 512)
    bucket, resized = buckets.select_bucket((1000, 250), settings)  # tall
    assert bucket == (1024, 256) and resized == (1024, 256)


@pytest.mark.parametrize("size", [(120, 160), (144, 112), (96, 128), (30, 200), (200, 31), (64, 64)])
def test_no_non_square_image_gets_a_square_bucket(size: tuple[int, int]) -> None:
    bucket, resized = buckets.select_bucket(size, FINE)
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
    assert resized[0] == bucket[0] or resized[1] == bucket[1]  # covers, one side exact
    if abs(size[0] / size[1] - 1) > 0.15:
        assert bucket[0] != bucket[1]
    aspect_error = abs(bucket[1] / bucket[0] - size[1] / size[0])
    assert aspect_error <= min(abs(w / h - size[1] / size[0]) for h, w in buckets.bucket_shapes(FINE)) + 1e-9


def test_no_upscale_gives_small_images_their_own_smaller_bucket() -> None:
    settings = BucketSettings(64, 32, 128, 16, no_upscale=True)
    assert buckets.select_bucket((40, 56), settings) == ((32, 48), (40, 56))  # kept, bucket rounded down
    bucket, resized = buckets.select_bucket((300, 400), settings)  # larger than 64^2: shrunk to about it
    assert bucket[0] * bucket[1] <= 64 * 64 and resized[0] * resized[1] <= 1.1 * 64 * 64
    assert bucket[0] % 16 == 0 and bucket[1] % 16 == 0 and resized[0] >= bucket[0] and resized[1] >= bucket[1]
    with pytest.raises(JaxboothError, match="bucket_reso_steps"):
        buckets.select_bucket((10, 100), settings)


def test_settings_follow_kohya_rounding_and_refuse_a_resolution_outside_the_range() -> None:
    s = BucketSettings(512, 250, 1000, 64)
    assert (s.min_reso, s.max_reso) == (192, 1024)
    with pytest.raises(JaxboothError, match="min_bucket_reso"):
        BucketSettings(64, 256, 1024, 64)


def test_time_ids_carry_the_bucket_as_target_size() -> None:
    ids = sdxl.add_time_ids([[120, 160], [96, 128]], [[0, 5], [3, 0]], (48, 80))
    np.testing.assert_array_equal(ids[:, 4:], [[48, 80], [48, 80]])
    per_row = sdxl.add_time_ids([[120, 160], [96, 128]], [[0, 5], [3, 0]], [[48, 80], [80, 48]])
    np.testing.assert_array_equal(per_row[:, 4:], [[48, 80], [80, 48]])
    np.testing.assert_array_equal(sdxl.add_time_ids([[120, 160]], [[0, 5]], 64)[:, 4:], [[64, 64]])  # as before


# ---------------------------------------------------------------- the iterator

SIZES = [(48, 96), (48, 96), (96, 48), (64, 64), (64, 64), (60, 100)]  # (h, w): three shapes


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def _iterator(folder: Path, *, batch_size: int = 2, process_index: int = 0, process_count: int = 1,
              **kwargs) -> data.BatchIterator:
    dataset = data.make_dataset([data.Subset(folder, "a photo of sks thing")])
    plan = buckets.plan_for_dataset(dataset, SMALL)
    return data.BatchIterator(dataset, resolution=64, batch_size=batch_size, seed=3, buckets=plan,
                              process_index=process_index, process_count=process_count, **kwargs)


def test_every_batch_is_one_bucket_shape_and_no_image_is_squared(mixed: Path) -> None:
    it = _iterator(mixed, random_flip=True)
    assert len(it.buckets.shapes) == 3
    seen = set()
    for _ in range(2 * it.num_batches_per_epoch):
        batch = next(it)
        shape = batch["pixel_values"].shape[1:3]
        seen.add(shape)
        assert (batch["target_size"] == shape).all()
        for i, (h, w) in zip(batch["example_index"], batch["original_size"], strict=True):
            own = it.buckets.shape_of(int(i))
            assert own == shape and (h == w) == (shape[0] == shape[1])
    assert seen == set(it.buckets.shapes)


def test_small_buckets_fill_by_repeating_within_and_an_epoch_covers_every_item(mixed: Path) -> None:
    it = _iterator(mixed, batch_size=4)
    counts = np.bincount([it.buckets.bucket_of[i] for i in it.dataset.instance_items])
    assert it.num_batches_per_epoch == sum(math.ceil(c / 4) for c in counts)
    for epoch in range(3):
        order = it.epoch_order(epoch).reshape(-1, 4)
        assert set(order.ravel()) == set(range(len(it.dataset)))
        for position, row in enumerate(order):
            assert len({it.buckets.bucket_of[int(i)] for i in row}) == 1
            assert it.batch_bucket(epoch, position) == it.buckets.shapes[it.buckets.bucket_of[int(row[0])]]
    assert not np.array_equal(it.epoch_order(0), it.epoch_order(1))  # reshuffled per epoch


def test_hosts_split_each_global_batch_evenly_within_one_bucket(mixed: Path) -> None:
    whole = _iterator(mixed, batch_size=4, random_flip=True)
    halves = [_iterator(mixed, batch_size=4, process_index=p, process_count=2, random_flip=True) for p in (0, 1)]
    for _ in range(whole.num_batches_per_epoch + 1):
        batch, parts = next(whole), [next(h) for h in halves]
        assert parts[0]["pixel_values"].shape == parts[1]["pixel_values"].shape
        np.testing.assert_array_equal(np.concatenate([p["pixel_values"] for p in parts]), batch["pixel_values"])
        np.testing.assert_array_equal(np.concatenate([p["crop_top_left"] for p in parts]), batch["crop_top_left"])


def test_resume_is_exact_across_a_bucket_change(mixed: Path) -> None:
    it = _iterator(mixed, random_flip=True)
    first = [next(it) for _ in range(2)]
    state = it.state_dict()
    rest = [next(it) for _ in range(it.num_batches_per_epoch + 1)]
    assert len({b["pixel_values"].shape for b in first + rest}) > 1
    resumed = _iterator(mixed, random_flip=True)
    resumed.load_state_dict(state)
    for want in rest:
        got = next(resumed)
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
        np.testing.assert_array_equal(got["example_index"], want["example_index"])
    assert state["buckets"] == SMALL.describe()


def test_class_rows_take_the_batch_bucket(mixed: Path, tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "c.png")
    dataset = data.make_dataset([data.Subset(mixed, "sks"), data.Subset(tmp_path, "thing", is_class=True)])
    it = data.BatchIterator(dataset, resolution=64, batch_size=2, seed=0, buckets=buckets.plan_for_dataset(
        dataset, SMALL))
    for _ in range(it.num_batches_per_epoch):
        batch = next(it)
        assert batch["is_class"].sum() == 2 and len({tuple(s) for s in batch["target_size"]}) == 1


def test_image_size_reads_the_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: a phone portrait stored sideways
    img.save(tmp_path / "turned.jpg", exif=exif)
    assert data.images.image_size(tmp_path / "turned.jpg") == (40, 20)
    assert data.decode_rgb(tmp_path / "turned.jpg").size == (20, 40)  # (w, h): what training sees


def test_row_captions_are_drawn_after_flip_and_crop(mixed: Path) -> None:
    """Caption options change the captions only: flips and crops are the draws a run without them makes."""
    def batches(**options) -> list[dict]:
        dataset = data.make_dataset([data.Subset(mixed, "sks, red, round, small, shiny", **options)])
        it = data.BatchIterator(dataset, resolution=64, batch_size=3, seed=5, random_flip=True)
        return [next(it) for _ in range(4)]

    plain, varied = batches(), batches(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3)
    captions = [str(c) for b in varied for c in b["caption"]]
    for a, b in zip(plain, varied, strict=True):
        for key in ("pixel_values", "flipped", "crop_top_left", "example_index"):
            np.testing.assert_array_equal(a[key], b[key])
    assert {str(c) for b in plain for c in b["caption"]} == {"sks, red, round, small, shiny"}
    assert "" in captions and all(c.startswith("sks, ") for c in captions if c)
    assert len(set(captions)) > 2
    assert captions == [str(c) for b in batches(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3)
                        for c in b["caption"]]  # a pure function of (seed, epoch, slot)


def test_a_subset_flip_overrides_the_run_flag(mixed: Path) -> None:
    dataset = data.make_dataset([data.Subset(mixed, "sks", random_flip=False)])
    it = data.BatchIterator(dataset, resolution=64, batch_size=6, seed=0, random_flip=True)
    assert not next(it)["flipped"].any()
    dataset = data.make_dataset([data.Subset(mixed, "sks", random_flip=True)])
    assert data.BatchIterator(dataset, resolution=64, batch_size=6, seed=0).load_batch(0, 0)["flipped"].any()
