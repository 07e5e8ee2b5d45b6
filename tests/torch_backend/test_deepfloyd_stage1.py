"""DeepFloyd IF stage I on the torch backend: the seed guide's LoRA and full commands and diffusers' IF LoRA
test case, run as written (paths and step counts aside) on a tiny ``IFPipeline``, with backend auto.

Validation samples with 2 inference steps instead of 25 (``validation.NUM_INFERENCE_STEPS``) to keep the
module fast; everything else in the runs is the command's.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.torch_backend._deepfloyd_seed import (
    STAGE1_FULL,
    STAGE1_LORA,
    TrainingSpy,
    fake_hub,
    offline_wandb,
    run_seed,
    seed_argv,
    write_images,
)

pytest.importorskip("peft")
pytest.importorskip("wandb")
pytest.importorskip("bitsandbytes")

WEIGHTS = "pytorch_lora_weights.safetensors"
# diffusers' examples/dreambooth/test_dreambooth_lora.py::test_dreambooth_lora_if_model, as written there
# (launcher and script path aside); MODEL, INSTANCE and OUT stand for its hub id, image folder and tmpdir.
DIFFUSERS_IF_LORA_CASE = """
                examples/dreambooth/train_dreambooth_lora.py
                --pretrained_model_name_or_path MODEL
                --instance_data_dir INSTANCE
                --instance_prompt photo
                --resolution 64
                --train_batch_size 1
                --gradient_accumulation_steps 1
                --max_train_steps 2
                --learning_rate 5.0e-04
                --scale_lr
                --lr_scheduler constant
                --lr_warmup_steps 0
                --output_dir OUT
                --pre_compute_text_embeddings
                --tokenizer_max_length=77
                --text_encoder_use_attention_mask
                """


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The seed's stage I LoRA command (wandb offline), its full command (push_to_hub to a fake Hub), and
    diffusers' IF LoRA case, 2 steps each, on one tiny IF-I pipeline and 4 instance images."""
    from jaxbooth.tiny_if import write_if_pipeline
    from jaxbooth.torch_backend import validation

    root = tmp_path_factory.mktemp("if-stage1")
    base = write_if_pipeline(root / "IF-I-XL-v1.0", "if-stage1")
    instance = root / "dog"
    write_images(instance, 4, 64)
    out = {"base": base, "lora": root / "dreambooth_dog_lora", "full": root / "dreambooth_if",
           "case": root / "diffusers_case", "wandb": root / "wandb"}
    variables = {"MODEL_NAME": str(base), "INSTANCE_DIR": str(instance)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation, "NUM_INFERENCE_STEPS", 2)
        lora_spy = TrainingSpy(mp)
        argv = seed_argv(STAGE1_LORA, {**variables, "OUTPUT_DIR": str(out["lora"])}, max_train_steps=2,
                         checkpointing_steps=2)
        with offline_wandb(out["wandb"]):
            assert run_seed(argv) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation, "NUM_INFERENCE_STEPS", 2)
        full_spy = TrainingSpy(mp)
        with fake_hub() as uploads:
            argv = seed_argv(STAGE1_FULL, {**variables, "OUTPUT_DIR": str(out["full"])}, max_train_steps=2,
                             validation_steps=2)
            assert run_seed(argv) == 0
    case = DIFFUSERS_IF_LORA_CASE.replace("MODEL", str(base)).replace("INSTANCE", str(instance))
    assert run_seed(case.replace("OUT", str(out["case"])).split()) == 0
    return {**out, "lora_spy": lora_spy, "full_spy": full_spy, "uploads": uploads}


def fixed_unet_input(unet) -> tuple:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 64, 64, generator=g)
    states = torch.randn(1, 77, unet.config.encoder_hid_dim, generator=g)
    return sample, torch.tensor([300]), states


def test_seed_stage1_lora_loads_with_load_lora_weights_and_generates(stage1: dict) -> None:
    from diffusers import IFPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    out = stage1["lora"]
    keys = list(load_file(out / WEIGHTS))
    for target in ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"):
        assert any(f".{target}.lora" in key for key in keys), target
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-1").exists()
    assert (out / "validation" / "step-1.png").is_file()  # after the first epoch, as the LoRA script
    assert sorted(p.name for p in (out / "validation" / "step-1").iterdir()) == [f"{k}.png" for k in range(4)]
    runs = list((stage1["wandb"] / "wandb").glob("offline-run-*"))
    assert runs, "no offline wandb run was written"
    logged = list(runs[0].glob("files/media/images/validation_*.png"))
    assert len(logged) == 4, "the validation images were not logged to wandb"  # as diffusers' scripts do
    card = (out / "README.md").read_text()
    assert 'variance_type="fixed_small"' in card and "IFPipeline" in card

    pipe = IFPipeline.from_pretrained(stage1["base"], safety_checker=None, watermarker=None, feature_extractor=None)
    pipe.load_lora_weights(out)
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, variance_type="fixed_small")
    trained = stage1["lora_spy"].trainers[0].unet
    trained = getattr(trained, "module", trained).eval()
    base = UNet2DConditionModel.from_pretrained(stage1["base"], subfolder="unet")
    inputs = fixed_unet_input(base)
    with torch.no_grad():
        expected, loaded, before = (model(*inputs).sample for model in (trained, pipe.unet, base))
    assert (expected - before).abs().max() > 1e-5, "the adapters changed nothing"
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-6)

    pipe.set_progress_bar_config(disable=True)
    image = pipe("a sks dog", num_inference_steps=2, output_type="pt", clean_caption=False,
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_seed_stage1_full_output_is_an_ifpipeline_without_text_encoder(stage1: dict) -> None:
    from diffusers import IFPipeline
    from transformers import T5EncoderModel

    from tests.torch_backend._helpers import unet_state

    out, base = stage1["full"], stage1["base"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "IFPipeline" and index["text_encoder"] == [None, None]
    assert not (out / "text_encoder").exists() and (out / "tokenizer" / "spiece.model").is_file()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "fixed_small"
    card = (out / "README.md").read_text()
    assert "T5EncoderModel" in card and str(base) in card
    assert (out / "validation" / "step-2.png").is_file()
    assert stage1["uploads"] == [("dreambooth_if", out)]
    assert type(stage1["full_spy"].trainers[0].optimizer.optimizer).__name__ == "AdamW8bit"
    before, after = unet_state(base), unet_state(out)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no weight"

    pipe = IFPipeline.from_pretrained(out, text_encoder=T5EncoderModel.from_pretrained(base, subfolder="text_encoder"))
    assert pipe.scheduler.config.variance_type == "fixed_small"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", num_inference_steps=2, output_type="pt", clean_caption=False,
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_diffusers_if_lora_case_passes(stage1: dict) -> None:
    """The assertions of diffusers' IF LoRA test, on its command run by jaxbooth."""
    import safetensors.torch

    tmpdir = stage1["case"]
    assert (tmpdir / WEIGHTS).is_file()
    lora_state_dict = safetensors.torch.load_file(tmpdir / WEIGHTS)
    assert lora_state_dict and all("lora" in k for k in lora_state_dict)
    assert all(key.startswith("unet") for key in lora_state_dict)


def test_training_regresses_the_first_three_of_six_channels(stage1: dict) -> None:
    """Pixel space, no VAE: the UNet's input is the noised batch pixels (diffusers' DDPMScheduler.add_noise),
    its prediction has 6 channels, and the loss is the MSE of the first 3 against the noise."""
    from diffusers import DDPMScheduler

    spy = stage1["full_spy"]
    assert not spy.vae_loads
    assert len(spy.calls) == len(spy.pixels) == 2  # 2 steps, no accumulation
    scheduler = DDPMScheduler.from_pretrained(stage1["base"], subfolder="scheduler")
    for call, (batch_pixels, pixels, std) in zip(spy.calls, spy.pixels, strict=True):
        assert std is None
        torch.testing.assert_close(pixels, torch.from_numpy(batch_pixels).permute(0, 3, 1, 2), rtol=0, atol=0)
        torch.testing.assert_close(call["x0"], pixels, rtol=0, atol=0)
        expected_input = scheduler.add_noise(pixels, call["noise"], call["timesteps"])
        torch.testing.assert_close(call["input"], expected_input, rtol=0, atol=1e-6)
        assert call["pred"].shape == (4, 6, 64, 64) and call["class_labels"] is None
        mse = torch.nn.functional.mse_loss(call["pred"][:, :3].float(), call["noise"].float())
        torch.testing.assert_close(call["loss"], mse, rtol=1e-6, atol=0)
        assert not torch.allclose(call["loss"], torch.nn.functional.mse_loss(call["pred"][:, 3:], call["noise"]))
