"""Per-draw caption transforms (kohya's caption dropout and tag shuffling) as pure functions.

A row's caption is its example's caption (read once, from the prompt or a sidecar file) passed
through :func:`row_caption` every time the row is drawn. All randomness comes from the numpy
``Generator`` the caller passes, so a run is reproducible and a resumed run draws the same
captions: the batch iterator gives every row its own generator (``BatchIterator.row_rng``-style,
seeded from (seed, epoch, slot, stream)); pass one dedicated to captions so that turning caption
options on does not move the row's crop and flip draws.

Framework-free (stdlib + numpy), shared by both backends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import permutations
from typing import Any, Protocol

import numpy as np

# kohya joins the kept and shuffled tags with this, whatever caption_separator splits them.
TAG_JOIN = ", "


class CaptionOptions(Protocol):
    """What :func:`row_caption` reads of a subset (``jaxbooth.data.dataset.Subset`` has these)."""

    caption_dropout_rate: float
    shuffle_caption: bool
    keep_tokens: int
    caption_separator: str


def split_tags(caption: str, separator: str, keep_tokens: int) -> tuple[list[str], list[str]]:
    """(kept, shuffled) tags, kohya's way: split the stripped caption on `separator`, strip each
    tag (empty tags stay, as kohya keeps them), the first `keep_tokens` stay in place."""
    tags = [t.strip() for t in caption.strip().split(separator)]
    keep = max(0, int(keep_tokens))
    return tags[:keep], tags[keep:]


def shuffle_tags(caption: str, separator: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """The caption with its tags after the first `keep_tokens` in a random order, joined by ", ".

    Draws exactly one ``rng.permutation(number of shuffled tags)``.
    """
    kept, flex = split_tags(caption, separator, keep_tokens)
    order = rng.permutation(len(flex))
    return TAG_JOIN.join(kept + [flex[i] for i in order])


def drop_caption(rate: float, rng: np.random.Generator) -> bool:
    """Whether this draw trains on the empty caption: one ``rng.random()`` when `rate` > 0, none otherwise."""
    return rate > 0 and bool(rng.random() < rate)


def row_caption(example_caption: str, subset: CaptionOptions, rng: np.random.Generator) -> str:
    """The caption a drawn row trains on: `example_caption` after its subset's dropout and shuffle.

    Draw order from `rng` (kohya's order), nothing else is drawn:
      1. if ``subset.caption_dropout_rate > 0``: one ``rng.random()``; below the rate -> ``""``
         (returned at once, no further draw);
      2. if ``subset.shuffle_caption``: one ``rng.permutation(n)``, n = the tags after the first
         ``keep_tokens`` (tags split on ``caption_separator`` and stripped, joined back with ", ").
    With neither option the caption comes back unchanged and `rng` is untouched. Callers reach it
    as ``captions.row_caption`` (module attribute), so tests can observe the draws.
    """
    if drop_caption(subset.caption_dropout_rate, rng):
        return ""
    if subset.shuffle_caption:
        return shuffle_tags(example_caption, subset.caption_separator, subset.keep_tokens, rng)
    return example_caption


def varies(subset: CaptionOptions) -> bool:
    """Whether rows of `subset` can get a caption other than their example's (dropout or shuffle)."""
    return subset.caption_dropout_rate > 0 or bool(subset.shuffle_caption)


def possible_captions(caption: str, subset: CaptionOptions, limit: int) -> set[str] | None:
    """Every caption :func:`row_caption` can return for `caption`, or None when more than `limit`
    orderings would have to be listed (the set is then too large to precompute)."""
    out = {""} if subset.caption_dropout_rate > 0 else set()
    if not subset.shuffle_caption:
        return out | {caption}
    kept, flex = split_tags(caption, subset.caption_separator, subset.keep_tokens)
    if math.factorial(len(flex)) > limit:
        return None
    out.update(TAG_JOIN.join(kept + list(p)) for p in permutations(flex))
    return out


def caption_set(pairs: Iterable[tuple[str, Any]], limit: int = 4096) -> tuple[str, ...] | None:
    """Sorted union of :func:`possible_captions` over (caption, subset) pairs; None past `limit` in all."""
    out: set[str] = set()
    for caption, subset in pairs:
        more = possible_captions(caption, subset, limit)
        if more is None:
            return None
        out |= more
        if len(out) > limit:
            return None
    return tuple(sorted(out))
