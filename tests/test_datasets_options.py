"""--image_interpolation_mode (resize filter) and --repeats (instance images per epoch) in jaxbooth.data."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import data
from jaxbooth.errors import JaxboothError
from jaxbooth.spec import RunSpec, replace_flat


def _noise(path: Path, seed: int, size=(40, 28)) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _folder(root: Path, n: int, seed: int = 0) -> Path:
    for i in range(n):
        _noise(root / f"img_{i:02d}.png", seed * 100 + i)
    return root


def _spec(prior: dict | None = None, **data_fields) -> RunSpec:
    return replace_flat(RunSpec(), **data_fields, **(prior or {}))


def _reference(path: Path, resolution: int, resample: Image.Resampling) -> np.ndarray:
    """Short side to `resolution` with `resample`, center crop, (x/255 - 0.5)/0.5: written out by hand."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    img = img.resize(size, resample)
    top, left = round((img.height - resolution) / 2), round((img.width - resolution) / 2)
    img = img.crop((left, top, left + resolution, top + resolution))
    return (np.asarray(img, np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


# ---------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize("mode, resample", [
    ("nearest", Image.Resampling.NEAREST), ("nearest_exact", Image.Resampling.NEAREST),
    ("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC),
    ("box", Image.Resampling.BOX), ("hamming", Image.Resampling.HAMMING), ("lanczos", Image.Resampling.LANCZOS),
])
def test_each_mode_resizes_with_torchvisions_pil_filter(tmp_path, mode, resample):
    path = _noise(tmp_path / "a.png", 1)
    got = data.load_image(path, 16, center_crop=True, interpolation=mode)
    np.testing.assert_array_equal(got, _reference(path, 16, resample))


def test_bilinear_is_the_default_and_other_filters_change_the_pixels(tmp_path):
    path = _noise(tmp_path / "a.png", 2)
    default = data.load_image(path, 16, center_crop=True)
    np.testing.assert_array_equal(default, _reference(path, 16, Image.Resampling.BILINEAR))
    for mode in ("nearest", "bicubic", "lanczos", "box"):
        other = data.load_image(path, 16, center_crop=True, interpolation=mode)
        assert np.abs(other - default).max() > 0.05, mode
    # torchvision sends nearest and nearest_exact to PIL's NEAREST alike
    np.testing.assert_array_equal(data.load_image(path, 16, center_crop=True, interpolation="nearest"),
                                  data.load_image(path, 16, center_crop=True, interpolation="nearest_exact"))
    _, original, crop = data.load_image_with_info(path, 16, center_crop=True, interpolation="lanczos")
    assert original == (28, 40) and crop == (0, 3)  # 40x28 -> 22x16, centred


def test_unknown_filter_is_an_error_naming_the_flag(tmp_path):
    path = _noise(tmp_path / "a.png", 3)
    with pytest.raises(JaxboothError, match="--image_interpolation_mode.*lanczos"):
        data.load_image(path, 16, center_crop=True, interpolation="antialias")
    ds = data.make_dreambooth_dataset(tmp_path, "p")
    with pytest.raises(JaxboothError, match="--image_interpolation_mode"):
        data.BatchIterator(ds, resolution=16, batch_size=1, seed=0, interpolation="cubic")


def test_batch_iterator_passes_the_filter_to_every_row(tmp_path):
    ds = data.make_dreambooth_dataset(_folder(tmp_path / "inst", 2), "p", _folder(tmp_path / "cls", 2, 1), "c")
    kw = dict(resolution=16, batch_size=2, seed=5, random_flip=True)
    plain = next(data.BatchIterator(ds, **kw))
    lanczos_it = data.BatchIterator(ds, **kw, interpolation="lanczos")
    lanczos = next(lanczos_it)
    assert lanczos["pixel_values"].shape == (4, 16, 16, 3)
    for row, (example, slot, stream) in enumerate(lanczos_it.global_row_plan(0, 0)):
        rng = lanczos_it.row_rng(0, slot, stream)
        flip = bool(rng.random() < 0.5)
        want = data.load_image(ds.examples[example].path, 16, center_crop=False, flip=flip, crop_rng=rng,
                               interpolation="lanczos")
        np.testing.assert_array_equal(lanczos["pixel_values"][row], want)
        assert np.abs(lanczos["pixel_values"][row] - plain["pixel_values"][row]).max() > 0.01


# ---------------------------------------------------------------------------- repeats


def test_repeats_triples_an_epoch_and_covers_each_image_three_times(tmp_path):
    folder = _folder(tmp_path / "inst", 4)
    once = data.dataset_from_spec(_spec(instance_data_dir=str(folder), instance_prompt="p"))
    thrice = data.dataset_from_spec(_spec(instance_data_dir=str(folder), instance_prompt="p", repeats=3))
    assert len(once.examples) == len(thrice.examples) == 4  # repeats list examples, never copy them
    assert (len(once), len(thrice)) == (4, 12)
    it_once = data.BatchIterator(once, resolution=8, batch_size=2, seed=0)
    it_thrice = data.BatchIterator(thrice, resolution=8, batch_size=2, seed=0)
    assert (it_once.num_batches_per_epoch, it_thrice.num_batches_per_epoch) == (2, 6)
    for epoch in (0, 1):
        seen = Counter(int(i) for position in range(6) for i, _, _ in it_thrice.global_row_plan(epoch, position))
        assert seen == {i: 3 for i in range(4)}
    batches = [next(it_thrice) for _ in range(6)]
    assert Counter(int(i) for b in batches for i in b["example_index"]) == {i: 3 for i in range(4)}
    assert (it_thrice.epoch, it_thrice.position) == (1, 0)
    assert once.fingerprint != thrice.fingerprint  # a resume with other repeats is noticed


def test_repeats_apply_to_instance_images_only_with_prior_preservation(tmp_path):
    inst, cls = _folder(tmp_path / "inst", 2), _folder(tmp_path / "cls", 5, 1)
    prior = dict(with_prior_preservation=True, class_data_dir=str(cls), class_prompt="a toy", num_class_images=5)
    spec = _spec(prior, instance_data_dir=str(inst), instance_prompt="p", repeats=3)
    ds = data.dataset_from_spec(spec)
    assert len(ds.instance_items) == 6 and len(ds.class_items) == 5 and len(ds) == 6  # max(2*3, 5)
    assert len(data.dataset_from_spec(dataclasses.replace(spec, data=dataclasses.replace(spec.data, repeats=1)))) == 5
    same = data.make_dreambooth_dataset(inst, "p", cls, "a toy", 5, repeats=3)
    assert same.fingerprint == ds.fingerprint


def test_prior_preservation_without_class_folder_is_an_error(tmp_path):
    spec = _spec(dict(with_prior_preservation=True, class_prompt="a toy"),
                 instance_data_dir=str(_folder(tmp_path / "inst", 1)), instance_prompt="p")
    with pytest.raises(JaxboothError, match="--class_data_dir"):
        data.dataset_from_spec(spec)


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True])
def test_bad_repeats_are_an_error_naming_the_flag(tmp_path, repeats):
    """The data layer's own guard, for specs built without the loader's type checks."""
    spec = _spec(instance_data_dir=str(_folder(tmp_path / "inst", 1)), instance_prompt="p")
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, repeats=repeats))
    with pytest.raises(JaxboothError, match="--repeats"):
        data.dataset_from_spec(spec)


def test_spec_without_images_or_prompt_is_an_error(tmp_path):
    with pytest.raises(JaxboothError, match="--instance_data_dir.*--dataset_name"):
        data.dataset_from_spec(_spec(instance_prompt="p"))
    with pytest.raises(JaxboothError, match="--instance_prompt"):
        data.dataset_from_spec(_spec(instance_data_dir=str(_folder(tmp_path / "inst", 1))))
