"""Aspect-ratio buckets (kohya's ``--enable_bucket``): the bucket shapes, each image's bucket, its resize.

Semantics follow kohya sd-scripts' ``BucketManager`` (learnt from its behaviour, sizes here are (h, w)):

- The shapes: sides are multiples of ``bucket_reso_steps`` within [``min_bucket_reso``, ``max_bucket_reso``],
  the area at most ``resolution^2``: the square side ``floor(resolution / steps) * steps``, and for each width w
  from the minimum up in steps, the tallest height ``floor(area / w / steps) * steps`` (capped at the maximum)
  with both orientations.
- An image goes to the shape nearest its aspect ratio (its own size when that is a shape), and is resized so
  that it covers the shape (the matching side equal, the other at least as long), then cropped minimally:
  only along the side that overhangs, never to a square unless the image is (nearly) square.
- With ``bucket_no_upscale`` there is no fixed list: an image larger than ``resolution^2`` pixels shrinks to
  about that area keeping its aspect ratio, a smaller one keeps its size, and its bucket is that size rounded
  down to ``bucket_reso_steps``; so small images get smaller buckets and are never enlarged.

Class (prior-preservation) rows share the batch with instance rows, so they take the batch's bucket: they are
resized to cover it and cropped like the instance images (:func:`cover_size`). numpy and the image header
reader only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxbooth.errors import JaxboothError

Shape = tuple[int, int]  # (h, w) pixels


@dataclasses.dataclass(frozen=True)
class BucketSettings:
    """The bucket keys of a run, as kohya adjusts them: min rounded down and max rounded up to ``steps``."""

    resolution: int
    min_reso: int
    max_reso: int
    steps: int
    no_upscale: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise JaxboothError(f"bucket_reso_steps (--bucket_reso_steps)={self.steps}: use a positive multiple of "
                                "the model's latent grid (64 for Stable Diffusion, as kohya).")
        object.__setattr__(self, "min_reso", self.min_reso - self.min_reso % self.steps)
        if self.max_reso % self.steps:
            object.__setattr__(self, "max_reso", self.max_reso + self.steps - self.max_reso % self.steps)
        if self.no_upscale:
            return  # kohya ignores min/max then: each image's bucket comes from its own size
        if not self.steps <= self.min_reso <= self.resolution <= self.max_reso:
            raise JaxboothError(
                f"enable_bucket: need bucket_reso_steps <= min_bucket_reso <= resolution <= max_bucket_reso, got "
                f"{self.steps}, {self.min_reso}, {self.resolution}, {self.max_reso}; set --min_bucket_reso (at most "
                f"{self.resolution}) and --max_bucket_reso (at least {self.resolution}).")

    @classmethod
    def from_spec(cls, spec: Any) -> BucketSettings | None:
        """The run's settings, or None without ``enable_bucket`` (square crops at ``resolution``)."""
        d = spec.data
        if not getattr(d, "enable_bucket", False):
            return None
        return cls(int(d.resolution), int(d.min_bucket_reso), int(d.max_bucket_reso), int(d.bucket_reso_steps),
                   bool(d.bucket_no_upscale))

    def describe(self) -> str:
        """What a resumed run compares: a different bucketing gives a different batch order."""
        return (f"resolution={self.resolution} min={self.min_reso} max={self.max_reso} steps={self.steps} "
                f"no_upscale={self.no_upscale}")


def bucket_shapes(settings: BucketSettings) -> list[Shape]:
    """The predefined bucket shapes (h, w), in kohya's order (sorted by (w, h)), which breaks aspect ties."""
    area, steps = settings.resolution ** 2, settings.steps
    side = int(math.sqrt(area) // steps) * steps
    shapes_wh = {(side, side)}
    width = settings.min_reso
    while width <= settings.max_reso:
        height = min(settings.max_reso, (area // width) // steps * steps)
        if height >= settings.min_reso:
            shapes_wh.update({(width, height), (height, width)})
        width += steps
    return [(h, w) for w, h in sorted(shapes_wh)]


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def cover_size(size: Shape, bucket: Shape) -> Shape:
    """The (h, w) an image of ``size`` is resized to so that it covers ``bucket`` with one side matching."""
    (h, w), (bh, bw) = size, bucket
    if w / h > bw / bh:  # wider than the bucket: match the height, crop the width
        scale = bh / h
    else:
        scale = bw / w
    return max(bh, int(h * scale + 0.5)), max(bw, int(w * scale + 0.5))


def _no_upscale_bucket(size: Shape, settings: BucketSettings) -> tuple[Shape, Shape]:
    (h, w), steps, area = size, settings.steps, settings.resolution ** 2
    aspect = w / h
    if h * w > area:  # shrink to about the target area, the rounded side chosen for the smaller aspect error
        width = math.sqrt(area * aspect)
        height = area / width
        w_rounded = _round_to_steps(width, steps)
        h_in_w = _round_to_steps(w_rounded / aspect, steps)
        h_rounded = _round_to_steps(height, steps)
        w_in_h = _round_to_steps(h_rounded * aspect, steps)
        err_w = abs(w_rounded / h_in_w - aspect) if h_in_w else math.inf
        err_h = abs(w_in_h / h_rounded - aspect) if h_rounded else math.inf
        if err_w < err_h:
            resized = (int(w_rounded / aspect + 0.5), w_rounded)
        else:
            resized = (h_rounded, int(h_rounded * aspect + 0.5))
    else:
        resized = (h, w)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if min(bucket) < steps:
        raise JaxboothError(f"bucket_no_upscale: an image of {h}x{w} (h x w) is smaller than bucket_reso_steps="
                            f"{steps} on one side; lower --bucket_reso_steps or drop the image.")
    return bucket, resized


def select_bucket(size: Shape, settings: BucketSettings, shapes: Sequence[Shape] | None = None
                  ) -> tuple[Shape, Shape]:
    """(bucket (h, w), resized (h, w)) of an image of ``size`` (h, w): the shape nearest its aspect ratio and
    the cover resize (or with ``no_upscale`` its own shrunk size and the bucket rounded down from it)."""
    if settings.no_upscale:
        return _no_upscale_bucket(size, settings)
    shapes = list(bucket_shapes(settings) if shapes is None else shapes)
    if tuple(size) in shapes:
        bucket = tuple(size)
    else:
        aspect = size[1] / size[0]
        errors = np.abs(np.array([w / h for h, w in shapes]) - aspect)
        bucket = shapes[int(errors.argmin())]
    return bucket, cover_size(size, bucket)


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Each instance example's bucket and resize; class examples (``bucket_of`` -1) take the batch's bucket.

    ``sizes``: every example's (h, w) as training sees it. ``shapes``: the buckets in use, sorted.
    """

    settings: BucketSettings
    sizes: tuple[Shape, ...]
    bucket_of: tuple[int, ...]  # index into ``shapes``, or -1 for a class example
    resized: tuple[Shape | None, ...]
    shapes: tuple[Shape, ...]

    def resized_for(self, example: int, shape: Shape) -> Shape:
        """The resize of ``example`` for a batch of ``shape``: its own for its bucket, else the cover."""
        own = self.bucket_of[example]
        if own >= 0 and self.shapes[own] == tuple(shape):
            return self.resized[example]
        return cover_size(self.sizes[example], shape)

    def shape_of(self, example: int) -> Shape:
        return self.shapes[self.bucket_of[example]]


def plan_buckets(sizes: Sequence[Shape], is_class: Sequence[bool], settings: BucketSettings) -> BucketPlan:
    """Assign every instance example of ``sizes`` to its bucket (pure; ``plan_for_dataset`` reads the sizes)."""
    predefined = None if settings.no_upscale else bucket_shapes(settings)
    chosen: list[tuple[Shape, Shape] | None] = [
        None if cls else select_bucket(tuple(size), settings, predefined) for size, cls in zip(sizes, is_class,
                                                                                              strict=True)]
    shapes = tuple(sorted({c[0] for c in chosen if c is not None}))
    where = {shape: i for i, shape in enumerate(shapes)}
    return BucketPlan(settings, tuple(tuple(s) for s in sizes),
                      tuple(-1 if c is None else where[c[0]] for c in chosen),
                      tuple(None if c is None else c[1] for c in chosen), shapes)


def plan_for_dataset(dataset: Any, settings: BucketSettings | None) -> BucketPlan | None:
    """The plan of a :class:`~jaxbooth.data.Dataset` (image headers read once), None without bucketing."""
    if settings is None:
        return None
    from jaxbooth.data.images import image_size

    sizes = [image_size(example.path) for example in dataset.examples]
    is_class = [dataset.subsets[example.subset].is_class for example in dataset.examples]
    return plan_buckets(sizes, is_class, settings)


def describe_plan(plan: BucketPlan, items: Sequence[int]) -> str:
    """One line per bucket in use: its shape and how many instance items (repeats counted) it holds."""
    counts = np.bincount([plan.bucket_of[i] for i in items], minlength=len(plan.shapes))
    return ", ".join(f"{h}x{w}: {int(c)}" for (h, w), c in zip(plan.shapes, counts, strict=True) if c)
