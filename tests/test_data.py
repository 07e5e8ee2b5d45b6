"""Tests for jaxbooth.data: decoding, folder validation, dataset model, batching."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import data
from jaxbooth.data import (
    EXAMPLE_CLASS_PROMPT,
    EXAMPLE_INSTANCE_PROMPT,
    BatchIterator,
    Subset,
    content_hash,
    example_class_dir,
    example_instance_dir,
    load_image,
    load_image_with_info,
    make_dataset,
    make_dreambooth_dataset,
    scan_image_folder,
)
from jaxbooth.errors import JaxboothError
from tests._logs import logged_warning

REPO = Path(__file__).resolve().parents[1]


def _norm(v: float) -> np.float32:
    """diffusers' ToTensor + Normalize([0.5], [0.5]) of one 8-bit value, in float32."""
    return (np.float32(v) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def _solid(path: Path, color, size=(16, 16), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def _noise(path: Path, seed: int, size=(24, 20)) -> Path:
    """A unique random image, so rows of a batch can be told apart."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _folder(root: Path, n: int, seed: int = 0, size=(24, 20)) -> Path:
    for i in range(n):
        _noise(root / f"img_{i:02d}.png", seed * 100 + i, size)
    return root


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.is_dir())
        for p in sorted(folder.rglob("*"))
    } | {".": folder.stat().st_mtime_ns}


# ---------------------------------------------------------------------------- import boundary


def test_importing_data_and_text_leaves_frameworks_out():
    code = (
        "import sys, jaxbooth.data, jaxbooth.text; "
        "print([m for m in ('jax', 'torch', 'transformers', 'flax', 'tensorflow', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- decoding


def test_exif_orientation_6_turns_left_half_red_into_top_half_red(tmp_path):
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(arr).save(path, quality=95, exif=exif)

    px, original, _ = load_image_with_info(path, 32, center_crop=True)
    assert original == (64, 32)  # (h, w) after the EXIF rotation: now portrait
    top, bottom = px[:14].reshape(-1, 3).mean(0), px[18:].reshape(-1, 3).mean(0)
    assert top[0] > 0.8 and top[2] < -0.8, top  # red
    assert bottom[2] > 0.8 and bottom[0] < -0.8, bottom  # blue


def test_output_is_float32_hwc_in_minus_one_to_one(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[0, 0] = 255
    arr[1, 1] = (0, 128, 64)
    Image.fromarray(arr).save(tmp_path / "x.png")
    px = load_image(tmp_path / "x.png", 8, center_crop=True)
    assert px.dtype == np.float32 and px.shape == (8, 8, 3)
    assert px.min() == -1.0 and px.max() == 1.0
    np.testing.assert_array_equal(px[1, 1], [_norm(0), _norm(128), _norm(64)])


@pytest.mark.parametrize(
    "mode, color, save, expected",
    [
        ("RGBA", (10, 20, 30, 0), {}, (10, 20, 30)),  # alpha dropped, as diffusers' convert("RGB")
        ("L", 100, {}, (100, 100, 100)),
        ("LA", (90, 0), {}, (90, 90, 90)),
        ("1", 1, {}, (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), {"format": "TIFF"}, (255, 0, 0)),
    ],
)
def test_image_modes_become_rgb(tmp_path, mode, color, save, expected):
    path = _solid(tmp_path / f"img_{mode}.{save.get('format', 'png').lower()}", color, mode=mode, **save)
    assert Image.open(path).mode == mode
    px = load_image(path, 16, center_crop=True)
    assert px.shape == (16, 16, 3)
    np.testing.assert_array_equal(px[5, 5], [_norm(c) for c in expected])


def test_palette_image_with_transparency_keeps_palette_colours(tmp_path):
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 200, 50, 25] + [0] * 762)
    img.paste(0, (0, 0, 8, 16))
    img.save(tmp_path / "p.png", transparency=bytes([0, 128]))  # per-entry alpha (tRNS)
    assert isinstance(Image.open(tmp_path / "p.png").info.get("transparency"), bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        px = load_image(tmp_path / "p.png", 16, center_crop=True)
    np.testing.assert_array_equal(px[3, 12], [_norm(200), _norm(50), _norm(25)])
    np.testing.assert_array_equal(px[3, 2], [-1, -1, -1])


def test_16_bit_grayscale_is_rescaled_not_clipped_to_white(tmp_path):
    values = np.array([[0, 64 * 257, 128 * 257, 65535]], np.uint16).repeat(4, 0)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    img.save(tmp_path / "deep.png")
    px = load_image(tmp_path / "deep.png", 4, center_crop=True)
    np.testing.assert_array_equal(px[0, :, 0], [_norm(0), _norm(64), _norm(128), _norm(255)])
    np.testing.assert_array_equal(px[..., 0], px[..., 2])


def test_resize_short_side_and_center_crop_follow_torchvision(tmp_path):
    # 45x32 at resolution 32: no resize; crop offset round(13 / 2) = 6 (torchvision CenterCrop).
    cols = np.tile(np.arange(45, dtype=np.uint8) * 5, (32, 1))
    Image.fromarray(np.stack([cols] * 3, -1)).save(tmp_path / "wide.png")
    px, original, crop = load_image_with_info(tmp_path / "wide.png", 32, center_crop=True)
    assert original == (32, 45) and crop == (0, 6)
    np.testing.assert_array_equal(px[0, :, 0], [_norm(v) for v in cols[0, 6:38]])

    # 50x100 (w x h) at 32: short side 50 -> 32, long side int(32 * 100 / 50) = 64.
    _solid(tmp_path / "tall.png", (1, 2, 3), size=(50, 100))
    px, original, crop = load_image_with_info(tmp_path / "tall.png", 32, center_crop=True)
    assert px.shape == (32, 32, 3) and original == (100, 50) and crop == (16, 0)


def test_random_crop_offsets_come_from_the_generator(tmp_path):
    _noise(tmp_path / "big.png", 3, size=(64, 40))
    offsets = set()
    for seed in range(12):
        a = load_image_with_info(
            tmp_path / "big.png", 16, center_crop=False, crop_rng=np.random.default_rng(seed)
        )
        b = load_image_with_info(
            tmp_path / "big.png", 16, center_crop=False, crop_rng=np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(a[0], b[0])
        assert a[2] == b[2]
        offsets.add(a[2])
    # resized to 25x16 (w x h): y is always 0, x in [0, 9]
    assert all(y == 0 and 0 <= x <= 9 for y, x in offsets)
    assert len(offsets) > 3


def test_flip_mirrors_columns(tmp_path):
    _noise(tmp_path / "sq.png", 5, size=(16, 16))
    plain = load_image(tmp_path / "sq.png", 16, center_crop=True)
    flipped = load_image(tmp_path / "sq.png", 16, center_crop=True, flip=True)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_load_image_names_a_corrupt_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(JaxboothError, match="bad.png"):
        load_image(tmp_path / "bad.png", 8, center_crop=True)


def test_content_hash_is_sha1_of_bytes_and_follows_changes(tmp_path):
    path = _solid(tmp_path / "a.png", (1, 2, 3))
    assert content_hash(path) == hashlib.sha1(path.read_bytes()).hexdigest()
    _solid(path, (9, 9, 9), size=(17, 16))
    assert content_hash(path) == hashlib.sha1(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- folders


def _messy_folder(root: Path) -> Path:
    _noise(root / "b_good.png", 1)
    _solid(root / "a_good.jpg", (200, 10, 10), format="JPEG")
    (root / "a_good.txt").write_text("a caption")  # sidecar: ignored
    (root / ".hidden.png").write_bytes(b"junk")  # hidden: ignored
    (root / "Thumbs.db").write_bytes(b"junk")  # OS metadata: ignored
    (root / "nested").mkdir()
    _noise(root / "nested" / "deep.png", 2)  # not recursive, like diffusers
    full = (root / "b_good.png").read_bytes()
    (root / "c_truncated.png").write_bytes(full[: len(full) // 2])
    (root / "d_random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "e_notes.md").write_text("# not an image")
    return root


def test_scan_reports_every_bad_file_in_one_error(tmp_path):
    folder = _messy_folder(tmp_path / "inst")
    with pytest.raises(JaxboothError) as info:
        scan_image_folder(folder)
    msg = str(info.value)
    for name in ("c_truncated.png", "d_random.jpg", "e_notes.md"):
        assert name in msg
    for name in ("a_good", "b_good", "Thumbs", "hidden", "deep"):
        assert name not in msg
    assert "3 of 5 files" in msg and "--instance_data_dir" in msg and "skip" in msg


def test_skip_bad_warns_once_and_keeps_the_good_images(tmp_path):
    folder = _messy_folder(tmp_path / "inst")
    with logged_warning("c_truncated.png") as record:
        found = scan_image_folder(folder, skip_bad=True)
    assert len(record) == 1 and "d_random.jpg" in record[0]
    assert [p.name for p in found] == ["a_good.jpg", "b_good.png"]


def test_scanning_and_batching_leave_the_folder_untouched(tmp_path):
    folder = _messy_folder(tmp_path / "inst")
    before = _snapshot(folder)
    with logged_warning():
        ds = make_dreambooth_dataset(folder, "a photo of sks toy", skip_bad=True)
    next(BatchIterator(ds, resolution=8, batch_size=2, seed=0))
    assert _snapshot(folder) == before


@pytest.mark.parametrize("case", ["missing", "file", "empty", "only_subfolder", "only_captions"])
def test_scan_rejects_unusable_folders(tmp_path, case):
    folder = tmp_path / "class_imgs"
    if case == "file":
        folder.write_text("x")
    elif case != "missing":
        folder.mkdir()
    if case == "only_subfolder":
        _noise(folder / "sub" / "a.png", 1)
    if case == "only_captions":
        (folder / "a.txt").write_text("caption")
    with pytest.raises(JaxboothError, match="class_imgs") as info:
        scan_image_folder(folder, role="class")
    assert "--class_data_dir" in str(info.value)
    if case == "only_subfolder":
        assert "sub" in str(info.value)


# ---------------------------------------------------------------------------- dataset model


def test_dreambooth_dataset_takes_the_first_num_class_images_by_name(tmp_path):
    inst = _folder(tmp_path / "inst", 2, seed=1)
    cls = _folder(tmp_path / "cls", 4, seed=2)
    ds = make_dreambooth_dataset(inst, "a photo of sks dog", cls, "a photo of a dog", num_class_images=3)
    assert [e.path.name for e in ds.examples] == ["img_00.png", "img_01.png"] + [
        f"img_{i:02d}.png" for i in range(3)
    ]
    assert [e.caption for e in ds.examples] == ["a photo of sks dog"] * 2 + ["a photo of a dog"] * 3
    assert ds.with_prior_preservation and len(ds) == 3
    assert ds.instance_items == (0, 1) and ds.class_items == (2, 3, 4)
    assert all(e.content_hash == content_hash(e.path) for e in ds.examples)


def test_class_dir_without_class_prompt_is_an_error(tmp_path):
    inst = _folder(tmp_path / "inst", 1)
    with pytest.raises(JaxboothError, match="class_prompt"):
        make_dreambooth_dataset(inst, "a photo of sks dog", inst, None)


def test_subsets_with_captions_and_repeats(tmp_path):
    inst = _folder(tmp_path / "inst", 3)
    (inst / "img_00.txt").write_text("sks toy on a beach\nsecond line ignored\n")
    (inst / "img_01.txt").write_text("   \n")  # empty: falls back to the prompt
    reg = _folder(tmp_path / "reg", 1, seed=4)
    subsets = [Subset(inst, "sks toy", repeats=2, use_captions=True), Subset(reg, "a toy", is_class=True)]
    with logged_warning("img_01.png, img_02.png"):
        ds = make_dataset(subsets)
    assert [e.caption for e in ds.examples] == ["sks toy on a beach", "sks toy", "sks toy", "a toy"]
    assert ds.instance_items == (0, 0, 1, 1, 2, 2) and ds.class_items == (3,)
    assert len(ds) == 6


def test_subset_validates_repeats_and_prompt(tmp_path):
    with pytest.raises(JaxboothError, match="repeats"):
        Subset(tmp_path, "p", repeats=0)
    with pytest.raises(JaxboothError, match="prompt"):
        Subset(tmp_path, "  ")


# ---------------------------------------------------------------------------- batches


def _prior_dataset(tmp_path, n_inst=3, n_cls=5):
    inst = _folder(tmp_path / "inst", n_inst, seed=1)
    cls = _folder(tmp_path / "cls", n_cls, seed=2)
    return make_dreambooth_dataset(inst, "sks toy", cls, "a toy")


def _fake_tokenize(prompts):
    ids = np.array([[len(p), sum(map(ord, p)) % 1000, 0, 0] for p in prompts], np.int64)
    return ids, (ids > 0).astype(np.int64)


def test_prior_preservation_batch_has_instance_rows_then_class_rows(tmp_path):
    ds = _prior_dataset(tmp_path)
    it = BatchIterator(ds, resolution=16, batch_size=2, seed=7, center_crop=True, tokenize=_fake_tokenize)
    batch = next(it)
    assert batch["pixel_values"].shape == (4, 16, 16, 3) and batch["pixel_values"].dtype == np.float32
    assert batch["is_class"].tolist() == [False, False, True, True]
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    assert batch["input_ids"].shape == (4, 4)
    order = it.epoch_order(0)
    expected = [ds.instance_items[order[s] % 3] for s in (0, 1)] + [
        ds.class_items[order[s] % 5] for s in (0, 1)
    ]
    assert batch["example_index"].tolist() == expected
    assert batch["caption"].tolist() == ["sks toy", "sks toy", "a toy", "a toy"]
    np.testing.assert_array_equal(batch["input_ids"], _fake_tokenize(batch["caption"].tolist())[0])
    for row, idx in enumerate(expected):
        np.testing.assert_array_equal(
            batch["pixel_values"][row], load_image(ds.examples[idx].path, 16, center_crop=True)
        )
        assert batch["content_hash"][row] == ds.examples[idx].content_hash
    assert batch["original_size"].tolist() == [[20, 24]] * 4 and batch["crop_top_left"].dtype == np.int32


def test_epoch_visits_every_item_and_wraps_within_its_own_permutation(tmp_path):
    ds = make_dreambooth_dataset(_folder(tmp_path / "inst", 5), "sks toy")
    it = BatchIterator(ds, resolution=8, batch_size=2, seed=3, center_crop=True)
    assert it.num_batches_per_epoch == 3 and it.steps_per_epoch(2) == 2
    perm = np.random.default_rng([3, 0]).permutation(5)
    seen = [next(it)["example_index"].tolist() for _ in range(3)]
    assert sum(seen, []) == [*perm.tolist(), int(perm[0])]
    assert it.state_dict()["epoch"] == 1 and it.state_dict()["position"] == 0
    next_epoch = next(it)["example_index"].tolist()
    assert next_epoch == np.random.default_rng([3, 1]).permutation(5)[:2].tolist()


def test_dataset_smaller_than_a_batch_is_repeated_to_fill_it(tmp_path):
    ds = make_dreambooth_dataset(_folder(tmp_path / "inst", 3), "sks toy")
    it = BatchIterator(ds, resolution=8, batch_size=8, seed=0, center_crop=True)
    assert it.num_batches_per_epoch == 1
    idx = next(it)["example_index"]
    assert idx.shape == (8,) and sorted(set(idx.tolist())) == [0, 1, 2]


def test_drop_last_drops_the_tail(tmp_path):
    ds = make_dreambooth_dataset(_folder(tmp_path / "inst", 5), "sks toy")
    it = BatchIterator(ds, resolution=8, batch_size=2, seed=3, drop_last=True, center_crop=True)
    assert it.num_batches_per_epoch == 2
    next(it), next(it)
    assert (it.epoch, it.position) == (1, 0)


def test_order_depends_only_on_the_seed(tmp_path):
    ds = make_dreambooth_dataset(_folder(tmp_path / "inst", 6), "sks toy")

    def run(seed):
        it = BatchIterator(ds, resolution=8, batch_size=2, seed=seed, random_flip=True)
        return [next(it) for _ in range(6)]

    a, b, c = run(11), run(11), run(12)
    for x, y in zip(a, b, strict=True):
        for key in ("pixel_values", "example_index", "crop_top_left", "flipped"):
            np.testing.assert_array_equal(x[key], y[key])
    assert any((x["example_index"] != z["example_index"]).any() for x, z in zip(a, c, strict=True))


def _assert_same_batches(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_iterator_yields_the_same_next_batches(tmp_path, num_workers):
    ds = _prior_dataset(tmp_path)
    kwargs = dict(resolution=12, batch_size=2, seed=5, random_flip=True, tokenize=_fake_tokenize)
    with BatchIterator(ds, num_workers=num_workers, **kwargs) as it:
        for _ in range(4):  # into the second epoch (5 items / 2 = 3 batches)
            next(it)
        state = json.loads(json.dumps(it.state_dict()))
        expected = [next(it) for _ in range(4)]
    assert state["epoch"] == 1 and state["position"] == 1
    flips = np.concatenate([b["flipped"] for b in expected])
    crops = np.concatenate([b["crop_top_left"] for b in expected])
    assert flips.any() and not flips.all() and len({tuple(c) for c in crops}) > 1  # really random
    with BatchIterator(ds, num_workers=num_workers, **kwargs) as restored:
        next(restored)  # consume something first: the restore must override it
        restored.load_state_dict(state)
        _assert_same_batches(expected, [next(restored) for _ in range(4)])


def test_restoring_with_a_changed_dataset_warns(tmp_path):
    ds = _prior_dataset(tmp_path)
    state = BatchIterator(ds, resolution=8, batch_size=2, seed=0).state_dict()
    _noise(tmp_path / "inst" / "img_99.png", 99)
    ds2 = _prior_dataset(tmp_path)
    with logged_warning("fingerprint"):
        BatchIterator(ds2, resolution=8, batch_size=2, seed=0).load_state_dict(state)


def test_hosts_read_disjoint_shares_whose_union_is_the_global_batch(tmp_path):
    ds = _prior_dataset(tmp_path, n_inst=5, n_cls=7)
    kwargs = dict(resolution=12, batch_size=4, seed=9, random_flip=True, tokenize=_fake_tokenize)
    single = BatchIterator(ds, **kwargs)
    hosts = [BatchIterator(ds, process_index=p, process_count=2, **kwargs) for p in range(2)]
    assert hosts[0].local_batch_size == 2 and hosts[0].num_batches_per_epoch == single.num_batches_per_epoch
    mixed_flips = False
    for _ in range(5):
        full = next(single)
        parts = [next(h) for h in hosts]
        mixed_flips |= len(set(full["flipped"][:4].tolist())) == 2  # rows get their own augmentation
        for key in full:
            inst = np.concatenate([p[key][:2] for p in parts])
            cls = np.concatenate([p[key][2:] for p in parts])
            np.testing.assert_array_equal(np.concatenate([inst, cls]), full[key], err_msg=key)
    assert mixed_flips


def test_batch_size_must_divide_among_processes(tmp_path):
    ds = make_dreambooth_dataset(_folder(tmp_path / "inst", 2), "sks toy")
    with pytest.raises(JaxboothError, match=r"train_batch_size=6 .* 4 processes"):
        BatchIterator(ds, resolution=8, batch_size=6, seed=0, process_index=0, process_count=4)


# ---------------------------------------------------------------------------- bundled examples


def test_bundled_examples_load_and_stay_small():
    inst, cls = example_instance_dir(), example_class_dir()
    files = sorted(inst.glob("*.png")) + sorted(cls.glob("*.png"))
    assert len(files) == 10 and sum(f.stat().st_size for f in files) < 150 * 1024
    sizes = {Image.open(f).size for f in files}
    assert len(sizes) >= 4 and all(96 <= min(s) and max(s) <= 160 for s in sizes)
    ds = make_dreambooth_dataset(inst, EXAMPLE_INSTANCE_PROMPT, cls, EXAMPLE_CLASS_PROMPT)
    assert len(ds.examples) == 10 and len(ds) == 5
    batch = next(BatchIterator(ds, resolution=64, batch_size=2, seed=0))
    assert batch["pixel_values"].shape == (4, 64, 64, 3)
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0


def test_bundled_examples_are_what_the_script_draws(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_example_images", REPO / "scripts" / "make_example_images.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    drawn = module.make_example_images(tmp_path)
    assert len(drawn) == 10
    for path in drawn:
        bundled = data.example_instance_dir().parent / path.parent.name / path.name
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(bundled)))


def test_unsorted_listing_order_does_not_change_the_dataset(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "inst", 4)
    real_iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: reversed(list(real_iterdir(self))))
    assert [p.name for p in scan_image_folder(folder)] == [f"img_{i:02d}.png" for i in range(4)]
    assert os.listdir(folder)  # sanity: the folder really has files
