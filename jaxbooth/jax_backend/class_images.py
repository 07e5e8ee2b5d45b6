"""Prior-preservation class images: top up `class_data_dir` to `num_class_images` with the JAX sampler.

The behaviour of diffusers' `train_dreambooth.py` ("Generate class images if prior preservation
is enabled"): count what is in the folder, generate only the shortfall with the base pipeline,
and name each file `f"{index}-{sha1}.jpg"`. What differs, and why:

- Counting uses `jaxbooth.data.scan_image_folder`, so only images the trainer will train on
  count (diffusers counts every directory entry, a stray `.DS_Store` included).
- Each image is written as soon as its batch is decoded, atomically (hidden temp file, then
  rename), so an interrupted run leaves only whole images and the next run generates only what
  is still missing. New files take the lowest indices not already used by a `N-<sha1>.jpg` file.
- The sha1 is of the written JPEG bytes (diffusers hashes the raw pixels), so the name checks the
  file: `sha1(path.read_bytes())` equals the name's hash.
- A batch's noise seed is derived from (seed, the index of its first image), so a resumed run
  never repeats an image already written.
- Multi-host: every process computes the same list of missing indices, process p takes the
  entries at positions k with k % process_count == p and writes only those files. No two
  processes write the same name. The folder must be on a filesystem every process sees.

Depends on `generate.py` / `sample.py` for the models; never imports torch.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbooth import data
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import mesh as mesh_lib
from jaxbooth.jax_backend import pretrained
from jaxbooth.jax_backend.schedulers import canonical_sampler_name

DEFAULT_NUM_INFERENCE_STEPS = 50  # StableDiffusionPipeline.__call__'s default, which diffusers' script uses
DEFAULT_GUIDANCE_SCALE = 7.5  # likewise
FALLBACK_SAMPLER = "DPMSolverMultistepScheduler"
JPEG_QUALITY = 95  # class images are training data: PIL's default 75 leaves blocking the model can learn
_GENERATED_NAME = re.compile(r"^(\d+)-[0-9a-f]{40}\.jpg$")
_PRECISIONS = {"no": jnp.float32, "fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}


def _message(text: str) -> None:
    print(f"[jaxbooth] {text}", file=sys.stderr, flush=True)


def existing_class_images(class_data_dir: str | Path, *, skip_bad: bool = False) -> list[Path]:
    """The usable images in `class_data_dir` ([] when it is missing or holds no files).

    An empty folder is the normal first run, not an error; any other problem (unreadable
    files without `skip_bad`) raises `scan_image_folder`'s error now, before a long generation.
    """
    folder = Path(class_data_dir)
    if not folder.is_dir():
        return []
    if not any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir()):
        return []
    return data.scan_image_folder(folder, skip_bad=skip_bad, role="class")


def missing_indices(existing: Sequence[Path], count: int) -> list[int]:
    """The `count` smallest indices no existing `N-<sha1>.jpg` file uses.

    For a folder filled by diffusers or by an uninterrupted run this is
    `range(len(existing), len(existing) + count)`, diffusers' numbering.
    """
    used = {int(m.group(1)) for p in existing if (m := _GENERATED_NAME.match(p.name))}
    out, index = [], 0
    while len(out) < count:
        if index not in used:
            out.append(index)
        index += 1
    return out


def batch_seed(seed: int, first_index: int) -> int:
    """A 31-bit sampler seed for the batch whose first image has `first_index`."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(first_index)]).generate_state(1)[0] >> 1)


def generation_dtype(precision: str | None, platform: str | None = None) -> Any:
    """The compute/param dtype for `prior_generation_precision`; None follows diffusers
    (fp16 on a GPU, fp32 elsewhere, TPU included)."""
    if precision is None:
        platform = platform or jax.devices()[0].platform
        return jnp.float16 if platform == "gpu" else jnp.float32
    if precision not in _PRECISIONS:
        raise JaxboothError(f"prior_generation_precision={precision!r} is not one of {sorted(_PRECISIONS)}")
    return _PRECISIONS[precision]


def default_sampler_name(scheduler_config: dict) -> str:
    """The pipeline's own scheduler when we have it as a JAX sampler (SD 1.5: PNDM), as diffusers
    samples class images with `pipeline.scheduler`; else DPM-Solver++ (e.g. a DDPM config)."""
    name = scheduler_config.get("_class_name", "")
    try:
        canonical_sampler_name(name)
    except JaxboothError:
        return FALLBACK_SAMPLER
    return name


def load_generation_sampler(model_dir: Path, *, dtype: Any, sampler_name: str | None = None,
                            variant: str | None = None, mesh: Any = None) -> Any:
    """A `StableDiffusionSampler` over the base pipeline with UNet and text encoder in `dtype`.

    The VAE stays float32 (diffusers' `force_upcast`: SD VAEs overflow in fp16).
    """
    from jaxbooth.jax_backend.generate import read_scheduler_config, sampler_from_models
    from jaxbooth.jax_backend.models import clip as clip_lib
    from jaxbooth.jax_backend.models.unet import FlaxUNet2DConditionModel
    from jaxbooth.text import load_tokenizer

    unet_config, _, unet_params = pretrained.load_pretrained(model_dir, "unet", variant=variant, dtype=dtype)
    text_config, _, text_params = pretrained.load_pretrained(model_dir, "text_encoder", variant=variant, dtype=dtype)
    vae_config, _, vae_params = pretrained.load_pretrained(model_dir, "vae", variant=variant, dtype=jnp.float32)
    name = sampler_name or default_sampler_name(read_scheduler_config(model_dir))
    return sampler_from_models(
        model_dir=model_dir, tokenizer=load_tokenizer(model_dir),
        unet=FlaxUNet2DConditionModel(unet_config, dtype=dtype), unet_params=unet_params,
        text_encoder=clip_lib.make_text_encoder(text_config, dtype=dtype), text_params=text_params,
        vae_config=vae_config, vae_params=vae_params, sampler_name=name, mesh=mesh)


def local_mesh(mesh: Any) -> Any:
    """The mesh to sample on: the given one (it must hold only this process's devices, since
    each process samples its own prompts), or one over the local devices when there are several."""
    if mesh is not None:
        foreign = [d for d in mesh.devices.flat if d.process_index != jax.process_index()]
        if foreign:
            raise JaxboothError(f"class-image generation got a mesh with {len(foreign)} devices of other processes; "
                                "each process samples its own images, so pass a mesh over jax.local_devices()")
        return mesh
    if jax.local_device_count() > 1:
        return mesh_lib.make_mesh((jax.local_device_count(), 1), jax.local_devices())
    return None


def write_class_image(folder: Path, index: int, image: Any) -> Path:
    """Save a PIL image as `folder/{index}-{sha1 of the JPEG bytes}.jpg`, atomically."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    payload = buffer.getvalue()
    path = folder / f"{index}-{hashlib.sha1(payload).hexdigest()}.jpg"
    handle, temp = tempfile.mkstemp(prefix=f".{index}-", suffix=".tmp", dir=folder)  # hidden: scans skip it
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def _barrier(name: str) -> None:
    """Wait for every process (multi-host runs), so no process scans while another writes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def ensure_class_images(model_dir: str | Path, class_data_dir: str | Path, class_prompt: str,
                        num_class_images: int, *, sample_batch_size: int = 4, precision: str | None = None,
                        seed: int = 0, mesh: Any = None, process_index: int | None = None,
                        process_count: int | None = None, num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
                        guidance_scale: float = DEFAULT_GUIDANCE_SCALE, sampler_name: str | None = None,
                        negative_prompt: str | None = None, variant: str | None = None,
                        skip_bad: bool = False, height: int | None = None, width: int | None = None,
                        sampler: Any = None) -> int:
    """Top `class_data_dir` up to `num_class_images` images; returns how many THIS process wrote.

    When the folder already has enough images, returns 0 without loading any model. Otherwise
    loads the pipeline at `model_dir` (see `load_generation_sampler`) and samples `class_prompt`
    in batches of `sample_batch_size` per device, writing each image as soon as its batch is
    decoded (module docstring: names, seeds, resume, multi-host split). Sizes default to the
    pipeline's (unet sample_size x VAE scale), as diffusers' pipeline call does.

    Every process of a multi-host run must call this (there are barriers); `process_index` /
    `process_count` default to JAX's and exist so tests can play several hosts in one process.
    `sampler`: an already loaded `StableDiffusionSampler` to use instead of loading `model_dir`
    (then `precision`, `sampler_name`, `variant` and `mesh` are the sampler's own): tests reuse
    one compiled sampler across calls.
    """
    if not class_prompt:
        raise JaxboothError("with_prior_preservation needs class_prompt (--class_prompt), e.g. 'a photo of dog'")
    if sample_batch_size < 1:
        raise JaxboothError(f"sample_batch_size={sample_batch_size} must be at least 1")
    rank = jax.process_index() if process_index is None else process_index
    world = jax.process_count() if process_count is None else process_count
    if not 0 <= rank < world:
        raise JaxboothError(f"process_index={rank} must be in [0, process_count={world})")
    folder = Path(class_data_dir)
    existing = existing_class_images(folder, skip_bad=skip_bad)
    shortfall = num_class_images - len(existing)
    _barrier("jaxbooth_class_images_counted")
    if shortfall <= 0:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    mine = missing_indices(existing, shortfall)[rank::world]
    if rank == 0:
        _message(f"class images: {len(existing)} in {folder}, generating {shortfall} more for {class_prompt!r}")
    written = 0
    if mine:
        if sampler is None:
            sampler = load_generation_sampler(Path(model_dir), dtype=generation_dtype(precision),
                                              sampler_name=sampler_name, variant=variant, mesh=local_mesh(mesh))
        written = _generate(sampler, folder, class_prompt, mine, sample_batch_size=sample_batch_size, seed=seed,
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            negative_prompt=negative_prompt, height=height, width=width, rank=rank)
    _barrier("jaxbooth_class_images_written")
    return written


def _generate(sampler: Any, folder: Path, prompt: str, indices: list[int], *, sample_batch_size: int, seed: int,
              num_inference_steps: int, guidance_scale: float, negative_prompt: str | None,
              height: int | None, width: int | None, rank: int) -> int:
    """Sample and write the images of `indices`, one batch at a time."""
    mesh = sampler.mesh
    shards = math.prod(mesh.shape[a] for a in mesh_lib.BATCH_AXES if a in mesh.axis_names) if mesh else 1
    batch = sample_batch_size * shards
    written = 0
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        # always a full batch, so the last one reuses the compiled loop; its extra images are dropped
        images = sampler.generate([prompt] * batch, negative_prompt=negative_prompt,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  seed=batch_seed(seed, chunk[0]), height=height, width=width)
        for index, image in zip(chunk, images[:len(chunk)], strict=True):
            write_class_image(folder, index, image)
        written += len(chunk)
        _message(f"class images (process {rank}): {written}/{len(indices)} written")
    return written
