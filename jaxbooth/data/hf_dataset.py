"""Instance images from a Hugging Face dataset (``--dataset_name``), as files on disk.

diffusers' LoRA/SDXL DreamBooth scripts load ``--dataset_name`` with ``datasets.load_dataset``
and train on its "train" split: ``--image_column`` (default "image") and, with
``--caption_column``, one prompt per image (an empty caption falls back to
``--instance_prompt``). The rest of jaxbooth works on files (the content hash keys the latent
cache), so every row becomes a path: an image the dataset references on the local disk is
used where it is; one stored as bytes is written once to a content-addressed folder.
``datasets`` is imported here only, when a dataset is asked for.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from jaxbooth.data.dataset import Example
from jaxbooth.data.folders import inspect_image, report_bad_images
from jaxbooth.data.images import content_hash
from jaxbooth.errors import JaxboothError

SPLIT = "train"  # the split diffusers' scripts train on


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise JaxboothError(
            "dataset_name (--dataset_name) needs the Hugging Face datasets library, which is not installed: "
            "run `pip install 'jaxbooth[datasets]'` (or `pip install datasets`), or pass a folder of images "
            "as --instance_data_dir instead."
        ) from exc
    return datasets


def images_cache_dir(cache_dir: str | Path | None) -> Path:
    """Where images stored as bytes are written: ``<cache_dir or jaxbooth's cache>/datasets``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / "datasets"
    from jaxbooth.tiny import default_cache_dir

    return default_cache_dir() / "datasets"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_train_split(datasets: Any, name: str, config_name: str | None, cache_dir: str | None) -> Any:
    """``load_dataset(name, config_name, cache_dir=...)["train"]``, every failure one JaxboothError."""
    shown = f"--dataset_name {name!r}" + (f" (--dataset_config_name {config_name!r})" if config_name else "")
    local = os.path.expanduser(name)
    path = local if local != name and os.path.exists(local) else name
    try:
        loaded = datasets.load_dataset(path, config_name, cache_dir=cache_dir)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and "corresponds to no data" in str(exc):  # datasets' wording for 0 rows
            raise JaxboothError(f"{shown}: {_first_line(exc)}: it has no rows; pass a dataset with images.") from exc
        cache = cache_dir or datasets.config.HF_DATASETS_CACHE
        offline = " Offline mode (HF_HUB_OFFLINE) is on." if datasets.config.HF_HUB_OFFLINE else ""
        raise JaxboothError(
            f"{shown}: the datasets library cannot load it ({_first_line(exc)}).{offline}\n"
            "Fix: pass an existing local folder (e.g. images with a metadata.jsonl, or parquet files), or a Hub "
            f"dataset id that can be downloaded or is already in the datasets cache {cache} (--cache_dir, "
            f"HF_DATASETS_CACHE or HF_HOME; load it once where there is network: "
            f"`python -c \"import datasets; datasets.load_dataset('{name}')\"`); check --dataset_config_name; "
            "or pass a folder of images as --instance_data_dir instead."
        ) from exc
    if SPLIT not in loaded:
        raise JaxboothError(
            f"{shown} has no {SPLIT!r} split (it has: {', '.join(loaded)}); diffusers trains on {SPLIT!r}, so "
            "rename the split or pass a folder of images as --instance_data_dir."
        )
    return loaded[SPLIT]


def _check_column(flag: str, column: str, columns: list[str], name: str) -> None:
    if column not in columns:
        raise JaxboothError(
            f"{flag} {column!r} is not a column of --dataset_name {name}; its columns are: "
            f"{', '.join(columns)}. Pass one of them as {flag}."
        )


def _suffix_for(data: bytes, original: str | None) -> str:
    """A file extension for image bytes: the original name's, else from the decoded format."""
    known = Image.registered_extensions()
    if original and Path(original).suffix.lower() in known:
        return Path(original).suffix.lower()
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except Exception:  # not an image: inspection reports it
        return ".bin"
    return next((ext for ext, f in known.items() if f == fmt), ".bin")


def write_image_bytes(data: bytes, folder: Path, original: str | None = None) -> Path:
    """Write image bytes once, named by their sha1, atomically; the same bytes reuse the file."""
    digest = hashlib.sha1(data).hexdigest()
    path = folder / f"{digest}{_suffix_for(data, original)}"
    if path.is_file() and path.stat().st_size == len(data):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _row_path(value: Any, folder: Path) -> tuple[Path | None, str]:
    """(local file of one image cell, label for messages); the path is None when there is none."""
    if isinstance(value, dict):
        ref, data = value.get("path"), value.get("bytes")
    else:
        ref, data = value, None
    label = Path(str(ref)).name if ref else "bytes"
    local = Path(str(ref)).expanduser() if ref else None
    # A relative name next to stored bytes is the name inside the dataset, not a file here.
    if local is not None and local.is_file() and (not data or local.is_absolute()):
        return local.resolve(), label
    if data:
        return write_image_bytes(bytes(data), folder, ref), label
    return None, label


def load_hf_examples(
    dataset_name: str,
    *,
    config_name: str | None = None,
    image_column: str | None = "image",
    caption_column: str | None = None,
    prompt: str = "",
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    subset_index: int = 0,
) -> list[Example]:
    """The "train" split of a Hugging Face dataset as examples of subset `subset_index`.

    `image_column` None takes the first column (as diffusers). Every image is fully decoded
    once; bad ones are one error listing all of them, or with `skip_bad` one warning.
    Captions come from `caption_column`, an empty one (or no column) falling back to `prompt`.
    """
    datasets = _import_datasets()
    cache = None if cache_dir is None else str(Path(cache_dir).expanduser())
    split = _load_train_split(datasets, dataset_name, config_name, cache)
    columns = list(split.column_names)
    image_column = image_column or columns[0]
    _check_column("--image_column", image_column, columns, dataset_name)
    if caption_column is not None:
        _check_column("--caption_column", caption_column, columns, dataset_name)
    if len(split) == 0:
        raise JaxboothError(
            f"--dataset_name {dataset_name!r}: its {SPLIT!r} split has no rows; pass a dataset with images."
        )
    try:
        split = split.cast_column(image_column, datasets.Image(decode=False))
    except Exception as exc:  # the datasets/pyarrow cast raises several types
        raise JaxboothError(
            f"--image_column {image_column!r} of --dataset_name {dataset_name} does not hold images "
            f"({_first_line(exc)}); pass the column of images (columns: {', '.join(columns)})."
        ) from exc
    wanted = [image_column] + ([caption_column] if caption_column and caption_column != image_column else [])
    folder = images_cache_dir(cache)
    rows: list[tuple[Path, str | None]] = []
    bad: dict[str, str] = {}
    for i, row in enumerate(split.select_columns(wanted)):
        path, label = _row_path(row[image_column], folder)
        why = "the image is neither stored in the dataset nor a local file" if path is None else inspect_image(path)
        if why is not None:
            bad[f"row {i} ({label})"] = why
            continue
        caption = row[caption_column] if caption_column is not None else None
        rows.append((path, None if caption is None else str(caption).strip() or None))
    where = f"--dataset_name {dataset_name} (--image_column {image_column!r})"
    report_bad_images(where, bad, len(split), skip_bad=skip_bad)
    if not rows:
        raise JaxboothError(f"{where} has no usable images; pass a dataset with images.")
    uncaptioned = [str(path.name) for path, caption in rows if caption is None]
    if caption_column is not None and uncaptioned and not prompt.strip():
        raise JaxboothError(
            f"--caption_column {caption_column!r} of --dataset_name {dataset_name}: {len(uncaptioned)} images have "
            f"an empty caption and there is no --instance_prompt to fall back on ({', '.join(uncaptioned[:10])}); "
            "give --instance_prompt or fill in the captions."
        )
    return [Example(path, caption or prompt, subset_index, content_hash(path)) for path, caption in rows]
