"""Single-file checkpoints (``--save_single_file``, ``jaxbooth export --single-file``): the original Stable
Diffusion layout, proven by diffusers' own reader.

Each file goes back through ``StableDiffusionPipeline.from_single_file`` / ``StableDiffusionXLPipeline
.from_single_file`` offline (``config=`` the local diffusers folder, ``local_files_only``) and every UNet, VAE
and text-encoder weight must come back equal to the diffusers folder's (fp32 files, so equality is exact).
One short training run per backend writes the file at the end and is exported again from its checkpoint-1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxbooth import single_file
from jaxbooth import single_file_keys as keys
from jaxbooth.cli import main
from jaxbooth.errors import JaxboothError
from jaxbooth.lora.merge import read_component_weights
from jaxbooth.weight_files import read_header

pytest.importorskip("diffusers")

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def header_dtypes(path: Path) -> set[str]:
    return {info["dtype"] for name, info in read_header(path).items() if name != "__metadata__"}


def metadata(path: Path) -> dict[str, str]:
    return read_header(path).get("__metadata__", {})


def assert_round_trip(path: Path, config_dir: Path, expected: dict[str, Path]) -> None:
    """``from_single_file(path, config=config_dir)`` loads each component of ``expected`` (name -> the diffusers
    folder holding its weights) with exactly those weights."""
    import diffusers

    class_name = json.loads((config_dir / "model_index.json").read_text())["_class_name"]
    pipe = getattr(diffusers, class_name).from_single_file(str(path), config=str(config_dir), local_files_only=True)
    for name, folder in expected.items():
        loaded = {key: value.float().numpy() for key, value in getattr(pipe, name).state_dict().items()}
        reference = read_component_weights(folder)
        if name in TEXT_ENCODERS:  # transformers' flattened CLIPTextModel has no text_model. prefix
            reference = keys.clip_canonical(reference)
            if not any(key.startswith("text_model.") for key in loaded):
                reference = {key.removeprefix("text_model."): value for key, value in reference.items()}
        loaded = {key: value for key, value in loaded.items() if not key.endswith("position_ids")}
        assert set(loaded) == set(reference), (name, sorted(set(loaded) ^ set(reference))[:5])
        unequal = [key for key, value in reference.items() if not np.array_equal(loaded[key], value.astype(np.float32))]
        assert not unequal, (name, unequal[:5])


# ------------------------------------------------------------------ the key tables


def test_sd1_and_sd2_text_encoder_layouts_match_diffusers_converter(tiny_model_dir: Path) -> None:
    """SD 1.x keeps transformers' CLIP names under cond_stage_model.transformer.; SD 2.x's OpenCLIP layout (fused
    q/k/v) goes back through diffusers' convert_open_clip_checkpoint to the same weights."""
    import torch
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    state = keys.clip_canonical(read_component_weights(tiny_model_dir / "text_encoder"))
    original = keys.prefixed(keys.SD2_TEXT_PREFIX, keys.open_clip_to_original(state, "text_encoder"))
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in original
    assert not any("q_proj" in key for key in original)
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(tiny_model_dir / "text_encoder"))
    back = convert_open_clip_checkpoint(model, {k: torch.from_numpy(v) for k, v in original.items()},
                                        prefix=keys.SD2_TEXT_PREFIX)
    assert set(back) == set(state)
    assert all(np.array_equal(back[key].numpy(), value) for key, value in state.items())


def test_a_weight_without_a_place_in_the_original_layout_is_refused_by_name() -> None:
    unet = ["conv_in.weight", "down_blocks.0.resnets.0.norm1.weight", "up_blocks.0.resnets.0.norm1.weight",
            "up_blocks.0.resnets.1.norm1.weight", "class_embedding.linear_1.weight"]
    with pytest.raises(JaxboothError, match="class_embedding.linear_1.weight"):
        keys.unet_keys(unet)
    with pytest.raises(JaxboothError, match="encoder.extra.weight"):
        keys.vae_keys(["encoder.conv_in.weight", "encoder.extra.weight"])


# ------------------------------------------------------------------ round trips of pipelines


def test_sd1_pipeline_round_trips_through_from_single_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = single_file.export(tiny_model_dir, tmp_path / "sd1.safetensors", "fp32")
    assert header_dtypes(path) == {"F32"}
    assert metadata(path)["jaxbooth.family"] == "sd1"
    names = read_header(path)
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "model.diffusion_model.input_blocks.0.0.weight" in names
    assert names["first_stage_model.encoder.mid.attn_1.q.weight"]["shape"][-2:] == [1, 1]  # a 1x1 conv, as LDM
    assert_round_trip(path, tiny_model_dir, {name: tiny_model_dir / name for name in ("unet", "vae", "text_encoder")})


def test_sd2_openclip_pipeline_round_trips_through_from_single_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An SD 2.x-style pipeline (OpenCLIP's GELU text encoder): cond_stage_model.model.*, fused in_proj."""
    sd2 = tmp_path / "sd2"
    shutil.copytree(tiny_model_dir, sd2)
    config = json.loads((sd2 / "text_encoder" / "config.json").read_text())
    (sd2 / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    scheduler = json.loads((sd2 / "scheduler" / "scheduler_config.json").read_text())
    (sd2 / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler,
                                                                         "prediction_type": "v_prediction"}))
    path = single_file.export(sd2, None, "fp32")
    assert path == sd2 / "sd2.safetensors"
    assert (metadata(path)["modelspec.architecture"], metadata(path)["modelspec.prediction_type"]) == (
        "stable-diffusion-v2-512", "v")
    names = read_header(path)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in names
    assert names["v_pred"]["shape"] == [0]  # the marker ComfyUI reads for v-prediction
    assert_round_trip(path, sd2, {name: sd2 / name for name in ("unet", "vae", "text_encoder")})


def write_sdxl_pipeline(out: Path) -> Path:
    """The tiny SDXL pipeline of tests/_sdxl_pipeline.py with a wider second encoder (48 vs 32): with equal widths
    diffusers' reader cannot tell the two CLIP layouts apart and loads the first into both."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tests import _sdxl_pipeline as tiny

    tiny.write_sdxl_pipeline(out)
    torch.manual_seed(1)
    config = json.loads((out / "text_encoder" / "config.json").read_text())
    wide = {**tiny.CLIP, "hidden_size": 48, "num_attention_heads": 4}
    special = {key: config[key] for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    shutil.rmtree(out / "text_encoder_2")
    CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=tiny.PROJECTION_DIM, **wide, **special)
                                ).save_pretrained(out / "text_encoder_2")
    shutil.rmtree(out / "unet")
    UNet2DConditionModel(**{**tiny.UNET, "cross_attention_dim": tiny.CLIP["hidden_size"] + 48}
                         ).save_pretrained(out / "unet")
    return out


def test_sdxl_pipeline_round_trips_and_fp16_is_the_default(tmp_path: Path) -> None:
    sdxl = write_sdxl_pipeline(tmp_path / "sdxl")
    path = single_file.export(sdxl, tmp_path / "xl.safetensors", "fp32")
    names = read_header(path)
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in names
    assert names["conditioner.embedders.1.model.text_projection"]["shape"] == [48, 32]  # OpenCLIP's [width, proj]
    assert "model.diffusion_model.label_emb.0.0.weight" in names
    assert metadata(path)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert_round_trip(path, sdxl, {name: sdxl / name for name in ("unet", "vae", "text_encoder", "text_encoder_2")})
    half = single_file.export(sdxl, tmp_path / "half.safetensors")
    assert header_dtypes(half) == {"F16"} and metadata(half)["jaxbooth.precision"] == "fp16"
    assert set(read_header(half)) == set(names)


# ------------------------------------------------------------------ a LoRA output: merged into its base


def test_a_lora_output_is_merged_into_its_recorded_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    from jaxbooth.lora.files import LORA_WEIGHTS_NAME, write_lora_file
    from jaxbooth.lora.layers import LoraLayer
    from jaxbooth.lora.merge import merge_into_state_dict
    from jaxbooth.lora.settings import AdapterSettings

    unet = read_component_weights(tiny_model_dir / "unet")
    target = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    out_features, in_features = unet[f"{target}.weight"].shape
    rng = np.random.default_rng(0)
    layer = LoraLayer(down=rng.normal(size=(4, in_features)).astype(np.float32),
                      up=rng.normal(size=(out_features, 4)).astype(np.float32), alpha=4.0)
    lora = tmp_path / "lora-run"
    write_lora_file(lora / LORA_WEIGHTS_NAME, {"unet": {target: layer}}, AdapterSettings())
    (lora / "jaxbooth_run.yaml").write_text(f"model:\n  pretrained_model_name_or_path: {tiny_model_dir}\n")
    assert main(["export", "--single-file", str(lora), "--save_precision", "fp32"]) == 0
    path = lora / "lora-run.safetensors"
    assert metadata(path)["jaxbooth.lora_merged"] == LORA_WEIGHTS_NAME
    merged = merge_into_state_dict(unet, {target: layer})
    assert_round_trip(path, tiny_model_dir, {})  # loads
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    to_original = keys.unet_keys(list(unet))
    assert np.array_equal(tensors[keys.UNET_PREFIX + to_original[f"{target}.weight"]], merged[f"{target}.weight"])
    assert not np.array_equal(merged[f"{target}.weight"], unet[f"{target}.weight"])


# ------------------------------------------------------------------ bad input: one error, no traceback


def export_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_bad_inputs_are_one_clear_error(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "no model_index.json (a pipeline)" in export_error(capsys, "--single-file", str(tmp_path))
    assert "does not exist" in export_error(capsys, "--single-file", str(tmp_path / "nothing"))
    broken = tmp_path / "no-vae"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    assert "no vae/" in export_error(capsys, "--single-file", str(broken))
    assert "name the file *.safetensors" in export_error(capsys, "--single-file", str(tiny_model_dir), "--out",
                                                         str(tmp_path / "model.ckpt"))
    deepfloyd = tmp_path / "if"
    deepfloyd.mkdir()
    (deepfloyd / "model_index.json").write_text(json.dumps({"_class_name": "IFPipeline"}))
    assert "DeepFloyd IF has no single-file checkpoint form" in export_error(capsys, "--single-file", str(deepfloyd))


def test_train_refuses_save_single_file_for_deepfloyd_if_before_training(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--backend=torch", "--model_family=deepfloyd_if", "--save_single_file",
                 "--output_dir=unused"]) == 2
    assert "DeepFloyd IF has no single-file checkpoint form" in capsys.readouterr().err


# ------------------------------------------------------------------ one short run per backend


def train_with_single_file(backend: str, model_dir: Path, out: Path, *extra: str) -> Path:
    assert main(["train", f"--backend={backend}", f"--pretrained_model_name_or_path={model_dir}",
                 f"--output_dir={out}", "--instance_prompt=a photo of sks toy", "--max_train_steps=1",
                 "--resolution=32", "--checkpointing_steps=1", "--seed=0", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def jax_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_with_single_file("jax", tiny_model_dir, tmp_path_factory.mktemp("jax") / "jax-run",
                                  "--save_single_file", "--save_precision=fp32")


@pytest.fixture(scope="module")
def torch_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trains the text encoder but leaves it out of the pipeline: the single file takes the base's."""
    pytest.importorskip("torch")
    return train_with_single_file("torch", tiny_model_dir, tmp_path_factory.mktemp("torch") / "torch-run",
                                  "--save_single_file", "--save_precision=fp32", "--train_text_encoder",
                                  "--skip_save_text_encoder")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_run_writes_the_single_file_and_its_checkpoint_exports(backend: str, tiny_model_dir: Path,
                                                                  request: pytest.FixtureRequest) -> None:
    out: Path = request.getfixturevalue(f"{backend}_run")
    path = out / f"{out.name}.safetensors"
    assert header_dtypes(path) == {"F32"}
    meta = metadata(path)
    assert (meta["jaxbooth.steps"], meta["jaxbooth.source"], meta["jaxbooth.base_model"]) == (
        "1", "output", str(tiny_model_dir))
    assert f"`{out.name}.safetensors`" in (out / "README.md").read_text()
    text_encoder = tiny_model_dir if backend == "torch" else out  # --skip_save_text_encoder: the base's
    assert_round_trip(path, tiny_model_dir, {"unet": out / "unet", "vae": out / "vae",
                                             "text_encoder": text_encoder / "text_encoder"})
    checkpoint = out / "checkpoint-1"
    assert main(["export", "--single-file", str(checkpoint), "--save_precision=fp32"]) == 0
    exported = checkpoint / f"{out.name}-step1.safetensors"
    assert metadata(exported)["jaxbooth.source"] == "checkpoint"
    trained_te = checkpoint if backend == "torch" else tiny_model_dir  # the checkpoint holds what trained
    assert_round_trip(exported, tiny_model_dir, {"unet": checkpoint / "unet", "vae": tiny_model_dir / "vae",
                                                 "text_encoder": trained_te / "text_encoder"})
