"""Image folders: which files are usable training images, and their sidecar captions.

Owns folder scanning and validation (every image fully decoded once, all problems reported
together), the bundled example folders and kohya-style ``<stem>.txt`` caption files.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from jaxbooth import log as jaxbooth_log
from jaxbooth.data.images import _hash_key, decode_rgb, remember_hash
from jaxbooth.errors import JaxboothError

EXAMPLE_INSTANCE_PROMPT = "a photo of sks toy"
EXAMPLE_CLASS_PROMPT = "a photo of a toy"
CAPTION_EXTENSION = ".txt"
# Sidecar caption extensions kohya users have (kohya's own default is .caption): never images, and
# when captions are off but such files sit beside the images, the run suggests --caption_extension.
KNOWN_CAPTION_EXTENSIONS = (".txt", ".caption")
# OS metadata files that land in image folders and are never training data.
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
SKIP_BAD_HINT = "set skip_bad_images (--skip_bad_images) to skip them with a warning"
_FOLDER_FLAGS = {"instance": "--instance_data_dir", "class": "--class_data_dir"}
_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_instance_dir() -> Path:
    """Bundled subject images (a red-and-yellow toy robot) for smoke runs and docs."""
    return _EXAMPLES / "instance"


def example_class_dir() -> Path:
    """Bundled generic toy images, a tiny prior-preservation class set."""
    return _EXAMPLES / "class"


def inspect_image(path: Path) -> str | None:
    """Return why `path` cannot be trained on, or None. Fills the content-hash cache.

    verify() catches bad checksums; the full decode catches truncation that verify misses.
    """
    try:
        key = _hash_key(path)
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or exc})"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Image.UnidentifiedImageError:
        return "not an image PIL can read (unknown format or not an image at all)"
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"corrupt image ({type(exc).__name__}: {exc})"
    try:
        decode_rgb(io.BytesIO(data))
    except Exception as exc:
        return f"corrupt or truncated image ({type(exc).__name__}: {exc})"
    remember_hash(key, data)
    return None


def report_bad_images(where: str, bad: Mapping[str, str], total: int, *, skip_bad: bool) -> None:
    """One error listing every unusable image (label -> why), or with `skip_bad` one warning.

    All problems together, so a user fixes a folder in one pass instead of one crash per file.
    """
    if not bad:
        return
    listing = "\n".join(f"  {label}: {why}" for label, why in bad.items())
    head = f"{where}: {len(bad)} of {total} files cannot be used as images"
    if not skip_bad:
        raise JaxboothError(f"{head}:\n{listing}\nRemove or re-save them, or {SKIP_BAD_HINT}.")
    jaxbooth_log.warning(f"{head}; skipping them:\n{listing}")


def _candidate_files(folder: Path, caption_extension: str) -> tuple[list[Path], list[str]]:
    """Files that should be images (sorted), and the names of skipped subfolders."""
    skip_suffixes = {*KNOWN_CAPTION_EXTENSIONS, caption_extension.lower()}
    files, subdirs = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.lower() in _IGNORED_NAMES:
            continue
        if p.is_dir():
            subdirs.append(p.name)
        elif p.suffix.lower() not in skip_suffixes:
            files.append(p)
    return files, subdirs


def scan_image_folder(
    folder: str | Path,
    *,
    skip_bad: bool = False,
    role: str = "instance",
    caption_extension: str = CAPTION_EXTENSION,
) -> list[Path]:
    """List the usable images of `folder`, sorted by name; every one is fully decoded once.

    Like diffusers (`Path(dir).iterdir()`), not recursive; hidden files, OS metadata files,
    subfolders and caption sidecars are ignored. All other files must be images: bad ones
    are reported together in ONE error (or, with `skip_bad`, one warning and skipped).
    Never writes to `folder`.
    """
    folder = Path(folder)
    flag = _FOLDER_FLAGS.get(role)
    where = f"{role} images folder {folder}" + (f" ({flag})" if flag else "")
    if not folder.exists():
        raise JaxboothError(f"{where} does not exist; check the path.")
    if not folder.is_dir():
        raise JaxboothError(f"{where} is a file, not a folder; pass the folder that holds the images.")
    files, subdirs = _candidate_files(folder, caption_extension)
    problems = {p: inspect_image(p) for p in files}
    bad = {p: why for p, why in problems.items() if why is not None}
    report_bad_images(where, {p.name: why for p, why in bad.items()}, len(files), skip_bad=skip_bad)
    good = [p for p in files if p not in bad]
    if not good:
        sub = f" (subfolders are not searched: {', '.join(subdirs)})" if subdirs else ""
        raise JaxboothError(
            f"{where} has no usable images{sub}; put the .png/.jpg/.webp files directly in it."
        )
    return good


def read_caption_file(image: Path, caption_extension: str) -> str | None:
    """First line of the sidecar caption (kohya's rule), or None when absent or empty."""
    side = image.with_suffix(caption_extension)
    if not side.is_file():
        return None
    try:
        lines = side.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise JaxboothError(
            f"caption file {side} cannot be read as UTF-8 text ({exc}); re-save it as UTF-8."
        ) from exc
    return lines[0].strip() if lines and lines[0].strip() else None


def sidecar_extensions(images: list[Path]) -> list[str]:
    """The known caption extensions (.txt, .caption) that have a file beside at least one of `images`."""
    return [ext for ext in KNOWN_CAPTION_EXTENSIONS if any(p.with_suffix(ext).is_file() for p in images)]
