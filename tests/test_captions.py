"""Captions: sidecar files with --caption_extension (prompt fallback), and the per-draw transforms of
``jaxbooth.data.captions`` (caption_dropout_rate, shuffle_caption with keep_tokens and caption_separator)
with kohya's semantics, drawn reproducibly from the generator the caller passes."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth.data import Subset, captions, dataset_from_spec, instance_dataset, make_dataset
from jaxbooth.errors import JaxboothError
from jaxbooth.spec import load_spec

TAGS = "sks toy, red, on grass, sunny"


def opts(**kw) -> Subset:
    return Subset(Path("."), "p", **kw)


def test_without_options_the_caption_is_unchanged_and_nothing_is_drawn() -> None:
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    assert captions.row_caption(" a ,b ", opts(), rng) == " a ,b "
    assert rng.bit_generator.state == state


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_dropout_trains_that_fraction_of_draws_on_the_empty_caption(rate: float) -> None:
    rng = np.random.default_rng(0)
    out = [captions.row_caption(TAGS, opts(caption_dropout_rate=rate), rng) for _ in range(4000)]
    assert set(out) <= {"", TAGS}
    assert abs(out.count("") / len(out) - rate) < 0.03


def test_shuffle_keeps_the_first_keep_tokens_and_visits_every_order_of_the_rest() -> None:
    rng = np.random.default_rng(0)
    sub = opts(shuffle_caption=True, keep_tokens=1)
    out = Counter(captions.row_caption(TAGS, sub, rng) for _ in range(1200))
    rest = ["red", "on grass", "sunny"]
    assert set(out) == {", ".join(["sks toy", *p]) for p in itertools.permutations(rest)}
    assert min(out.values()) > 1200 / 6 * 0.7  # about uniform


def test_shuffle_splits_on_the_separator_strips_and_joins_with_comma_space_as_kohya() -> None:
    sub = opts(shuffle_caption=True, keep_tokens=2, caption_separator=";")
    out = captions.row_caption("  a ; b;c ;d  ", sub, np.random.default_rng(3))
    assert out.startswith("a, b, ") and sorted(out.split(", ")[2:]) == ["c", "d"]
    # kohya keeps empty tags (a trailing separator) in the shuffle
    assert sorted(captions.row_caption("x,y,", opts(shuffle_caption=True), np.random.default_rng(0)).split(", ")) \
        == ["", "x", "y"]
    # keep_tokens past the tag count keeps everything in place
    assert captions.row_caption("x ,y", opts(shuffle_caption=True, keep_tokens=5), np.random.default_rng(0)) == "x, y"


def test_the_draw_order_is_the_documented_one() -> None:
    """Dropout's one random(), then (kept) one permutation(n) of the shuffled tags."""
    sub = opts(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.5)
    for seed in range(20):
        ref = np.random.default_rng(seed)
        if ref.random() < 0.5:
            expected = ""
        else:
            flex = ["red", "on grass", "sunny"]
            expected = ", ".join(["sks toy"] + [flex[i] for i in ref.permutation(3)])
        assert captions.row_caption(TAGS, sub, np.random.default_rng(seed)) == expected


def test_same_generator_seed_same_captions_different_seeds_differ() -> None:
    sub = opts(shuffle_caption=True, caption_dropout_rate=0.2)

    def draws(seed: int) -> list[str]:
        return [captions.row_caption(TAGS, sub, np.random.default_rng([seed, epoch, slot]))
                for epoch in range(3) for slot in range(8)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_possible_captions_lists_what_draws_can_give_or_none_past_the_limit() -> None:
    assert captions.possible_captions("a, b", opts(), 10) == {"a, b"}
    assert captions.possible_captions("a, b", opts(caption_dropout_rate=0.1), 10) == {"", "a, b"}
    assert captions.possible_captions("a,b,c", opts(shuffle_caption=True, keep_tokens=1), 10) == {"a, b, c", "a, c, b"}
    assert captions.possible_captions("a,b,c,d,e", opts(shuffle_caption=True), 100) is None  # 120 orders
    rng = np.random.default_rng(0)
    sub = opts(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3)
    allowed = captions.possible_captions(TAGS, sub, 100)
    assert {captions.row_caption(TAGS, sub, rng) for _ in range(300)} == allowed


@pytest.mark.parametrize("bad", [{"caption_dropout_rate": 1.5}, {"keep_tokens": -1}, {"caption_separator": ""}])
def test_subset_rejects_bad_caption_options_naming_them(bad: dict) -> None:
    with pytest.raises(JaxboothError, match=next(iter(bad))):
        opts(**bad)


# ---------------------------------------------------------------- sidecar captions through the spec


def images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{name}.png")
    return folder


@contextlib.contextmanager
def info_lines() -> Iterator[list[str]]:
    logger = logging.getLogger("jaxbooth")
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def captioned(tmp_path: Path) -> Path:
    folder = images(tmp_path / "inst", ["a", "b", "c"])
    (folder / "a.txt").write_text("sks toy on a beach\nsecond line ignored\n")
    (folder / "b.caption").write_text("sks toy at night")
    return folder


def test_caption_extension_reads_the_sidecar_first_line_with_the_prompt_as_fallback(captioned: Path) -> None:
    spec = load_spec([f"--instance_data_dir={captioned}", "--instance_prompt=a photo of sks toy",
                      "--caption_extension=.txt"])
    assert [e.caption for e in instance_dataset(spec).examples] == [
        "sks toy on a beach", "a photo of sks toy", "a photo of sks toy"]
    spec = load_spec([f"--instance_data_dir={captioned}", "--instance_prompt=p", "--caption_extension=caption"])
    assert [e.caption for e in instance_dataset(spec).examples] == ["p", "sks toy at night", "p"]


def test_without_caption_extension_every_image_gets_the_prompt_and_one_line_suggests_the_flag(
        captioned: Path) -> None:
    spec = load_spec([f"--instance_data_dir={captioned}", "--instance_prompt=a photo of sks toy"])
    with info_lines() as lines:
        ds = instance_dataset(spec)  # .txt / .caption sidecars are not mistaken for images
    assert [e.caption for e in ds.examples] == ["a photo of sks toy"] * 3
    assert len([line for line in lines if "--caption_extension=.txt" in line]) == 1


def test_class_images_read_captions_too_and_caption_options_ride_on_every_subset(
        captioned: Path, tmp_path: Path) -> None:
    cls = images(tmp_path / "cls", ["x", "y"])
    (cls / "y.txt").write_text("a toy, blue")
    spec = load_spec([f"--instance_data_dir={captioned}", "--instance_prompt=p", "--caption_extension=.txt",
                      "--with_prior_preservation", f"--class_data_dir={cls}", "--class_prompt=a toy",
                      "--num_class_images=2", "--shuffle_caption", "--keep_tokens=1", "--caption_separator=;",
                      "--caption_dropout_rate=0.25"])
    ds = dataset_from_spec(spec)
    assert [e.caption for e in ds.examples if ds.subsets[e.subset].is_class] == ["a toy", "a toy, blue"]
    assert {(s.shuffle_caption, s.keep_tokens, s.caption_separator, s.caption_dropout_rate) for s in ds.subsets} \
        == {(True, 1, ";", 0.25)}
    assert ds.captions_vary


def test_caption_extension_with_dataset_name_is_an_error_naming_caption_column(tmp_path: Path) -> None:
    spec = load_spec([f"--dataset_name={tmp_path}", "--instance_prompt=p", "--caption_extension=.txt"])
    with pytest.raises(JaxboothError, match="--caption_column"):
        instance_dataset(spec)


def test_fingerprint_and_caption_set_follow_the_caption_settings(captioned: Path) -> None:
    plain = make_dataset([Subset(captioned, "p", use_captions=True)])
    shuffled = make_dataset([Subset(captioned, "p", use_captions=True, shuffle_caption=True)])
    kept = make_dataset([Subset(captioned, "p", use_captions=True, shuffle_caption=True, keep_tokens=1)])
    assert len({plain.fingerprint, shuffled.fingerprint, kept.fingerprint}) == 3
    assert not plain.captions_vary and plain.possible_captions() == ("p", "sks toy on a beach")
    dropped = make_dataset([Subset(captioned, "p", use_captions=True, caption_dropout_rate=0.1)])
    assert dropped.captions_vary and dropped.possible_captions() == ("", "p", "sks toy on a beach")
    assert plain.row_caption(0, np.random.default_rng(0)) == "sks toy on a beach"
