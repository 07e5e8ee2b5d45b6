"""diffusers' removed Flax pipeline API, on jaxbooth's models: `FlaxStableDiffusionPipeline` and
`FlaxStableDiffusionXLPipeline`.

diffusers 0.40 dropped its Flax classes, so the Flax inference code of its DreamBooth guide
(`from_pretrained(..., dtype=jnp.bfloat16)` -> `prepare_inputs` -> `replicate` / `shard` ->
`pipeline(..., jit=True).images` -> `numpy_to_pil`) ran nowhere. These classes keep that surface and
run it on the sampler `jaxbooth generate` uses (`sample.StableDiffusionSampler`): the same models,
loop, noise and images. Where they differ from the old classes, on purpose:

- `jit=True` compiles one `jax.jit` loop over a mesh of all local devices (the batch split over them),
  not a `jax.pmap`. The guide's pmap-style inputs still work: params from `flax.jax_utils.replicate`
  are un-replicated (each device keeps its own copy; nothing is gathered), ids from
  `flax.training.common_utils.shard` flattened, and images come back [devices, per_device, H, W, 3].
- Noise: example b of a batch draws from `fold_in(key, b)` (jaxbooth's rule, not the old single
  `normal(key, batch_shape)`), so `jax.random.PRNGKey(s)` gives `jaxbooth generate --seed s`'s images;
  with one key per device, example j of device d draws from `fold_in(prng_seed[d], j)`.
- No safety checker: `nsfw_content_detected` is all False. `guidance_scale <= 1` skips the
  unconditional pass (diffusers' PyTorch pipelines' rule; the old Flax ones always ran it).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxbooth import hub, pipelines, sdxl
from jaxbooth.diffusion import read_scheduler_config
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import mesh as mesh_lib
from jaxbooth.jax_backend.generate import sampler_from_models, vae_scale_factor
from jaxbooth.jax_backend.models import clip as clip_lib
from jaxbooth.jax_backend.models.unet import FlaxUNet2DConditionModel
from jaxbooth.jax_backend.models.vae import FlaxAutoencoderKL
from jaxbooth.jax_backend.sample import StableDiffusionSampler, _onto_mesh, decode_latents_float
from jaxbooth.jax_backend.schedulers import SAMPLER_NAMES, canonical_sampler_name
from jaxbooth.jax_backend.weights import flatten_tree, unflatten_tree

# Old from_pretrained keywords taken for compatibility, and what they mean here.
_NONE_ONLY = {
    "safety_checker": "jaxbooth has no safety checker",
    "feature_extractor": "it only fed the safety checker",
}
_NO_EFFECT = {
    "from_pt": "both PyTorch (safetensors) and old Flax (msgpack) weights load, whichever the folder has",
    "split_head_dim": "a layout choice of the old attention; jaxbooth's kernels pick their own",
}
_REFUSED_FIX = {
    "local_files_only": "set HF_HUB_OFFLINE=1 to use only the local Hugging Face cache",
    "proxies": "set the HTTPS_PROXY environment variable",
}
_KEYWORDS = ("dtype", "variant", "scheduler", "lora_scale", "base_model", "revision", "token", "cache_dir",
             "use_memory_efficient_attention", *_NONE_ONLY, *_NO_EFFECT)


class FlaxStableDiffusionPipelineOutput(NamedTuple):
    """`.images`: float32 numpy in [0, 1], NHWC ([devices, per_device, H, W, 3] for sharded ids);
    `.nsfw_content_detected`: one False per image (no safety checker)."""

    images: np.ndarray
    nsfw_content_detected: list[bool]


class FlaxStableDiffusionPipeline:
    """Text to image on an SD 1.x/2.x pipeline, with diffusers' old Flax API; see the module docstring.

    Build it with `from_pretrained`, which also returns the params. Attributes as the old class:
    `tokenizer`, `text_encoder`, `unet`, `vae` (Flax modules), `dtype`, `vae_scale_factor`; `scheduler` is
    the name of the sampler it runs (diffusers class name), `scheduler_config` the pipeline's config.
    """

    _pipeline_class = "StableDiffusionPipeline"
    _components: tuple[str, ...] = ("text_encoder", "unet", "vae")

    def __init__(self, *, model_dir: Path, modules: dict[str, Any], vae_config: Any, scheduler: str,
                 scheduler_config: dict, dtype: Any, param_shapes: dict[str, dict]) -> None:
        self.model_dir, self.dtype = model_dir, dtype
        self.scheduler, self.scheduler_config = scheduler, scheduler_config
        for name, module in modules.items():  # tokenizer(s), text_encoder(s), unet
            setattr(self, name, module)
        self.vae = FlaxAutoencoderKL(vae_config)
        self.vae_scale_factor = vae_scale_factor(vae_config)
        self._modules, self._vae_config, self._param_shapes = modules, vae_config, param_shapes
        self._samplers: dict[bool, StableDiffusionSampler] = {}
        self._mesh: Mesh | None = None
        self._placed: dict[str, tuple[Any, list, Any]] = {}  # component -> (mesh, the leaves given, placed)

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, dtype: Any = jnp.float32, *,
                        variant: str | None = None, scheduler: str | None = None, lora_scale: float | None = None,
                        base_model: str | None = None, revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None, **kwargs: Any,
                        ) -> tuple[FlaxStableDiffusionPipeline, dict[str, Any]]:
        """`(pipeline, params)` for a diffusers pipeline folder or Hub id (safetensors or old Flax msgpack
        weights; what `jaxbooth train` writes), or a LoRA output folder / LoRA file merged at `lora_scale`
        (None: 1.0) into its base (`base_model`, else the one its folder records), as `jaxbooth generate`.

        `params`: {"text_encoder", "unet", "vae"} (+ "text_encoder_2" for SDXL) -> Flax param trees of host
        numpy arrays (`flax.jax_utils.replicate` stacks them on the host, one copy per device).
        `dtype`: the computation dtype of the UNet and text encoder(s), whose params are stored in it too
        (bfloat16 halves their memory, as diffusers' `variant="bf16"` weights did); the VAE keeps float32
        params and decodes in float32 (SD VAEs overflow in half precision); latents, sampler and guidance
        math stay float32. `variant`: weight files `*.{variant}.safetensors` (e.g. "fp16"). `scheduler`: the
        sampler by diffusers class or short name (`schedulers.SAMPLER_NAMES`); default the folder's own
        scheduler class when jaxbooth has it, else DPMSolverMultistepScheduler. `revision`, `token`,
        `cache_dir`: for a Hub id, as in diffusers. Old keywords also taken: `safety_checker=None`,
        `feature_extractor=None`, `from_pt` and `split_head_dim` (no effect here), and
        `use_memory_efficient_attention=True` (the UNet's query-chunked attention kernel).
        """
        kernel = _check_kwargs(cls.__name__, kwargs)
        dtype = _compute_dtype(dtype)
        if scheduler is not None:
            _check_scheduler(scheduler)
        model_dir, load, variant = _source(pretrained_model_name_or_path, variant=variant, lora_scale=lora_scale,
                                           base_model=base_model, revision=revision, token=token, cache_dir=cache_dir)
        cls._check_class(model_dir)
        from jaxbooth.jax_backend.class_images import default_sampler_name
        from jaxbooth.text import load_tokenizer

        params: dict[str, Any] = {}
        configs: dict[str, Any] = {}
        for component in cls._components:
            configs[component], _, params[component] = load(
                model_dir, component, variant=variant, dtype=jnp.float32 if component == "vae" else dtype)
        unet_options = {} if kernel is None else {"attention_kernel": kernel}
        modules = {"tokenizer": load_tokenizer(model_dir),
                   "text_encoder": clip_lib.make_text_encoder(configs["text_encoder"], dtype=dtype),
                   "unet": FlaxUNet2DConditionModel(configs["unet"], dtype=dtype, **unet_options)}
        if "text_encoder_2" in configs:
            config_2 = configs["text_encoder_2"]
            modules["tokenizer_2"] = load_tokenizer(model_dir, subfolder="tokenizer_2")
            modules["text_encoder_2"] = clip_lib.make_text_encoder(config_2, with_projection=config_2.has_projection,
                                                                   dtype=dtype)
        scheduler_config = read_scheduler_config(model_dir)
        pipeline = cls(model_dir=model_dir, modules=modules, vae_config=configs["vae"],
                       scheduler=scheduler or default_sampler_name(scheduler_config),
                       scheduler_config=scheduler_config, dtype=dtype,
                       param_shapes={c: _shapes(tree) for c, tree in params.items()})
        return pipeline, params

    @classmethod
    def _check_class(cls, model_dir: Path) -> None:
        """Refuse another family's pipeline before its models load, naming the class that loads it."""
        name = pipelines.pipeline_class(model_dir)
        if name == cls._pipeline_class:
            return
        other = {"StableDiffusionPipeline": "FlaxStableDiffusionPipeline",
                 "StableDiffusionXLPipeline": "FlaxStableDiffusionXLPipeline"}.get(name)
        fix = (f"load it with jaxbooth.{other}.from_pretrained" if other else
               "point it at a Stable Diffusion 1.x/2.x or SDXL pipeline folder")
        raise JaxboothError(f"{model_dir / 'model_index.json'}: _class_name={name}, which {cls.__name__} does not "
                            f"sample (it takes {cls._pipeline_class} folders); {fix}")

    # ------------------------------------------------------------------------------------------ inputs

    def prepare_inputs(self, prompt: str | list[str]) -> np.ndarray:
        """int32 token ids [B, L] (L: the tokenizer's model_max_length, 77 for CLIP): padded to L, longer
        prompts truncated, as the old API."""
        ids, _ = self._sampler(None).tokenize(_prompt_list(prompt))
        return np.asarray(ids, np.int32)

    def _tokens(self, rows: np.ndarray) -> tuple[Any, Any]:
        """A sampler's `tokenize` output for ids [n, L]. The mask is unused (the old Flax pipelines, and
        jaxbooth's samplers by default, pass the text encoder none)."""
        return rows, np.ones_like(rows)

    def _text_params(self, placed: dict[str, Any]) -> Any:
        return placed["text_encoder"]

    # ------------------------------------------------------------------------------------------ sampling

    def __call__(self, prompt_ids: Any, params: Mapping[str, Any], prng_seed: Any, num_inference_steps: int = 50,
                 height: int | None = None, width: int | None = None, guidance_scale: float | Any = 7.5,
                 latents: Any = None, neg_prompt_ids: Any = None, return_dict: bool = True, jit: bool = False,
                 ) -> FlaxStableDiffusionPipelineOutput | tuple[np.ndarray, list[bool]]:
        """Images for `prompt_ids` (`prepare_inputs`; or `shard`-ed [devices, per_device, L] with one key
        per device and params from `replicate`), in the old class's argument order.

        `prng_seed`: a PRNG key (`jax.random.PRNGKey(s)` or `jax.random.key(s)`, or an int seed) for
        [B, L] ids; `jax.random.split(key, devices)` for sharded ids. `neg_prompt_ids`: ids of the negative
        prompts, shaped as `prompt_ids`; None: the empty prompt's (SDXL: zeros when the pipeline's
        `force_zeros_for_empty_prompt`). `height`/`width`: default the UNet's sample_size times the VAE
        scale. `jit`: sample on a mesh of all local devices (else on the default device). `latents`
        (initial latents) is not taken: the noise comes from `prng_seed`.
        """
        return self._generate(prompt_ids, params, prng_seed, num_inference_steps=num_inference_steps, height=height,
                              width=width, guidance_scale=guidance_scale, latents=latents,
                              neg_prompt_ids=neg_prompt_ids, return_dict=return_dict, jit=jit)

    def _generate(self, prompt_ids: Any, params: Mapping[str, Any], prng_seed: Any, *, num_inference_steps: int,
                  height: int | None, width: int | None, guidance_scale: Any, latents: Any, neg_prompt_ids: Any,
                  return_dict: bool, jit: bool) -> FlaxStableDiffusionPipelineOutput | tuple[np.ndarray, list[bool]]:
        if latents is not None:
            raise JaxboothError("latents=: initial latents are not taken; the noise comes from prng_seed (example b "
                                "of a batch from jax.random.fold_in(prng_seed, b)). Fix: drop latents=")
        ids, lead = self._ids(prompt_ids, "prompt_ids")
        count = math.prod(lead)
        negatives = None
        if neg_prompt_ids is not None:
            negatives, neg_lead = self._ids(neg_prompt_ids, "neg_prompt_ids")
            if neg_lead != lead:
                raise JaxboothError(f"neg_prompt_ids has shape {np.shape(neg_prompt_ids)} but prompt_ids has "
                                    f"{np.shape(prompt_ids)}; give one negative per prompt, shaped (and sharded) alike")
        noise = _noise(prng_seed, lead)
        scale = _guidance_value(guidance_scale)
        sampler = self._sampler(self._jit_mesh() if jit else None)
        placed = self._place(params, sampler.mesh)
        guided = scale > 1.0
        zero_uncond = guided and negatives is None and sampler.zero_empty_negative
        negative_tokens = None
        if guided and not zero_uncond:
            negative_tokens = sampler.tokenize([""] * count) if negatives is None else self._tokens(negatives)
        result = sampler.latents_from_tokens(
            self._tokens(ids), negative_tokens, zero_uncond=zero_uncond, noise=noise,
            num_inference_steps=num_inference_steps, guidance_scale=scale, height=height, width=width,
            unet_params=placed["unet"], text_params=self._text_params(placed))
        images = decode_latents_float(sampler.vae_decode, placed["vae"], result, sampler.scaling_factor,
                                      sampler.latent_statistics)
        images = np.asarray(jax.device_get(images))[:count]
        images = images.reshape(*lead, *images.shape[1:])
        nsfw = [False] * count
        return FlaxStableDiffusionPipelineOutput(images, nsfw) if return_dict else (images, nsfw)

    _row_ndim = 1  # ids per example: [L]; SDXL [2, L]

    def _ids(self, value: Any, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """Host int32 ids [n, *row] and the leading shape ([B] or [devices, per_device])."""
        ids = np.asarray(jax.device_get(value))
        lead = ids.shape[: ids.ndim - self._row_ndim]
        row = "[2, L] (both tokenizers)" if self._row_ndim == 2 else "[L]"
        if not np.issubdtype(ids.dtype, np.integer) or len(lead) not in (1, 2) or 0 in ids.shape:
            raise JaxboothError(f"{name}: expected integer token ids of shape [B, ...] or [devices, B/devices, ...] "
                                f"with {row} per prompt (prepare_inputs, then flax.training.common_utils.shard "
                                f"for jit=True pmap-style), got {ids.dtype} {ids.shape}")
        return ids.reshape(-1, *ids.shape[len(lead):]).astype(np.int32), lead

    def _jit_mesh(self) -> Mesh | None:
        """A (data, fsdp) mesh over the local devices, None for one device (as `jaxbooth generate`)."""
        if jax.local_device_count() == 1:
            return None
        if self._mesh is None:
            self._mesh = mesh_lib.make_mesh((jax.local_device_count(), 1), jax.local_devices())
        return self._mesh

    def _sampler(self, mesh: Mesh | None) -> StableDiffusionSampler:
        """The sampler on `mesh` (None: the default device), built once; params are given per call."""
        key = mesh is not None
        if key not in self._samplers:
            modules = self._modules
            extra = {name: modules[name] for name in ("tokenizer_2", "text_encoder_2") if name in modules}
            self._samplers[key] = sampler_from_models(
                model_dir=self.model_dir, tokenizer=modules["tokenizer"], unet=modules["unet"], unet_params=None,
                text_encoder=modules["text_encoder"], text_params=None, vae_config=self._vae_config, vae_params=None,
                sampler_name=self.scheduler, mesh=mesh, scheduler_config=self.scheduler_config, **extra)
        return self._samplers[key]

    # ------------------------------------------------------------------------------------------ params

    def _place(self, params: Mapping[str, Any], mesh: Mesh | None) -> dict[str, Any]:
        """Each component's params on the devices that sample: `mesh` (replicated) or the default device.
        Replicated params (a leading device axis, `flax.jax_utils.replicate`) give each device its own copy
        back, with no transfer; other params are placed once and reused while the same arrays come back."""
        if not isinstance(params, Mapping):
            raise JaxboothError(f"params: expected the dict from_pretrained returned (or flax.jax_utils.replicate "
                                f"of it), got {type(params).__name__}")
        missing = [c for c in self._components if c not in params]
        extra = sorted(str(k) for k in params if k not in self._components)
        if missing or extra:
            hint = " (choose the sampler with from_pretrained(..., scheduler=NAME))" if "scheduler" in extra else ""
            raise JaxboothError(f"params has components {sorted(map(str, params))}; {type(self).__name__} takes "
                                f"exactly {list(self._components)}, the dict from_pretrained returned{hint}")
        return {component: self._place_component(component, params[component], mesh) for component in self._components}

    def _place_component(self, component: str, tree: Any, mesh: Mesh | None) -> Any:
        flat = flatten_tree(tree) if isinstance(tree, Mapping) else {}
        expected = self._param_shapes[component]
        if flat.keys() != expected.keys():
            odd = sorted(set(flat) ^ set(expected))
            where = "/".join(odd[0]) if odd else "(not a dict of arrays)"
            raise JaxboothError(f"params['{component}'] is not this pipeline's {component} tree (e.g. {where} "
                                "differs); pass the params from_pretrained returned with this pipeline")
        shapes = {path: np.shape(leaf) for path, leaf in flat.items()}
        if shapes == expected:
            leaves = list(flat.values())
            cached = self._placed.get(component)
            if cached is not None and cached[0] is mesh and len(cached[1]) == len(leaves) \
                    and all(a is b for a, b in zip(cached[1], leaves, strict=True)):
                return cached[2]
            placed = jax.device_put(tree, jax.devices()[0]) if mesh is None else _onto_mesh(unflatten_tree(flat), mesh)
            self._placed[component] = (mesh, leaves, placed)
            return placed
        devices = {shape[0] if shape else None for shape in shapes.values()}
        if len(devices) != 1 or any(shape[1:] != expected[path] for path, shape in shapes.items()):
            path = next(p for p, s in shapes.items() if s != expected[p])
            raise JaxboothError(f"params['{component}'][{'/'.join(path)}] has shape {shapes[path]}; this pipeline's is "
                                f"{expected[path]} (or [devices, ...] from flax.jax_utils.replicate)")
        return unflatten_tree({path: _one_replica(leaf, expected[path], mesh) for path, leaf in flat.items()})

    # ------------------------------------------------------------------------------------------ output

    @staticmethod
    def numpy_to_pil(images: Any) -> list[Any]:
        """float images in [0, 1] ([H, W, C], [N, H, W, C] or more leading axes) -> PIL images,
        round(x * 255) as uint8 (values outside [0, 1] clipped)."""
        from PIL import Image

        array = np.asarray(images)
        if array.ndim < 3 or array.shape[-1] not in (1, 3, 4):
            raise JaxboothError(f"numpy_to_pil: expected images [..., H, W, C] with C in (1, 3, 4), got {array.shape}")
        pixels = np.round(np.clip(array.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
        return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in pixels]


class FlaxStableDiffusionXLPipeline(FlaxStableDiffusionPipeline):
    """The SDXL twin: both text encoders and tokenizers (`tokenizer_2`, `text_encoder_2`), SDXL's time ids,
    and, without negative prompt ids, zero unconditional embeddings when the pipeline's
    `force_zeros_for_empty_prompt` (as jaxbooth's SDXL sampler and diffusers' SDXL pipeline)."""

    _pipeline_class = sdxl.PIPELINE_CLASS
    _components = ("text_encoder", "text_encoder_2", "unet", "vae")
    _row_ndim = 2

    def prepare_inputs(self, prompt: str | list[str]) -> np.ndarray:
        """int32 token ids [B, 2, L]: row 0 from `tokenizer`, row 1 from `tokenizer_2` (each padded to L and
        truncated, as the old API)."""
        ids, _ = self._sampler(None).tokenize(_prompt_list(prompt))
        lengths = sorted({row.shape[-1] for row in ids})
        if len(lengths) != 1:
            raise JaxboothError(f"{self.model_dir}: tokenizer and tokenizer_2 have model_max_length {lengths}; "
                                "prepare_inputs stacks both, so they must be equal (77 in SDXL pipelines)")
        return np.stack(ids, axis=1).astype(np.int32)

    def _tokens(self, rows: np.ndarray) -> tuple[Any, Any]:
        pair = (rows[:, 0], rows[:, 1])
        return pair, tuple(np.ones_like(ids) for ids in pair)

    def _text_params(self, placed: dict[str, Any]) -> Any:
        return placed["text_encoder"], placed["text_encoder_2"]

    def __call__(self, prompt_ids: Any, params: Mapping[str, Any], prng_seed: Any, num_inference_steps: int = 50,
                 guidance_scale: float | Any = 7.5, height: int | None = None, width: int | None = None,
                 latents: Any = None, neg_prompt_ids: Any = None, return_dict: bool = True, jit: bool = False,
                 ) -> FlaxStableDiffusionPipelineOutput | tuple[np.ndarray, list[bool]]:
        """As `FlaxStableDiffusionPipeline.__call__`, in the old XL class's argument order (guidance_scale
        before height and width); ids [B, 2, L] from `prepare_inputs`."""
        return self._generate(prompt_ids, params, prng_seed, num_inference_steps=num_inference_steps, height=height,
                              width=width, guidance_scale=guidance_scale, latents=latents,
                              neg_prompt_ids=neg_prompt_ids, return_dict=return_dict, jit=jit)


# ---------------------------------------------------------------------------------------------- helpers


def _check_kwargs(owner: str, kwargs: dict[str, Any]) -> str | None:
    """The old keywords' values checked; returns the UNet attention kernel they ask for (None: default)."""
    for name, why in _NONE_ONLY.items():
        if kwargs.pop(name, None) is not None:
            raise JaxboothError(f"{owner}.from_pretrained: {name}= is taken only as None ({why}). Fix: drop {name}=")
    for name in _NO_EFFECT:
        kwargs.pop(name, None)
    efficient = kwargs.pop("use_memory_efficient_attention", False)
    if kwargs:
        name = sorted(kwargs)[0]
        fix = _REFUSED_FIX.get(name)
        if fix is None:
            close = difflib.get_close_matches(name, _KEYWORDS, n=1)
            fix = f"did you mean {close[0]!r}?" if close else "it takes " + ", ".join(_KEYWORDS)
        raise JaxboothError(f"{owner}.from_pretrained: unknown keyword {name}= ({fix})")
    return "chunked" if efficient else None


def _compute_dtype(dtype: Any) -> Any:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise JaxboothError(f"dtype={dtype!r}: expected a floating dtype (jnp.float32, jnp.bfloat16, jnp.float16)")
    return resolved.type


def _check_scheduler(name: Any) -> None:
    if not isinstance(name, str):
        raise JaxboothError(f"scheduler={name!r}: expected a sampler name, one of {', '.join(SAMPLER_NAMES)} "
                            "(diffusers' Flax scheduler objects no longer exist)")
    try:
        canonical_sampler_name(name)
    except JaxboothError as error:
        raise JaxboothError(str(error).replace("validation_scheduler=", "scheduler=", 1)) from None


def _source(name: str | os.PathLike, *, variant: str | None, lora_scale: float | None, base_model: str | None,
            revision: str | None, token: str | bool | None, cache_dir: str | os.PathLike | None) -> tuple:
    """(pipeline folder, component loader, weight variant), as `jaxbooth generate` resolves its model."""
    from jaxbooth.jax_backend.lora_loading import generate_source

    name = str(name)
    if not Path(name).expanduser().exists() and hub.looks_like_hub_id(name):
        name = str(hub.resolve_model_dir(name, revision=revision, variant=variant, token=token, cache_dir=cache_dir))
    source = generate_source(name, base=base_model, lora_scale=lora_scale)
    return source.model_dir, source.load, variant if variant is not None else source.variant


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {path: np.shape(leaf) for path, leaf in flatten_tree(tree).items()}


def _prompt_list(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise JaxboothError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def _typed_keys(prng_seed: Any) -> jax.Array:
    """Typed PRNG key(s) from a typed key, raw key data (`jax.random.PRNGKey`, `split`) or an int seed."""
    if isinstance(prng_seed, (int, np.integer)) and not isinstance(prng_seed, bool):
        return jax.random.key(int(prng_seed))
    if isinstance(prng_seed, jax.Array) and jax.dtypes.issubdtype(prng_seed.dtype, jax.dtypes.prng_key):
        return prng_seed
    data = jnp.asarray(prng_seed) if isinstance(prng_seed, (jax.Array, np.ndarray)) else None
    if data is not None and data.dtype == jnp.uint32 and data.ndim >= 1:
        try:
            return jax.random.wrap_key_data(data)
        except (TypeError, ValueError):
            pass
    shape = getattr(prng_seed, "shape", None)
    raise JaxboothError(f"prng_seed: expected a PRNG key (jax.random.PRNGKey(seed), jax.random.key(seed) or an int "
                        f"seed) or one per device (jax.random.split(key, jax.device_count())), got "
                        f"{type(prng_seed).__name__} {shape if shape is not None else ''}".rstrip())


def _noise(prng_seed: Any, lead: tuple[int, ...]) -> dict[str, jax.Array]:
    """The sampler's noise source: {"rng": key} for [B] ids (example b from `fold_in(key, b)`, the very
    program `jaxbooth generate` runs), {"keys": [devices * per_device]} for sharded ids, example (d, j)
    from `fold_in(prng_seed[d], j)`: each device's examples as a batch of their own with that device's key."""
    keys = _typed_keys(prng_seed)
    if len(lead) == 1:
        if keys.shape != ():
            raise JaxboothError(f"prng_seed has {keys.shape[0]} keys but prompt_ids are not sharded; give one key "
                                "(jax.random.PRNGKey(seed)), or shard the ids (flax.training.common_utils.shard)")
        return {"rng": keys}
    if keys.shape != lead[:1]:
        raise JaxboothError(f"prng_seed has shape {keys.shape} but the sharded prompt_ids have {lead[0]} devices; "
                            f"give one key per device: jax.random.split(key, {lead[0]})")
    fold = jax.vmap(lambda key: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(lead[1])))
    return {"keys": fold(keys).reshape(-1)}


def _guidance_value(guidance_scale: Any) -> float:
    """One float for the batch: a number, or the per-device arrays the old API built (all equal)."""
    values = np.asarray(jax.device_get(guidance_scale), np.float32).reshape(-1)
    if values.size == 0 or not np.all(values == values[0]):
        raise JaxboothError(f"guidance_scale: expected one value for the whole batch, got {values.tolist()}")
    return float(values[0])


def _one_replica(leaf: Any, shape: tuple[int, ...], mesh: Mesh | None) -> Any:
    """One replica of a leaf with a leading device axis (`flax.jax_utils.replicate`), placed for `mesh`
    (None: the default device): each device reuses the row it already holds, so nothing crosses devices;
    a leaf not laid out so (e.g. host numpy) sends its row 0."""
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    if isinstance(leaf, jax.Array):
        rows = {shard.device: shard.data for shard in leaf.addressable_shards if shard.data.shape == (1, *shape)}
        if all(device in rows for device in devices):
            local = [rows[device].reshape(shape) for device in devices]
            if mesh is None:
                return local[0]
            return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, PartitionSpec()), local)
    row = np.asarray(jax.device_get(leaf[0]))
    return jax.device_put(row) if mesh is None else _onto_mesh(row, mesh)
