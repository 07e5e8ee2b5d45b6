"""``--dataset_config``: kohya's dataset config file (TOML, or the same structure as YAML / JSON).

The documented form (kohya sd-scripts, docs/config_README-en.md)::

    [general]                      # options for every dataset and subset
    [[datasets]]                   # resolution, batch_size, bucket keys; subset options too
      [[datasets.subsets]]         # image_dir (required), is_reg, class_tokens, num_repeats, ...

A subset option inherits subset -> dataset -> [general] -> the run spec's flag, as kohya's.
jaxbooth's model of it: every subset is a :class:`~jaxbooth.data.dataset.Subset`; ``is_reg``
subsets are class (prior-preservation) images read as they are, and turn prior preservation on
(weight ``--prior_loss_weight``); ``class_tokens`` is the caption of images without a caption
file (kohya's ``.caption`` extension unless ``caption_extension`` says otherwise); ``num_repeats``
is the subset's repeats; ``flip_aug`` its random flip. Dataset-level keys (``resolution``,
``batch_size`` -> ``train_batch_size``, the bucket keys) are one value per run in jaxbooth: two
datasets that disagree are an error, and the file's values win over the command line's (as kohya's).
Unknown keys are errors naming the file, the line and the closest valid key; kohya keys jaxbooth
does not implement are errors saying so, never ignored.

Entry points: :func:`spec_overrides` (the spec keys the file decides; ``run_defaults.fill_defaults``
applies them), :func:`config_dataset` (the :class:`Dataset`, via ``instance_dataset``) and
:func:`check_file` (structure only, for spec validation).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any

from jaxbooth import log as jaxbooth_log
from jaxbooth.data.config_files import key_line, read_config
from jaxbooth.data.dataset import Dataset, Subset, make_dataset
from jaxbooth.data.folders import read_caption_file
from jaxbooth.errors import JaxboothError

KOHYA_CAPTION_EXTENSION = ".caption"  # kohya's default when nothing sets caption_extension
# Dataset-level keys -> the spec key each sets for the whole run.
DATASET_KEYS: Mapping[str, str] = {
    "resolution": "resolution", "batch_size": "train_batch_size", "enable_bucket": "enable_bucket",
    "min_bucket_reso": "min_bucket_reso", "max_bucket_reso": "max_bucket_reso",
    "bucket_reso_steps": "bucket_reso_steps", "bucket_no_upscale": "bucket_no_upscale",
}
# Subset options that may also sit in [[datasets]] and [general] (kohya's "ascendable" ones).
SUBSET_KEYS = ("num_repeats", "caption_extension", "class_tokens", "shuffle_caption", "keep_tokens",
               "caption_separator", "caption_dropout_rate", "flip_aug", "caption_prefix", "caption_suffix")
SUBSET_ONLY_KEYS = ("image_dir", "is_reg")
_TYPES: Mapping[str, tuple[type | tuple[type, ...], str]] = {
    **dict.fromkeys(["batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "num_repeats",
                     "keep_tokens"], (int, "an integer")),
    **dict.fromkeys(["enable_bucket", "bucket_no_upscale", "shuffle_caption", "flip_aug", "is_reg"],
                    (bool, "true or false")),
    **dict.fromkeys(["caption_extension", "class_tokens", "caption_separator", "caption_prefix", "caption_suffix",
                     "image_dir"], (str, "a string")),
    "caption_dropout_rate": ((int, float), "a number in [0, 1]"),
    "resolution": ((int, list), "an integer, or [width, height]"),
}
# kohya keys jaxbooth does not implement: an error naming them (never silently ignored), with a way out.
KOHYA_ONLY: Mapping[str, str] = {
    "color_aug": "drop it", "face_crop_aug_range": "drop it", "random_crop": "drop it (see --center_crop)",
    "keep_tokens_separator": "use keep_tokens", "secondary_separator": "drop it", "enable_wildcard": "drop it",
    "token_warmup_min": "drop it", "token_warmup_step": "drop it", "custom_attributes": "drop it",
    "resize_interpolation": "use --image_interpolation_mode (one filter for the run)",
    "caption_dropout_every_n_epochs": "use caption_dropout_rate", "caption_tag_dropout_rate": "drop it",
    "cache_info": "drop it (jaxbooth scans folders itself)", "alpha_mask": "drop it",
    "metadata_file": "use image_dir with caption files (fine-tuning datasets are not supported)",
    "conditioning_data_dir": "drop it (ControlNet datasets are not supported)",
    "validation_seed": "drop it", "validation_split": "drop it", "network_multiplier": "drop it",
    "debug_dataset": "drop it", "prior_loss_weight": "use --prior_loss_weight", "max_token_length": "drop it",
}
_LEVELS: Mapping[str, frozenset[str]] = {
    "top": frozenset({"general", "datasets"}),
    "general": frozenset({*DATASET_KEYS, *SUBSET_KEYS}),
    "dataset": frozenset({*DATASET_KEYS, *SUBSET_KEYS, "subsets"}),
    "subset": frozenset({*SUBSET_KEYS, *SUBSET_ONLY_KEYS}),
}
_TABLE_NAMES = {"top": "the top level", "general": "[general]", "dataset": "[[datasets]]",
                "subset": "[[datasets.subsets]]"}


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """A checked config file: its subsets (in file order) and the spec keys its datasets set."""

    path: Path
    subsets: tuple[Subset, ...]
    settings: Mapping[str, Any]  # spec key -> value, only those the file sets
    where: Mapping[str, str]  # spec key -> "file:line: key" of the value


class _Problems:
    """Every mistake of one file, each 'file:line: ...', raised together."""

    def __init__(self, path: Path, lines: Mapping[tuple, int]):
        self.path, self.lines, self.items = path, lines, []

    def at(self, loc: tuple) -> str:
        line = key_line(self.lines, loc)
        return f"{self.path}:{line}" if line else str(self.path)

    def add(self, loc: tuple, message: str) -> None:
        self.items.append(f"{self.at(loc)}: {message}")

    def raise_any(self) -> None:
        if self.items:
            head = f"dataset config {self.path} (--dataset_config): {len(self.items)} problem(s):\n  "
            raise JaxboothError(head + "\n  ".join(self.items))


def _check_table(table: Any, level: str, loc: tuple, p: _Problems) -> None:
    if not isinstance(table, Mapping):
        p.add(loc, f"{_TABLE_NAMES[level]} must be a table of key = value lines, found {table!r}")
        return
    allowed = _LEVELS[level]
    for key, value in table.items():
        here = (*loc, key)
        if key in allowed:
            _check_value(key, value, here, p)
        elif key in KOHYA_ONLY:
            p.add(here, f"{key} is a kohya option jaxbooth does not support; {KOHYA_ONLY[key]}")
        elif any(key in keys for keys in _LEVELS.values()):
            homes = " or ".join(_TABLE_NAMES[lv] for lv in ("general", "dataset", "subset") if key in _LEVELS[lv])
            p.add(here, f"{key} belongs in {homes}, not in {_TABLE_NAMES[level]}; move it there")
        else:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"valid keys here: {', '.join(sorted(allowed))}"
            p.add(here, f"unknown key {key!r} in {_TABLE_NAMES[level]}; {hint}")


def _check_value(key: str, value: Any, loc: tuple, p: _Problems) -> None:
    if key in ("subsets", "general", "datasets"):
        return
    kind, words = _TYPES[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        p.add(loc, f"{key} = {value!r}: must be {words}")
    elif key == "resolution" and isinstance(value, list) and (
            len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        p.add(loc, f"resolution = {value!r}: must be an integer, or [width, height]")
    elif key == "caption_dropout_rate" and not 0 <= value <= 1:
        p.add(loc, f"caption_dropout_rate = {value!r}: must be a number in [0, 1]")
    elif key in ("num_repeats", "batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps") and value < 1:
        p.add(loc, f"{key} = {value!r}: must be >= 1")
    elif key == "keep_tokens" and value < 0:
        p.add(loc, f"keep_tokens = {value!r}: must be >= 0")
    elif key == "caption_separator" and not value:
        p.add(loc, "caption_separator is empty; use e.g. ',' (the default)")


def _structure(path: Path) -> tuple[dict, Mapping[tuple, int], _Problems]:
    """Read and check the file's structure and value types (no folders touched); raise every problem."""
    data, lines = read_config(path)
    p = _Problems(path, lines)
    _check_table(data, "top", (), p)
    _check_table(data.get("general", {}), "general", ("general",), p)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        p.add(("datasets",), "no [[datasets]]: add a [[datasets]] table with at least one [[datasets.subsets]] "
                             "that has an image_dir")
        p.raise_any()
    for i, ds in enumerate(datasets):
        _check_table(ds, "dataset", ("datasets", i), p)
        subsets = ds.get("subsets") if isinstance(ds, Mapping) else None
        if not isinstance(subsets, list) or not subsets:
            p.add(("datasets", i), "this [[datasets]] has no [[datasets.subsets]]; add one with an image_dir")
            continue
        for j, sub in enumerate(subsets):
            _check_table(sub, "subset", ("datasets", i, "subsets", j), p)
            if isinstance(sub, Mapping) and "image_dir" not in sub:
                p.add(("datasets", i, "subsets", j), "this [[datasets.subsets]] has no image_dir (required): "
                                                     "the folder of its images")
    p.raise_any()
    return data, lines, p


def check_file(path: str | os.PathLike) -> None:
    """Spec validation's early check: the file exists and its structure is valid (raises JaxboothError)."""
    _structure(Path(path))


def _image_dir(raw: str, path: Path) -> Path:
    """kohya resolves a relative image_dir against the working directory; jaxbooth also tries the file's folder."""
    folder = Path(raw).expanduser()
    if folder.is_absolute() or folder.is_dir():
        return folder
    beside = path.parent / folder
    return beside if beside.is_dir() else folder


def _dataset_settings(data: Mapping, p: _Problems) -> tuple[dict[str, Any], dict[str, str]]:
    """One value per dataset-level key for the run; datasets that disagree are an error."""
    general = data.get("general", {})
    settings: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, spec_key in DATASET_KEYS.items():
        seen: dict[Any, str] = {}
        for i, ds in enumerate(data["datasets"]):
            loc = ("datasets", i, key) if key in ds else ("general", key) if key in general else None
            if loc is None:
                continue
            value = ds.get(key, general.get(key))
            if key == "resolution" and isinstance(value, list):
                if value[0] != value[1]:
                    p.add(loc, f"resolution = {value}: jaxbooth trains square images (or aspect buckets of about "
                               "resolution^2 pixels with enable_bucket); use one number, e.g. "
                               f"resolution = {max(value)}")
                    continue
                value = value[0]
            seen.setdefault(value, f"{p.at(loc)}: {key} = {value!r}")
        if len(seen) > 1:
            p.add(("datasets",), f"the datasets set different {key} values ({'; '.join(seen.values())}); jaxbooth "
                                 f"trains one {key} per run: put the subsets in one [[datasets]] with one {key}, or "
                                 "train them in separate runs")
        elif seen:
            (value, text), = seen.items()
            settings[spec_key], where[spec_key] = value, text
    if "resolution" in settings and settings["resolution"] % 8:
        p.add(("general", "resolution"), f"resolution = {settings['resolution']}: not divisible by 8 (the VAE "
                                         "downsamples by 8)")
    return settings, where


def _chain(key: str, sub: Mapping, ds: Mapping, general: Mapping, fallback: Any) -> Any:
    for table in (sub, ds, general):
        if table.get(key) is not None:
            return table[key]
    return fallback


def _subsets(data: Mapping, path: Path, spec: Any, p: _Problems) -> list[Subset]:
    general = data.get("general", {})
    d, prior = spec.data, spec.prior
    out: list[Subset] = []
    for i, ds in enumerate(data["datasets"]):
        seen: dict[Path, str] = {}
        for j, sub in enumerate(ds["subsets"]):
            loc = ("datasets", i, "subsets", j)
            is_reg = bool(sub.get("is_reg", False))
            folder = _image_dir(sub["image_dir"], path)
            if not folder.is_dir():
                p.add((*loc, "image_dir"), f"image_dir = {sub['image_dir']!r}: no such folder (relative paths are "
                                           f"tried from the working directory and from {path.parent})")
                continue
            key = folder.resolve()
            if key in seen:
                p.add(loc, f"image_dir {sub['image_dir']!r} repeats the subset at {seen[key]} in the same dataset "
                           "(kohya would drop this one); remove one, or raise num_repeats")
                continue
            seen[key] = p.at(loc)

            def get(name: str, fallback: Any, sub: Mapping = sub, ds: Mapping = ds) -> Any:
                return _chain(name, sub, ds, general, fallback)

            prompt = get("class_tokens", (prior.class_prompt if is_reg else d.instance_prompt) or "")
            flip = get("flip_aug", None)
            try:
                out.append(Subset(
                    folder, prompt, is_class=is_reg, repeats=get("num_repeats", 1 if is_reg else d.repeats),
                    use_captions=True,
                    caption_extension=get("caption_extension", d.caption_extension or KOHYA_CAPTION_EXTENSION),
                    caption_dropout_rate=float(get("caption_dropout_rate", d.caption_dropout_rate)),
                    shuffle_caption=get("shuffle_caption", d.shuffle_caption),
                    keep_tokens=get("keep_tokens", d.keep_tokens),
                    caption_separator=get("caption_separator", d.caption_separator),
                    caption_prefix=get("caption_prefix", ""), caption_suffix=get("caption_suffix", ""),
                    random_flip=bool(d.random_flip) if flip is None else flip))
            except JaxboothError as error:
                p.add(loc, str(error))
    return out


def load_dataset_config(spec: Any) -> DatasetConfig:
    """Read and check ``spec.data.dataset_config`` into subsets and run settings (no image is read)."""
    path = Path(spec.data.dataset_config)
    data, _, p = _structure(path)
    settings, where = _dataset_settings(data, p)
    subsets = _subsets(data, path, spec, p)
    p.raise_any()
    return DatasetConfig(path, tuple(subsets), settings, where)


def _conflicts(spec: Any, path: Path) -> None:
    d, prior = spec.data, spec.prior
    for name, value in (("instance_data_dir", d.instance_data_dir), ("dataset_name", d.dataset_name),
                        ("class_data_dir", prior.class_data_dir)):
        if value is not None:
            raise JaxboothError(f"--dataset_config={path} and --{name}={value}: the config file's subsets are the "
                                f"images (is_reg ones the class images); drop --{name} or put it in the file as a "
                                "[[datasets.subsets]] image_dir")


def spec_overrides(spec: Any, given: Set[str] = frozenset()) -> dict[str, Any]:
    """The flat spec keys the file decides: its datasets' resolution, batch_size and bucket keys (the
    file wins over the command line, as kohya's; a differing flag the user gave is warned about),
    ``with_prior_preservation`` when it has is_reg subsets, and ``random_flip`` when every subset
    flips alike. {} without ``dataset_config``. ``run_defaults.fill_defaults`` applies them last, so the
    file's values also win over its own defaults (the built-in tiny model's resolution)."""
    if getattr(spec.data, "dataset_config", None) is None:
        return {}
    cfg = load_dataset_config(spec)
    _conflicts(spec, cfg.path)
    flat = spec.flat()
    out: dict[str, Any] = {}
    for key, value in cfg.settings.items():  # all of them, so they also win over fill_defaults' own choices
        if flat[key] != value and key in given:
            jaxbooth_log.warning(f"{cfg.where[key]} wins over --{key}={flat[key]} (the dataset config decides, "
                                 "as in kohya); drop the flag or change the file")
        out[key] = value
    has_reg = any(s.is_class for s in cfg.subsets)
    if has_reg and not spec.prior.with_prior_preservation:
        out["with_prior_preservation"] = True
    elif not has_reg and spec.prior.with_prior_preservation:
        raise JaxboothError(f"--with_prior_preservation with --dataset_config={cfg.path}, which has no is_reg subset: "
                            "add a [[datasets.subsets]] with is_reg = true (the class images) or drop the flag")
    flips = {s.random_flip for s in cfg.subsets}
    if len(flips) == 1 and flat["random_flip"] != next(iter(flips)):
        out["random_flip"] = next(iter(flips))
    return out


def config_dataset(spec: Any) -> Dataset:
    """Every subset of the spec's dataset config, scanned (images validated, captions read) now,
    before any model loads. The spec must already carry :func:`spec_overrides`."""
    cfg = load_dataset_config(spec)
    _conflicts(spec, cfg.path)
    flat = spec.flat()
    stale = {key: value for key, value in spec_overrides(spec).items() if flat[key] != value}
    if stale:
        raise JaxboothError(f"the run spec does not carry the settings of --dataset_config={cfg.path} ("
                            + ", ".join(f"{k}: {flat[k]!r} -> {v!r}" for k, v in stale.items())
                            + "); resolve it with jaxbooth.data.dataset_config.spec_overrides (jaxbooth train does),"
                              " or set those keys, e.g. --with_prior_preservation for is_reg subsets")
    dataset = make_dataset(cfg.subsets, skip_bad=bool(spec.data.skip_bad_images))
    for index, sub in enumerate(cfg.subsets):
        paths = [ex.path for ex in dataset.examples if ex.subset == index]
        captioned = sum(read_caption_file(p, sub.caption_extension) is not None for p in paths)
        jaxbooth_log.info(
            f"{cfg.path}: {sub.role} subset {sub.folder}: {len(paths)} images x {sub.repeats} repeats, "
            f"{captioned} captions from {sub.caption_extension} files"
            + (f", the rest {sub.prompt!r}" if captioned < len(paths) else "")
            + (f"; caption dropout {sub.caption_dropout_rate}" if sub.caption_dropout_rate else "")
            + (f"; shuffled tags (keep {sub.keep_tokens})" if sub.shuffle_caption else "")
            + ("; flipped" if sub.random_flip else ""))
    return dataset
