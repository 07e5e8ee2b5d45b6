"""LoRA on the torch backend (peft), as diffusers' train_dreambooth_lora.py: adapters, init, files, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxbooth.checkpoints import MARKER
from jaxbooth.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, AdapterSettings, is_target
from tests.torch_backend._helpers import metrics

pytest.importorskip("peft")

LORA_ARGS = ("--backend=torch", "--resolution=64", "--train_batch_size=1", "--learning_rate=1e-3",
             "--lr_warmup_steps=0", "--seed=0", "--report_to=none", "--log_every_steps=1", "--rank=4")
WEIGHTS = "pytorch_lora_weights.safetensors"


def run_lora(model_dir: Path, out: Path, *extra: str, script: str = "train_dreambooth_lora.py") -> int:
    """``jaxbooth train train_dreambooth_lora.py --backend=torch ...`` in this process, through the CLI
    (``script=""``: ``jaxbooth train --use_lora ...``)."""
    from jaxbooth.cli import main

    return main(["train", *([script] if script else ["--use_lora"]), f"--pretrained_model_name_or_path={model_dir}",
                 f"--output_dir={out}", *LORA_ARGS, *extra])


def lora_file(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / WEIGHTS)


def load_models(model_dir: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"),
            CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder"))


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Runs train.run_loop for real and keeps the Trainer, to inspect the models afterwards."""
    from jaxbooth.torch_backend import train

    seen: dict = {}
    real_loop = train.run_loop

    def keep(trainer, start_step):
        seen["trainer"] = trainer
        return real_loop(trainer, start_step)

    monkeypatch.setattr(train, "run_loop", keep)
    return seen


# --- adapters in memory ---------------------------------------------------------------------------------------------

def test_only_adapters_train_start_from_the_shared_init_and_leave_the_output_unchanged(tiny_model_dir: Path) -> None:
    from jaxbooth import spec as spec_lib
    from jaxbooth.torch_backend import lora, optim

    unet, text_encoder = load_models(tiny_model_dir)
    sample, timesteps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    hidden = torch.randn(1, 77, text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(77)[None] % 50
    with torch.no_grad():
        base_out, base_text = unet(sample, timesteps, hidden).sample, text_encoder(ids)[0]
    base_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    linear = {model: {p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
              for model in (unet, text_encoder)}
    settings = AdapterSettings(rank=4, alpha=8.0, train_text_encoder=True)
    lora.attach(unet, text_encoder, settings, seed=3, dtype=torch.float32)

    for component, model, targets in (("unet", unet, UNET_TARGETS), ("text_encoder", text_encoder,
                                                                       TEXT_ENCODER_TARGETS)):
        layers = lora.adapted_layers(model)
        assert layers and all(is_target(path, targets) for path in layers)
        # every target Linear is adapted
        assert {p.removeprefix(lora.path_prefix(model)) for p in layers} == {
            p for p in linear[model] if is_target(p, targets)}
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
        for path, layer in layers.items():
            init = settings.initial_layer(component, path, lora.base_weight(layer), seed=3)
            np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), init.down)
            assert not layer.lora_B["default"].weight.any(), path
            assert layer.scaling["default"] == 2.0  # alpha / rank reached peft
    assert "text_model.encoder.layers.0.self_attn.q_proj" in lora.adapted_layers(text_encoder)
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, timesteps, hidden).sample, base_out, rtol=0, atol=1e-5)
        torch.testing.assert_close(text_encoder(ids)[0], base_text, rtol=0, atol=1e-5)
    for key, value in unet.state_dict().items():  # the base weights themselves are untouched
        if ".lora_" not in key:
            assert torch.equal(value, base_weights[key.replace(".base_layer", "")]), key

    spec = spec_lib.load_spec(["--use_lora", "--train_text_encoder"])
    groups = optim.param_groups(spec, unet, text_encoder, 1)
    in_optimizer = {id(p) for group in groups for p in group["params"]}
    adapters = {id(p) for model in (unet, text_encoder) for p in model.parameters() if ".lora_" in
                next(n for n, q in model.named_parameters() if q is p)}
    assert in_optimizer == adapters


def test_dora_magnitudes_start_at_the_row_norms(tiny_model_dir: Path) -> None:
    from jaxbooth.torch_backend import lora

    unet, _ = load_models(tiny_model_dir)
    sample, timesteps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10])
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = unet(sample, timesteps, hidden).sample
    lora.attach(unet, None, AdapterSettings(rank=2, alpha=2.0, use_dora=True), seed=0, dtype=torch.float32)
    layers = lora.adapted_layers(unet)
    for layer in layers.values():
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert magnitude.requires_grad
        torch.testing.assert_close(magnitude, layer.get_base_layer().weight.norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, timesteps, hidden).sample, base_out, rtol=0, atol=1e-5)
    state = lora.export_lora_state(unet, None, AdapterSettings(rank=2, alpha=2.0, use_dora=True))
    assert set(state) == {"unet"} and all(layer.magnitude is not None for layer in state["unet"].values())


def test_base_in_the_weight_dtype_adapters_in_float32(tiny_model_dir: Path) -> None:
    from jaxbooth.torch_backend import lora

    unet, text_encoder = load_models(tiny_model_dir)
    lora.attach(unet, text_encoder, AdapterSettings(train_text_encoder=True), seed=0, dtype=torch.bfloat16)
    for model in (unet, text_encoder):
        dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
        assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}


def test_loading_a_state_checks_its_layers(tiny_model_dir: Path) -> None:
    from jaxbooth.errors import JaxboothError
    from jaxbooth.torch_backend import lora

    unet, _ = load_models(tiny_model_dir)
    settings = AdapterSettings(rank=2, alpha=2.0)
    lora.attach(unet, None, settings, seed=0, dtype=torch.float32)
    state = lora.export_lora_state(unet, None, settings)
    changed = {path: type(layer)(down=layer.down, up=layer.up + 1, alpha=layer.alpha)
               for path, layer in state["unet"].items()}
    lora.load_lora_state({"unet": changed}, {"unet": unet})
    assert all(torch.equal(layer.lora_B["default"].weight, torch.ones_like(layer.lora_B["default"].weight))
               for layer in lora.adapted_layers(unet).values())
    with pytest.raises(JaxboothError, match="missing"):
        lora.load_lora_state({"unet": dict(list(changed.items())[1:])}, {"unet": unet}, source="ckpt")
    with pytest.raises(JaxboothError, match="--rank"):
        lora.load_lora_state({"unet": {p: type(x)(down=np.zeros((3, x.down.shape[1]), np.float32),
                                                  up=np.zeros((x.up.shape[0], 3), np.float32), alpha=2.0)
                                       for p, x in changed.items()}}, {"unet": unet})
    with pytest.raises(JaxboothError, match="--lora_alpha"):
        lora.load_lora_state({"unet": {p: type(x)(down=x.down, up=x.up, alpha=4.0) for p, x in changed.items()}},
                             {"unet": unet})
    with pytest.raises(JaxboothError, match="text_encoder"):
        lora.load_lora_state({"unet": changed}, {"unet": unet, "text_encoder": unet})


def test_unmatched_target_modules_are_refused(tiny_model_dir: Path) -> None:
    from jaxbooth.errors import JaxboothError
    from jaxbooth.torch_backend import lora

    unet, _ = load_models(tiny_model_dir)
    with pytest.raises(JaxboothError, match="lora_target_modules"):
        lora.attach(unet, None, AdapterSettings(unet_targets=("no_such_layer",)), seed=0, dtype=torch.float32)


# --- the CLI: train_dreambooth_lora.py --backend=torch ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """4 steps with text-encoder adapters, a checkpoint every 2; keeps the Trainer."""
    from jaxbooth.torch_backend import train

    out = tmp_path_factory.mktemp("torch-lora") / "out"
    seen: dict = {}
    real_loop = train.run_loop

    def keep(trainer, start_step):
        seen["trainer"] = trainer
        return real_loop(trainer, start_step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "run_loop", keep)
        assert run_lora(tiny_model_dir, out, "--max_train_steps=4", "--checkpointing_steps=2",
                        "--train_text_encoder") == 0
    return out, seen


def trained_adapters(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """component -> shared path -> lora_B weight of the Trainer's models."""
    from jaxbooth.torch_backend import lora

    models = {"unet": trainer.unet, "text_encoder": trainer.text_encoder}
    return {component: {path: layer.lora_B["default"].weight.detach().clone()
                        for path, layer in lora.adapted_layers(trainer.accelerator.unwrap_model(model)).items()}
            for component, model in models.items() if model is not None}


def loaded_adapters(folder: Path, model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """lora_B weights per layer after stock diffusers' ``load_lora_weights(folder)`` on the base pipeline."""
    from diffusers import StableDiffusionPipeline

    from jaxbooth.torch_backend import lora

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.load_lora_weights(folder)
    out = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        layers = lora.adapted_layers(model)
        if layers:
            out[component] = {path: next(iter(layer.lora_B.values())).weight.detach() for path, layer in layers.items()}
    return out


def test_output_is_a_lora_file_stock_diffusers_loads(trained: tuple[Path, dict], tiny_model_dir: Path) -> None:
    out, seen = trained
    keys = lora_file(out).keys()
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder"}
    assert not (out / "unet").exists() and not (out / "text_encoder").exists()  # adapters only, no pipeline
    assert (out / "README.md").is_file() and (out / "jaxbooth_run.yaml").is_file()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    trained_b, loaded_b = trained_adapters(seen["trainer"]), loaded_adapters(out, tiny_model_dir)
    assert loaded_b.keys() == trained_b.keys() == {"unet", "text_encoder"}
    for component in trained_b:
        assert loaded_b[component].keys() == trained_b[component].keys()
        assert all(trained_b[component][p].any() for p in trained_b[component]), f"{component} did not train"
        for path, up in trained_b[component].items():
            torch.testing.assert_close(loaded_b[component][path], up, rtol=0, atol=0, msg=path)


def test_checkpoint_holds_the_lora_file_and_state_only(trained: tuple[Path, dict], tiny_model_dir: Path) -> None:
    out, _ = trained
    ckpt = out / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([WEIGHTS, "state", MARKER])
    assert not list((ckpt / "state").glob("model*"))  # no copy of the frozen base
    assert json.loads((ckpt / MARKER).read_text())["step"] == 2
    assert loaded_adapters(ckpt, tiny_model_dir).keys() == {"unet", "text_encoder"}
    assert not torch.equal(lora_file(ckpt)[next(k for k in lora_file(ckpt) if ".up." in k)],
                           lora_file(out)[next(k for k in lora_file(ckpt) if ".up." in k)])


def test_resume_from_a_lora_checkpoint_equals_the_straight_run(trained: tuple[Path, dict], tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    """checkpoint-2 of the 4-step run, resumed to step 4: the same adapters and losses."""
    out, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    assert run_lora(tiny_model_dir, resumed, "--max_train_steps=4", "--checkpointing_steps=2",
                    "--train_text_encoder", "--resume_from_checkpoint=latest") == 0
    straight, again = lora_file(out), lora_file(resumed)
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=1e-6, msg=key)
    np.testing.assert_allclose([r["train/loss"] for r in metrics(resumed)],
                               [r["train/loss"] for r in metrics(out)][2:], rtol=1e-6)


def test_a_checkpoint_of_the_other_mode_is_refused(trained: tuple[Path, dict], tiny_model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from tests.torch_backend._helpers import run_train

    out = tmp_path / "mixed"
    shutil.copytree(trained[0] / "checkpoint-2", out / "checkpoint-2")
    assert run_train(tiny_model_dir, out, "--max_train_steps=3", "--train_text_encoder",
                     "--resume_from_checkpoint=latest") == 2
    assert "resume it with --use_lora" in capsys.readouterr().err
    (out / "checkpoint-2" / WEIGHTS).unlink()
    assert run_lora(tiny_model_dir, out, "--max_train_steps=3", "--train_text_encoder",
                    "--resume_from_checkpoint=latest") == 2
    assert f"no {WEIGHTS}" in capsys.readouterr().err


def test_dora_trains_validates_and_loads_in_diffusers(tiny_model_dir: Path, tmp_path: Path, captured: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``--use_lora --use_dora``: magnitudes train; validation samples the peft UNet between steps."""
    from jaxbooth.torch_backend import lora, validation

    monkeypatch.setattr(validation, "NUM_INFERENCE_STEPS", 2)
    out = tmp_path / "dora"
    assert run_lora(tiny_model_dir, out, "--max_train_steps=2", "--checkpointing_steps=100", "--use_dora",
                    "--lora_alpha=8", "--validation_prompt=a photo of sks toy", "--validation_steps=1",
                    "--num_validation_images=1", script="") == 0
    assert (out / "validation" / "step-1.png").is_file() and (out / "validation" / "step-2.png").is_file()
    assert "validation/step-2.png" in (out / "README.md").read_text()
    unet = captured["trainer"].accelerator.unwrap_model(captured["trainer"].unet)
    layers = lora.adapted_layers(unet)
    assert all(layer.use_dora["default"] and layer.scaling["default"] == 2.0 for layer in layers.values())
    moved = [not torch.allclose(layer.lora_magnitude_vector["default"].weight,
                                layer.get_base_layer().weight.norm(dim=1)) for layer in layers.values()]
    assert any(moved), "no DoRA magnitude trained"
    keys = lora_file(out).keys()
    assert {key.split(".")[0] for key in keys} == {"unet"}
    assert sum(key.endswith("lora_magnitude_vector") for key in keys) == len(layers)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(out)
    loaded = lora.adapted_layers(pipe.unet)
    assert loaded.keys() == layers.keys()
    for path, layer in loaded.items():
        assert next(iter(layer.use_dora.values())), path
        torch.testing.assert_close(next(iter(layer.lora_magnitude_vector.values())).weight,
                                   layers[path].lora_magnitude_vector["default"].weight, rtol=0, atol=0)


def test_lora_dropout_reaches_peft(trained: tuple[Path, dict], tiny_model_dir: Path, tmp_path: Path,
                                  captured: dict) -> None:
    """--lora_dropout=0.1: a Dropout(0.1) on every adapter's input; the default 0: none (peft's Identity)."""
    from jaxbooth.torch_backend import lora

    def dropouts(trainer) -> set:
        models = [trainer.accelerator.unwrap_model(m) for m in (trainer.unet, trainer.text_encoder)]
        return {(type(layer.lora_dropout["default"]).__name__, getattr(layer.lora_dropout["default"], "p", None))
                for model in models for layer in lora.adapted_layers(model).values()}

    assert dropouts(trained[1]["trainer"]) == {("Identity", None)}
    assert run_lora(tiny_model_dir, tmp_path / "out", "--max_train_steps=1", "--train_text_encoder",
                    "--lora_dropout=0.1") == 0
    assert dropouts(captured["trainer"]) == {("Dropout", 0.1)}


def test_memory_options_and_bf16_with_lora(tiny_model_dir: Path, tmp_path: Path, captured: dict,
                                           capsys: pytest.CaptureFixture) -> None:
    """Gradient checkpointing (UNet and text encoder), 8-bit Adam, SDPA and a bf16 base: every adapter
    trains; xFormers stays refused without CUDA."""
    pytest.importorskip("bitsandbytes")
    from jaxbooth.torch_backend import lora

    out = tmp_path / "memory"
    assert run_lora(tiny_model_dir, out, "--max_train_steps=2", "--checkpointing_steps=100", "--train_text_encoder",
                    "--gradient_checkpointing", "--use_8bit_adam", "--mixed_precision=bf16") == 0
    trainer = captured["trainer"]
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    text_encoder = trainer.accelerator.unwrap_model(trainer.text_encoder)
    assert unet.is_gradient_checkpointing and text_encoder.is_gradient_checkpointing
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    for model in (unet, text_encoder):
        layers = lora.adapted_layers(model).values()
        assert all(layer.lora_B["default"].weight.any() for layer in layers), "an adapter got no update"
        assert {(p.requires_grad, p.dtype) for p in model.parameters()} == {(True, torch.float32),
                                                                             (False, torch.bfloat16)}
    assert len(metrics(out)) == 2 and all(np.isfinite(r["train/loss"]) for r in metrics(out))
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert run_lora(tiny_model_dir, tmp_path / "xformers", "--max_train_steps=1",
                        "--enable_xformers_memory_efficient_attention") == 2
        assert "xformers" in capsys.readouterr().err.lower()
