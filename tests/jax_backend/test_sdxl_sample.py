"""SDXL sampling on the JAX backend: the one sampler, with SDXL's conditioning step, equals stock diffusers'
`StableDiffusionXLPipeline` from the same initial latents; `jaxbooth generate` samples an SDXL pipeline and a
LoRA on one; a JAX SDXL run writes validation images and generates its missing class images."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import class_images, cli, sdxl
from jaxbooth.jax_backend import generate, pretrained
from jaxbooth.lora import AdapterSettings, LoraState, is_target
from jaxbooth.lora import files as lora_files
from tests.jax_backend.test_caches import image_folder

pytest.importorskip("torch")
pytestmark = pytest.mark.requires_torch

PROMPTS = ["a photo of sks dog", "a dog"]
HEIGHT, WIDTH = 64, 48  # not square, so a swapped (height, width) in the time ids shows
STEPS, GUIDANCE = 2, 5.0


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory):
    """The tiny SDXL pipeline folder, loaded by stock diffusers."""
    from diffusers import StableDiffusionXLPipeline

    from tests._sdxl_pipeline import write_sdxl_pipeline

    folder = write_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


def diffusers_sample(pipe, noise_nhwc: np.ndarray, negative_prompt: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(final latents NHWC, uint8 images) of the stock pipeline from the given unscaled initial noise."""
    import torch

    latents_nchw = torch.from_numpy(noise_nhwc.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        latents = pipe(PROMPTS, negative_prompt=negative_prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       height=HEIGHT, width=WIDTH, latents=latents_nchw, output_type="latent").images
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # as the pipeline decodes
        images = pipe.image_processor.postprocess(decoded, output_type="np")
    return latents.numpy().transpose(0, 2, 3, 1), np.round(images * 255).astype(np.int32)


def test_jax_sdxl_sampling_equals_stock_diffusers(stock) -> None:
    """Same initial latents, same Euler schedule, guidance 5: a given negative prompt, and no negative prompt
    with force_zeros_for_empty_prompt True (zeros) and False (the empty prompt's encoding)."""
    import jax

    from jaxbooth.jax_backend.sample import decode_latents, make_initial_noise

    folder, pipe = stock
    base = generate.load_pipeline_sampler(folder, sampler_name="EulerDiscreteScheduler")
    assert base.zero_empty_negative and base.size_conditioning and base.latent_statistics is None
    noise = np.asarray(make_initial_noise(jax.random.key(0), (len(PROMPTS), HEIGHT // 2, WIDTH // 2, 4)))
    results = {}
    try:
        for negative, force_zeros in (("blurry, low quality", True), (None, True), (None, False)):
            pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
            sampler = dataclasses.replace(base, zero_empty_negative=force_zeros)  # shares the compiled loop
            latents = sampler.generate_latents(PROMPTS, negative_prompt=negative, num_inference_steps=STEPS,
                                               guidance_scale=GUIDANCE, seed=0, height=HEIGHT, width=WIDTH)
            images = decode_latents(sampler.vae_decode, sampler.vae_params, latents, sampler.scaling_factor)
            ours, ours_images = np.asarray(latents), np.asarray(images).astype(np.int32)
            theirs, theirs_images = diffusers_sample(pipe, noise, negative)
            case = f"negative={negative!r} force_zeros={force_zeros}"
            assert ours.shape == theirs.shape == (len(PROMPTS), HEIGHT // 2, WIDTH // 2, 4), case
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max(), err_msg=case)
            assert np.abs(ours_images - theirs_images).max() <= 1, case
            results[(negative, force_zeros)] = ours
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    zeros, empty = results[(None, True)], results[(None, False)]
    assert np.abs(zeros - empty).max() > 1e-3, "zeroed and encoded empty negatives sampled the same latents"


def test_decode_unnormalises_with_the_vae_latents_mean_and_std(tmp_path: Path) -> None:
    """diffusers' SDXL decode: latents * latents_std / scaling_factor + latents_mean (when the VAE sets both);
    the statistics and force_zeros_for_empty_prompt come from the pipeline's files."""
    import jax.numpy as jnp

    from jaxbooth.jax_backend.sample import decode_latents

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    mean, std = np.array([0.1, -0.2, 0.3, 0.0], np.float32), np.array([2.0, 0.5, 1.0, 4.0], np.float32)
    vae_config = types.SimpleNamespace(latents_mean=tuple(mean), latents_std=tuple(std), latent_channels=4)
    (tmp_path / "model_index.json").write_text('{"force_zeros_for_empty_prompt": false}')
    options = generate.sdxl_sampling_options(tmp_path, vae_config)
    assert options["force_zeros_for_empty_prompt"] is False
    got = decode_latents(lambda params, x: x[..., :3] / 8, None, jnp.asarray(latents), 0.13025,
                         options["latent_statistics"])
    pixels = (latents * std / 0.13025 + mean)[..., :3] / 8
    np.testing.assert_array_equal(np.asarray(got), np.round(np.clip(pixels / 2 + 0.5, 0, 1) * 255).astype(np.uint8))
    plain = decode_latents(lambda params, x: x[..., :3] / 8, None, jnp.asarray(latents), 0.13025)
    assert not np.array_equal(np.asarray(plain), np.asarray(got))


def sdxl_lora(folder: Path, out: Path) -> Path:
    """A LoRA output folder on the SDXL base: nonzero adapters on the UNet and both text encoders."""
    settings = AdapterSettings(rank=4, alpha=8.0, train_text_encoder=True, text_encoders=sdxl.TEXT_ENCODERS)
    rng = np.random.default_rng(0)
    state: LoraState = {}
    for component in settings.components:
        weights = pretrained.read_state_dict(folder / component)
        paths = sorted({key.rsplit(".", 1)[0] for key in weights if key.endswith(".weight")})
        state[component] = {}
        for path in (p for p in paths if is_target(p, settings.targets(component))):
            layer = settings.initial_layer(component, path, weights[f"{path}.weight"], 0)
            up = rng.normal(0, 0.5, layer.up.shape).astype(np.float32)
            state[component][path] = dataclasses.replace(layer, up=up)
    assert all(state.values()), {c: len(layers) for c, layers in state.items()}
    out.mkdir(parents=True)
    lora_files.write_lora_file(out / lora_files.LORA_WEIGHTS_NAME, state, settings)
    (out / "jaxbooth_run.yaml").write_text(f"model:\n  pretrained_model_name_or_path: {folder}\n")
    return out


def pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))]


def test_generate_samples_an_sdxl_pipeline_and_a_lora_on_it(stock, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    folder, _ = stock
    fast = ["--steps", "1", "--scheduler", "DDIMScheduler", "--guidance", "5"]
    assert cli.main(["generate", str(folder), PROMPTS[0], "-n", "2", "--out", str(tmp_path / "base"), *fast]) == 0
    base = pngs(tmp_path / "base")
    assert len(base) == 2 and all(image.shape == (64, 64, 3) for image in base)  # the pipeline's native size
    assert not np.array_equal(base[0], base[1])
    lora = sdxl_lora(folder, tmp_path / "lora")
    assert cli.main(["generate", str(lora), PROMPTS[0], "--out", str(tmp_path / "lora-samples"), *fast]) == 0
    (adapted,) = pngs(tmp_path / "lora-samples")
    assert adapted.shape == (64, 64, 3)
    assert np.abs(adapted.astype(int) - base[0]).mean() > 1, "the LoRA did not change the image"
    capsys.readouterr()


@pytest.fixture(scope="module")
def sampling_run(stock, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A JAX SDXL run's sampling phases, as ``train.train`` calls them, from a command line with
    --validation_prompt and prior preservation short of class images (1 of 3): the pipeline is not
    refused, the missing class images are generated with the loaded models, then the validator made
    from them samples the (here untrained) UNet. The train step itself is test_sdxl_train.py's; every
    sampler runs 1 step instead of 50 (class images) and 25 (validation), for speed."""
    import jax

    from jaxbooth.jax_backend import loading, sample, train, validation
    from jaxbooth.run_defaults import fill_defaults
    from jaxbooth.spec import load_spec_with_keys

    folder, _ = stock
    root = tmp_path_factory.mktemp("run")
    class_dir = image_folder(root / "class", [(64, 64)])
    out = root / "out"
    spec, given = load_spec_with_keys([
        f"--pretrained_model_name_or_path={folder}", f"--output_dir={out}", "--backend=jax", "--resolution=64",
        "--seed=0", "--report_to=none", "--max_train_steps=1", "--validation_prompt=a photo of sks toy",
        "--num_validation_images=2", "--validation_steps=1", "--with_prior_preservation",
        f"--class_data_dir={class_dir}", "--class_prompt=a photo of a toy", "--num_class_images=3",
        "--sample_batch_size=2"])
    spec = fill_defaults(spec, given)
    real_make_sampler = sample.make_sampler
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sample, "make_sampler", lambda name, config, steps: real_make_sampler(name, config, 1))
        loading.refuse_unsupported_options(spec)
        models = loading.load_models(spec, loading.resolve_model_paths(spec))
        assert models.is_sdxl
        train.prepare_inputs(spec, models)
        validator = validation.make_validator(spec, models, output_dir=out, seed=0)
        assert validator is not None and validator.guidance_scale == 5.0  # StableDiffusionXLPipeline's default
        validator.run(1, jax.device_put(models.unet_params))
    return out, class_dir


def test_a_jax_sdxl_run_writes_validation_images(sampling_run) -> None:
    out, _ = sampling_run
    singles = pngs(out / "validation" / "step-1")
    assert len(singles) == 2 and all(image.shape == (64, 64, 3) for image in singles)
    assert not np.array_equal(singles[0], singles[1])
    assert (out / "validation" / "step-1.png").is_file()


def test_a_jax_sdxl_run_generates_the_missing_class_images(sampling_run) -> None:
    _, class_dir = sampling_run
    generated = [path for path in class_dir.iterdir() if class_images.GENERATED_NAME.match(path.name)]
    assert len(class_images.existing_class_images(class_dir)) == 3 and len(generated) == 2
    for path in generated:
        with Image.open(path) as image:
            assert image.size == (64, 64)  # the SDXL pipeline's native size (unet sample_size x VAE scale)
