"""Aspect-ratio buckets on the JAX backend: one compiled train step per bucket shape in use.

Why per shape: XLA compiles for fixed shapes, and a bucket's latents are ``[B, h/f, w/f, c]``. The
bucket shapes are few (kohya's list has ~20 at 1024 px, a data set uses some of them), each bucket's
latent cache lives on the devices beside the shared frozen tree (text embeddings, LoRA base), and each
shape's step is compiled the first time a batch of that bucket comes (the persistent compilation
cache, ``train.configure_jax``, serves a relaunch's). Every host computes the same bucket for a batch
(``BatchIterator.batch_bucket``), so all of them compile and run the same executable each step.

:class:`BucketSteps` has the interface ``train.run_loop`` expects: ``rows(iterator, epoch, position)``
(the batch's cache rows, recording its bucket) then ``steps(state, frozen, batch)`` (the step of that
bucket with that bucket's frozen tree; the ``frozen`` argument, the shared tree, is not needed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxbooth import log as jaxbooth_log
from jaxbooth.data.buckets import BucketPlan, BucketSettings, Shape, describe_plan, plan_for_dataset
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import caches as caches_lib
from jaxbooth.jax_backend import mesh as mesh_lib
from jaxbooth.jax_backend.loaded import LoadedModels


def plan(spec: Any, models: LoadedModels, dataset: Any) -> BucketPlan | None:
    """The run's bucket plan (None without ``enable_bucket``), its shapes checked against the model, logged."""
    settings = BucketSettings.from_spec(spec)
    if settings is None:
        return None
    bucket_plan = plan_for_dataset(dataset, settings)
    check_shapes(bucket_plan, models)
    if jax.process_index() == 0:
        jaxbooth_log.info(f"aspect-ratio buckets (h x w: items): {describe_plan(bucket_plan, dataset.instance_items)}")
    return bucket_plan


def latent_multiple(models: LoadedModels) -> int:
    """Pixels per step of the UNet's coarsest grid: the VAE's downsampling times the UNet's."""
    vae_blocks = len(getattr(models.vae_config, "block_out_channels", (0,) * 4))
    unet_blocks = len(models.unet_config_dict.get("block_out_channels", (0,) * 4))
    return 2 ** (vae_blocks - 1) * 2 ** (unet_blocks - 1)


def check_shapes(plan: BucketPlan | None, models: LoadedModels) -> None:
    """Every bucket side a multiple of :func:`latent_multiple` (the Flax UNet's down/up blocks pair up
    exactly then), else an error naming ``bucket_reso_steps``, before anything is encoded."""
    if plan is None:
        return
    multiple = latent_multiple(models)
    bad = [shape for shape in plan.shapes if shape[0] % multiple or shape[1] % multiple]
    if bad:
        raise JaxboothError(
            f"enable_bucket: bucket shape(s) {', '.join(f'{h}x{w}' for h, w in bad)} (h x w) are not multiples of "
            f"{multiple} px, the grid this model's VAE and UNet downsample to; set --bucket_reso_steps to a "
            f"multiple of {multiple}.")


class _BatchShardings(dict):
    """Every batch key sharded along the data axis (the keys differ with per-row token ids)."""

    def __init__(self, sharding: Any):
        super().__init__()
        self.sharding = sharding

    def __missing__(self, key: str) -> Any:
        return self.sharding


class BucketSteps:
    """The step of each bucket shape, compiled when first needed; counts its compiles.

    ``compile_fn(frozen, batch) -> (compiled, seconds)`` compiles the step for one frozen tree and one
    example batch (``train.compile_step`` bound to the state and mesh); ``frozen_for`` maps each bucket
    shape to its full frozen tree on the devices.
    """

    def __init__(self, compile_fn: Callable[[dict, dict], tuple[Any, float]], frozen_for: dict[Shape, dict],
                 caches: caches_lib.Caches, mesh: Any, *, log: Callable[[str], None],
                 tokenize: Callable | None = None):
        self.compile_fn, self.frozen_for, self.log, self.tokenize = compile_fn, frozen_for, log, tokenize
        self.indices = {shape: bucket.latent_index for shape, bucket in caches.buckets.items()}
        self.prompt_index = {prompt: i for i, prompt in enumerate(caches.prompts)}
        self.batch_shardings = _BatchShardings(mesh_lib.batch_sharding(mesh))
        self.compiled: dict[Shape, Any] = {}
        self.compiles = 0
        self.current: Shape | None = None

    @classmethod
    def build(cls, step_fn: Callable, state: Any, shardings: Any, frozen: dict, caches: caches_lib.Caches, mesh: Any,
              *, log: Callable[[str], None], compile_step: Callable, frozen_shardings: Callable,
              tokenize: Callable | None = None) -> BucketSteps:
        """From ``train``'s pieces: each bucket's latent arrays placed beside ``frozen`` (``frozen_shardings``),
        compiles by ``compile_step`` against the state's shapes (the state itself is donated by then)."""
        abstract_state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

        def compile_fn(frozen_b: dict, batch: dict) -> tuple[Any, float]:
            return compile_step(step_fn, abstract_state, shardings, frozen_b, batch, mesh)[:2]

        frozen_for = {shape: {**frozen, **jax.device_put(bucket.arrays, frozen_shardings(bucket.arrays, mesh))}
                      for shape, bucket in caches.buckets.items()}
        return cls(compile_fn, frozen_for, caches, mesh, log=log, tokenize=tokenize)

    def rows(self, iterator: Any, epoch: int, position: int) -> dict:
        """``caches.global_rows`` of the batch at (epoch, position) against its bucket's cache."""
        self.current = iterator.batch_bucket(epoch, position)
        return caches_lib.global_rows(iterator, epoch, position, self.prompt_index, self.indices[self.current],
                                      self.tokenize)

    def __call__(self, state: Any, frozen: Any, batch: dict) -> tuple[Any, dict]:
        shape = self.current
        if shape not in self.compiled:
            self.compiled[shape], seconds = self.compile_fn(self.frozen_for[shape], batch)
            self.compiles += 1
            self.log(f"compiled the train step for bucket {shape[0]}x{shape[1]} (h x w) in {seconds:.1f}s "
                     f"({self.compiles} of {len(self.frozen_for)} bucket shapes)")
        return self.compiled[shape](state, self.frozen_for[shape], batch)

    def summary(self) -> str:
        """The line tests and users read: compiles against bucket shapes used."""
        return (f"bucket steps: {self.compiles} compile(s) for {len(self.compiled)} bucket shape(s) used of "
                f"{len(self.frozen_for)}: {', '.join(f'{h}x{w}' for h, w in sorted(self.compiled))}")
