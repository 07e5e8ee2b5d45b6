"""A kohya dataset_config TOML in its documented form (two captioned subsets with repeats, a regularisation
subset, per-subset caption options) trains unchanged through `jaxbooth train` on both backends: the file
decides the resolution, batch size and prior preservation, and every drawn row's caption is its image's
caption file (or class_tokens) through the subset's dropout and tag shuffle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from jaxbooth.cli import main
from jaxbooth.data import captions

CAPTION_A = "sks toy, red, on grass, sunny"
CAPTION_B = "sks toy; blue; close up"
TOML = """\
[general]
caption_extension = '.txt'
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 32
batch_size = 3

  [[datasets.subsets]]
  image_dir = '{root}/inst_a'
  class_tokens = 'sks toy'
  num_repeats = 2
  caption_dropout_rate = 0.25

  [[datasets.subsets]]
  image_dir = '{root}/inst_b'
  class_tokens = 'sks toy'
  caption_separator = ';'

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg'
  class_tokens = 'a toy'
"""
ARGS = ["--num_train_epochs=1", "--lr_warmup_steps=0", "--seed=0", "--report_to=none", "--log_every_steps=1",
        "--checkpointing_steps=100", "--learning_rate=1e-4"]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kohya")
    for name, count in (("inst_a", 2), ("inst_b", 1), ("reg", 2)):
        (root / name).mkdir()
        for i in range(count):
            pixels = np.random.default_rng([len(name), i]).integers(0, 256, (40, 36, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "inst_a" / "0.txt").write_text(CAPTION_A + "\n")  # inst_a/1.png has none: class_tokens
    (root / "inst_b" / "0.txt").write_text(CAPTION_B + "\n")
    path = root / "dataset.toml"
    path.write_text(TOML.format(root=root))
    return path


def train(backend: str, model_dir: Path, config: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Run `jaxbooth train --dataset_config=...`; returns every drawn row's (caption, subset, trained caption)."""
    draws: list[tuple] = []
    draw = captions.row_caption

    def spy(caption, subset, rng):
        result = draw(caption, subset, rng)
        draws.append((caption, subset, result))
        return result

    monkeypatch.setattr(captions, "row_caption", spy)
    assert main(["train", f"--backend={backend}", f"--pretrained_model_name_or_path={model_dir}",
                 f"--output_dir={out}", f"--dataset_config={config}", *ARGS]) == 0
    return draws


def check_run(out: Path, draws: list[tuple]) -> dict:
    """The file set the run; the rows trained on the caption files, class_tokens and reg images."""
    resolved = yaml.safe_load((out / "jaxbooth_run.yaml").read_text())
    flat = {k: v for section in resolved.values() if isinstance(section, dict) for k, v in section.items()}
    assert (flat["resolution"], flat["train_batch_size"], flat["with_prior_preservation"]) == (32, 3, True)
    records = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # (2 images x 2 repeats + 1) items at batch_size 3
    assert all(r["train/prior_loss"] > 0 for r in records)  # the is_reg subset trained as class images
    assert {c for c, _, _ in draws} == {CAPTION_A, "sks toy", CAPTION_B, "a toy"}
    for caption, subset, trained in draws:
        kept, rest = captions.split_tags(caption, subset.caption_separator, subset.keep_tokens)
        if trained:
            assert trained.split(", ")[: len(kept)] == kept
            assert sorted(trained.split(", ")[len(kept):]) == sorted(rest)
    return {s.folder.name: s for _, s, _ in draws}


def test_jax_trains_the_kohya_config_with_its_captions(tiny_model_dir: Path, config: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    subsets = check_run(tmp_path / "out", train("jax", tiny_model_dir, config, tmp_path / "out", monkeypatch))
    # dataset_config's [general] caption_extension / shuffle_caption / keep_tokens reach every subset,
    # its subsets' own caption_dropout_rate and caption_separator only theirs
    assert {s.caption_extension for s in subsets.values()} == {".txt"}
    assert all(s.shuffle_caption and s.keep_tokens == 1 for s in subsets.values())
    assert (subsets["inst_a"].caption_dropout_rate, subsets["inst_b"].caption_separator) == (0.25, ";")
    assert subsets["reg"].is_class and subsets["inst_a"].repeats == 2


def test_torch_trains_the_kohya_config_with_its_captions(tiny_model_dir: Path, config: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    subsets = check_run(tmp_path / "out", train("torch", tiny_model_dir, config, tmp_path / "out", monkeypatch))
    # the same dataset_config subsets: caption_extension, shuffle_caption, keep_tokens from [general],
    # caption_dropout_rate and caption_separator per subset
    assert {s.caption_extension for s in subsets.values()} == {".txt"}
    assert all(s.shuffle_caption and s.keep_tokens == 1 for s in subsets.values())
    assert (subsets["inst_a"].caption_dropout_rate, subsets["inst_b"].caption_separator) == (0.25, ";")
    assert subsets["reg"].is_class and subsets["inst_a"].repeats == 2
