"""The JAX load phase: refusals before any weight loads, the VAE override, the optimizer's param groups."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from jaxbooth import data
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import caches, loading, pretrained
from jaxbooth.jax_backend import train as train_lib
from jaxbooth.spec import load_spec_from_dict


def index_only_pipeline(folder: Path, class_name: str) -> Path:
    """A model folder with a model_index.json and nothing else: loading anything from it would fail."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "unet": ["diffusers", "x"]}))
    return folder


def test_if_pipeline_is_one_clear_error_before_anything_loads(tmp_path: Path) -> None:
    model = index_only_pipeline(tmp_path / "if", "IFPipeline")
    proc = subprocess.run([sys.executable, "-m", "jaxbooth", "train", "--backend=jax",
                           f"--pretrained_model_name_or_path={model}", f"--output_dir={tmp_path / 'out'}",
                           "--report_to=none", "--seed=0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for part in ("IFPipeline", str(model / "model_index.json"), "jax backend does not train", "--backend=torch"):
        assert part in proc.stderr, (part, proc.stderr[-3000:])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("class_name", ["IFPipeline", "IFSuperResolutionPipeline"])
def test_untrainable_pipelines_are_refused_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      class_name: str) -> None:
    model = index_only_pipeline(tmp_path / "model", class_name)

    def must_not_load(*args, **kwargs):
        raise AssertionError("a weight was loaded before the pipeline was refused")

    monkeypatch.setattr(pretrained, "load_pretrained", must_not_load)
    spec = load_spec_from_dict({"pretrained_model_name_or_path": str(model), "instance_data_dir": str(tmp_path),
                                "instance_prompt": "a photo of sks toy", "output_dir": str(tmp_path / "out")})
    with pytest.raises(JaxboothError, match=f"_class_name={class_name} .*does not train; use --backend=torch"):
        train_lib.train(spec)


def test_a_hub_if_repo_is_refused_after_fetching_model_index_json_only(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import jaxbooth.hub

    index_only = index_only_pipeline(tmp_path / "snapshot", "IFPipeline")
    calls = []

    def fake_resolve(name, **kwargs):
        calls.append(kwargs.get("subfolders"))
        return index_only

    monkeypatch.setattr(jaxbooth.hub, "resolve_model_dir", fake_resolve)
    spec = load_spec_from_dict({"pretrained_model_name_or_path": "DeepFloyd/IF-I-XL-v1.0"})
    with pytest.raises(JaxboothError, match="IFPipeline"):
        loading.resolve_model_paths(spec)
    assert calls == [[]], "weights were fetched before the pipeline class was checked"


@pytest.mark.parametrize(("class_name", "family", "fix"), [
    ("StableDiffusionPipeline", "sdxl", "use train_dreambooth_lora.py"),
    ("StableDiffusionXLPipeline", "sd", "set it to sdxl"),
])
def test_a_model_family_the_pipeline_is_not_is_refused_from_model_index_json(
        tmp_path: Path, class_name: str, family: str, fix: str) -> None:
    model = index_only_pipeline(tmp_path / "model", class_name)
    loading.refuse_untrainable_pipeline(model)  # auto: the class decides
    with pytest.raises(JaxboothError, match=f"_class_name={class_name} .*model_family={family}") as raised:
        loading.refuse_untrainable_pipeline(model, family)
    assert fix in str(raised.value) and str(model / "model_index.json") in str(raised.value)


def test_unknown_pipeline_class_and_missing_index_are_refused(tmp_path: Path) -> None:
    with pytest.raises(JaxboothError, match="StableDiffusionInpaintPipeline"):
        loading.refuse_untrainable_pipeline(index_only_pipeline(tmp_path / "inpaint", "StableDiffusionInpaintPipeline"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(JaxboothError, match="model_index.json: not found"):
        loading.refuse_untrainable_pipeline(tmp_path / "bare")


def test_lora_dropout_is_refused_by_the_jax_backend_naming_the_fix() -> None:
    loading.refuse_unsupported_options(load_spec_from_dict({"use_lora": True}))  # LoRA itself trains on jax
    with pytest.raises(JaxboothError, match="--lora_dropout=0.1") as raised:
        loading.refuse_unsupported_options(load_spec_from_dict({"use_lora": True, "lora_dropout": 0.1}))
    assert "--lora_dropout=0" in str(raised.value) and "--backend=torch" in str(raised.value)


def test_torch_only_options_are_refused_by_the_jax_backend_itself() -> None:
    with pytest.raises(JaxboothError, match="--use_8bit_adam"):
        loading.refuse_unsupported_options(load_spec_from_dict({"use_8bit_adam": True}))


# ----------------------------------------------------------------------------- VAE override


def rescaled_vae_pipeline(tiny_model_dir: Path, out: Path) -> Path:
    """A pipeline-style folder whose vae/ is the tiny VAE with its encoder input conv doubled."""
    shutil.copytree(tiny_model_dir / "vae", out / "vae")
    weights = out / "vae" / "diffusion_pytorch_model.safetensors"
    state = safetensors.numpy.load_file(weights)
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"] * 2.0
    safetensors.numpy.save_file(state, weights, metadata={"format": "pt"})
    return out


def test_vae_override_by_its_sdxl_name_is_loaded_and_cached(tiny_model_dir: Path, tmp_path: Path) -> None:
    override = rescaled_vae_pipeline(tiny_model_dir, tmp_path / "other-vae")
    base_spec = load_spec_from_dict({"pretrained_model_name_or_path": str(tiny_model_dir), "resolution": 64,
                                     "center_crop": True})
    spec = load_spec_from_dict({**base_spec.flat(), "pretrained_vae_model_name_or_path": str(override)})
    paths = loading.resolve_model_paths(spec)
    assert paths.vae_dir == override.resolve() and paths.model_dir == tiny_model_dir.resolve()
    dataset = data.make_dreambooth_dataset(data.example_instance_dir(), "a photo of sks toy")
    latents = []
    for s in (base_spec, spec):
        models = loading.load_models(s, loading.resolve_model_paths(s))
        mean, _, _ = caches.encode_latent_cache(models, dataset, resolution=64, center_crop=True, random_flip=False,
                                                seed=0)
        latents.append(mean)
    assert models.vae_dir == override.resolve()
    assert latents[0].shape == latents[1].shape
    assert not np.allclose(latents[0], latents[1], atol=1e-3), "the override VAE did not change the cached latents"


# ----------------------------------------------------------------------------- optimizer groups


def test_trainer_optimizer_gives_the_text_encoder_its_own_lr_and_weight_decay() -> None:
    spec = load_spec_from_dict({"train_text_encoder": True, "learning_rate": 0.1, "adam_weight_decay": 0.2,
                                "text_encoder_lr": 0.05, "adam_weight_decay_text_encoder": 0.5,
                                "lr_warmup_steps": 0, "lr_scheduler": "constant"})
    run = train_lib.RunInputs(spec, Path("."), Path("."), dataset=None, seed=0, max_train_steps=10)
    tx, schedule = train_lib.make_optimizer(run)
    assert float(schedule(0)) == pytest.approx(0.1)  # the logged lr is the UNet group's
    params = {"unet": {"w": jnp.full((3,), 2.0)}, "text_encoder": {"w": jnp.full((2,), 2.0)}}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["unet"]["w"], 2.0 * (1 - 0.1 * 0.2), rtol=1e-6)
    np.testing.assert_allclose(new["text_encoder"]["w"], 2.0 * (1 - 0.05 * 0.5), rtol=1e-6)


def test_loading_a_pipeline_never_imports_torch() -> None:
    """The JAX path loads the models (tokenizer included) without torch, even where torch is installed:
    transformers' AutoTokenizer imports torch, so only the torch-only IF (T5) folders may use it."""
    script = ("import sys\n"
              "from jaxbooth.spec import load_spec_from_dict\n"
              "from jaxbooth.jax_backend import loading\n"
              "from jaxbooth.tiny import builtin_tiny_model\n"
              "spec = load_spec_from_dict({'instance_prompt': 'a sks dog', 'output_dir': 'unused',\n"
              "                            'pretrained_model_name_or_path': str(builtin_tiny_model())})\n"
              "models = loading.load_models(spec, loading.resolve_model_paths(spec))\n"
              "assert models.tokenizer('a sks dog').input_ids\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
