"""DeepFloyd IF stage II on the torch backend: the seed guide's two stage II commands as written (paths and step
counts aside, resolution 256) on a tiny ``IFSuperResolutionPipeline``, trained on what the stock pipeline feeds
its UNet: the noisy image beside the low-resolution image upscaled and noised to a level that is the class label.

To keep the module fast, validation samples with 1 inference step instead of 25
(``validation.NUM_INFERENCE_STEPS``); ``tiny_if``'s stage II UNet is narrow (8-16-32 channels) for the 256 px
steps; everything else in the runs is the command's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from jaxbooth.errors import JaxboothError
from tests.torch_backend._deepfloyd_seed import (
    STAGE2_FULL,
    STAGE2_LORA,
    TrainingSpy,
    fake_hub,
    offline_wandb,
    run_seed,
    seed_argv,
    write_images,
)

pytest.importorskip("peft")
pytest.importorskip("wandb")

WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The seed's stage II LoRA and full commands, 1 step each (the full one: 6 micro-steps of 2 at 256 px), with
    the guide's 4 downsized validation images; wandb offline, push_to_hub to a fake Hub."""
    from jaxbooth.tiny_if import write_if_pipeline
    from jaxbooth.torch_backend import validation

    root = tmp_path_factory.mktemp("if-stage2")
    base = write_if_pipeline(root / "IF-II-L-v1.0", "if-stage2")
    instance = root / "dog"
    write_images(instance, 4, 256)
    low = write_images(root / "dog_downsized", 4, 64, seed=1, name="image_{i}.png")
    out = {"base": base, "low": low, "lora": root / "dreambooth_dog_upscale_lora",
           "full": root / "dreambooth_dog_upscale", "wandb": root / "wandb"}
    variables = {"MODEL_NAME": str(base), "INSTANCE_DIR": str(instance),
                 "VALIDATION_IMAGES": " ".join(map(str, low))}
    spies = {}
    with pytest.MonkeyPatch.context() as mp, fake_hub() as uploads, offline_wandb(out["wandb"]):
        mp.setattr(validation, "NUM_INFERENCE_STEPS", 1)
        for kind, command, steps in (("lora", STAGE2_LORA, {}), ("full", STAGE2_FULL, {"validation_steps": 1})):
            with pytest.MonkeyPatch.context() as spy_mp:
                spies[kind] = TrainingSpy(spy_mp)
                argv = seed_argv(command, {**variables, "OUTPUT_DIR": str(out[kind])}, max_train_steps=1, **steps)
                assert run_seed(argv) == 0
    return {**out, "spies": spies, "uploads": uploads}


def test_training_inputs_match_what_ifsuperresolutionpipeline_feeds_the_unet(stage2: dict) -> None:
    from diffusers import DDPMScheduler, IFSuperResolutionPipeline
    from PIL import Image

    from jaxbooth.torch_backend.deepfloyd import UpscalerConditioning

    base = stage2["base"]
    conditioning = UpscalerConditioning.from_model_dir(base, 256, torch.device("cpu"))
    assert (conditioning.factor, conditioning.num_noise_levels) == (4, 1000)

    # pipeline side: the stock pipeline's UNet input for one 64 px image at its default noise level (250)
    pipe = IFSuperResolutionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    seen: dict = {}
    real_forward, real_add_noise = pipe.unet.forward, pipe.image_noising_scheduler.add_noise

    def forward(sample, timestep, encoder_hidden_states=None, **kwargs):
        seen.update(sample=sample.clone(), class_labels=kwargs["class_labels"].clone())
        return real_forward(sample, timestep, encoder_hidden_states, **kwargs)

    def add_noise(original, noise, timesteps):
        seen.update(noise=noise.clone(), levels=timesteps.clone())
        return real_add_noise(original, noise, timesteps)

    pipe.unet.forward, pipe.image_noising_scheduler.add_noise = forward, add_noise
    image = Image.open(stage2["low"][0]).convert("RGB")
    pipe("a sks dog", image=image, num_inference_steps=1, guidance_scale=1.0, clean_caption=False,
         generator=torch.Generator().manual_seed(0), output_type="pt")
    assert seen["sample"].shape == (1, 6, 256, 256) and seen["class_labels"].tolist() == [250]
    low = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x0 = low.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # a 256 px crop whose box-downsample is `low`
    torch.testing.assert_close(conditioning.low_res_inputs(x0), low, rtol=0, atol=1e-6)
    condition = conditioning.condition(x0, seen["levels"], seen["noise"])
    torch.testing.assert_close(condition, seen["sample"][:, 3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["levels"], seen["class_labels"], rtol=0, atol=0)

    # training side, written out with torch and diffusers' schedulers: every micro-step of the full run, which
    # set --class_labels_conditioning=timesteps (the class label is the noise-augmentation level, not the timestep)
    resolved = yaml.safe_load((stage2["full"] / "jaxbooth_run.yaml").read_text())
    assert resolved["deepfloyd_if"]["class_labels_conditioning"] == "timesteps"
    spy = stage2["spies"]["full"]
    assert len(spy.calls) == len(spy.upscaler_draws) == 6 and not spy.vae_loads
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    noising = DDPMScheduler.from_pretrained(base, subfolder="image_noising_scheduler")
    for call, (levels, noise) in zip(spy.calls, spy.upscaler_draws, strict=True):
        x0 = call["x0"]
        assert x0.shape == (2, 3, 256, 256) and call["pred"].shape == (2, 6, 256, 256)
        boxed = x0.reshape(2, 3, 64, 4, 64, 4).mean(dim=(3, 5))
        on_grid = torch.round((boxed / 2 + 0.5).clamp(0, 1) * 255) / 127.5 - 1
        upscaled = F.interpolate(on_grid, size=(256, 256), mode="bilinear", align_corners=True)
        torch.testing.assert_close(call["input"][:, 3:], noising.add_noise(upscaled, noise, levels), rtol=0,
                                   atol=1e-5)
        torch.testing.assert_close(call["input"][:, :3], scheduler.add_noise(x0, call["noise"], call["timesteps"]),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(call["class_labels"], levels, rtol=0, atol=0)
        torch.testing.assert_close(call["unet_timesteps"], call["timesteps"], rtol=0, atol=0)
        assert levels.dtype == torch.int64 and 0 <= levels.min() and levels.max() < 1000
    all_levels = torch.cat([levels for levels, _ in spy.upscaler_draws])
    all_steps = torch.cat([call["timesteps"] for call in spy.calls])
    assert not torch.equal(all_levels, all_steps), "the class labels are the denoising timesteps"
    assert len(set(all_levels.tolist())) > 1


def test_seed_stage2_full_and_lora_outputs_load_and_upscale(stage2: dict) -> None:
    from diffusers import IFSuperResolutionPipeline
    from PIL import Image

    base, image = stage2["base"], Image.open(stage2["low"][1]).convert("RGB")
    full = stage2["full"]
    assert json.loads((full / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "fixed_small"
    assert (full / "image_noising_scheduler" / "scheduler_config.json").read_bytes() == \
        (base / "image_noising_scheduler" / "scheduler_config.json").read_bytes()
    assert stage2["uploads"] == [("dreambooth_dog_upscale", full)]
    assert list((stage2["wandb"] / "wandb").glob("offline-run-*"))
    lora = stage2["lora"]
    card = (lora / "README.md").read_text()
    assert "image=low_res_image" in card and 'variance_type="fixed_small"' in card
    for out in (full, lora):  # one validation per run: each of the 4 --validation_images upscaled once
        resolved = yaml.safe_load((out / "jaxbooth_run.yaml").read_text())
        assert resolved["validation"]["validation_images"] == [str(p) for p in stage2["low"]]
        assert (out / "validation" / "step-1.png").is_file()
        assert sorted(p.name for p in (out / "validation" / "step-1").iterdir()) == [f"{k}.png" for k in range(4)]
        with Image.open(out / "validation" / "step-1" / "0.png") as sample:
            assert sample.size == (256, 256)

    loaded = IFSuperResolutionPipeline.from_pretrained(full)
    with_lora = IFSuperResolutionPipeline.from_pretrained(base)
    with_lora.load_lora_weights(lora)
    with_lora.scheduler = with_lora.scheduler.__class__.from_config(with_lora.scheduler.config,
                                                                    variance_type="fixed_small")
    for pipe in (loaded, with_lora):
        pipe.set_progress_bar_config(disable=True)
        upscaled = pipe("a sks dog", image=image, num_inference_steps=1, clean_caption=False, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images
        assert upscaled.shape == (1, 3, 256, 256) and torch.isfinite(upscaled).all()


@pytest.mark.parametrize("change, message", [
    (("--class_labels_conditioning=timesteps", None), "--class_labels_conditioning is not set"),
    (("--validation_images", None), "--validation_images is not"),
    (("MISSING", "missing.png"), "missing.png does not exist"),
])
def test_stage2_refusals_before_any_model_loads(stage2: dict, tmp_path, monkeypatch, capsys, change: tuple,
                                                message: str) -> None:
    """Stage II without its class labels, validation without images, a missing image: refused by name before any
    UNet loads (as is a stage II key on a Stable Diffusion pipeline)."""
    from diffusers import UNet2DConditionModel

    def no_load(*args, **kwargs):
        raise AssertionError("a UNet was loaded")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_load)
    low = " ".join(map(str, stage2["low"]))
    variables = {"MODEL_NAME": str(stage2["base"]), "INSTANCE_DIR": str(stage2["base"].parent / "dog"),
                 "OUTPUT_DIR": str(tmp_path / "out"), "VALIDATION_IMAGES": low}
    argv = seed_argv(STAGE2_LORA, variables, max_train_steps=1)
    flag, replacement = change
    if flag == "MISSING":
        argv[argv.index(str(stage2["low"][0]))] = str(tmp_path / replacement)
    elif flag == "--validation_images":
        at = argv.index(flag)
        del argv[at:at + 1 + len(stage2["low"])]
    else:
        argv.remove(flag)
    assert run_seed(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stage2_keys_are_refused_on_a_stable_diffusion_pipeline(stage2: dict, tmp_path) -> None:
    """``check_supported`` runs the IF option checks on every pipeline: a Stable Diffusion UNet has no class labels
    (diffusers would ignore the flag)."""
    from jaxbooth import spec as spec_lib
    from jaxbooth.torch_backend.train import check_supported

    sd = tmp_path / "sd"
    (sd / "scheduler").mkdir(parents=True)
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (sd / "scheduler" / "scheduler_config.json").write_bytes(
        (stage2["base"] / "scheduler" / "scheduler_config.json").read_bytes())
    spec = spec_lib.load_spec(["--backend=torch", "--class_labels_conditioning=timesteps",
                               f"--output_dir={tmp_path}", "--instance_prompt=a photo of sks dog"])
    with pytest.raises(JaxboothError, match="--class_labels_conditioning=timesteps"):
        check_supported(spec, sd)
