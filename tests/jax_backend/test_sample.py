"""The denoising loop, decode and prompt-to-image sampler, with tiny stand-in models."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.sample import (
    StableDiffusionSampler,
    decode_latents,
    generate_latents,
    make_initial_noise,
    make_seeded_noise,
    seed_array,
)
from jaxbooth.jax_backend.schedulers import make_sampler

REPO = Path(__file__).resolve().parents[2]
SD_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}
TOKENS, WIDTH, VOCAB = 4, 5, 64


def linear_unet(params: dict, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    """A 'UNet' linear in its inputs: a * x + mean(context) + b * t / 1000."""
    return (params["a"] * x + context.mean(axis=(1, 2))[:, None, None, None]
            + params["b"] * t[:, None, None, None] / 1000.0)


UNET_PARAMS = {"a": jnp.float32(0.3), "b": jnp.float32(0.5)}


def toy_tokenize(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(prompts), TOKENS), np.int32)
    for row, prompt in enumerate(prompts):
        words = [sum(map(ord, word)) % VOCAB for word in prompt.split()][:TOKENS]
        ids[row, : len(words)] = words
    return ids, np.ones_like(ids)


TABLE = jax.random.normal(jax.random.key(7), (VOCAB, WIDTH))


_lookup = jax.jit(lambda ids: TABLE[ids])


def toy_encode(params: dict, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    del mask
    return params["gain"] * _lookup(jax.device_put(ids))


def toy_vae_decode(params: dict, latents: jax.Array) -> jax.Array:
    """x8 nearest upsampling of the first three latent channels, squashed into [-1, 1]."""
    image = jnp.repeat(jnp.repeat(latents[..., :3], 8, axis=1), 8, axis=2)
    return jnp.tanh(params["gain"] * image)


def toy_pipeline(mesh: object = None, sampler_name: str = "dpm++") -> StableDiffusionSampler:
    return StableDiffusionSampler(
        tokenize=toy_tokenize, encode_text=toy_encode, text_params={"gain": jnp.float32(1.0)},
        unet_apply=linear_unet, unet_params=UNET_PARAMS,
        vae_decode=toy_vae_decode, vae_params={"gain": jnp.float32(2.0)}, scheduler_config=SD_CONFIG,
        sampler_name=sampler_name, default_size=32, mesh=mesh)


def _hand_ddim(noise: np.ndarray, cond: np.ndarray, uncond: np.ndarray | None, g: float) -> np.ndarray:
    """Two DDIM steps written out from the paper's update and SD's schedule, in float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    x = noise.astype(np.float64)
    for t in (501, 1):  # "leading" spacing of 2 steps with steps_offset=1
        a, a_prev = alphas_cumprod[t], alphas_cumprod[t - 500] if t >= 500 else alphas_cumprod[0]
        e_cond = 0.3 * x + cond.mean(axis=(1, 2))[:, None, None, None] + 0.5 * t / 1000
        eps = e_cond
        if uncond is not None:
            e_uncond = 0.3 * x + uncond.mean(axis=(1, 2))[:, None, None, None] + 0.5 * t / 1000
            eps = e_uncond + g * (e_cond - e_uncond)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return x


def test_guided_two_step_ddim_matches_hand_computation() -> None:
    sampler = make_sampler("ddim", SD_CONFIG, 2)
    np.testing.assert_array_equal(sampler.timesteps, [501, 1])
    cond, uncond = (np.random.default_rng(s).standard_normal((2, TOKENS, WIDTH)).astype(np.float32)
                    for s in (0, 1))
    rng, shape = jax.random.key(3), (2, 4, 4, 4)
    latents = generate_latents(linear_unet, UNET_PARAMS, jnp.asarray(cond), jnp.asarray(uncond),
                               sampler=sampler, rng=rng, latent_shape=shape, guidance_scale=7.5)
    expected = _hand_ddim(np.asarray(make_initial_noise(rng, shape)), cond, uncond, 7.5)
    np.testing.assert_allclose(np.asarray(latents), expected, rtol=1e-4, atol=1e-5)


def test_guidance_scale_one_skips_the_unconditional_pass() -> None:
    batches = []

    def recording_unet(params: dict, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        batches.append(x.shape[0])  # runs at trace time
        return linear_unet(params, x, t, context)

    cond = np.random.default_rng(0).standard_normal((2, TOKENS, WIDTH)).astype(np.float32)
    rng, shape = jax.random.key(3), (2, 4, 4, 4)
    latents = generate_latents(recording_unet, UNET_PARAMS, jnp.asarray(cond), None,
                               sampler=make_sampler("ddim", SD_CONFIG, 2), rng=rng, latent_shape=shape,
                               guidance_scale=1.0)
    assert batches and set(batches) == {2}
    expected = _hand_ddim(np.asarray(make_initial_noise(rng, shape)), cond, None, 1.0)
    np.testing.assert_allclose(np.asarray(latents), expected, rtol=1e-4, atol=1e-5)


def test_noise_of_an_example_does_not_depend_on_batch_size() -> None:
    rng = jax.random.key(11)
    small, large = make_initial_noise(rng, (2, 4, 4, 4)), make_initial_noise(rng, (5, 4, 4, 4), 2.0)
    np.testing.assert_array_equal(2.0 * np.asarray(small), np.asarray(large)[:2])
    assert not np.allclose(small[0], small[1])


def test_seed_reproduces_and_distinct_seeds_differ() -> None:
    pipe = toy_pipeline()
    kw = {"num_inference_steps": 3, "guidance_scale": 5.0}
    with jax.transfer_guard("disallow"):  # host<->device copies in generate are all explicit
        first = [np.asarray(im) for im in pipe.generate(["a sks dog", "a cat"], seed=1, **kw)]
        again = [np.asarray(im) for im in pipe.generate(["a sks dog", "a cat"], seed=1, **kw)]
        other = [np.asarray(im) for im in pipe.generate(["a sks dog", "a cat"], seed=2, **kw)]
        alone = np.asarray(pipe.generate(["a sks dog"], seed=1, **kw)[0])
    assert first[0].shape == (32, 32, 3) and first[0].dtype == np.uint8
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], alone)  # an image depends on (seed, position), not batch
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], first[1])


def test_seeded_noise_of_an_example_is_its_batch_of_one_noise() -> None:
    seeds = [0, 11, 2**31 - 1, 2**31 + 3, 2**40 + 9, -5]  # the large/negative ones wrap as jax.random.key(int)
    noise = np.asarray(make_seeded_noise(jax.device_put(seed_array(seeds)), (len(seeds), 4, 4, 4), 1.5))
    for row, seed in enumerate(seeds):
        alone = np.asarray(make_initial_noise(jax.random.key(seed), (1, 4, 4, 4), 1.5))[0]
        np.testing.assert_array_equal(noise[row], alone)
    assert not np.allclose(noise[0], noise[1])


def test_one_seed_per_prompt_draws_each_image_as_a_batch_of_one() -> None:
    pipe = toy_pipeline()
    kw = {"num_inference_steps": 3, "guidance_scale": 5.0}
    prompts, seeds = ["a sks dog", "a cat", "a sks dog"], [21, 2**31 + 3, 21]
    with jax.transfer_guard("disallow"):
        batch = [np.asarray(im) for im in pipe.generate(prompts, seed=seeds, **kw)]
        alone = [np.asarray(pipe.generate([p], seed=s, **kw)[0]) for p, s in zip(prompts, seeds, strict=True)]
        one_seed = [np.asarray(im) for im in pipe.generate(prompts, seed=21, **kw)]
    for got, want in zip(batch, alone, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(batch[0], batch[2])  # same prompt and seed: same image, wherever it sits
    assert not np.array_equal(batch[0], batch[1])
    assert not np.array_equal(one_seed[0], one_seed[2])  # an int seed still gives each position its own noise
    latents = pipe.generate_latents(prompts[:2], seed=(21, 2**31 + 3), **kw)
    np.testing.assert_allclose(latents[0], pipe.generate_latents(prompts[:1], seed=21, **kw)[0], rtol=1e-6)


def test_params_given_to_generate_replace_the_bound_ones_without_recompiling() -> None:
    traces = []

    def counting_unet(params: dict, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        traces.append(1)
        return linear_unet(params, x, t, context)

    pipe = dataclasses.replace(toy_pipeline(), unet_apply=counting_unet)
    new_unet, new_text = {"a": jnp.float32(-0.2), "b": jnp.float32(0.1)}, {"gain": jnp.float32(3.0)}
    kw = {"num_inference_steps": 2, "seed": 4}
    bound = pipe.generate_latents(["a dog"], **kw)
    given = pipe.generate_latents(["a dog"], unet_params=new_unet, text_params=new_text, **kw)
    rebuilt = dataclasses.replace(toy_pipeline(), unet_params=new_unet, text_params=new_text)
    np.testing.assert_allclose(given, rebuilt.generate_latents(["a dog"], **kw), rtol=1e-6)
    assert not np.allclose(bound, given)
    assert len(traces) == 1


def test_negative_prompt_changes_the_result() -> None:
    pipe = toy_pipeline(sampler_name="euler")
    kw = {"num_inference_steps": 2, "guidance_scale": 3.0, "seed": 0}
    plain = pipe.generate_latents(["a dog"], **kw)
    negative = pipe.generate_latents(["a dog"], negative_prompt="blurry photo", **kw)
    assert not np.allclose(plain, negative)


def test_decode_latents_matches_diffusers_postprocess() -> None:
    latents = jax.random.normal(jax.random.key(0), (2, 2, 2, 4)) * 0.3
    images = np.asarray(decode_latents(toy_vae_decode, {"gain": jnp.float32(2.0)}, latents, 0.18215))
    decoded = np.tanh(2.0 * np.repeat(np.repeat(np.asarray(latents)[..., :3] / 0.18215, 8, 1), 8, 2))
    expected = np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    assert np.abs(images.astype(int) - expected).max() <= 1  # float32 vs float64 rounding at .5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"negative_prompt": ["x", "y", "z"]}, "negative_prompt has 3 entries for 2 prompts"),
        ({"height": 36}, "must be divisible by the VAE's scale factor 8"),
        ({"seed": [1, 2, 3]}, "seed has 3 entries for 2 prompts"),
        ({"seed": [1, "2"]}, "one integer per prompt"),
        ({"seed": "12"}, "seed must be an integer or one integer per prompt"),
    ],
)
def test_bad_generate_arguments_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(JaxboothError, match=match):
        toy_pipeline().generate(["a", "b"], num_inference_steps=2, **kwargs)


def test_unknown_sampler_fails_at_construction() -> None:
    with pytest.raises(JaxboothError, match="validation_scheduler='lms'"):
        toy_pipeline(sampler_name="lms")


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from tests.jax_backend.test_sample import toy_pipeline

    assert jax.device_count() == 8, jax.devices()
    kw = dict(negative_prompt="ugly", num_inference_steps=4, guidance_scale=6.0, seed=5)
    prompts = ["a sks dog", "a red cat", "a toy"]  # 3 prompts on 8 devices: padded to 8
    single = toy_pipeline()
    sharded = toy_pipeline(Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp")))
    lat_single = np.asarray(single.generate_latents(prompts, **kw))
    lat_sharded_array = sharded.generate_latents(prompts, **kw)
    images_single = [np.asarray(im) for im in single.generate(prompts, **kw)]
    images_sharded = [np.asarray(im) for im in sharded.generate(prompts, **kw)]
    seeded = {**kw, "seed": [11, 2**31 + 3, 7]}  # one seed per prompt; padding repeats the last
    seeded_sharded = np.asarray(sharded.generate_latents(prompts, **seeded))
    seeded_alone = np.stack([np.asarray(single.generate_latents([p], **{**kw, "seed": s}))[0]
                             for p, s in zip(prompts, seeded["seed"])])
    print(json.dumps({
        "seeded_diff": float(np.abs(seeded_sharded[:3] - seeded_alone).max()),
        "seeded_distinct": bool(not np.allclose(seeded_sharded[:3], lat_single[:3])),
        "devices": len(lat_sharded_array.sharding.device_set),
        "shape": list(lat_sharded_array.shape),
        "latent_diff": float(np.abs(np.asarray(lat_sharded_array)[:3] - lat_single[:3]).max()),
        "count": len(images_sharded),
        "image_diff": max(int(np.abs(a.astype(int) - b.astype(int)).max())
                          for a, b in zip(images_single, images_sharded)),
    }))
    """
)


def test_sharded_over_8_devices_equals_unsharded_with_padding() -> None:
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["shape"][0] == 8
    assert result["count"] == 3
    assert result["latent_diff"] <= 1e-4  # reduction order differs per shard: float32 noise, not a bug
    assert result["image_diff"] <= 1
    assert result["seeded_diff"] <= 1e-4 and result["seeded_distinct"]


def _random_params(abstract: dict, seed: int = 0) -> dict:
    """Random values for an abstract param tree: numpy is much faster here than compiling Flax's
    initialisers for every shape (`init_params` takes minutes on a loaded 2-core CPU)."""
    rng = np.random.default_rng(seed)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def test_two_guided_steps_with_the_real_tiny_unet() -> None:
    from jaxbooth import tiny
    from jaxbooth.jax_backend.models import unet as unet_lib

    config = unet_lib.unet_config_from_dict(tiny.unet_config("tiny"))
    model = unet_lib.FlaxUNet2DConditionModel(config)
    params = _random_params(unet_lib.abstract_params(config))

    def unet_apply(p: dict, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        return model.apply({"params": p}, x, t, context)

    cond, uncond = (jax.random.normal(jax.random.key(s), (1, TOKENS, config.encoder_hidden_dim))
                    for s in (1, 2))
    shape = (1, 8, 8, config.in_channels)
    latents = generate_latents(unet_apply, params, cond, uncond, sampler=make_sampler("dpm++", SD_CONFIG, 2),
                               rng=jax.random.key(0), latent_shape=shape, guidance_scale=7.5)
    assert latents.shape == shape and bool(jnp.all(jnp.isfinite(latents)))
    assert not np.allclose(latents, make_initial_noise(jax.random.key(0), shape))
