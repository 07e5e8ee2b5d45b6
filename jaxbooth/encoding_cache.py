"""Disk caches of encodings (``--cache_latents_to_disk``, ``--cache_text_embeddings_to_disk``): encode once,
across runs, processes and backends.

One file per entry, ``<root>/<kind>/<key[:2]>/<key>.npz`` (plain numpy arrays, float32, no pickles), so
both backends read what either wrote and several processes (hosts of one run, or runs) share the folder:
each entry is written to a temporary file beside it and renamed into place, so a reader sees the whole
entry or none; two writers of one key write the same values and the last rename wins. An unreadable
entry (a crash on a filesystem without atomic rename, a disk that filled) is a miss and is rewritten.

A key is the hash of everything the encoding depends on, so a changed input is a new key and only its
entries are encoded again:

* VAE latents (:func:`latent_key`): the image's content hash, the crop's size (the resolution square or
  the bucket shape), top-left and flip (the offset in the flipped image, as the data pipeline records
  it), the resize rule and filter, and the encoder identity. Stored: the posterior ``mean`` and ``std``
  channel-first ``[C, h, w]`` (diffusers' layout) before any SDXL latent statistics, so each step still
  draws a fresh sample and both backends train on what they would have encoded.
* text embeddings (:func:`text_key`): the token ids (which fix the prompt, tokenizer and max length),
  the attention mask when the encoder sees it, and the encoder identity. Stored: ``embeds`` ``[L, D]``
  (SDXL: both encoders' concatenated, plus ``pooled`` ``[P]``).

The encoder identity (:func:`encoder_identity`) hashes the bytes of every file in the model's component
folders (config and weights) plus the precision it runs in; each file's hash is remembered under the
cache folder by (path, size, mtime), so only a new or changed file is read again. numpy only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxbooth.data.images import resize_filter

FORMAT = 1  # part of every key: bump when what an entry holds changes, and old entries are never read
LATENTS, TEXT = "latents", "text"
RESIZE_COVER = "cover"  # the short side resized to cover the crop (torchvision Resize truncation), then cropped
_HASH_CHUNK = 1 << 23


def cache_root(encoding_cache_dir: str | os.PathLike | None) -> Path:
    """``encoding_cache_dir``, or ``<jaxbooth cache>/encodings`` when None (``jaxbooth.tiny.default_cache_dir``)."""
    if encoding_cache_dir:
        return Path(encoding_cache_dir).expanduser()
    from jaxbooth.tiny import default_cache_dir

    return default_cache_dir() / "encodings"


def _digest(fields: Mapping[str, Any]) -> str:
    text = json.dumps({"format": FORMAT, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def resize_label(resized: Sequence[int] | None) -> str:
    """The ``resize`` of :func:`latent_key`: :data:`RESIZE_COVER` for the ``resolution`` squares (None), or the
    exact (h, w) an image was resized to before its crop (an aspect-ratio bucket's plan)."""
    return RESIZE_COVER if resized is None else "to {}x{}".format(*(int(v) for v in resized))


def latent_key(content_hash: str, *, size: Sequence[int], crop: Sequence[int], flip: bool, interpolation: str,
               encoder: str, resize: str = RESIZE_COVER) -> str:
    """The key of one crop's VAE posterior. ``size``: the crop's (h, w); ``crop``: its top-left (y, x) in the
    resized (and, when ``flip``, mirrored) image; ``interpolation``: the resize filter's name (names of one
    PIL filter share keys); ``resize``: how the image was resized before the crop (:func:`resize_label`;
    by default its short side to the crop's, as torchvision's Resize of the ``resolution`` squares)."""
    return _digest({"kind": LATENTS, "image": str(content_hash), "size": [int(v) for v in size],
                    "crop": [int(v) for v in crop], "flip": bool(flip), "resize": resize,
                    "filter": resize_filter(interpolation).name, "encoder": encoder})


def text_key(input_ids: Sequence[np.ndarray] | np.ndarray, *, encoder: str,
             attention_mask: np.ndarray | None = None, output: str = "last_hidden_state") -> str:
    """The key of one prompt's embeddings: its token ids (one row per tokenizer: SDXL has two), the
    attention mask when the encoder is given one (None otherwise), the encoder identity and which
    output is kept (``last_hidden_state``; ``sdxl``: penultimate states of both encoders and the pooled)."""
    rows = [input_ids] if isinstance(input_ids, np.ndarray) else list(input_ids)
    fields: dict[str, Any] = {"kind": TEXT, "encoder": encoder, "output": output,
                              "ids": [np.asarray(r).astype(np.int64).ravel().tolist() for r in rows]}
    if attention_mask is not None:
        fields["mask"] = np.asarray(attention_mask).astype(np.int64).ravel().tolist()
    return _digest(fields)


# ---------------------------------------------------------------------------- encoder identity


def precision_tag(dtype_name: str, how: str) -> str:
    """What an encoder's numerics are, for :func:`encoder_identity`: ``"float32"``, else the reduced dtype and
    ``how`` the backend applies it (torch casts the weights, JAX computes in it), so reduced-precision
    encodings are shared only between runs that compute them alike."""
    return "float32" if dtype_name == "float32" else f"{dtype_name} {how}"


_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_FILE_HASHES_LOCK = threading.Lock()


def _file_hash(path: Path, memo_dir: Path | None) -> str:
    """sha256 of a file's bytes, remembered in this process and (``memo_dir``) on disk by (path, size, mtime)."""
    resolved, st = path.resolve(), path.stat()
    memo_key = (str(resolved), st.st_size, st.st_mtime_ns)
    with _FILE_HASHES_LOCK:
        if memo_key in _FILE_HASHES:
            return _FILE_HASHES[memo_key]
    memo = None if memo_dir is None else memo_dir / hashlib.sha256(repr(memo_key).encode()).hexdigest()
    digest = None
    if memo is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = memo.read_text().strip()
            digest = text if len(text) == 64 else None
    if digest is None:
        h = hashlib.sha256()
        with open(resolved, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        if memo is not None:
            with contextlib.suppress(OSError):
                _atomic_write(memo, lambda handle: handle.write(digest.encode()))
    with _FILE_HASHES_LOCK:
        _FILE_HASHES[memo_key] = digest
    return digest


def encoder_identity(folders: Iterable[str | os.PathLike], *, precision: str,
                     memo_dir: str | os.PathLike | None = None) -> str:
    """A hash of the files (config, weights, every regular file) of each of ``folders`` and of ``precision``,
    the numerics the encoder runs in (e.g. ``"float32"``; a backend's tag for a reduced precision).

    Same bytes, same identity, whichever folder or backend they are read from; a changed weight (or config)
    file changes it. ``memo_dir``: where file hashes are remembered across runs (the cache folder).
    """
    memo = None if memo_dir is None else Path(memo_dir)
    parts = []
    for folder in folders:
        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        parts.append([[p.name, _file_hash(p, memo)] for p in files])
    return _digest({"kind": "encoder", "files": parts, "precision": precision})


# ---------------------------------------------------------------------------- the store


def _atomic_write(path: Path, write: Any) -> None:
    """``write(handle)`` into a temporary file beside ``path``, then rename it into place (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


class EncodingStore:
    """The entries of one kind (``latents`` or ``text``) of one encoder under ``root``, with the counts a run
    logs: ``encoded`` (entries put) and ``read`` (entries found by :meth:`get_many`).

    ``encoder``: the :func:`encoder_identity` the caller builds its keys with.
    """

    def __init__(self, root: str | os.PathLike, kind: str, encoder: str):
        if kind not in (LATENTS, TEXT):
            raise ValueError(f"kind must be {LATENTS!r} or {TEXT!r}, got {kind!r}")
        self.root, self.kind, self.encoder = Path(root), kind, encoder
        self.encoded = self.read = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / self.kind / key[:2] / f"{key}.npz"

    def _load(self, key: str) -> dict[str, np.ndarray] | None:
        try:
            with np.load(self.path(key), allow_pickle=False) as entry:
                return {name: entry[name] for name in entry.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
            return None  # absent, or unreadable: a miss (put rewrites it)

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
        """The stored arrays of each of ``keys`` that has an entry (misses are left out)."""
        found = {}
        for key in dict.fromkeys(keys):
            arrays = self._load(key)
            if arrays is not None:
                found[key] = arrays
        with self._lock:
            self.read += len(found)
        return found

    def put(self, key: str, arrays: Mapping[str, Any]) -> None:
        """Store one encoding (floating arrays as float32), atomically; counted as encoded."""
        stored = {name: np.asarray(value, np.float32) if np.issubdtype(np.asarray(value).dtype, np.floating)
                  else np.asarray(value) for name, value in arrays.items()}
        _atomic_write(self.path(key), lambda handle: np.savez(handle, **stored))
        with self._lock:
            self.encoded += 1

    def summary(self) -> str:
        """The line a run logs: ``VAE latents: encoded N, read M from the disk cache <root>``."""
        what = "VAE latents" if self.kind == LATENTS else "text embeddings"
        return f"{what}: encoded {self.encoded}, read {self.read} from the disk cache {self.root}"


def open_store(kind: str, *, enabled: bool, encoding_cache_dir: str | os.PathLike | None,
               folders: Iterable[str | os.PathLike], precision: str) -> EncodingStore | None:
    """The store of ``kind`` for the encoder in ``folders`` (see :func:`encoder_identity`), None when not
    ``enabled`` (the spec's ``cache_latents_to_disk`` / ``cache_text_embeddings_to_disk``)."""
    if not enabled:
        return None
    root = cache_root(encoding_cache_dir)
    return EncodingStore(root, kind, encoder_identity(folders, precision=precision, memo_dir=root / "file-hashes"))
