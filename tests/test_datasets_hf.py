"""--dataset_name and friends: Hugging Face datasets (local folders, parquet, the offline cache) as examples.

No test touches the network: offline mode is on and any socket connect fails the test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import data
from jaxbooth.errors import JaxboothError
from jaxbooth.spec import RunSpec, replace_flat
from tests._logs import logged_warning

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline datasets/hub, caches under tmp_path, and any socket connect fails the test."""
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    monkeypatch.setenv("JAXBOOTH_CACHE", str(tmp_path / "jaxbooth_cache"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def _png(seed: int, size=(24, 20)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _imagefolder(root: Path, captions: list[str]) -> Path:
    """An `imagefolder` dataset: img_i.png plus metadata.jsonl with a `text` caption per image."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            (root / f"img_{i}.png").write_bytes(_png(i))
            f.write(json.dumps({"file_name": f"img_{i}.png", "text": caption}) + "\n")
    return root


def _parquet(path: Path, images: list[dict], captions: list[str]) -> Path:
    """A parquet file whose image column stores the bytes (as Hub datasets do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_dict({"image": images, "text": captions})
    table.cast_column("image", datasets.Image()).to_parquet(str(path))
    return path


def _spec(prior: dict | None = None, **data_fields) -> RunSpec:
    return replace_flat(RunSpec(), **data_fields, **(prior or {}))


def test_imagefolder_images_and_captions(tmp_path):
    folder = _imagefolder(tmp_path / "ds", ["a sks toy on a desk", "", "a sks toy in snow"])
    ds = data.dataset_from_spec(_spec(dataset_name=str(folder), caption_column="text",
                                      instance_prompt="a photo of sks toy", cache_dir=str(tmp_path / "cache")))
    assert [e.path for e in ds.examples] == [(folder / f"img_{i}.png").resolve() for i in range(3)]
    # an empty caption falls back to the instance prompt, as diffusers
    assert [e.caption for e in ds.examples] == ["a sks toy on a desk", "a photo of sks toy", "a sks toy in snow"]
    assert [e.content_hash for e in ds.examples] == [hashlib.sha1(_png(i)).hexdigest() for i in range(3)]
    assert len(ds) == 3 and not ds.with_prior_preservation
    assert not (tmp_path / "cache" / "datasets").exists()  # local files are used where they are
    batch = next(data.BatchIterator(ds, resolution=16, batch_size=3, seed=0))
    assert sorted(batch["caption"]) == sorted(e.caption for e in ds.examples)  # captions reach the batches


def test_without_caption_column_every_image_gets_the_instance_prompt(tmp_path):
    folder = _imagefolder(tmp_path / "ds", ["x", "y"])
    ds = data.dataset_from_spec(_spec(dataset_name=str(folder), instance_prompt="a photo of sks dog"))
    assert [e.caption for e in ds.examples] == ["a photo of sks dog"] * 2
    with pytest.raises(JaxboothError, match="--instance_prompt.*--caption_column"):
        data.dataset_from_spec(_spec(dataset_name=str(folder)))
    # captions alone are enough when every one is filled in
    assert [e.caption for e in data.dataset_from_spec(_spec(dataset_name=str(folder), caption_column="text"))
            .examples] == ["x", "y"]


def test_empty_caption_without_instance_prompt_is_an_error(tmp_path):
    folder = _imagefolder(tmp_path / "ds", ["x", ""])
    with pytest.raises(JaxboothError, match="empty caption.*--instance_prompt"):
        data.dataset_from_spec(_spec(dataset_name=str(folder), caption_column="text"))


@pytest.mark.parametrize("field, flag", [("image_column", "--image_column"), ("caption_column", "--caption_column")])
def test_unknown_column_names_the_flag_and_lists_the_columns(tmp_path, field, flag):
    folder = _imagefolder(tmp_path / "ds", ["x"])
    with pytest.raises(JaxboothError) as info:
        data.dataset_from_spec(_spec(dataset_name=str(folder), instance_prompt="p", **{field: "prompt"}))
    message = str(info.value)
    assert flag in message and "'prompt'" in message and "image, text" in message


def test_image_column_that_holds_no_images_is_an_error(tmp_path):
    folder = _imagefolder(tmp_path / "ds", ["x"])
    with pytest.raises(JaxboothError, match="--image_column 'text'"):
        data.dataset_from_spec(_spec(dataset_name=str(folder), instance_prompt="p", image_column="text"))


@pytest.mark.parametrize("name", ["owner/not-a-dataset", "no_such_local_folder_or_dataset"])
def test_missing_dataset_is_one_error_naming_the_flag_and_the_fix(tmp_path, name):
    with pytest.raises(JaxboothError) as info:
        data.dataset_from_spec(_spec(dataset_name=name, instance_prompt="p", cache_dir=str(tmp_path / "c")))
    message = str(info.value)
    for expected in (f"--dataset_name '{name}'", "Offline mode", str(tmp_path / "c"), "--instance_data_dir",
                     f"load_dataset('{name}')"):
        assert expected in message, expected


def test_bad_config_name_is_an_error_naming_it(tmp_path):
    folder = _imagefolder(tmp_path / "ds", ["x"])
    with pytest.raises(JaxboothError, match="--dataset_config_name 'nope'"):
        data.dataset_from_spec(_spec(dataset_name=str(folder), dataset_config_name="nope", instance_prompt="p"))


def test_empty_dataset_is_an_error(tmp_path):
    folder = tmp_path / "ds"
    _parquet(folder / "train.parquet", [], [])
    with pytest.raises(JaxboothError, match="--dataset_name .*no rows"):
        data.dataset_from_spec(_spec(dataset_name=str(folder), instance_prompt="p"))


def test_no_train_split_is_an_error_listing_the_splits(tmp_path):
    folder = tmp_path / "ds"
    _parquet(folder / "test.parquet", [{"bytes": _png(0), "path": None}], ["x"])
    with pytest.raises(JaxboothError, match="no 'train' split.*test"):
        data.dataset_from_spec(_spec(dataset_name=str(folder), instance_prompt="p"))


def test_repeats_with_a_dataset(tmp_path):
    folder = _imagefolder(tmp_path / "ds", ["x", "y"])
    ds = data.dataset_from_spec(_spec(dataset_name=str(folder), instance_prompt="p", repeats=3))
    assert len(ds.examples) == 2 and len(ds) == 6 and ds.instance_items == (0, 0, 0, 1, 1, 1)
    assert data.BatchIterator(ds, resolution=8, batch_size=2, seed=0).num_batches_per_epoch == 3


def test_images_stored_as_bytes_are_written_once_by_content(tmp_path):
    folder = tmp_path / "ds"
    images = [{"bytes": _png(0), "path": None}, {"bytes": _png(1), "path": "remote/dir/b.png"},
              {"bytes": _png(0), "path": None}]
    _parquet(folder / "train.parquet", images, ["first", "second", "third"])
    spec = _spec(dataset_name=str(folder), caption_column="text", instance_prompt="p", cache_dir=str(tmp_path / "c"))
    ds = data.dataset_from_spec(spec)
    written = tmp_path / "c" / "datasets"
    digests = [hashlib.sha1(_png(i)).hexdigest() for i in (0, 1, 0)]
    assert [e.path for e in ds.examples] == [written / f"{d}.png" for d in digests]
    assert [e.content_hash for e in ds.examples] == digests
    assert [e.caption for e in ds.examples] == ["first", "second", "third"]
    assert sorted(p.name for p in written.iterdir()) == sorted({f"{d}.png" for d in digests})
    mtimes = {p: p.stat().st_mtime_ns for p in written.iterdir()}
    assert data.dataset_from_spec(spec).fingerprint == ds.fingerprint
    assert {p: p.stat().st_mtime_ns for p in written.iterdir()} == mtimes  # reused, not rewritten
    batch = next(data.BatchIterator(ds, resolution=16, batch_size=3, seed=0, center_crop=True))
    assert batch["pixel_values"].shape == (3, 16, 16, 3)


def test_stored_bytes_win_over_a_same_named_file_in_the_working_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    _parquet(folder / "train.parquet", [{"bytes": _png(0), "path": "img.png"}], ["x"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img.png").write_bytes(_png(9))  # a decoy with the row's relative name
    ds = data.dataset_from_spec(_spec(dataset_name=str(folder), instance_prompt="p", cache_dir=str(tmp_path / "c")))
    assert ds.examples[0].content_hash == hashlib.sha1(_png(0)).hexdigest()
    assert ds.examples[0].path.parent == tmp_path / "c" / "datasets"


def test_bytes_go_to_the_jaxbooth_cache_without_cache_dir(tmp_path):
    folder = tmp_path / "ds"
    _parquet(folder / "train.parquet", [{"bytes": _png(4), "path": None}], ["x"])
    ds = data.dataset_from_spec(_spec(dataset_name=str(folder), instance_prompt="p"))
    assert ds.examples[0].path.parent == tmp_path / "jaxbooth_cache" / "datasets"


def test_bad_images_are_listed_together_or_skipped(tmp_path):
    folder = tmp_path / "ds"
    images = [{"bytes": _png(0), "path": None}, {"bytes": b"not an image", "path": "broken.png"},
              {"bytes": _png(1)[:60], "path": "cut.png"}]
    _parquet(folder / "train.parquet", images, ["a", "b", "c"])
    spec = _spec(dataset_name=str(folder), caption_column="text", instance_prompt="p", cache_dir=str(tmp_path / "c"))
    with pytest.raises(JaxboothError) as info:
        data.dataset_from_spec(spec)
    message = str(info.value)
    assert "2 of 3" in message and "row 1 (broken.png)" in message and "row 2 (cut.png)" in message
    assert "--skip_bad_images" in message
    skipping = dataclasses.replace(spec, data=dataclasses.replace(spec.data, skip_bad_images=True))
    with logged_warning("row 1 .broken.png"):
        ds = data.dataset_from_spec(skipping)
    assert [e.caption for e in ds.examples] == ["a"]


def test_dataset_with_prior_preservation(tmp_path):
    folder = _imagefolder(tmp_path / "ds", ["x", "y"])
    cls = tmp_path / "cls"
    cls.mkdir()
    for i in range(5):
        (cls / f"{i}.png").write_bytes(_png(10 + i))
    prior = dict(with_prior_preservation=True, class_data_dir=str(cls), class_prompt="a toy", num_class_images=3)
    ds = data.dataset_from_spec(_spec(prior, dataset_name=str(folder), instance_prompt="p", repeats=2))
    assert [s.is_class for s in ds.subsets] == [False, True]
    assert len(ds.instance_items) == 4 and len(ds.class_items) == 3 and len(ds) == 4
    assert [e.caption for e in ds.examples] == ["p", "p", "a toy", "a toy", "a toy"]


def test_dataset_name_and_instance_data_dir_together_are_an_error(tmp_path):
    folder = _imagefolder(tmp_path / "ds", ["x"])
    with pytest.raises(JaxboothError, match="only one"):
        data.dataset_from_spec(_spec(dataset_name=str(folder), instance_data_dir=str(folder), instance_prompt="p"))


def test_hub_dataset_in_the_offline_cache(tmp_path):
    """A Hub id found in --cache_dir offline, laid out as datasets caches a Hub download
    (``<owner>___<name>/<config>/<version>/<hash>/<name>-train.arrow``); its images are bytes."""
    source = _parquet(tmp_path / "src" / "train.parquet", [{"bytes": _png(7), "path": "cat.jpg"}], ["a cat"])
    staging = tmp_path / "staging"
    datasets.load_dataset("parquet", data_files={"train": str(source)}, cache_dir=str(staging))
    (built,) = [p for p in staging.glob("parquet/*/*/*") if p.is_dir()]
    cache = tmp_path / "cache"
    target = cache / "owner___tiny-ds" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(built, target)
    (target / "parquet-train.arrow").rename(target / "tiny-ds-train.arrow")
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(builder_name="tiny-ds", dataset_name="tiny-ds")
    (target / "dataset_info.json").write_text(json.dumps(info))

    ds = data.dataset_from_spec(_spec(dataset_name="owner/tiny-ds", caption_column="text", instance_prompt="p",
                                      cache_dir=str(cache)))
    digest = hashlib.sha1(_png(7)).hexdigest()
    # the row's path names no local file, so its bytes are written (keeping the row's extension)
    assert [e.path for e in ds.examples] == [cache / "datasets" / f"{digest}.jpg"]
    assert [e.caption for e in ds.examples] == ["a cat"]
    with pytest.raises(JaxboothError, match="owner/tiny-ds"):  # not in the default cache
        data.dataset_from_spec(_spec(dataset_name="owner/tiny-ds", instance_prompt="p"))


def test_missing_datasets_library_gives_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(JaxboothError, match="pip install"):
        data.dataset_from_spec(_spec(dataset_name=str(tmp_path), instance_prompt="p"))
