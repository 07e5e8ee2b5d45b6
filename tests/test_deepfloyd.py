"""The framework-free DeepFloyd IF core (``jaxbooth.deepfloyd``, ``diffusion.drop_learned_variance``) and what the
shared modules do for IF (T5 tokenizer loading, saved pipelines and cards), against stock diffusers on the tiny
IF pipelines of ``jaxbooth.tiny_if``. No training here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from jaxbooth import deepfloyd, diffusion, output, text
from jaxbooth.errors import JaxboothError
from jaxbooth.spec import load_spec_from_dict

SEED_STAGE1_LORA = {"use_lora": True, "instance_prompt": "a sks dog", "resolution": 64, "train_batch_size": 4,
                    "learning_rate": 5e-6, "scale_lr": True, "max_train_steps": 1200, "validation_prompt": "a sks dog",
                    "validation_epochs": 25, "checkpointing_steps": 100, "pre_compute_text_embeddings": True,
                    "tokenizer_max_length": 77, "text_encoder_use_attention_mask": True}
SEED_STAGE2_FULL = {"instance_prompt": "a sks dog", "resolution": 256, "train_batch_size": 2,
                    "gradient_accumulation_steps": 6, "validation_prompt": "a sks dog", "validation_steps": 150,
                    "pre_compute_text_embeddings": True, "tokenizer_max_length": 77,
                    "text_encoder_use_attention_mask": True, "class_labels_conditioning": "timesteps"}


@pytest.fixture(scope="module")
def tiny_if(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny stage I and stage II pipelines, built once."""
    pytest.importorskip("diffusers")
    from jaxbooth.tiny_if import write_if_pipeline

    root = tmp_path_factory.mktemp("tiny_if")
    return {"if-stage1": write_if_pipeline(root / "stage1", "if-stage1"),
            "if-stage2": write_if_pipeline(root / "stage2", "if-stage2")}


@pytest.fixture(scope="module")
def downsized(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Four 64 px validation images, as the seed's dog_downsized folder holds."""
    root = tmp_path_factory.mktemp("dog_downsized")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(1, 5):
        path = root / f"image_{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_deepfloyd_imports_neither_jax_nor_torch() -> None:
    code = ("import sys, jaxbooth.deepfloyd; print(sorted(m for m in ('jax', 'torch', 'flax', 'diffusers', "
            "'transformers', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.requires_torch
def test_stage_reads_the_pipeline_class(tiny_if: dict[str, Path], tmp_path: Path) -> None:
    assert deepfloyd.stage(tiny_if["if-stage1"]) == 1 and deepfloyd.stage(tiny_if["if-stage2"]) == 2
    assert deepfloyd.is_if_pipeline(tiny_if["if-stage2"])
    assert deepfloyd.text_encoder_class_name(tiny_if["if-stage1"]) == "T5EncoderModel"
    others = {"sd": {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]},
              "sdxl": {"_class_name": "StableDiffusionXLPipeline"}, "list": ["IFPipeline"]}
    for name, index in others.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    for name in (*others, "broken", "missing"):
        assert deepfloyd.stage(tmp_path / name) is None and not deepfloyd.is_if_pipeline(tmp_path / name)
        assert deepfloyd.text_encoder_class_name(tmp_path / name) == "CLIPTextModel"


def test_low_res_factor_takes_multiples_of_64_above_64() -> None:
    assert deepfloyd.low_res_factor(256) == 4 and deepfloyd.low_res_factor(128) == 2
    for bad in (64, 100, 32, 0):
        with pytest.raises(JaxboothError, match=r"--resolution=.*--resolution=256"):
            deepfloyd.low_res_factor(bad)


def test_box_downsample_and_quantize_match_pil_and_numpy() -> None:
    torch = pytest.importorskip("torch")
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    rng = np.random.default_rng(1)
    nchw = rng.uniform(-1, 1, (2, 3, 16, 8)).astype(np.float32)
    low = deepfloyd.downsample_box(nchw, 4)
    np.testing.assert_allclose(low, nchw.reshape(2, 3, 4, 4, 2, 4).mean((3, 5)), rtol=0, atol=1e-7)
    np.testing.assert_allclose(deepfloyd.downsample_box(torch.from_numpy(nchw), 4).numpy(), low, atol=1e-7)
    nhwc = deepfloyd.downsample_box(nchw.transpose(0, 2, 3, 1), 4, channel_axis=-1)
    np.testing.assert_allclose(nhwc.transpose(0, 3, 1, 2), low, atol=1e-7)
    with pytest.raises(ValueError, match="not divisible by 3"):
        deepfloyd.downsample_box(nchw, 3)

    # an 8-bit photo reduced by PIL (block means, halves rounded up) == box-downsampled and quantised in [-1, 1]
    # (halves rounded to even, as numpy_to_pil rounds)
    photo = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pil_low = np.asarray(Image.fromarray(photo).reduce(4), np.float32)
    ours = (deepfloyd.quantize_8bit(deepfloyd.downsample_box(photo.astype(np.float32) / 127.5 - 1, 4, -1)) + 1) * 127.5
    half = photo.reshape(8, 4, 8, 4, 3).sum((1, 3)) % 16 == 8
    np.testing.assert_allclose(ours[~half], pil_low[~half], atol=1e-4)
    assert np.abs(ours[half] - pil_low[half]).max() <= 1 + 1e-4 and half.any()

    # quantize_8bit == stage I's PIL output (IFPipeline's postprocessing) read back by stage II's preprocess_image
    x = torch.from_numpy(np.concatenate([rng.uniform(-1.2, 1.2, (1, 3, 8, 8)),
                                         (np.arange(192).reshape(1, 3, 8, 8) + 0.5) / 127.5 - 1]).astype(np.float32))
    pil = IFPipeline.numpy_to_pil((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy())
    fake_pipe = SimpleNamespace(unet=SimpleNamespace(dtype=torch.float32))
    read_back = IFSuperResolutionPipeline.preprocess_image(fake_pipe, pil, 1, "cpu")
    torch.testing.assert_close(deepfloyd.quantize_8bit(x), read_back, rtol=0, atol=1e-6)
    np.testing.assert_allclose(deepfloyd.quantize_8bit(x.numpy()), read_back.numpy(), rtol=0, atol=1e-6)
    grid = (deepfloyd.quantize_8bit(x.numpy()) + 1) * 127.5
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)


@pytest.mark.requires_torch
def test_noising_schedule_matches_diffusers_image_noising_scheduler(tiny_if: dict[str, Path]) -> None:
    import torch
    from diffusers import DDPMScheduler

    schedule = deepfloyd.load_noising_schedule(tiny_if["if-stage2"])
    theirs = DDPMScheduler.from_pretrained(tiny_if["if-stage2"], subfolder=deepfloyd.NOISING_SCHEDULER)
    assert schedule.num_train_timesteps == theirs.config.num_train_timesteps
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    levels = torch.tensor([0, 250, 500, 999])
    expected = theirs.add_noise(x0, noise, levels)
    torch.testing.assert_close(diffusion.add_noise(x0, noise, levels, schedule.as_tables()), expected,
                               rtol=0, atol=1e-6)
    with pytest.raises(JaxboothError, match=r"image_noising_scheduler/scheduler_config.json.*stage II"):
        deepfloyd.load_noising_schedule(tiny_if["if-stage1"])


def test_fixed_variance_rewrites_only_learned(tmp_path: Path) -> None:
    for learned in deepfloyd.LEARNED_VARIANCE_TYPES:
        config = {"variance_type": learned, "beta_schedule": "squaredcos_cap_v2", "_class_name": "DDPMScheduler"}
        assert deepfloyd.fixed_variance_config(config) == {**config, "variance_type": "fixed_small"}
        assert config["variance_type"] == learned  # a copy
    for kept in ({"variance_type": "fixed_small"}, {"variance_type": "fixed_large"}, {"beta_start": 0.1}, {}):
        assert deepfloyd.fixed_variance_config(kept) == kept

    folder = tmp_path / "scheduler"
    folder.mkdir()
    path = folder / "scheduler_config.json"
    path.write_text(json.dumps({"variance_type": "learned_range", "thresholding": True}))
    assert deepfloyd.write_fixed_variance(folder) is True
    assert json.loads(path.read_text()) == {"variance_type": "fixed_small", "thresholding": True}
    assert deepfloyd.write_fixed_variance(folder) is False
    path.write_text(text_ := json.dumps({"variance_type": "fixed_large"}))
    assert deepfloyd.write_fixed_variance(folder) is False and path.read_text() == text_
    assert deepfloyd.write_fixed_variance(tmp_path / "absent") is False
    assert sorted(p.name for p in folder.iterdir()) == ["scheduler_config.json"]  # no temporary left behind


def test_drop_learned_variance_keeps_the_first_half() -> None:
    torch = pytest.importorskip("torch")
    pred = torch.randn(2, 6, 4, 4)
    noise_half, _ = torch.chunk(pred, 2, dim=1)  # diffusers' scripts
    torch.testing.assert_close(diffusion.drop_learned_variance(pred, 3), noise_half, rtol=0, atol=0)
    np.testing.assert_array_equal(diffusion.drop_learned_variance(pred.numpy(), 3), noise_half.numpy())
    nhwc = pred.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(diffusion.drop_learned_variance(nhwc, 3, channel_axis=-1),
                                  noise_half.numpy().transpose(0, 2, 3, 1))
    latents = torch.randn(2, 4, 4, 4)
    assert diffusion.drop_learned_variance(latents, 4) is latents
    with pytest.raises(ValueError, match="5 channels"):
        diffusion.drop_learned_variance(torch.randn(2, 5, 4, 4), 3)


def _spec(**flags):
    return load_spec_from_dict(flags)


# (pipeline class, flags, what each message must say); "{images}" is replaced by the four validation images.
PROBLEMS = [
    ("IFSuperResolutionPipeline", {**SEED_STAGE2_FULL, "class_labels_conditioning": None,
                                   "validation_images": "{images}"},
     ["--class_labels_conditioning is not set", "Add --class_labels_conditioning=timesteps"]),
    ("IFPipeline", {"class_labels_conditioning": "timesteps"},
     ["--class_labels_conditioning=timesteps", "Drop --class_labels_conditioning"]),
    ("StableDiffusionPipeline", {"class_labels_conditioning": "timesteps"},
     ["StableDiffusionPipeline has none", "Drop --class_labels_conditioning"]),
    ("StableDiffusionXLPipeline", {"validation_prompt": "a dog", "validation_images": "{images}"},
     ["--validation_images", "takes no input image", "Drop --validation_images"]),
    ("IFPipeline", {"validation_prompt": "a dog", "validation_images": "{images}"},
     ["--validation_images", "Drop --validation_images"]),
    ("IFSuperResolutionPipeline", SEED_STAGE2_FULL,
     ["--validation_prompt is set but --validation_images is not", "Add --validation_images"]),
    ("IFSuperResolutionPipeline", {**SEED_STAGE2_FULL, "validation_prompt": None, "validation_images": "{images}"},
     ["--validation_images without --validation_prompt", "Add --validation_prompt"]),
    ("IFSuperResolutionPipeline", {**SEED_STAGE2_FULL, "validation_images": ["missing.png"]},
     ["--validation_images: missing.png does not exist"]),
    ("IFSuperResolutionPipeline", {**SEED_STAGE2_FULL, "validation_images": ["{not_an_image}"]},
     ["cannot be read as an image", "give PNG or JPEG files"]),
    ("IFSuperResolutionPipeline", {**SEED_STAGE2_FULL, "validation_images": "{images}", "resolution": 200},
     ["--resolution=200", "set --resolution=256"]),
    ("IFPipeline", {"pretrained_vae_name_or_path": "some/vae"},
     ["--pretrained_vae_name_or_path=some/vae", "no VAE", "Drop --pretrained_vae_name_or_path"]),
    ("IFSuperResolutionPipeline", {**SEED_STAGE2_FULL, "validation_images": "{images}",
                                   "pretrained_vae_model_name_or_path": "some/vae"},
     ["Drop --pretrained_vae_model_name_or_path"]),
    ("IFPipeline", {**SEED_STAGE1_LORA, "output_kohya_format": True},
     ["--output_kohya_format", "no kohya", "Drop --output_kohya_format"]),
    ("IFPipeline", {**SEED_STAGE1_LORA, "train_text_encoder": True, "pre_compute_text_embeddings": False},
     ["--train_text_encoder with --use_lora", "T5", "Drop --train_text_encoder"]),
]


@pytest.mark.parametrize(("pipeline_class", "flags", "said"), PROBLEMS,
                         ids=[f"{i}-{case[0]}" for i, case in enumerate(PROBLEMS)])
def test_option_problems_name_each_key_and_fix(pipeline_class, flags, said, downsized, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    flags = dict(flags)
    if flags.get("validation_images") == "{images}":
        flags["validation_images"] = downsized
    elif flags.get("validation_images") == ["{not_an_image}"]:
        flags["validation_images"] = [str(broken)]
    problems = deepfloyd.option_problems(_spec(**flags), pipeline_class)
    assert len(problems) == 1, problems
    for part in said:
        assert part in problems[0]


def test_seed_commands_and_plain_runs_pass_the_checks(downsized: list[str]) -> None:
    stage2 = {**SEED_STAGE2_FULL, "validation_images": downsized}
    for pipeline_class, flags in [("IFPipeline", SEED_STAGE1_LORA), ("IFSuperResolutionPipeline", stage2),
                                  ("IFSuperResolutionPipeline", {**stage2, "use_lora": True}),
                                  ("IFPipeline", {**SEED_STAGE1_LORA, "use_lora": False, "train_text_encoder": True,
                                                  "pre_compute_text_embeddings": False}),
                                  ("StableDiffusionPipeline", {}), ("StableDiffusionXLPipeline", {"use_lora": True})]:
        spec = _spec(**flags)
        assert deepfloyd.option_problems(spec, pipeline_class) == []
        assert deepfloyd.option_warnings(spec, pipeline_class) == []
    for pipeline_class in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        assert deepfloyd.option_warnings(_spec(tokenizer_max_length=20), pipeline_class) == []
    warnings = deepfloyd.option_warnings(_spec(), "IFPipeline")
    assert len(warnings) == 2
    assert "--text_encoder_use_attention_mask is off" in warnings[0] and "at 77 tokens" in warnings[0]
    assert "--tokenizer_max_length is not set" in warnings[1] and "--tokenizer_max_length=77" in warnings[1]
    [warning] = deepfloyd.option_warnings(_spec(text_encoder_use_attention_mask=True, tokenizer_max_length=120),
                                          "IFSuperResolutionPipeline")
    assert "--tokenizer_max_length is 120" in warning


@pytest.mark.requires_torch
def test_load_tokenizer_reads_a_t5_folder(tiny_if: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from transformers import CLIPTokenizer, T5Tokenizer

    tokenizer = text.load_tokenizer(tiny_if["if-stage1"])
    assert isinstance(tokenizer, T5Tokenizer)
    prompts = ["a photo of sks dog", "a dog " * 60]  # the second is cut at 77 tokens
    ids, mask = text.make_tokenize_fn(tokenizer, deepfloyd.PROMPT_MAX_LENGTH)(prompts)
    # how IFPipeline.encode_prompt tokenizes, with the tokenizer the pipeline loads
    stock = T5Tokenizer.from_pretrained(tiny_if["if-stage1"], subfolder="tokenizer")
    expected = stock(prompts, padding="max_length", max_length=77, truncation=True, add_special_tokens=True,
                     return_tensors="np")
    np.testing.assert_array_equal(ids, expected.input_ids)
    np.testing.assert_array_equal(mask, expected.attention_mask)
    assert ids[0, mask[0].sum() - 1] == tokenizer.eos_token_id and mask[1].all() and ids[1, -1] == 1

    clip = tmp_path / "sd" / "tokenizer"
    text.write_tiny_clip_tokenizer(clip)
    assert isinstance(text.load_tokenizer(tmp_path / "sd"), CLIPTokenizer)

    only_spm = tmp_path / "spm" / "tokenizer"
    only_spm.mkdir(parents=True)
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(tiny_if["if-stage1"] / "tokenizer" / name, only_spm / name)
    monkeypatch.setattr(text, "_importable", lambda module: module != "sentencepiece")
    with pytest.raises(JaxboothError, match=r"spiece.model.*pip install sentencepiece$"):
        text.load_tokenizer(tmp_path / "spm")
    (only_spm / "spiece.model").unlink()
    with pytest.raises(JaxboothError, match=r"neither tokenizer.json nor spiece.model"):
        text.load_tokenizer(tmp_path / "spm")


@pytest.mark.requires_torch
def test_load_tokenizer_converts_a_spiece_model_alone(tiny_if: dict[str, Path], tmp_path: Path) -> None:
    """Real IF folders ship spiece.model and no tokenizer.json: converted by transformers (sentencepiece)."""
    pytest.importorskip("sentencepiece")
    only_spm = tmp_path / "tokenizer"
    only_spm.mkdir()
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(tiny_if["if-stage1"] / "tokenizer" / name, only_spm / name)
    prompts = ["a photo of sks dog", "A photo of a dog, in the style of Monet."]
    converted = text.make_tokenize_fn(text.load_tokenizer(tmp_path), 77)(prompts)
    original = text.make_tokenize_fn(text.load_tokenizer(tiny_if["if-stage1"]), 77)(prompts)
    np.testing.assert_array_equal(converted[0], original[0])
    np.testing.assert_array_equal(converted[1], original[1])


def test_hub_downloads_fetch_the_if_components() -> None:
    from huggingface_hub.utils import filter_repo_objects

    from jaxbooth import hub

    remote = ["tokenizer/spiece.model", "tokenizer/tokenizer_config.json",
              "image_noising_scheduler/scheduler_config.json", "watermarker/config.json",
              "watermarker/diffusion_pytorch_model.safetensors", "text_encoder/model-00001-of-00002.safetensors",
              "text_encoder/pytorch_model.bin", "safety_checker/model.safetensors", "unet/diffusion_pytorch_model.bin"]
    patterns = hub.allow_patterns(hub.DEFAULT_SUBFOLDERS, weights="safetensors")
    assert sorted(filter_repo_objects(remote, allow_patterns=patterns)) == sorted(remote[:6])


def _base_with_watermarker(source: Path, base: Path) -> Path:
    """A copy of a tiny IF pipeline with an ``IFWatermarker`` in it, as the real IF repos have."""
    from diffusers.pipelines.deepfloyd_if.watermark import IFWatermarker

    shutil.copytree(source, base)
    IFWatermarker().save_pretrained(base / "watermarker")
    index = json.loads((base / "model_index.json").read_text())
    index["watermarker"] = ["deepfloyd_if", "IFWatermarker"]
    (base / "model_index.json").write_text(json.dumps(index))
    return base


@pytest.mark.requires_torch
def test_write_pipeline_copies_if_components_and_fixes_the_variance(tiny_if: dict[str, Path], tmp_path: Path,
                                                                     downsized: list[str]) -> None:
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    runs = {"if-stage1": (IFPipeline, SEED_STAGE1_LORA | {"use_lora": False}),
            "if-stage2": (IFSuperResolutionPipeline, SEED_STAGE2_FULL | {"validation_images": downsized})}
    for family, (pipeline_cls, flags) in runs.items():
        base = _base_with_watermarker(tiny_if[family], tmp_path / f"base-{family}")
        out = tmp_path / f"out-{family}"
        shutil.copytree(base / "unet", out / "unet")  # what a backend writes before write_pipeline
        spec = _spec(**flags, pretrained_model_name_or_path=str(base), skip_save_text_encoder=True)
        output.write_pipeline(out, base_dir=base, trained_components=output.components_to_save(spec), vae_dir=None,
                              spec=spec, steps=1, backend="torch", instance_prompt="a sks dog")
        assert (out / "watermarker" / "config.json").is_file() and not (out / "text_encoder").exists()
        assert (out / deepfloyd.NOISING_SCHEDULER).is_dir() == (family == "if-stage2")
        index = json.loads((out / "model_index.json").read_text())
        assert index["text_encoder"] == [None, None] and index["watermarker"] == ["deepfloyd_if", "IFWatermarker"]
        saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert saved["variance_type"] == "fixed_small"
        assert json.loads((base / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == \
            "learned_range"
        card = (out / "README.md").read_text()
        assert "license: deepfloyd-if-license" in card and "- if\n- if-diffusers\n" in card
        assert "from transformers import T5EncoderModel" in card and "T5EncoderModel.from_pretrained(" in card
        assert ("image=low_res_image" in card) == (family == "if-stage2")
        pipe = pipeline_cls.from_pretrained(out, text_encoder=None)
        assert pipe.scheduler.config.variance_type == "fixed_small" and pipe.text_encoder is None
        assert type(pipe.watermarker).__name__ == "IFWatermarker"


@pytest.mark.requires_torch
def test_cards_of_if_bases_name_the_licence_variance_switch_and_image(tiny_if: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    from jaxbooth.lora.card import lora_model_card
    from jaxbooth.lora.settings import AdapterSettings

    notes = deepfloyd.card_notes(base_dir=tiny_if["if-stage2"], lora=True, text_encoder_saved=True)
    assert 'variance_type="fixed_small"' in notes and "64 px" in notes and "T5EncoderModel" not in notes
    assert "fixed_small" not in deepfloyd.card_notes(base_dir=tiny_if["if-stage1"], lora=False,
                                                     text_encoder_saved=True)
    assert "`T5EncoderModel`" in deepfloyd.card_notes(base_dir=tiny_if["if-stage1"], lora=False,
                                                      text_encoder_saved=False)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert deepfloyd.card_notes(base_dir=tmp_path, lora=True, text_encoder_saved=False) == ""

    card = lora_model_card(base_model="DeepFloyd/IF-II-L-v1.0", instance_prompt="a sks dog",
                           settings=AdapterSettings(rank=4), targets={"unet": ["to_k", "add_k_proj"]}, steps=1,
                           backend="torch", pipeline_class="IFSuperResolutionPipeline", notes=notes)
    assert "license: deepfloyd-if-license" in card and "- if\n- if-diffusers\n" in card
    assert 'pipe("a sks dog", image=low_res_image,' in card and notes in card
    sd_card = lora_model_card(base_model="sd", instance_prompt="a sks dog", settings=AdapterSettings(rank=4),
                              targets={"unet": ["to_k"]}, steps=1, backend="torch")
    assert "creativeml-openrail-m" in sd_card and "- if" not in sd_card and "image=" not in sd_card


def test_sampled_prompts_are_lower_cased_and_stripped_before_tokenizing() -> None:
    seen = []
    tokenize = deepfloyd.sampled_prompts(lambda prompts: seen.append(list(prompts)) or len(prompts))
    assert tokenize([" A SKS Dog ", "a photo"]) == 2
    assert seen == [["a sks dog", "a photo"]]
