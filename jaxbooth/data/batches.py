"""Deterministic, resumable, multi-host-aware numpy batches of a :class:`Dataset`.

Owns the epoch order, the per-row crop/flip randomness, the host split of each global batch,
optional threaded prefetch and the iterator state saved in checkpoints.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxbooth import log as jaxbooth_log
from jaxbooth.data import captions
from jaxbooth.data.buckets import BucketPlan, Shape
from jaxbooth.data.dataset import Dataset
from jaxbooth.data.images import DEFAULT_INTERPOLATION, load_bucketed, load_image_with_info, resize_filter
from jaxbooth.errors import JaxboothError

Tokenize = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]

_STATE_VERSION = 1
_INSTANCE_STREAM, _CLASS_STREAM = 0, 1
_BUCKET_ORDER_TAG = 0x62756B74  # "bukt": the batch order of a bucketed epoch, apart from its item order


def row_caption(caption: str, subset: Any, rng: np.random.Generator) -> str:
    """A row's caption: ``captions.row_caption`` (dropout, shuffle with keep_tokens), drawn from the row's
    generator after its flip and crop, so runs without caption options draw exactly what they drew before."""
    return captions.row_caption(caption, subset, rng)


def subset_flips(subset: Any, default: bool) -> bool:
    """Whether rows of ``subset`` are flipped at random: its own ``random_flip`` when it sets one, else the run's."""
    own = getattr(subset, "random_flip", None)
    return default if own is None else bool(own)


class BatchIterator:
    """Endless, deterministic, resumable batches of one host's share of each global batch.

    A global batch holds `batch_size` dataset items. Epoch e visits the items in the order
    `np.random.default_rng([seed, e]).permutation(len(dataset))`. To keep one batch shape
    (one compiled step) the epoch's order is wrapped *within the same epoch's permutation*
    up to a whole number of batches: `num_batches_per_epoch = ceil(len / batch_size)` as
    diffusers' DataLoader (no drop_last), the last batch topped up from the start of the
    permutation; a dataset smaller than one batch is repeated to fill it. `drop_last=True`
    instead drops the tail (at least one batch per epoch). Nothing depends on the next epoch,
    so (epoch, position) alone determines a batch.

    Item i yields instance item i % n_instance and, with prior preservation, class item
    i % n_class (diffusers' DreamBoothDataset). Rows: all local instance rows, then the
    matching class rows (diffusers' collate_fn). On P processes, process p gets global
    slots [p*B/P, (p+1)*B/P), so the global array is [inst_0, cls_0, inst_1, cls_1, ...]:
    split the prior loss with `is_class`, never by halving the batch.

    Images are resized with the `interpolation` filter (``--image_interpolation_mode``;
    bilinear as train_dreambooth.py) before the crop. Random crop offsets and flips of a row
    come from `default_rng([seed, epoch, slot, stream])`, so they do not depend on the host
    count and are reproduced after a restore.

    Batch dict (R = local rows = B/P, or 2*B/P with prior preservation; L = token length):
      pixel_values   float32 [R, res, res, 3]  NHWC, in [-1, 1]
      input_ids      int32   [R, L]            only when `tokenize` is given
      attention_mask int32   [R, L]            only when `tokenize` is given
      is_class       bool    [R]
      example_index  int32   [R]               index into `dataset.examples`
      original_size  int32   [R, 2]            (h, w) before resizing (SDXL time ids)
      crop_top_left  int32   [R, 2]            (y, x) in the resized image (SDXL time ids)
      target_size    int32   [R, 2]            (h, w) of the pixels: (res, res), or the batch's bucket
      resized_size   int32   [R, 2]            buckets only: the (h, w) each image was resized to before its crop
      flipped        bool    [R]
      content_hash   str     [R]               host-only (numpy unicode), for encoding caches
      caption        str     [R]               host-only (numpy unicode): the row's caption (dropout, shuffle)

    Aspect-ratio buckets (``buckets``, a :class:`~jaxbooth.data.buckets.BucketPlan`): every global batch is
    one bucket shape, the pixels ``[R, h, w, 3]`` of that bucket. Epoch e takes the same permutation of
    the items, groups it by the bucket of each item's instance image (in permutation order), fills each
    group to whole batches by repeating within it (``drop_last``: floors it, at least one batch a bucket),
    and visits those batches in an order drawn from (seed, "bukt", e). Every host takes its share of
    the same global batch, so each step all hosts hold rows of one bucket, and (epoch, position) still
    determines a batch. Class rows take the batch's bucket (resized to cover it, cropped).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        resolution: int,
        batch_size: int,
        seed: int,
        tokenize: Tokenize | None = None,
        center_crop: bool = False,
        random_flip: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        drop_last: bool = False,
        num_workers: int = 0,
        prefetch: int = 2,
        interpolation: str = DEFAULT_INTERPOLATION,
        buckets: BucketPlan | None = None,
    ) -> None:
        if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
            raise JaxboothError(
                f"batch_size={batch_size}, process_index={process_index}, process_count={process_count}: "
                "need batch_size >= 1 and 0 <= process_index < process_count."
            )
        resize_filter(interpolation)  # an unknown filter name fails here, not in the first batch
        if batch_size % process_count:
            raise JaxboothError(
                f"train_batch_size={batch_size} is not divisible by the {process_count} processes (hosts); "
                f"use a multiple of {process_count}."
            )
        self.dataset, self.resolution, self.batch_size, self.seed = dataset, int(resolution), batch_size, seed
        self.tokenize, self.center_crop, self.random_flip = tokenize, center_crop, random_flip
        self.interpolation = interpolation
        self.process_index, self.process_count, self.drop_last = process_index, process_count, drop_last
        self.buckets = buckets
        n = len(dataset)
        if buckets is None:
            self.num_batches_per_epoch = max(1, n // batch_size) if drop_last else math.ceil(n / batch_size)
        else:
            self._item_bucket = self._item_buckets()
            self.num_batches_per_epoch = int(sum(self._bucket_batches(count) for count in
                                                 np.bincount(self._item_bucket, minlength=len(buckets.shapes))
                                                 if count))
        self._batch_shapes: dict[int, np.ndarray] = {}
        self.epoch, self.position = 0, 0
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._prefetch = max(1, prefetch)
        self._pool = ThreadPoolExecutor(num_workers, "jaxbooth-data") if num_workers > 0 else None
        self._pending: deque[tuple[tuple[int, int], Future]] = deque()

    @property
    def local_batch_size(self) -> int:
        """Dataset items per host per step (rows are twice this with prior preservation)."""
        return self.batch_size // self.process_count

    def steps_per_epoch(self, gradient_accumulation_steps: int = 1) -> int:
        """Optimizer steps per epoch, as diffusers: ceil(batches / accumulation steps)."""
        return math.ceil(self.num_batches_per_epoch / gradient_accumulation_steps)

    def _item_buckets(self) -> np.ndarray:
        """The bucket (index into ``buckets.shapes``) of every dataset item: its instance image's."""
        inst = self.dataset.instance_items
        return np.array([self.buckets.bucket_of[inst[i % len(inst)]] for i in range(len(self.dataset))], np.int64)

    def _bucket_batches(self, count: int) -> int:
        return max(1, count // self.batch_size) if self.drop_last else math.ceil(count / self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset item of every global slot of `epoch` (length num_batches * batch_size)."""
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
                if self.buckets is None:
                    order = np.resize(perm, self.num_batches_per_epoch * self.batch_size)
                else:
                    order, self._batch_shapes[epoch] = self._bucketed_order(epoch, perm)
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._batch_shapes = {e: b for e, b in self._batch_shapes.items() if e >= epoch - 1}
                self._orders[epoch] = order
            return order

    def _bucketed_order(self, epoch: int, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(items of every slot, bucket of every batch) of a bucketed epoch: see the class docstring."""
        blocks, shapes = [], []
        for bucket in range(len(self.buckets.shapes)):
            items = perm[self._item_bucket[perm] == bucket]
            if len(items):
                count = self._bucket_batches(len(items))
                blocks.extend(np.resize(items, count * self.batch_size).reshape(count, self.batch_size))
                shapes.extend([bucket] * count)
        visit = np.random.default_rng([self.seed, _BUCKET_ORDER_TAG, epoch]).permutation(len(blocks))
        return np.concatenate([blocks[i] for i in visit]), np.asarray(shapes, np.int64)[visit]

    def batch_bucket(self, epoch: int, position: int) -> Shape | None:
        """The (h, w) bucket of the batch at (epoch, position), None without buckets (``resolution`` squares)."""
        if self.buckets is None:
            return None
        self.epoch_order(epoch)
        with self._lock:
            return self.buckets.shapes[int(self._batch_shapes[epoch][position])]

    def _row_plan(self, epoch: int, position: int) -> list[tuple[int, int, int]]:
        """(example index, global slot, stream) per local row: instance rows, then class rows."""
        lo = position * self.batch_size + self.process_index * self.local_batch_size
        return self._plan_for_slots(epoch, range(lo, lo + self.local_batch_size))

    def global_row_plan(self, epoch: int, position: int) -> list[tuple[int, int, int]]:
        """Every process's rows of one global batch: all instance rows, then all class rows.

        For trainers that feed the device mesh from cached encodings by index, where any
        host can build any row (so the global batch keeps diffusers' instance-then-class halves).
        """
        lo = position * self.batch_size
        return self._plan_for_slots(epoch, range(lo, lo + self.batch_size))

    def _plan_for_slots(self, epoch: int, slots: range) -> list[tuple[int, int, int]]:
        order = self.epoch_order(epoch)
        inst, cls = self.dataset.instance_items, self.dataset.class_items
        plan = [(inst[order[s] % len(inst)], s, _INSTANCE_STREAM) for s in slots]
        if cls:
            plan += [(cls[order[s] % len(cls)], s, _CLASS_STREAM) for s in slots]
        return plan

    def row_rng(self, epoch: int, slot: int, stream: int) -> np.random.Generator:
        """The generator behind one row's flip and crop: independent of host count, reproducible."""
        return np.random.default_rng([self.seed, epoch, slot, stream])

    def flips(self, example_index: int) -> bool:
        """Whether rows of this example are flipped at random (its subset's ``random_flip``, else the run's)."""
        example = self.dataset.examples[example_index]
        return subset_flips(self.dataset.subsets[example.subset], self.random_flip)

    def row_flip(self, epoch: int, slot: int, stream: int, example_index: int | None = None) -> bool:
        """Whether a row is flipped (the first draw of its generator, as ``load_batch`` makes it)."""
        flips = self.random_flip if example_index is None else self.flips(example_index)
        return bool(flips and self.row_rng(epoch, slot, stream).random() < 0.5)

    def load_batch(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """The batch at (epoch, position), without tokens: a pure function of its arguments."""
        pixels, sizes, crops, flips, captions, resized = [], [], [], [], [], []
        plan = self._row_plan(epoch, position)
        shape = self.batch_bucket(epoch, position)
        for example_index, slot, stream in plan:
            rng = self.row_rng(epoch, slot, stream)
            example = self.dataset.examples[example_index]
            flip = bool(self.flips(example_index) and rng.random() < 0.5)
            if shape is None:
                px, size, crop = load_image_with_info(example.path, self.resolution, center_crop=self.center_crop,
                                                      flip=flip, crop_rng=rng, interpolation=self.interpolation)
            else:
                resized.append(self.buckets.resized_for(example_index, shape))
                px, size, crop = load_bucketed(example.path, resized[-1], shape, center_crop=self.center_crop,
                                               flip=flip, crop_rng=rng, interpolation=self.interpolation)
            pixels.append(px)
            sizes.append(size)
            crops.append(crop)
            flips.append(flip)
            captions.append(row_caption(example.caption, self.dataset.subsets[example.subset], rng))
        examples = [self.dataset.examples[i] for i, _, _ in plan]
        target = (self.resolution, self.resolution) if shape is None else shape
        extra = {} if shape is None else {"resized_size": np.array(resized, np.int32).reshape(-1, 2)}
        return {
            "pixel_values": np.stack(pixels),
            "is_class": np.array([stream == _CLASS_STREAM for _, _, stream in plan]),
            "example_index": np.array([i for i, _, _ in plan], np.int32),
            "original_size": np.array(sizes, np.int32).reshape(-1, 2),
            "crop_top_left": np.array(crops, np.int32).reshape(-1, 2),
            "target_size": np.tile(np.asarray(target, np.int32), (len(plan), 1)),
            "flipped": np.array(flips, bool),
            "content_hash": np.array([e.content_hash for e in examples]),
            "caption": np.array(captions),
            **extra,
        }

    def next_key(self, key: tuple[int, int]) -> tuple[int, int]:
        """The (epoch, position) after ``key``."""
        epoch, position = key
        return (epoch, position + 1) if position + 1 < self.num_batches_per_epoch else (epoch + 1, 0)

    def _take(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        """Load `key`, keeping up to `prefetch` following batches in flight on the pool."""
        if self._pool is None:
            return self.load_batch(*key)
        if self._pending and self._pending[0][0] != key:
            self._drop_pending()
        ahead = self._pending[-1][0] if self._pending else None
        while len(self._pending) < self._prefetch + 1:
            ahead = key if ahead is None else self.next_key(ahead)
            self._pending.append((ahead, self._pool.submit(self.load_batch, *ahead)))
        return self._pending.popleft()[1].result()

    def _drop_pending(self) -> None:
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        key = (self.epoch, self.position)
        batch = self._take(key)
        if self.tokenize is not None:
            ids, mask = self.tokenize([str(c) for c in batch["caption"]])
            batch["input_ids"] = np.asarray(ids, np.int32)
            batch["attention_mask"] = np.asarray(mask, np.int32)
        self.epoch, self.position = self.next_key(key)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the *next* batch, plus what defines the order."""
        state = {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "dataset_len": len(self.dataset),
            "fingerprint": self.dataset.fingerprint,
        }
        if self.buckets is not None:
            state["buckets"] = self.buckets.settings.describe()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict()` was taken; warns if the data or order changed."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise JaxboothError(
                f"data iterator state {state!r} lacks an integer epoch/position ({exc})."
            ) from exc
        changed = [
            f"{k}: {state[k]!r} -> {v!r}"
            for k, v in self.state_dict().items()
            if k in ("seed", "batch_size", "dataset_len", "fingerprint", "buckets") and k in state and state[k] != v
        ]
        if changed:
            jaxbooth_log.warning(
                "resuming with different data settings, so the batch order differs from the original run ("
                + "; ".join(changed)
                + ")")
        if position >= self.num_batches_per_epoch:
            epoch, position = epoch + 1, 0
        self._drop_pending()
        self.epoch, self.position = epoch, position

    def close(self) -> None:
        """Stop prefetch workers (only needed with num_workers > 0)."""
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
