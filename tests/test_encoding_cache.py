"""The disk caches' keys, encoder identity and store (jaxbooth.encoding_cache): pure numpy, no model."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxbooth import encoding_cache as ec

LATENT = {"size": (32, 32), "crop": (0, 4), "flip": False, "interpolation": "bilinear", "encoder": "e1"}


def test_latent_key_changes_with_every_input_that_changes_the_pixels_or_the_encoder() -> None:
    base = ec.latent_key("abc", **LATENT)
    assert base == ec.latent_key("abc", **LATENT)
    changed = [ec.latent_key("abd", **LATENT)] + [
        ec.latent_key("abc", **{**LATENT, name: value})
        for name, value in [("size", (32, 48)), ("crop", (4, 0)), ("flip", True), ("interpolation", "lanczos"),
                            ("encoder", "e2")]]
    changed.append(ec.latent_key("abc", **LATENT, resize=ec.resize_label((48, 40))))
    assert ec.resize_label(None) == ec.RESIZE_COVER != ec.resize_label((32, 32))
    assert len({base, *changed}) == len(changed) + 1
    # two names of one PIL filter give the same pixels, so the same key
    assert ec.latent_key("abc", **{**LATENT, "interpolation": "nearest"}) == ec.latent_key(
        "abc", **{**LATENT, "interpolation": "NEAREST-EXACT"})


def test_text_key_follows_the_ids_the_mask_only_when_used_and_the_output() -> None:
    ids, mask = np.array([49406, 320, 49407, 0]), np.array([1, 1, 1, 0])
    base = ec.text_key(ids, encoder="t")
    assert base == ec.text_key(ids.astype(np.int32), encoder="t")
    assert base != ec.text_key(np.array([49406, 321, 49407, 0]), encoder="t")
    assert base != ec.text_key(ids, encoder="u")
    assert base != ec.text_key(ids, encoder="t", attention_mask=mask)
    assert ec.text_key(ids, encoder="t", attention_mask=mask) != ec.text_key(ids, encoder="t",
                                                                           attention_mask=np.ones(4))
    assert base != ec.text_key([ids], encoder="t", output="sdxl")
    assert ec.text_key([ids, ids], encoder="t", output="sdxl") != ec.text_key([ids, ids[::-1]], encoder="t",
                                                                              output="sdxl")


def _component(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"latent_channels": 4}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return folder


def test_encoder_identity_is_the_files_bytes_and_the_precision(tmp_path: Path) -> None:
    memo = tmp_path / "memo"
    one = _component(tmp_path / "a" / "vae", b"\x01" * 1000)
    identity = ec.encoder_identity([one], precision="float32", memo_dir=memo)
    # the same bytes elsewhere (another copy of the model, or the other backend reading it) are the same encoder
    assert ec.encoder_identity([_component(tmp_path / "b" / "vae", b"\x01" * 1000)], precision="float32") == identity
    assert ec.encoder_identity([one], precision="bfloat16 weights", memo_dir=memo) != identity
    assert ec.encoder_identity([one, one], precision="float32", memo_dir=memo) != identity
    assert len(list(memo.iterdir())) == 2  # each file hashed once, remembered for the next run
    weights = one / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"\x02" * 1000)  # same size: the rewrite shows in the mtime
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert ec.encoder_identity([one], precision="float32", memo_dir=memo) != identity


def test_encoder_identity_reads_a_remembered_file_hash_from_the_memo(tmp_path: Path) -> None:
    """The memo on disk answers for a file seen by an earlier run (a fake digest proves it was not re-read)."""
    memo = tmp_path / "memo"
    folder = _component(tmp_path / "vae", b"\x03" * 100)
    ec.encoder_identity([folder], precision="float32", memo_dir=memo)
    ec._FILE_HASHES.clear()  # a new process
    for entry in memo.iterdir():
        entry.write_text("f" * 64)
    faked = ec.encoder_identity([folder], precision="float32", memo_dir=memo)
    ec._FILE_HASHES.clear()
    assert faked != ec.encoder_identity([folder], precision="float32")


def test_store_round_trips_float32_and_counts_reads_and_encodes(tmp_path: Path) -> None:
    store = ec.EncodingStore(tmp_path, ec.LATENTS, "e")
    mean = np.random.default_rng(0).standard_normal((4, 8, 8))
    store.put("k1", {"mean": mean, "std": np.ones((4, 8, 8), np.float16)})
    assert store.get_many(["k0"]) == {}
    found = store.get_many(["k1", "k1", "k2"])
    assert list(found) == ["k1"]
    assert found["k1"]["mean"].dtype == found["k1"]["std"].dtype == np.float32
    np.testing.assert_array_equal(found["k1"]["mean"], mean.astype(np.float32))
    assert (store.encoded, store.read) == (1, 1)
    assert store.summary() == f"VAE latents: encoded 1, read 1 from the disk cache {tmp_path}"
    # another process (a new store on the same folder) reads it
    assert list(ec.EncodingStore(tmp_path, ec.LATENTS, "e").get_many(["k1"])) == ["k1"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_torn_entry_is_a_miss_and_is_rewritten(tmp_path: Path) -> None:
    store = ec.EncodingStore(tmp_path, ec.TEXT, "e")
    store.put("k", {"embeds": np.ones((3, 2))})
    path = store.path("k")
    path.write_bytes(path.read_bytes()[:40])  # what a non-atomic writer leaves after a crash
    assert store.get_many(["k"]) == {}
    store.put("k", {"embeds": np.ones((3, 2))})
    assert list(store.get_many(["k"])) == ["k"]


def test_a_write_that_fails_leaves_no_entry_and_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    store = ec.EncodingStore(tmp_path, ec.TEXT, "e")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ec.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put("k", {"embeds": np.ones((3, 2))})
    monkeypatch.undo()
    assert not store.path("k").exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_concurrent_writers_of_one_key_leave_one_whole_entry(tmp_path: Path) -> None:
    """Hosts of one run (or two runs) sharing the folder may encode the same entry at once."""
    stores = [ec.EncodingStore(tmp_path, ec.LATENTS, "e") for _ in range(4)]
    value = np.arange(4 * 64 * 64, dtype=np.float32).reshape(4, 64, 64)
    seen: list[list[str]] = []

    def work(store: ec.EncodingStore) -> None:
        for _ in range(20):
            store.put("shared", {"mean": value, "std": value})
            seen.append(list(store.get_many(["shared"])))

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and all(found == ["shared"] for found in seen)  # a reader never saw a torn file
    np.testing.assert_array_equal(stores[0].get_many(["shared"])["shared"]["mean"], value)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [stores[0].path("shared").name]


def test_cache_root_and_open_store(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JAXBOOTH_CACHE", str(tmp_path / "home"))
    assert ec.cache_root(None) == tmp_path / "home" / "encodings"
    assert ec.cache_root(str(tmp_path / "mine")) == tmp_path / "mine"
    folder = _component(tmp_path / "vae", b"\x04" * 10)
    assert ec.open_store(ec.LATENTS, enabled=False, encoding_cache_dir=None, folders=[folder],
                         precision="float32") is None
    store = ec.open_store(ec.TEXT, enabled=True, encoding_cache_dir=None, folders=[folder], precision="float32")
    assert store is not None and store.root == tmp_path / "home" / "encodings" and store.kind == ec.TEXT
    assert store.encoder == ec.encoder_identity([folder], precision="float32")
    assert ec.precision_tag("float32", "weights") == "float32"
    assert ec.precision_tag("bfloat16", "weights") != ec.precision_tag("bfloat16", "compute")
