"""Text-to-image sampling with jaxbooth's Flax models: the denoising loop, VAE decode, and a
prompt-to-PIL sampler for validation images.

Mirrors diffusers `StableDiffusionPipeline.__call__` (classifier-free guidance, initial noise
times `init_noise_sigma`, `latents / scaling_factor` before decode, the uint8 post-process),
but the whole denoising loop is one jitted `jax.lax.fori_loop` over a `schedulers.Sampler`.
Models are passed in as pure apply functions, so this module depends on no model class:

- `unet_apply(params, sample_nhwc, timesteps[B] float32, conditioning) -> prediction_nhwc`, where
  `conditioning` is whatever the text encoder produced: an array [B, L, D] for SD 1.x/2.x, or
  any pytree of arrays with a leading batch axis (SDXL: a dict of the hidden states, the pooled
  embeddings and the time ids), concatenated and passed through untouched;
- `vae_decode(params, latents_nhwc) -> image_nhwc` roughly in [-1, 1].

SDXL is the same loop with a richer conditioning step, as `StableDiffusionXLPipeline.__call__`:
both encoders' penultimate hidden states concatenated plus encoder 2's pooled `text_embeds`; with
no negative prompt and `force_zeros_for_empty_prompt` the unconditional half is zeros; each half
gets `time_ids` (height, width) + (0, 0) + (height, width); latents are un-normalised with the
VAE's `latents_mean` / `latents_std` when it has them before the float32 decode.

Randomness: with one seed, example b of a batch starts from noise drawn with `fold_in(key(seed), b)`,
so an image depends only on (seed, its position), not on the batch size, the padding or the mesh.
With one seed per example (class images), example b draws `fold_in(key(seeds[b]), 0)`: exactly the
noise a batch of one with seed `seeds[b]` starts from, so an image does not depend on its batch.
With one key per example (`keys`; the Flax pipeline API's per-device seeds), example b draws `keys[b]` itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.mesh import BATCH_AXES
from jaxbooth.jax_backend.schedulers import Sampler, canonical_sampler_name, make_sampler

UNetApply = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
VAEDecode = Callable[[Any, jax.Array], jax.Array]
Tokenize = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
EncodeText = Callable[[Any, np.ndarray, np.ndarray], Any]


def _noise_from_keys(keys: jax.Array, example_shape: tuple[int, ...], init_noise_sigma: float) -> jax.Array:
    noise = jax.vmap(lambda key: jax.random.normal(key, example_shape, jnp.float32))(keys)
    return noise * init_noise_sigma


def _example_keys(rng: jax.Array | None, seeds: jax.Array | None, batch: int) -> jax.Array:
    """The key of each example [B]: `fold_in(rng, b)`, or `fold_in(key(seeds[b]), 0)` with seeds.
    Its initial noise is drawn from it, and an ancestral sampler's per-step noise (DDPM) too."""
    if seeds is not None:
        return jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), 0))(seeds)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(batch))


def make_initial_noise(rng: jax.Array, latent_shape: Sequence[int],
                       init_noise_sigma: float = 1.0) -> jax.Array:
    """float32 standard normal noise of `latent_shape` [B, ...] times `init_noise_sigma`;
    example b uses key `fold_in(rng, b)` (see module docstring)."""
    batch, *rest = latent_shape
    return _noise_from_keys(_example_keys(rng, None, batch), tuple(rest), init_noise_sigma)


def make_seeded_noise(seeds: jax.Array, latent_shape: Sequence[int], init_noise_sigma: float = 1.0) -> jax.Array:
    """Like `make_initial_noise`, but example b from its own seed: key `fold_in(key(seeds[b]), 0)`,
    bit for bit `make_initial_noise(key(seeds[b]), (1, ...))[0]`. `seeds`: integers [B] as
    `seed_array` makes them (traced or not)."""
    batch, *rest = latent_shape
    if seeds.shape != (batch,):
        raise ValueError(f"seeds have shape {seeds.shape} but latent_shape is {tuple(latent_shape)}")
    return _noise_from_keys(_example_keys(None, seeds, batch), tuple(rest), init_noise_sigma)


def seed_array(seeds: Sequence[int]) -> np.ndarray:
    """Host integer seeds as `jax.random.key(int)` reads a Python int: int64, then JAX's default
    integer (int32 unless x64 is on, wrapping as it does), so traced seeds give the same keys."""
    values = np.asarray([np.int64(int(seed)) for seed in seeds], np.int64)
    return values.astype(jax.dtypes.canonicalize_dtype(np.int64))


def apply_guidance(uncond: jax.Array, cond: jax.Array, guidance_scale: jax.Array | float) -> jax.Array:
    """Classifier-free guidance, as diffusers: uncond + g * (cond - uncond)."""
    return uncond + guidance_scale * (cond - uncond)


def _denoise(unet_params: Any, text_embeddings: Any, uncond_embeddings: Any, rng: jax.Array | None,
             seeds: jax.Array | None, guidance_scale: jax.Array, keys: jax.Array | None = None, *,
             unet_apply: UNetApply, sampler: Sampler, latent_shape: tuple[int, ...],
             latents_sharding: NamedSharding | None) -> jax.Array:
    """The traced denoising loop behind `generate_latents` (guidance when uncond is given)."""
    guided = uncond_embeddings is not None
    if keys is None:
        keys = _example_keys(rng, seeds, latent_shape[0])
    x = _noise_from_keys(keys, latent_shape[1:], sampler.init_noise_sigma)
    if latents_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, latents_sharding)
    cond = text_embeddings
    if guided:  # one UNet pass over [uncond; cond], as diffusers
        cond = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond_embeddings, text_embeddings)
    timesteps = jnp.asarray(sampler.timesteps)

    def body(i: jax.Array, carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
        x, state = carry
        model_in = sampler.scale_model_input(state, x, i)
        if guided:
            model_in = jnp.concatenate([model_in, model_in])
        t = jnp.broadcast_to(timesteps[i], (model_in.shape[0],))
        out = unet_apply(unet_params, model_in, t, cond).astype(jnp.float32)
        if guided:
            uncond_out, cond_out = jnp.split(out, 2)
            out = apply_guidance(uncond_out, cond_out, guidance_scale)
        return sampler.step(state, out, i, x)

    x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x, keys)))
    return x


_denoise_jit = jax.jit(_denoise,
                       static_argnames=("unet_apply", "sampler", "latent_shape", "latents_sharding"))


def generate_latents(unet_apply: UNetApply, unet_params: Any, text_embeddings: Any, uncond_embeddings: Any, *,
                     sampler: Sampler, rng: jax.Array | None = None, latent_shape: Sequence[int],
                     guidance_scale: float, latents_sharding: NamedSharding | None = None,
                     seeds: Any = None, keys: jax.Array | None = None) -> jax.Array:
    """Denoise fresh noise into float32 NHWC latents [B, h, w, c] (`latent_shape`), in one jit.

    `text_embeddings` / `uncond_embeddings`: the conditioning for the prompts and the negative
    prompts (arrays or pytrees with leading batch axis B). With `guidance_scale <= 1` the
    unconditional pass is skipped (as diffusers' `do_classifier_free_guidance`) and
    `uncond_embeddings` may be None. Compiled once per (unet_apply, sampler, shape) — reuse
    the same `sampler` object; the guidance scale is traced, so changing it does not recompile.
    `latents_sharding` (e.g. the batch sharding of a mesh) places the noise and the loop.
    Noise: give either `rng` (one key; example b from `fold_in(rng, b)`) or `seeds` (integers [B],
    see `seed_array`; example b from its own seed, as `make_seeded_noise`), or `keys` (PRNG keys [B];
    example b draws from `keys[b]` as is).
    """
    if sum(noise is not None for noise in (rng, seeds, keys)) != 1:
        raise ValueError("generate_latents needs exactly one of rng (a key), seeds (one integer per example) "
                         "and keys (one PRNG key per example)")
    latent_shape = tuple(int(n) for n in latent_shape)
    guided = guidance_scale > 1.0
    if guided and uncond_embeddings is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs uncond_embeddings")
    trees = {"text_embeddings": text_embeddings, "uncond_embeddings": uncond_embeddings if guided else None}
    for name, tree in trees.items():
        for leaf in jax.tree.leaves(tree):
            if leaf.shape[0] != latent_shape[0]:
                raise ValueError(f"{name} has batch {leaf.shape[0]} but latent_shape is {latent_shape}")
    if seeds is not None and not isinstance(seeds, jax.Array):
        seeds = jax.device_put(seed_array(seeds))
    if seeds is not None and seeds.shape != latent_shape[:1]:
        raise ValueError(f"seeds have shape {seeds.shape} but latent_shape is {latent_shape}")
    if keys is not None and keys.shape[:1] != latent_shape[:1]:
        raise ValueError(f"keys have shape {keys.shape} but latent_shape is {latent_shape}")
    return _denoise_jit(unet_params, text_embeddings, uncond_embeddings if guided else None, rng, seeds,
                        jax.device_put(np.float32(guidance_scale)), keys, unet_apply=unet_apply, sampler=sampler,
                        latent_shape=latent_shape, latents_sharding=latents_sharding)


def _unit_image(vae_params: Any, latents: jax.Array, scaling_factor: jax.Array, statistics: Any,
                vae_decode: VAEDecode) -> jax.Array:
    """Traced: the decoded image as float32 in [0, 1], clip(x / 2 + 0.5, 0, 1)."""
    if statistics is None:
        latents = latents / scaling_factor
    else:  # SDXL pipelines with latents_mean/std (diffusers: latents * std / scaling_factor + mean)
        mean, std = statistics
        latents = latents * std / scaling_factor + mean
    image = vae_decode(vae_params, latents).astype(jnp.float32)
    return jnp.clip(image / 2 + 0.5, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("vae_decode",))
def _decode(vae_params: Any, latents: jax.Array, scaling_factor: jax.Array, statistics: Any, *,
            vae_decode: VAEDecode) -> jax.Array:
    image = _unit_image(vae_params, latents, scaling_factor, statistics, vae_decode)
    return jnp.round(image * 255).astype(jnp.uint8)


_decode_float = jax.jit(_unit_image, static_argnames=("vae_decode",))


def decode_latents(vae_decode: VAEDecode, vae_params: Any, latents: jax.Array, scaling_factor: float,
                   latent_statistics: tuple[np.ndarray, np.ndarray] | None = None) -> jax.Array:
    """uint8 NHWC images from NHWC latents: decode(latents / scaling_factor), then diffusers'
    `VaeImageProcessor` post-process round(clip(x / 2 + 0.5, 0, 1) * 255). Jitted per vae_decode.
    `latent_statistics`: the VAE config's per-channel (latents_mean, latents_std) (`sdxl.latent_statistics`);
    with them the latents decoded are latents * std / scaling_factor + mean, as diffusers' SDXL pipeline."""
    statistics = None if latent_statistics is None else tuple(
        jax.device_put(np.asarray(v, np.float32)) for v in latent_statistics)
    return _decode(vae_params, latents, jax.device_put(np.float32(scaling_factor)), statistics,
                   vae_decode=vae_decode)


def decode_latents_float(vae_decode: VAEDecode, vae_params: Any, latents: jax.Array, scaling_factor: float,
                         latent_statistics: tuple[np.ndarray, np.ndarray] | None = None) -> jax.Array:
    """`decode_latents` before its uint8 rounding: float32 NHWC images in [0, 1], what diffusers' old Flax
    pipelines returned; `round(x * 255)` of it is `decode_latents`'s uint8 image."""
    statistics = None if latent_statistics is None else tuple(
        jax.device_put(np.asarray(v, np.float32)) for v in latent_statistics)
    return _decode_float(vae_params, latents, jax.device_put(np.float32(scaling_factor)), statistics,
                         vae_decode=vae_decode)


# ----------------------------------------------------------------------------------------------
# Prompts in, PIL images out
# ----------------------------------------------------------------------------------------------


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    if not axes:
        raise JaxboothError(f"sampling mesh has axes {mesh.axis_names}; it needs one of {BATCH_AXES} "
                            "to split the batch over (use jaxbooth.jax_backend.mesh.make_mesh)")
    return axes


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """Place every leaf with `sharding`; host arrays go through make_array_from_callback so the
    same code works when the mesh spans several processes (each holds the full host value)."""
    def put(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.Array):
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def _onto_mesh(params: Any, mesh: Mesh) -> Any:
    """Params already sharded on `mesh` stay as they are; everything else is replicated on it."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf: Any) -> Any:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return leaf
        return _put(leaf, replicated)

    return jax.tree.map(place, params)


def _seed_key(seed: int) -> jax.Array:
    """`jax.random.key(seed)`; its seed upload is deliberate, so allowed under a transfer guard."""
    with jax.transfer_guard("allow"):
        return jax.random.key(seed)


def _to_host(images: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(images, tiled=True))
    return np.asarray(jax.device_get(images))


def _pad_rows(tree: Any, pad: int) -> Any:
    """Each leaf with its last row repeated `pad` times (host arrays stay on the host)."""
    def pad_leaf(x: Any) -> Any:
        xp = jnp if isinstance(x, jax.Array) else np
        return xp.concatenate([x, xp.repeat(x[-1:], pad, axis=0)])

    return tree if pad == 0 else jax.tree.map(pad_leaf, tree)


def _per_prompt_seeds(seed: int | Sequence[int], count: int) -> list[int] | None:
    """None for one seed (an int); else the list of one seed per prompt, checked."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return None
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence | np.ndarray):
        raise JaxboothError(f"seed must be an integer or one integer per prompt, got {seed!r}")
    seeds = list(seed)
    if len(seeds) != count or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
        raise JaxboothError(f"seed has {len(seeds)} entries for {count} prompts; give one integer per prompt "
                            "or a single integer")
    return [int(s) for s in seeds]


def _negative_prompts(negative_prompt: str | Sequence[str] | None, count: int) -> list[str]:
    """diffusers' rule: None -> "" for every prompt, a string -> repeated, a list -> one per prompt."""
    if negative_prompt is None:
        return [""] * count
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = list(negative_prompt)
    if len(negatives) != count:
        raise JaxboothError(f"negative_prompt has {len(negatives)} entries for {count} prompts; give one per "
                            "prompt or a single string")
    return negatives


@dataclasses.dataclass(eq=False)
class StableDiffusionSampler:
    """Prompts -> PIL images with loaded models; the JAX counterpart of diffusers'
    `StableDiffusionPipeline(...)(prompts, negative_prompt=..., num_inference_steps=...,
    guidance_scale=..., generator=...)` (or `StableDiffusionXLPipeline`'s) for validation images, class
    images and `jaxbooth generate`.

    With a `mesh`, the batch is split over its data/fsdp axes (padded to a multiple of their
    size, padding dropped after decode) and params not already on the mesh are replicated
    onto it once, here. Samplers are cached per step count, so repeated `generate` calls with
    the same settings and batch size reuse one compiled loop. For validation during training,
    build it once and pass the current `unet_params` / `text_params` to each `generate` call
    (a new instance, or new apply closures, would recompile).
    """

    tokenize: Tokenize
    """prompts -> (input_ids int32 [n, L], attention_mask [n, L]); see `jaxbooth.text.make_tokenize_fn`.
    SDXL: one tuple of both tokenizers' ids and one of their masks."""
    encode_text: EncodeText
    """(text_params, input_ids, attention_mask host arrays) -> the UNet conditioning [n, L, D]
    (or a pytree; SDXL: {"prompt_embeds", "text_embeds"})."""
    text_params: Any
    unet_apply: UNetApply
    unet_params: Any
    vae_decode: VAEDecode
    vae_params: Any
    scheduler_config: Mapping[str, Any]
    """The pipeline's scheduler/scheduler_config.json, of any scheduler class."""
    sampler_name: str = "DPMSolverMultistepScheduler"
    """Which sampler to run (`schedulers.SAMPLER_NAMES`); the run spec's validation_scheduler."""
    scaling_factor: float = 0.18215
    """The VAE config's scaling_factor (SD 1.x/2.x: 0.18215, SDXL: 0.13025)."""
    vae_scale_factor: int = 8
    """Pixels per latent: 2 ** (len(vae block_out_channels) - 1)."""
    latent_channels: int = 4
    default_size: int = 512
    """Height and width when `generate` gets none: unet sample_size * vae_scale_factor."""
    mesh: Mesh | None = None
    zero_empty_negative: bool = False
    """SDXL's `force_zeros_for_empty_prompt`: with no negative prompt (None, not ""), the unconditional
    conditioning is zeros instead of the empty prompt's encoding."""
    size_conditioning: bool = False
    """SDXL: the conditioning is a dict that gets `time_ids` [n, 6] = (height, width) original + (0, 0)
    crop + (height, width) target, the pipeline's defaults, the same for both guidance halves."""
    latent_statistics: tuple[np.ndarray, np.ndarray] | None = None
    """The VAE config's (latents_mean, latents_std), per channel (`decode_latents`)."""
    _samplers: dict[int, Sampler] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        canonical_sampler_name(self.sampler_name)  # fail at construction, not at the first validation
        if self.mesh is not None:
            self.unet_params = _onto_mesh(self.unet_params, self.mesh)
            self.text_params = _onto_mesh(self.text_params, self.mesh)
            self.vae_params = _onto_mesh(self.vae_params, self.mesh)

    def sampler(self, num_inference_steps: int) -> Sampler:
        """The (cached) sampler for a step count."""
        if num_inference_steps not in self._samplers:
            self._samplers[num_inference_steps] = make_sampler(self.sampler_name, self.scheduler_config,
                                                               num_inference_steps)
        return self._samplers[num_inference_steps]

    def _latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        height, width = height or self.default_size, width or self.default_size
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise JaxboothError(f"validation image size {height}x{width} must be divisible by the VAE's "
                                f"scale factor {self.vae_scale_factor}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def _params(self, params: Any, default: Any) -> Any:
        if params is None:
            return default
        return params if self.mesh is None else _onto_mesh(params, self.mesh)

    def _encode(self, tokens: Any, text_params: Any, sharding: NamedSharding | None) -> Any:
        ids, mask = jax.tree.map(np.asarray, tokens)
        embeddings = self.encode_text(text_params, ids, mask)
        return embeddings if sharding is None else _put(embeddings, sharding)

    def _conditioning(self, tokens: Any, negative_tokens: Any, text_params: Any, height: int,
                      width: int, sharding: NamedSharding | None, *, zero_uncond: bool) -> tuple[Any, Any]:
        """(conditioning, unconditional conditioning) of the (padded) tokenized prompts and negatives; the
        latter zeros with `zero_uncond`, else None without negatives (no guidance)."""
        cond = self._encode(tokens, text_params, sharding)
        uncond = None
        if zero_uncond:  # placed as the conditioning is
            zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), cond)
            uncond = jax.device_put(zeros) if sharding is None else _put(zeros, sharding)
        elif negative_tokens is not None:
            uncond = self._encode(negative_tokens, text_params, sharding)
        if self.size_conditioning:  # sdxl.add_time_ids' layout, with the pipeline's (height, width) target
            count = len(jax.tree.leaves(tokens)[0])
            ids = np.tile(np.asarray([height, width, 0, 0, height, width], np.float32), (count, 1))
            ids = jax.device_put(ids) if sharding is None else _put(ids, sharding)
            cond = {**cond, "time_ids": ids}
            uncond = None if uncond is None else {**uncond, "time_ids": ids}
        return cond, uncond

    def generate_latents(self, prompts: Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                         num_inference_steps: int = 30, guidance_scale: float = 7.5, seed: int | Sequence[int] = 0,
                         height: int | None = None, width: int | None = None, unet_params: Any = None,
                         text_params: Any = None) -> jax.Array:
        """Denoised NHWC latents for `prompts`, padded to a multiple of the mesh's batch size.
        `seed`: one int for the call, or one per prompt (see `generate`). `unet_params` /
        `text_params` replace the bound ones for this call."""
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise JaxboothError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        negatives = _negative_prompts(negative_prompt, len(prompts))
        seeds = _per_prompt_seeds(seed, len(prompts))
        guided = guidance_scale > 1.0  # else no unconditional pass (diffusers' do_classifier_free_guidance)
        zero_uncond = guided and negative_prompt is None and self.zero_empty_negative
        return self.latents_from_tokens(
            self.tokenize(prompts), self.tokenize(negatives) if guided and not zero_uncond else None,
            zero_uncond=zero_uncond, noise={"rng": _seed_key(seed)} if seeds is None else {"seeds": seed_array(seeds)},
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            unet_params=unet_params, text_params=text_params)

    def latents_from_tokens(self, tokens: Any, negative_tokens: Any, *, zero_uncond: bool, noise: dict[str, Any],
                            num_inference_steps: int, guidance_scale: float, height: int | None, width: int | None,
                            unet_params: Any = None, text_params: Any = None) -> jax.Array:
        """`generate_latents` from prompts already tokenized (`tokenize`'s (ids, mask) of n prompts), for callers
        that hold token ids (the Flax pipeline API). `negative_tokens`: the negatives' tokens, or None for no
        unconditional pass (`guidance_scale <= 1`) or, with `zero_uncond`, a zero one. `noise`: {"rng": key},
        {"seeds": `seed_array` [n]} or {"keys": PRNG keys [n]} (`generate_latents`). Padded as `generate_latents`."""
        count = len(jax.tree.leaves(tokens)[0])
        shards = math.prod(self.mesh.shape[a] for a in _batch_axes(self.mesh)) if self.mesh else 1
        pad = -(-count // shards) * shards - count  # padding repeats the last example; its images are dropped
        tokens, negative_tokens = _pad_rows(tokens, pad), _pad_rows(negative_tokens, pad)
        sharding = NamedSharding(self.mesh, PartitionSpec(_batch_axes(self.mesh))) if self.mesh else None
        height, width = height or self.default_size, width or self.default_size
        cond, uncond = self._conditioning(tokens, negative_tokens, self._params(text_params, self.text_params),
                                          height, width, sharding, zero_uncond=zero_uncond)
        if "rng" not in noise:  # one entry per example: padded and placed as the batch
            ((name, rows),) = noise.items()
            rows = _pad_rows(rows, pad)
            noise = {name: jax.device_put(rows) if sharding is None else _put(rows, sharding)}
        return generate_latents(
            self.unet_apply, self._params(unet_params, self.unet_params), cond, uncond,
            sampler=self.sampler(num_inference_steps),
            latent_shape=(count + pad, *self._latent_size(height, width), self.latent_channels),
            guidance_scale=guidance_scale, latents_sharding=sharding, **noise)

    def generate(self, prompts: Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 7.5, seed: int | Sequence[int] = 0,
                 height: int | None = None, width: int | None = None, unet_params: Any = None,
                 text_params: Any = None) -> list[Any]:
        """One PIL RGB image per prompt (diffusers' defaults for steps and guidance).

        With one int `seed`, the image of prompt k depends only on (seed, k), the prompts, the
        settings and the params. With one seed per prompt, prompt k starts from exactly the noise
        `generate([prompt_k], seed=seed[k])` starts from, so its image does not depend on the
        batch it was drawn in (class images: one call per batch, one seed per image).
        """
        from PIL import Image

        prompts = list(prompts)
        latents = self.generate_latents(
            prompts, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=seed, height=height, width=width, unet_params=unet_params,
            text_params=text_params)
        images = _to_host(decode_latents(self.vae_decode, self.vae_params, latents, self.scaling_factor,
                                         self.latent_statistics))
        return [Image.fromarray(image) for image in images[: len(prompts)]]


def make_pipeline_sampler(*, tokenizer: Any, text_encoder: Any, text_params: Any, unet: Any, unet_params: Any,
                          vae: Any, vae_params: Any, scheduler_config: Mapping[str, Any],
                          sampler_name: str = "DPMSolverMultistepScheduler", scaling_factor: float = 0.18215,
                          vae_scale_factor: int = 8, latent_channels: int = 4, default_size: int = 512,
                          use_attention_mask: bool = False, mesh: Mesh | None = None, tokenizer_2: Any = None,
                          text_encoder_2: Any = None, force_zeros_for_empty_prompt: bool = True,
                          latent_statistics: tuple[np.ndarray, np.ndarray] | None = None) -> StableDiffusionSampler:
    """Bind Flax modules and their params into a `StableDiffusionSampler`.

    `tokenizer` is a transformers CLIPTokenizer; `text_encoder` a jaxbooth Flax CLIP text model
    (its `last_hidden_state` conditions the UNet; the attention mask is passed only with
    `use_attention_mask`, as diffusers' `encode_prompt`); `unet` a `FlaxUNet2DConditionModel`;
    `vae` a Flax module with a `decode(latents_nhwc)` method returning the NHWC image (or an
    output with `.sample`).

    SDXL: give `tokenizer_2` and `text_encoder_2` (CLIP with projection); `text_params` is then the
    tuple (params_1, params_2), `force_zeros_for_empty_prompt` the pipeline's (model_index.json) and
    `latent_statistics` the VAE's `sdxl.latent_statistics`.
    """
    from jaxbooth.text import make_tokenize_fn

    def vae_decode(params: Any, latents: jax.Array) -> jax.Array:
        out = vae.apply({"params": params}, latents, method=vae.decode)
        return getattr(out, "sample", out)

    common = dict(unet_params=unet_params, vae_decode=vae_decode, vae_params=vae_params,
                  scheduler_config=scheduler_config, sampler_name=sampler_name, scaling_factor=scaling_factor,
                  vae_scale_factor=vae_scale_factor, latent_channels=latent_channels, default_size=default_size,
                  mesh=mesh, latent_statistics=latent_statistics)
    if text_encoder_2 is not None:
        pair = isinstance(text_params, tuple) and len(text_params) == 2
        if tokenizer_2 is None or not (text_params is None or pair):
            raise ValueError("an SDXL sampler needs tokenizer_2 and text_params = (params_1, params_2) (or None)")
        tokenize, encode_text = sdxl_text_conditioning((tokenizer, tokenizer_2), (text_encoder, text_encoder_2))

        def sdxl_unet_apply(params: Any, sample: jax.Array, timesteps: jax.Array, cond: dict) -> jax.Array:
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
            return unet.apply({"params": params}, sample, timesteps, cond["prompt_embeds"], added_cond_kwargs=added)

        return StableDiffusionSampler(tokenize=tokenize, encode_text=encode_text, text_params=text_params,
                                      unet_apply=sdxl_unet_apply, zero_empty_negative=force_zeros_for_empty_prompt,
                                      size_conditioning=True, **common)

    text_fn = jax.jit(lambda p, ids, mask: text_encoder.apply({"params": p}, ids, mask).last_hidden_state)

    def encode_text(params: Any, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
        return text_fn(params, jax.device_put(ids), jax.device_put(mask) if use_attention_mask else None)

    def unet_apply(params: Any, sample: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        return unet.apply({"params": params}, sample, timesteps, context)

    return StableDiffusionSampler(tokenize=make_tokenize_fn(tokenizer), encode_text=encode_text,
                                  text_params=text_params, unet_apply=unet_apply, **common)


def sdxl_text_conditioning(tokenizers: tuple[Any, Any], text_encoders: tuple[Any, Any]) -> tuple[Tokenize, EncodeText]:
    """SDXL's (tokenize, encode_text) for a sampler: both tokenizers, and `encode.sdxl_conditioning` (the
    training cache's math) jitted once per sampler, as {"prompt_embeds", "text_embeds"}."""
    from jaxbooth.jax_backend.encode import sdxl_conditioning
    from jaxbooth.text import make_tokenize_fn

    tokenize_fns = tuple(make_tokenize_fn(t) for t in tokenizers)

    def tokenize(prompts: Sequence[str]) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        pairs = [fn(prompts) for fn in tokenize_fns]
        return tuple(ids for ids, _ in pairs), tuple(mask for _, mask in pairs)

    @jax.jit
    def forward(params: tuple, ids: tuple) -> dict[str, jax.Array]:
        embeds, pooled = sdxl_conditioning(text_encoders, params, ids)
        return {"prompt_embeds": embeds, "text_embeds": pooled}

    def encode_text(params: Any, ids: tuple, mask: Any) -> dict[str, jax.Array]:
        del mask  # SDXL's encode_prompt passes none
        return forward(tuple(params), tuple(jax.device_put(i) for i in ids))

    return tokenize, encode_text
