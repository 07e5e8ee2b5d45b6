"""`jaxbooth train train_dreambooth_lora.py --backend=jax` end to end on the tiny pipeline: the LoRA
file and checkpoints, exact resume, the loss options, fsdp, and diffusers loading what JAX trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from jaxbooth.cli import main

LORA_FILE = "pytorch_lora_weights.safetensors"
ARGS = ["--backend=jax", "--resolution=64", "--train_batch_size=1", "--lr_warmup_steps=0", "--seed=0",
        "--report_to=none", "--log_every_steps=1"]


def lora_train(tiny: Path, out: Path, *extra: str) -> int:
    return main(["train", "train_dreambooth_lora.py", f"--pretrained_model_name_or_path={tiny}",
                 f"--output_dir={out}", *ARGS, *extra])


def lora_tensors(folder: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(folder / LORA_FILE)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "out"
    assert lora_train(tiny_model_dir, out, "--max_train_steps=4", "--checkpointing_steps=2",
                      "--save_single_file") == 0
    return out


def test_save_single_file_writes_the_base_with_the_lora_merged(trained: Path, tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    """The one-file form A1111/ComfyUI load: the base's weights but the adapted attention projections."""
    from safetensors.numpy import load_file

    from jaxbooth import single_file

    written = list(trained.glob("*.safetensors"))
    written = [p for p in written if p.name != LORA_FILE]
    assert len(written) == 1, written
    merged = load_file(written[0])
    base = load_file(single_file.export(tiny_model_dir, tmp_path / "base.safetensors", None))
    assert merged.keys() == base.keys()
    changed = [key for key in merged if not np.array_equal(merged[key], base[key])]
    assert changed and all(key.startswith("model.diffusion_model.") and ".attn" in key for key in changed), changed


def test_lora_run_writes_the_lora_file_and_checkpoints(trained: Path) -> None:
    assert (trained / "README.md").is_file() and (trained / "jaxbooth_run.yaml").is_file()
    assert not (trained / "unet").exists() and not (trained / "model_index.json").exists()
    final = lora_tensors(trained)
    assert final and all(key.startswith("unet.") for key in final), sorted(final)[:5]
    assert any("to_out.0" in key for key in final)
    ups = [value for key, value in final.items() if ".up." in key or "lora_B" in key]
    assert ups and all(np.abs(up).max() > 0 for up in ups), "the adapters did not train"
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for name in ("checkpoint-2", "checkpoint-4"):
        assert (trained / name / LORA_FILE).is_file() and not (trained / name / "unet").exists()
    at_4, at_2 = lora_tensors(trained / "checkpoint-4"), lora_tensors(trained / "checkpoint-2")
    assert at_4.keys() == final.keys() == at_2.keys()
    for key in final:
        np.testing.assert_array_equal(at_4[key], final[key], err_msg=key)
    assert any(not np.array_equal(at_2[key], final[key]) for key in final)


def test_lora_resume_continues_exactly(tiny_model_dir: Path, trained: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, then resume from checkpoint-2 for 2 more, bit for bit."""
    out = tmp_path / "resumed"
    assert lora_train(tiny_model_dir, out, "--max_train_steps=2", "--checkpointing_steps=2") == 0
    assert lora_train(tiny_model_dir, out, "--max_train_steps=4", "--checkpointing_steps=2",
                      "--resume_from_checkpoint=latest") == 0
    straight, resumed = lora_tensors(trained), lora_tensors(out)
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    assert losses(out)[-2:] == losses(trained)[-2:]


def test_dora_text_encoder_and_the_loss_options(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--train_text_encoder adds text_encoder. adapters; DoRA, Min-SNR, offset noise, prior preservation and
    accumulation train with them (bf16 + remat and validation on merged params: test_lora.py)."""
    from jaxbooth.data import example_class_dir

    out = tmp_path / "options"
    assert main(["train", "--use_lora", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={out}",
                 *ARGS, "--max_train_steps=2", "--checkpointing_steps=100", "--train_text_encoder", "--use_dora",
                 "--rank=2", "--lora_alpha=3", "--snr_gamma=5.0", "--offset_noise", "--gradient_accumulation_steps=2",
                 "--with_prior_preservation", f"--class_data_dir={example_class_dir()}",
                 "--class_prompt=a photo of a toy", "--num_class_images=5"]) == 0
    tensors = lora_tensors(out)
    prefixes = {key.split(".")[0] for key in tensors}
    assert prefixes == {"unet", "text_encoder"}
    magnitudes = [key for key in tensors if "magnitude" in key]
    assert any(k.startswith("text_encoder.") for k in magnitudes) and any(k.startswith("unet.") for k in magnitudes)
    text_ups = [v for k, v in tensors.items() if k.startswith("text_encoder.") and ("lora_B" in k or ".up." in k)]
    assert text_ups and all(np.abs(v).max() > 0 for v in text_ups)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["train/prior_loss"] > 0 for r in records)


def test_lora_dropout_is_refused_on_jax_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "never"
    assert main(["train", "train_dreambooth_lora.py", "--backend=jax", "--lora_dropout=0.1",
                 f"--output_dir={out}", "--pretrained_model_name_or_path=/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert "lora_dropout" in err and "Traceback" not in err
    assert not out.exists()


FSDP_RUNNER = """
import json, sys
import jax
import numpy as np
import jaxbooth.jax_backend.mesh as mesh_lib
mesh_lib.FSDP_MIN_BYTES = 1024  # shard even the tiny model's params over fsdp
from jaxbooth.jax_backend import train
from jaxbooth.cli import main

seen = {}
run_loop = train.run_loop

def spy(run, compiled, state, frozen, *args, **kwargs):
    def specs(tree):
        return {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    seen["before"] = specs(frozen["base"])
    seen["compiled"] = {jax.tree_util.keystr(p): str(s.spec) for p, s in
                        jax.tree_util.tree_leaves_with_path(compiled.grads.input_shardings[0][1]["base"])}
    want = mesh_lib.param_shardings(frozen["base"], mesh_lib.make_mesh((2, 4)))
    seen["rules"] = specs(jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       frozen["base"], want))
    seen["adapters"] = specs(state.params)
    state = run_loop(run, compiled, state, frozen, *args, **kwargs)
    seen["after"] = specs(frozen["base"])
    return state

train.run_loop = spy
code = main(sys.argv[2:])
json.dump(seen, open(sys.argv[1], "w"))
sys.exit(code)
"""


def test_fsdp_lora_keeps_the_base_sharded_and_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, record = tmp_path / "fsdp", tmp_path / "shardings.json"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    args = ["train", "train_dreambooth_lora.py", f"--pretrained_model_name_or_path={tiny_model_dir}",
            f"--output_dir={out}", *ARGS, "--max_train_steps=2", "--checkpointing_steps=100", "--fsdp_parallelism=4"]
    proc = subprocess.run([sys.executable, "-c", FSDP_RUNNER, str(record), *args], capture_output=True, text=True,
                          env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(record.read_text())
    sharded = [key for key, spec in seen["before"].items() if "fsdp" in spec]
    assert len(sharded) > 10, seen["before"]
    assert seen["before"] == seen["rules"] == seen["after"] == seen["compiled"]
    assert "mesh {'data': 2, 'fsdp': 4}" in proc.stderr
    assert all(np.isfinite(losses(out)))
    ups = [v for k, v in lora_tensors(out).items() if "lora_B" in k or ".up." in k]
    assert ups and all(np.abs(v).max() > 0 for v in ups)


@pytest.mark.requires_torch
@pytest.mark.parametrize("use_dora", [False, True])
def test_diffusers_loads_jax_adapters_to_the_same_outputs(tiny_model_dir: Path, tmp_path: Path,
                                                          use_dora: bool) -> None:
    """Adapters in JAX -> pytorch_lora_weights.safetensors -> stock diffusers load_lora_weights: the UNet
    and text encoder match the Flax models on the merged params (alpha != rank, so the metadata counts)."""
    pytest.importorskip("torch")
    import jax
    import torch
    from diffusers import StableDiffusionPipeline

    from jaxbooth.jax_backend import lora as lora_lib
    from jaxbooth.jax_backend import pretrained
    from jaxbooth.jax_backend.models import clip as clip_lib
    from jaxbooth.jax_backend.models import unet as unet_lib
    from jaxbooth.lora import AdapterSettings
    from jaxbooth.lora.files import write_lora_file

    settings = AdapterSettings(rank=2, alpha=5.0, use_dora=use_dora, train_text_encoder=True)
    unet_config, _, unet_params = pretrained.load_pretrained(tiny_model_dir, "unet")
    text_config, _, text_params = pretrained.load_pretrained(tiny_model_dir, "text_encoder")
    base = {"unet": unet_params, "text_encoder": text_params}
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: (x * (1 + 0.2 * rng.standard_normal(x.shape)) + 0.1 * rng.standard_normal(
        x.shape)).astype(np.float32), lora_lib.init_adapters(base, settings, seed=0))
    write_lora_file(tmp_path / LORA_FILE, lora_lib.to_lora_state(adapters, settings), settings)
    merged = lora_lib.merge_components(base, adapters, settings.scale)

    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    timestep = np.array([10, 700])
    text = clip_lib.make_text_encoder(text_config)
    unet = unet_lib.FlaxUNet2DConditionModel(unet_config)

    @jax.jit
    def forward(params: dict, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden = text.apply({"params": params["text_encoder"]}, ids).last_hidden_state
        return hidden, unet.apply({"params": params["unet"]}, sample.transpose(0, 2, 3, 1), timestep, hidden)

    def flax_outputs(params: dict) -> tuple[np.ndarray, np.ndarray]:
        hidden, out = forward(params, ids)
        return np.asarray(hidden), np.asarray(out).transpose(0, 3, 1, 2)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(tmp_path)
    ids = pipe.tokenizer(["a photo of sks toy", "toy"], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="np").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(torch.tensor(ids))[0]
        out = pipe.unet(torch.tensor(sample), torch.tensor(timestep), hidden).sample.numpy()
    ours_hidden, ours_out = flax_outputs(merged)
    base_hidden, base_out = flax_outputs(base)

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    errors = rel(ours_hidden, hidden.numpy()), rel(ours_out, out)
    print(f"relative errors (text encoder, unet): {errors}")
    assert max(errors) <= 1e-4, errors
    assert rel(base_hidden, hidden.numpy()) > 1e-2 and rel(base_out, out) > 1e-2  # the adapters do act
