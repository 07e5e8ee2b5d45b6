"""DeepFloyd IF sampling on the torch backend: validation pipelines, class images, `jaxbooth generate`.

No training: the tiny stock IF pipelines (``jaxbooth.tiny_if``) are sampled with 1-2 steps where the count is
free, and each result is compared with what stock diffusers makes from the same inputs (or shown to depend on
what the test claims it depends on).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jaxbooth import cli, deepfloyd
from jaxbooth.class_images import class_image_name, image_seed
from jaxbooth.errors import JaxboothError
from jaxbooth.lora import AdapterSettings, is_target
from jaxbooth.lora import files as lora_files
from jaxbooth.lora.base_model import sampled_pipeline_class
from jaxbooth.spec import load_spec
from jaxbooth.text import load_tokenizer, make_tokenize_fn
from jaxbooth.tiny_if import write_if_pipeline
from jaxbooth.torch_backend import class_images, generate, validation
from jaxbooth.torch_backend.inputs import TextConditioner

CPU = torch.device("cpu")
LOAD = class_images.load_generation_pipeline
PROMPT = "a sks dog"  # lower case: IF pipelines lower-case prompts even with clean_caption=False


@pytest.fixture(scope="module")
def if_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("if")
    return {1: write_if_pipeline(root / "stage1", "if-stage1"), 2: write_if_pipeline(root / "stage2", "if-stage2")}


def parts(model_dir: Path) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5EncoderModel

    return dict(unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval(),
                text_encoder=T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder").eval(),
                tokenizer=load_tokenizer(model_dir),
                config=DDPMScheduler.load_config(model_dir, subfolder="scheduler"))


def pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


class Steps:
    """A pipeline called with ``num_inference_steps=steps`` (class images use the pipeline's default count);
    records each call's keywords."""

    def __init__(self, pipeline, steps: int):
        self.pipeline, self.steps, self.calls = pipeline, steps, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.pipeline(*args, num_inference_steps=self.steps, **kwargs)


def test_validation_pipeline_samples_with_fixed_variance_and_precomputed_embeds(
        if_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import IFPipeline

    monkeypatch.setattr(validation, "NUM_INFERENCE_STEPS", 2)
    model_dir = if_dirs[1]
    p = parts(model_dir)
    assert p["config"]["variance_type"] == "learned_range"
    for name in ("DDPMScheduler", "DPMSolverMultistepScheduler"):  # one rule: deepfloyd.fixed_variance_config
        assert validation.validation_scheduler(name, p["config"]).config.variance_type == "fixed_small"
    plain = dict(p["config"], variance_type="fixed_large")
    assert validation.validation_scheduler("DDPMScheduler", plain).config.variance_type == "fixed_large"

    def pipeline(text_encoder):
        made = validation.make_if_pipeline(stage=1, unet=p["unet"], text_encoder=text_encoder,
                                           tokenizer=p["tokenizer"], model_dir=model_dir,
                                           scheduler=validation.validation_scheduler("DDPMScheduler", p["config"]))
        assert isinstance(made, IFPipeline) and made.watermarker is None and made.safety_checker is None
        return made

    with_encoder = pipeline(p["text_encoder"])
    step_channels = []
    step = with_encoder.scheduler.step

    @functools.wraps(step)  # keeps the signature the pipeline inspects to pass the generator
    def spy(output, *args, **kwargs):
        step_channels.append(output.shape[1])
        return step(output, *args, **kwargs)

    monkeypatch.setattr(with_encoder.scheduler, "step", spy)
    from_prompt = validation.generate_images(with_encoder, prompt=PROMPT, num_images=2, seed=3, device=CPU,
                                             autocast_dtype=None, extra=validation.IF_CALL)
    assert step_channels == [3, 3, 3, 3]  # the UNet's 6 channels, variance split off: fixed_small sampling
    assert len(from_prompt) == 2 and from_prompt[0].size == (64, 64)
    assert not np.array_equal(*pixels(from_prompt))  # one generator over both calls, as diffusers

    # pre_compute_text_embeddings: what the trainer cached (mask, 77 tokens) replaces the freed encoder
    conditioner = TextConditioner(p["text_encoder"], make_tokenize_fn(p["tokenizer"], deepfloyd.PROMPT_MAX_LENGTH),
                                  CPU, trained=False, use_attention_mask=True)
    conditioner.precompute([PROMPT, ""])
    conditioner.free_encoder()
    embeds = (conditioner.embeddings([PROMPT]), conditioner.embeddings([""]))
    from_embeds = validation.generate_images(pipeline(None), prompt=PROMPT, num_images=2, seed=3, device=CPU,
                                             autocast_dtype=None, prompt_embeds=embeds, extra=validation.IF_CALL)
    np.testing.assert_array_equal(pixels(from_embeds), pixels(from_prompt))


def test_stage2_validation_makes_one_image_per_validation_image(if_dirs, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DDPMScheduler, IFSuperResolutionPipeline

    monkeypatch.setattr(validation, "NUM_INFERENCE_STEPS", 1)
    rng = np.random.default_rng(0)
    files = [tmp_path / "gray.png", tmp_path / "rgba.png"]  # modes the pipeline cannot read as they are
    Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8), "L").save(files[0])
    Image.fromarray(rng.integers(0, 256, (48, 48, 4), np.uint8), "RGBA").save(files[1])
    spec = load_spec(["--validation_prompt=a dog", "--validation_images", *map(str, files),
                      "--class_labels_conditioning=timesteps", "--resolution=256", "--num_validation_images=4"])
    assert validation.if_calls(spec, 1) is None
    calls = validation.if_calls(spec, 2)
    assert [c["image"].mode for c in calls] == ["RGB", "RGB"] and calls[1]["image"].size == (48, 48)

    model_dir = if_dirs[2]
    p = parts(model_dir)
    pipeline = validation.make_if_pipeline(stage=2, unet=p["unet"], text_encoder=p["text_encoder"],
                                           tokenizer=p["tokenizer"], model_dir=model_dir,
                                           scheduler=validation.validation_scheduler("DDPMScheduler", p["config"]))
    assert isinstance(pipeline, IFSuperResolutionPipeline)
    noising = DDPMScheduler.from_pretrained(model_dir, subfolder=deepfloyd.NOISING_SCHEDULER)
    assert pipeline.image_noising_scheduler.config == noising.config != pipeline.scheduler.config
    seen, cleaned = [], []
    preprocess, text = pipeline.preprocess_image, pipeline._text_preprocessing
    monkeypatch.setattr(pipeline, "preprocess_image", lambda image, *a: seen.append(image) or preprocess(image, *a))
    monkeypatch.setattr(pipeline, "_text_preprocessing",
                        lambda prompt, clean_caption: cleaned.append(clean_caption) or text(prompt, clean_caption))
    images = validation.generate_images(pipeline, prompt="a dog", num_images=spec.validation.num_validation_images,
                                        seed=0, device=CPU, autocast_dtype=None, per_call=calls,
                                        extra=validation.IF_CALL)
    assert [image.size for image in images] == [(256, 256)] * 2  # one per file; num_validation_images unused
    assert seen == [c["image"] for c in calls] and set(cleaned) == {False}


@pytest.fixture()
def class_spec(tmp_path: Path):
    def make(num: int, resolution: int = 64, batch: int = 2):
        return load_spec(["--with_prior_preservation", f"--class_data_dir={tmp_path / 'class'}",
                          "--class_prompt=a dog", f"--num_class_images={num}", f"--sample_batch_size={batch}",
                          f"--resolution={resolution}"])

    return make


def test_stage1_class_images_come_from_ifpipeline_at_64px(if_dirs, class_spec,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import IFPipeline

    loaded = []
    monkeypatch.setattr(class_images, "load_generation_pipeline",
                        lambda *args: loaded.append(Steps(LOAD(*args), steps=2)) or loaded[-1])
    written = class_images.generate_class_images(class_spec(2), if_dirs[1], device=CPU, seed=5)
    (pipeline,) = loaded
    assert isinstance(pipeline.pipeline, IFPipeline) and pipeline.pipeline.safety_checker is None
    assert [call["clean_caption"] for call in pipeline.calls] == [False]  # one batch of sample_batch_size=2
    assert sorted(p.name.split("-")[0] for p in written) == ["0", "1"]
    for path in written:
        assert Image.open(path).size == (64, 64)
    # image i is what the stock pipeline makes from image_seed(seed, i) alone (file names hash the pixels)
    index = 1
    alone = pipeline.pipeline(["a dog"], generator=[torch.Generator().manual_seed(image_seed(5, index))],
                              num_inference_steps=2, clean_caption=False).images[0]
    assert class_image_name(index, alone) in {p.name for p in written}


def test_stage2_class_images_upscale_downsized_sources_and_refuse_without_sources(
        if_dirs, class_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxbooth.data.images import load_image

    def no_load(*args):
        raise AssertionError("the pipeline loaded before the refusal")

    monkeypatch.setattr(class_images, "load_generation_pipeline", no_load)
    with pytest.raises(JaxboothError, match="--class_data_dir") as refused:
        class_images.generate_class_images(class_spec(2, resolution=128), if_dirs[2], device=CPU, seed=0)
    assert "stage I" in str(refused.value) and "--class_prompt" in str(refused.value)

    spec = class_spec(4, resolution=128, batch=1)  # one image per call: a batch changes the last bit of a pixel
    folder = Path(spec.prior.class_data_dir)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    stage1_like = rng.integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(stage1_like).save(folder / "a.png")  # a 64 px image is upscaled exactly as it is
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), np.uint8)).save(folder / "b.png")  # resized, cropped, boxed
    loaded = []
    monkeypatch.setattr(class_images, "load_generation_pipeline",
                        lambda *args: loaded.append(Steps(LOAD(*args), steps=2)) or loaded[-1])
    written = class_images.generate_class_images(spec, if_dirs[2], device=CPU, seed=7)
    assert sorted(p.name.split("-")[0] for p in written) == ["2", "3"]
    assert all(Image.open(p).size == (128, 128) for p in written)
    (pipeline,) = loaded
    assert all(c["height"] == c["width"] == 128 and c["clean_caption"] is False for c in pipeline.calls)
    (low_a,), (low_b,) = (c["image"] for c in pipeline.calls)  # index 2 -> sources[0] (a.png), 3 -> sources[1]
    np.testing.assert_array_equal(np.asarray(low_a), stage1_like)
    expected_b = deepfloyd.quantize_8bit(deepfloyd.downsample_box(
        load_image(folder / "b.png", 128, center_crop=True), 2, channel_axis=-1))
    assert low_b.size == (64, 64)
    np.testing.assert_allclose(np.asarray(low_b) / 127.5 - 1, expected_b, atol=1e-5)
    alone = pipeline.pipeline(["a dog"], image=[low_b], generator=[torch.Generator().manual_seed(image_seed(7, 3))],
                              height=128, width=128, num_inference_steps=2, clean_caption=False).images[0]
    assert class_image_name(3, alone) in {p.name for p in written}
    # a resumed generation cycles the same sources: its own earlier upscales are not among them
    more = class_spec(6, resolution=128)
    assert class_images.upscale_sources(more, class_images.plan_for_spec(more)) == [folder / "a.png",
                                                                                    folder / "b.png"]


# ---------------------------------------------------------------------------------------------- generate


SETTINGS = AdapterSettings(rank=4, alpha=8.0)


def write_lora(base_dir: Path, folder: Path, *, seed: int = 0) -> Path:
    """Adapters with a nonzero ``up`` on every target layer of an IF UNet (add_k/add_v included), in jaxbooth's
    LoRA file, plus the run spec naming the base (as a LoRA output folder holds)."""
    import safetensors.numpy

    weights = safetensors.numpy.load_file(str(base_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    rng = np.random.default_rng(seed)
    layers = {}
    for key, weight in sorted(weights.items()):
        path = key.removesuffix(".weight")
        if key.endswith(".weight") and weight.ndim == 2 and is_target(path, SETTINGS.targets("unet")):
            layer = SETTINGS.initial_layer("unet", path, weight, seed)
            layers[path] = dataclasses.replace(layer, up=rng.normal(0, 0.5, layer.up.shape).astype(np.float32))
    assert any(path.endswith("add_k_proj") for path in layers)
    lora_files.write_lora_file(folder / lora_files.LORA_WEIGHTS_NAME, {"unet": layers}, SETTINGS)
    (folder / "jaxbooth_run.yaml").write_text(f"model:\n  pretrained_model_name_or_path: {base_dir}\n")
    return folder


def reference(model_dir: Path, *, scheduler: str, variance: str, lora: Path | None = None, **call) -> np.ndarray:
    """What stock diffusers makes: the pipeline, (LoRA,) the scheduler switched to ``variance``, seed 1, 2 steps."""
    import diffusers

    pipeline = diffusers.DiffusionPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    if lora is not None:
        pipeline.load_lora_weights(str(lora))
    pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config, variance_type=variance)
    out = pipeline(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(1), clean_caption=False,
                   **call)
    return np.asarray(out.images[0])


@pytest.fixture(scope="module")
def generate_cli(tmp_path_factory: pytest.TempPathFactory):
    """``generate_cli(model, *flags)`` -> (status, first image or None) of `jaxbooth generate`, 2 steps, seed 1."""
    root = tmp_path_factory.mktemp("generated")

    def run(model: Path, *flags: str):
        out = root / str(len(list(root.iterdir())))
        status = cli.main(["generate", str(model), PROMPT, "--steps", "2", "--seed", "1", "--out", str(out), *flags])
        files = sorted(out.glob("*.png"))
        return status, (np.asarray(Image.open(files[0])) if files else None)

    return run


@pytest.fixture(scope="module")
def stage1_full(if_dirs, generate_cli) -> np.ndarray:
    status, image = generate_cli(if_dirs[1], "--scheduler", "DDPMScheduler")
    assert status == 0 and image.shape == (64, 64, 3)
    return image


def test_generate_if_full_and_lora_with_fixed_variance(if_dirs, generate_cli, stage1_full, tmp_path: Path,
                                                       capsys) -> None:
    stage1, stage2 = if_dirs[1], if_dirs[2]
    np.testing.assert_array_equal(stage1_full, reference(stage1, scheduler="DDPMScheduler", variance="fixed_small"))
    assert not np.array_equal(stage1_full, reference(stage1, scheduler="DDPMScheduler", variance="learned_range"))

    lora_dir = write_lora(stage1, tmp_path / "lora")
    status, adapted = generate_cli(lora_dir, "--scheduler", "DDPMScheduler")
    assert status == 0 and np.abs(adapted.astype(int) - stage1_full.astype(int)).mean() > 1.0
    expected = reference(stage1, scheduler="DDPMScheduler", variance="fixed_small", lora=lora_dir)
    assert np.abs(adapted.astype(int) - expected.astype(int)).max() <= 1  # fused here, unfused there
    status, scaled_off = generate_cli(lora_dir, "--scheduler", "DDPMScheduler", "--lora_scale", "0")
    np.testing.assert_array_equal(scaled_off, stage1_full)

    low = tmp_path / "low.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)).save(low)
    status, upscaled = generate_cli(stage2, "--image", str(low), "--resolution", "128")  # default DPM-Solver
    assert status == 0 and upscaled.shape == (128, 128, 3)
    np.testing.assert_array_equal(upscaled, reference(stage2, scheduler="DPMSolverMultistepScheduler",
                                                      variance="fixed_small", image=Image.open(low).convert("RGB"),
                                                      height=128, width=128))
    for model, flags, words in [(stage2, [], ["IFSuperResolutionPipeline", "--image"]),
                                (stage1, ["--image", str(low)], ["--image", "IFPipeline"])]:
        assert generate_cli(model, *flags) == (2, None)
        err = capsys.readouterr().err
        assert all(word in err for word in words), err
    with pytest.raises(JaxboothError, match="--image"):  # the function checks too, before loading
        generate.generate_to_dir(str(stage2), PROMPT, num_images=1, steps=1, guidance_scale=None,
                                 negative_prompt=None, scheduler="DDPMScheduler", seed=0, resolution=None,
                                 out_dir=str(tmp_path / "none"))


def test_generate_takes_the_text_encoder_of_a_pipeline_saved_without_it(if_dirs, generate_cli, stage1_full,
                                                                       tmp_path: Path, capsys) -> None:
    stage1 = if_dirs[1]
    no_t5 = tmp_path / "no_t5"  # what a full run with --skip_save_text_encoder writes
    shutil.copytree(stage1, no_t5)
    shutil.rmtree(no_t5 / "text_encoder")
    index = json.loads((no_t5 / "model_index.json").read_text())
    (no_t5 / "model_index.json").write_text(json.dumps(dict(index, text_encoder=[None, None])))
    assert generate_cli(no_t5, "--scheduler", "DDPMScheduler") == (2, None)
    assert "--pretrained_model_name_or_path" in capsys.readouterr().err
    status, image = generate_cli(no_t5, "--scheduler", "DDPMScheduler", "--pretrained_model_name_or_path",
                                 str(stage1))
    assert status == 0
    np.testing.assert_array_equal(image, stage1_full)
    (no_t5 / "jaxbooth_run.yaml").write_text(f"model:\n  pretrained_model_name_or_path: {stage1}\n")
    status, image = generate_cli(no_t5, "--scheduler", "DDPMScheduler")
    assert status == 0
    np.testing.assert_array_equal(image, stage1_full)


def test_generate_refuses_a_lora_that_does_not_fit_and_an_unknown_scheduler(if_dirs, generate_cli, tmp_path: Path,
                                                                           capsys) -> None:
    lora_dir = write_lora(if_dirs[1], tmp_path / "lora")
    low = tmp_path / "low.png"
    Image.new("RGB", (64, 64)).save(low)
    assert sampled_pipeline_class(str(lora_dir), str(if_dirs[2])) == "IFSuperResolutionPipeline"
    assert generate_cli(lora_dir, "--pretrained_model_name_or_path", str(if_dirs[2]), "--image", str(low)) == (2, None)
    err = capsys.readouterr().err
    assert "matches no layer" in err and lora_files.LORA_WEIGHTS_NAME in err and "Traceback" not in err
    assert generate_cli(if_dirs[1], "--scheduler", "NoSuchScheduler") == (2, None)
    assert "--scheduler NoSuchScheduler" in capsys.readouterr().err
