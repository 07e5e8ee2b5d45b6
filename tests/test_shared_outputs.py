"""What both backends write through the shared modules, checked once over both backends.

- ``output.write_pipeline``: completes a folder whose trained UNet a backend wrote (each
  backend's own writer) into a diffusers pipeline; ``skip_save_text_encoder`` names the text
  encoder ``[null, null]`` and the folder loads in diffusers given one.
- ``validation_files``: the cadence (diffusers' steps / end-of-epoch rule) and the file names.
- ``class_images``: names ``{index}-{sha1 of the pixels}.jpg``, per-image seeds independent of
  batch size, interruption and process split, mode 0644, through each backend's generator.
- ``checkpoints``: the marker holds the seed and never the Hub token.
- ``output.metric_record``: the metric names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxbooth import checkpoints, output, validation_files
from jaxbooth import class_images as shared_class_images
from jaxbooth.errors import JaxboothError
from jaxbooth.spec import load_spec

BACKENDS = ["jax", pytest.param("torch", marks=pytest.mark.requires_torch)]
CLASS_NAME = re.compile(r"^(\d+)-([0-9a-f]{40})\.jpg$")
TOKEN = "hf_SharedOutputsMustNotLeak"


def needs(backend: str) -> None:
    pytest.importorskip("jax" if backend == "jax" else "torch")
    if backend == "torch":
        pytest.importorskip("diffusers")


def test_shared_modules_import_neither_jax_nor_torch() -> None:
    code = ("import sys, jaxbooth.output, jaxbooth.checkpoints, jaxbooth.class_images, jaxbooth.validation_files; "
            "print(sorted(m for m in ('jax', 'torch', 'flax', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ pipeline export


def write_trained_unet(backend: str, base: Path, out: Path) -> None:
    """What each backend's save_pipeline writes before write_pipeline: its UNet, diffusers layout."""
    if backend == "jax":
        from jaxbooth.jax_backend import pretrained

        _, config_dict, params = pretrained.load_pretrained(base, "unet")
        pretrained.save_diffusers_component(params, config_dict, out, "unet")
    else:
        from diffusers import UNet2DConditionModel

        UNet2DConditionModel.from_pretrained(base, subfolder="unet").save_pretrained(out / "unet")


def export(backend: str, base: Path, out: Path, *flags: str, vae_dir: Path | None = None) -> Path:
    spec = load_spec([f"--pretrained_model_name_or_path={base}", f"--hub_token={TOKEN}", *flags])
    saved = output.components_to_save(spec)
    assert saved == ("unet",)
    write_trained_unet(backend, base, out)
    return output.write_pipeline(out, base_dir=base, trained_components=saved, vae_dir=vae_dir, spec=spec, steps=3,
                                 backend=backend, instance_prompt="a photo of sks toy",
                                 validation_images=["validation/step-2.png"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_pipeline_copies_the_base_and_writes_index_card_and_spec(backend: str, tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    needs(backend)
    out = export(backend, tiny_model_dir, tmp_path / "out")
    te = "text_encoder/model.safetensors"
    assert (out / te).read_bytes() == (tiny_model_dir / te).read_bytes()
    for name in ("unet/config.json", "vae/config.json", "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (out / name).is_file(), name
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    card = (out / "README.md").read_text()
    assert f"{backend} backend" in card and "![sample](validation/step-2.png)" in card and "3 optimizer steps" in card
    spec_text = (out / output.SPEC_FILENAME).read_text()
    assert TOKEN not in spec_text and str(tiny_model_dir) in spec_text


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_save_text_encoder_names_it_null_and_loads_in_diffusers(backend: str, tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    needs(backend)
    out = tmp_path / "out"
    (out / "text_encoder").mkdir(parents=True)  # left by an earlier run into the same folder
    (out / "text_encoder" / "config.json").write_text("{}")
    export(backend, tiny_model_dir, out, "--skip_save_text_encoder", "--train_text_encoder")
    assert not (out / "text_encoder").exists()
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == [None, None]
    assert "text_encoder=text_encoder" in (out / "README.md").read_text()
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    pipe = StableDiffusionPipeline.from_pretrained(out, text_encoder=text_encoder)
    assert pipe.text_encoder is text_encoder
    image = pipe("a photo of sks toy", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("layout", ["pipeline folder", "standalone vae"])
def test_vae_override_lands_in_vae(layout: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("jax")
    vae = tmp_path / "override"
    source = vae / "vae" if layout == "pipeline folder" else vae
    source.mkdir(parents=True)
    config = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    (source / "diffusion_pytorch_model.safetensors").write_bytes(
        (tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    out = export("jax", tiny_model_dir, tmp_path / "out", vae_dir=vae)
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 0.5
    with pytest.raises(JaxboothError, match="config.json"):
        export("jax", tiny_model_dir, tmp_path / "out2", vae_dir=tmp_path / "empty")


def test_write_pipeline_refuses_components_the_backend_did_not_write(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = load_spec([f"--pretrained_model_name_or_path={tiny_model_dir}", "--skip_save_text_encoder"])
    with pytest.raises(ValueError, match="unet"):
        output.write_pipeline(tmp_path, base_dir=tiny_model_dir, trained_components=["unet"], vae_dir=None, spec=spec,
                              steps=1, backend="jax", instance_prompt="x")
    with pytest.raises(ValueError, match="skip_save_text_encoder"):
        output.write_pipeline(tmp_path, base_dir=tiny_model_dir, trained_components=["unet", "text_encoder"],
                              vae_dir=None, spec=spec, steps=1, backend="jax", instance_prompt="x")


def test_components_to_save_follow_diffusers() -> None:
    assert output.components_to_save(load_spec([])) == ("unet",)
    assert output.components_to_save(load_spec(["--train_text_encoder"])) == ("unet", "text_encoder")
    assert output.components_to_save(load_spec(["--train_text_encoder", "--skip_save_text_encoder"])) == ("unet",)


# ------------------------------------------------------------------------------------------------ validation


def test_validation_cadence_is_diffusers() -> None:
    every_5 = ("steps", 5)
    assert [s for s in range(16) if validation_files.should_validate(every_5, s)] == [5, 10, 15]
    assert validation_files.should_validate(every_5, 5, epochs_done=1)  # epoch ends do not matter in steps mode
    every_2_epochs = ("epochs", 2)
    # the LoRA scripts' `epoch % validation_epochs == 0` with 0-based epochs, checked at each epoch's end
    assert [e for e in range(8) if validation_files.should_validate(every_2_epochs, 100, epochs_done=e)] == [1, 3, 5, 7]
    assert not validation_files.should_validate(every_2_epochs, 100)  # mid-epoch
    assert not validation_files.should_validate(None, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_validate_on_the_shared_cadence(backend: str) -> None:
    needs(backend)
    if backend == "jax":
        from jaxbooth.jax_backend.validation import Validator

        def hook(schedule, step, epochs_done):
            validator = Validator.__new__(Validator)  # the cadence needs no models
            validator.schedule = schedule
            return validator.should_run(step, epochs_done)
    else:
        from jaxbooth.torch_backend import loop

        hook = loop.should_validate
    for schedule in (("steps", 3), ("epochs", 2), ("epochs", 1)):
        for step in range(10):
            for epochs_done in (None, step // 2):
                assert hook(schedule, step, epochs_done) == validation_files.should_validate(schedule, step,
                                                                                              epochs_done)


def tiles(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (8, 6), (40 * k, 0, 0)) for k in range(count)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_files_are_named_alike(backend: str, tiny_model_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each backend's save path writes validation/step-N.png (grid) and validation/step-N/k.png."""
    needs(backend)
    images = tiles(3)
    if backend == "jax":
        from jaxbooth.jax_backend.validation import make_validator
        from tests._loaded import loaded_models

        spec = load_spec([f"--pretrained_model_name_or_path={tiny_model_dir}", "--validation_prompt=a toy",
                          "--num_validation_images=3"])
        validator = make_validator(spec, loaded_models(tiny_model_dir), output_dir=tmp_path, seed=0)
        monkeypatch.setattr(validator, "generate", lambda *args, **kwargs: images)  # the naming, not the sampling
        grid = validator.run(12, unet_params=None)
        assert validator.written == ["validation/step-12.png"]
    else:
        from jaxbooth.torch_backend import validation

        grid = validation.save_and_log(images, tmp_path, 12, trackers=[])
    assert grid == tmp_path / "validation" / "step-12.png"
    assert Image.open(grid).size == (16, 12)  # 2 x 2 grid of 8 x 6 images
    singles = sorted(p.name for p in (tmp_path / "validation" / "step-12").iterdir())
    assert singles == ["0.png", "1.png", "2.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "validation" / "step-12" / "2.png")), np.asarray(images[2]))
    assert not list(tmp_path.rglob(".*")), "temporary files left behind"


# ------------------------------------------------------------------------------------------------ class images


def seed_image(seed: int) -> Image.Image:
    """What the fake samplers draw from one image's seed: pixels that identify the seed."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8))


class FakeTorchPipeline:
    """diffusers' pipeline call shape: one generator per image; dies after ``fail_after`` images."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after, self.made = fail_after, 0

    def __call__(self, prompts, generator):
        images = []
        for g in generator:
            if self.fail_after is not None and self.made >= self.fail_after:
                raise KeyboardInterrupt("killed")
            images.append(seed_image(g.initial_seed()))
            self.made += 1
        return type("Output", (), {"images": images})()


class FakeJaxSampler:
    """StableDiffusionSampler's call shape for class images: one seed per prompt (the padding of a
    short last batch repeats the last); dies after ``fail_after`` images."""

    mesh = None

    def __init__(self, fail_after: int | None = None):
        self.fail_after, self.made = fail_after, 0

    def generate(self, prompts, *, seed, **settings):
        assert not isinstance(seed, int) and len(seed) == len(prompts), "class images pass one seed per prompt"
        images = []
        for image_seed in seed:
            if self.fail_after is not None and self.made >= self.fail_after:
                raise KeyboardInterrupt("killed")
            images.append(seed_image(image_seed))
            self.made += 1
        return images


def generate(backend: str, folder: Path, count: int, *, batch: int = 2, seed: int = 0, fail_after: int | None = None,
             monkeypatch: pytest.MonkeyPatch) -> None:
    """One backend's class-image entry point on a fake sampler."""
    if backend == "jax":
        from jaxbooth.jax_backend.class_images import ensure_class_images

        ensure_class_images(None, folder, "a toy", count, sample_batch_size=batch, seed=seed,
                            sampler=FakeJaxSampler(fail_after))
    else:
        import torch

        from jaxbooth.torch_backend import class_images

        monkeypatch.setattr(class_images, "load_generation_pipeline", lambda *a: FakeTorchPipeline(fail_after))
        spec = load_spec(["--with_prior_preservation", f"--class_data_dir={folder}", "--class_prompt=a toy",
                          f"--num_class_images={count}", f"--sample_batch_size={batch}"])
        class_images.generate_class_images(spec, Path("unused"), device=torch.device("cpu"), seed=seed)


def class_files(folder: Path) -> dict[int, str]:
    return {int(CLASS_NAME.match(p.name).group(1)): p.name for p in folder.iterdir() if CLASS_NAME.match(p.name)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_images_are_named_by_index_and_pixels_from_per_image_seeds(
        backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs(backend)
    previous = os.umask(0o022)
    try:
        generate(backend, tmp_path / "cls", 5, batch=2, seed=7, monkeypatch=monkeypatch)
    finally:
        os.umask(previous)
    files = class_files(tmp_path / "cls")
    assert sorted(files) == [0, 1, 2, 3, 4]
    for index, name in files.items():
        expected = seed_image(shared_class_images.image_seed(7, index))
        assert name == f"{index}-{hashlib.sha1(expected.tobytes()).hexdigest()}.jpg"  # diffusers' pixel hash
        assert (tmp_path / "cls" / name).stat().st_mode & 0o777 == 0o644
    assert len(list((tmp_path / "cls").iterdir())) == 5, "temporary files left behind"


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_images_do_not_depend_on_batch_size_interruption_or_split(
        backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs(backend)
    straight = tmp_path / "straight"
    generate(backend, straight, 6, batch=4, monkeypatch=monkeypatch)
    want = class_files(straight)
    rebatched = tmp_path / "rebatched"
    generate(backend, rebatched, 6, batch=1, monkeypatch=monkeypatch)
    assert class_files(rebatched) == want
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        generate(backend, resumed, 6, batch=2, fail_after=3, monkeypatch=monkeypatch)
    assert len(class_files(resumed)) == 2  # the first batch was written as soon as it was made
    generate(backend, resumed, 6, batch=3, monkeypatch=monkeypatch)
    assert class_files(resumed) == want
    split = tmp_path / "split"  # two processes plan before either writes, then each makes its share
    plans = [shared_class_images.plan_class_images(split, 6, process_index=rank, process_count=2) for rank in (0, 1)]
    assert [plan.mine for plan in plans] == [(0, 2, 4), (1, 3, 5)]
    for plan in plans:
        shared_class_images.generate_class_images(plan, backend_sampler(backend), prompt="a toy", batch_size=2, seed=0)
    assert class_files(split) == want


def backend_sampler(backend: str) -> shared_class_images.SampleImages:
    """The backend's ``sample(prompts, seeds)`` over its fake model."""
    if backend == "jax":
        from jaxbooth.jax_backend.class_images import sample_with_image_seeds

        return sample_with_image_seeds(FakeJaxSampler(), num_inference_steps=1, guidance_scale=1.0)
    import torch

    from jaxbooth.torch_backend.class_images import sample_with_image_seeds

    return sample_with_image_seeds(FakeTorchPipeline(), torch.device("cpu"))


def test_missing_indices_number_as_diffusers_and_fill_gaps(tmp_path: Path) -> None:
    generated = [Path("0-" + "a" * 40 + ".jpg"), Path("2-" + "b" * 40 + ".jpg")]
    assert shared_class_images.missing_indices(generated, 3) == [1, 3, 4]  # the gap first, never a used index
    assert shared_class_images.missing_indices([Path("mine.png"), Path("yours.jpg")], 2) == [2, 3]  # as diffusers
    assert shared_class_images.missing_indices([*generated, Path("mine.png")], 5) == [1, 3, 4, 5, 6]
    assert shared_class_images.process_share([1, 3, 4, 5, 6], 1, 2) == [3, 5]
    with pytest.raises(ValueError, match="process_index"):
        shared_class_images.process_share([1], 2, 2)
    folder = tmp_path / "cls"
    folder.mkdir()
    seed_image(1).save(folder / "user.png")
    (folder / ".DS_Store").write_bytes(b"junk")  # hidden files never count (nor fail)
    plan = shared_class_images.plan_class_images(folder, 3)
    assert (plan.have, plan.missing) == (1, (1, 2))
    assert shared_class_images.plan_class_images(folder, 1).missing == ()
    assert shared_class_images.image_seed(0, 3) != shared_class_images.image_seed(0, 4)
    assert shared_class_images.image_seed(0, 4) != shared_class_images.image_seed(1, 4)
    assert 0 <= shared_class_images.image_seed(2**40, 10**9) < 2**31


# ------------------------------------------------------------------------------------------------ checkpoint marker


def test_marker_holds_step_seed_data_and_spec_but_never_the_token(tmp_path: Path) -> None:
    spec = load_spec([f"--hub_token={TOKEN}", "--checkpointing_steps=7"])
    record = checkpoints.checkpoint_record(4, {"epoch": 1, "position": 2}, spec, seed=1234)
    assert record["step"] == 4 and record["seed"] == 1234 and record["data"] == {"epoch": 1, "position": 2}
    assert record["spec"]["hub"]["hub_token"] is None and record["spec"]["checkpointing"]["checkpointing_steps"] == 7
    assert spec.hub.hub_token == TOKEN  # the spec itself is untouched
    leaky = {**record, "spec": {**record["spec"], "hub": {"hub_token": TOKEN}}}
    path = checkpoints.write_marker(tmp_path / "checkpoint-4", leaky)  # scrubbed whoever built the record
    assert path == tmp_path / "checkpoint-4" / checkpoints.MARKER
    assert TOKEN not in path.read_text()
    assert checkpoints.read_marker(tmp_path / "checkpoint-4")["seed"] == 1234
    assert checkpoints.list_checkpoints(tmp_path) == [(4, tmp_path / "checkpoint-4")]


def test_a_damaged_marker_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / checkpoints.MARKER).write_text("{not json")
    with pytest.raises(JaxboothError, match="checkpoint-1/jaxbooth_checkpoint.json"):
        checkpoints.read_marker(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-1" / checkpoints.MARKER).write_text("[]")
    with pytest.raises(JaxboothError, match="not a jaxbooth checkpoint marker"):
        checkpoints.read_marker(tmp_path / "checkpoint-1")


def test_the_resume_seed_is_read_from_the_marker(tmp_path: Path) -> None:
    from jaxbooth.run_defaults import recorded_seed

    checkpoints.write_marker(tmp_path / "checkpoint-3", checkpoints.checkpoint_record(3, {}, load_spec([]), seed=99))
    assert recorded_seed(tmp_path / "checkpoint-3") == 99


# ------------------------------------------------------------------------------------------------ metrics


def test_metric_record_names_and_the_nan_window() -> None:
    clock = iter([0.0, 2.0, 3.0]).__next__
    window = output.MetricWindow(start_step=10, clock=clock)
    step_metrics = {"loss": 0.5, "instance_loss": 0.4, "prior_loss": 0.1, "lr": 1e-4, "grad_norm": 2.0}
    record = window.record(14, step_metrics)
    assert record == {"train/loss": 0.5, "train/instance_loss": 0.4, "train/prior_loss": 0.1, "train/lr": 1e-4,
                      "train/grad_norm": 2.0, "perf/steps_per_sec": 2.0}  # steps 11..14 in 2 s
    with pytest.raises(JaxboothError, match=r"within steps \[15, 16\] \(prior_loss\)"):
        window.record(16, {**step_metrics, "prior_loss": float("nan")})
    with pytest.raises(KeyError, match="grad_norm"):
        output.metric_record({"loss": 1.0, "instance_loss": 1.0, "prior_loss": 0.0, "lr": 0.1}, steps_per_sec=1.0)
