"""The torch and JAX backends train the same objective.

1. ``denoising_loss`` of each backend, on the same tiny model, latents, noise, timesteps and
   text embeddings, agrees to 1e-4 relative: with and without prior preservation and Min-SNR,
   for epsilon and v_prediction schedules.
2. A few real training steps of each backend on the same data give losses of the same
   size that fall together.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
jax = pytest.importorskip("jax")

from jaxbooth import diffusion  # noqa: E402

BATCH = 4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two OpenMP threads on a shared 2-core CI box make torch CPU ops ~20x slower (spinning)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def v_prediction_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with a v_prediction scheduler config (weights shared by symlink)."""
    out = tmp_path_factory.mktemp("vpred") / "tiny-v"
    out.mkdir()
    for child in tiny_model_dir.iterdir():
        if child.name != "scheduler":
            (out / child.name).symlink_to(child)
    config = json.loads((tiny_model_dir / diffusion.SCHEDULER_CONFIG).read_text())
    config["prediction_type"] = "v_prediction"
    (out / "scheduler").mkdir()
    (out / diffusion.SCHEDULER_CONFIG).write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def shared_batch(tiny_model_dir: Path) -> dict[str, np.ndarray]:
    """One batch both backends see: NCHW latents and noise, timesteps across the schedule, embeddings."""
    rng = np.random.default_rng(0)
    unet_config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    channels, size = unet_config["in_channels"], unet_config["sample_size"]
    return {
        "latents": rng.standard_normal((BATCH, channels, size, size)).astype(np.float32) * 0.8,
        "noise": rng.standard_normal((BATCH, channels, size, size)).astype(np.float32),
        "timesteps": np.array([3, 250, 600, 999], np.int32),
        "hidden": rng.standard_normal((BATCH, 77, unet_config["cross_attention_dim"])).astype(np.float32),
    }


@functools.cache
def torch_unet(model_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()


@functools.cache
def jax_unet(model_dir: Path):
    """(jitted apply, params): the UNet compiles once per model folder, the loss math runs eagerly."""
    from jaxbooth.jax_backend.models.unet import FlaxUNet2DConditionModel
    from jaxbooth.jax_backend.pretrained import load_pretrained

    config, _, params = load_pretrained(model_dir, "unet")
    return jax.jit(FlaxUNet2DConditionModel(config).apply), params


def added_conditions(batch: dict, to_array) -> dict | None:
    """SDXL's added conditioning of the batch (its pooled embeds and time ids), None for SD."""
    return {key: to_array(batch[key]) for key in ("text_embeds", "time_ids")} if "time_ids" in batch else None


def torch_loss(model_dir: Path, batch: dict, **options) -> tuple[float, float, float]:
    from jaxbooth.torch_backend.loss import LossOptions, denoising_loss

    schedule = diffusion.load_schedule(model_dir)
    with torch.no_grad():
        loss, aux = denoising_loss(torch_unet(model_dir), torch.from_numpy(batch["latents"]),
                                   torch.from_numpy(batch["noise"]), torch.from_numpy(batch["timesteps"]).long(),
                                   torch.from_numpy(batch["hidden"]), schedule.as_tables().map(torch.from_numpy),
                                   LossOptions(prediction_type=schedule.prediction_type, **options),
                                   added_cond_kwargs=added_conditions(batch, torch.from_numpy))
    return float(loss), float(aux["instance_loss"]), float(aux["prior_loss"])


def jax_loss(model_dir: Path, batch: dict, **options) -> tuple[float, float, float]:
    from jaxbooth.jax_backend.train_step import LossOptions, denoising_loss

    schedule = diffusion.load_schedule(model_dir)
    unet_apply, params = jax_unet(model_dir)
    nhwc = (0, 2, 3, 1)
    loss, aux = denoising_loss(
        params, jax.numpy.asarray(batch["latents"].transpose(nhwc)), jax.numpy.asarray(batch["noise"].transpose(nhwc)),
        jax.numpy.asarray(batch["timesteps"]), jax.numpy.asarray(batch["hidden"]), unet_apply=unet_apply,
        tables=schedule.as_tables().map(jax.numpy.asarray),
        options=LossOptions(prediction_type=schedule.prediction_type, **options),
        added_cond_kwargs=added_conditions(batch, jax.numpy.asarray))
    return float(loss), float(aux["instance_loss"]), float(aux["prior_loss"])


CASES = {
    "plain": {},
    "prior": {"with_prior_preservation": True, "prior_loss_weight": 0.7},
    "snr": {"snr_gamma": 5.0},
    "prior+snr": {"with_prior_preservation": True, "snr_gamma": 5.0},
}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", list(CASES))
def test_first_step_loss_matches_jax_backend(case: str, prediction: str, tiny_model_dir: Path,
                                             v_prediction_model_dir: Path, shared_batch: dict) -> None:
    model_dir = tiny_model_dir if prediction == "epsilon" else v_prediction_model_dir
    assert diffusion.load_schedule(model_dir).prediction_type == prediction
    got = torch_loss(model_dir, shared_batch, **CASES[case])
    want = jax_loss(model_dir, shared_batch, **CASES[case])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert got[0] > 0
    if "with_prior_preservation" in CASES[case]:
        assert got[2] > 0
        np.testing.assert_allclose(got[0], got[1] + CASES[case].get("prior_loss_weight", 1.0) * got[2], rtol=1e-6)


@pytest.fixture(scope="module")
def sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._sdxl_pipeline import write_sdxl_pipeline

    return write_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.mark.parametrize("case", ["plain", "prior+snr"])
def test_sdxl_first_step_loss_matches_jax_backend(case: str, sdxl_model_dir: Path) -> None:
    """SDXL: the same loss from both backends' UNet calls with the added conditioning (pooled embeds and
    time ids), on a stock diffusers SDXL UNet; and the conditioning matters (it is not dropped)."""
    rng = np.random.default_rng(1)
    config = json.loads((sdxl_model_dir / "unet" / "config.json").read_text())
    channels, size = config["in_channels"], config["sample_size"]
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    batch = {"latents": rng.standard_normal((BATCH, channels, size, size)).astype(np.float32) * 0.8,
             "noise": rng.standard_normal((BATCH, channels, size, size)).astype(np.float32),
             "timesteps": np.array([3, 250, 600, 999], np.int32),
             "hidden": rng.standard_normal((BATCH, 77, config["cross_attention_dim"])).astype(np.float32),
             "text_embeds": rng.standard_normal((BATCH, pooled_dim)).astype(np.float32),
             "time_ids": np.array([[512, 768, 0, 64, 64, 64]] * BATCH, np.float32)}
    got = torch_loss(sdxl_model_dir, batch, **CASES[case])
    np.testing.assert_allclose(got, jax_loss(sdxl_model_dir, batch, **CASES[case]), rtol=1e-4, atol=1e-7)
    other_crop = {**batch, "time_ids": np.array([[64, 64, 0, 0, 64, 64]] * BATCH, np.float32)}
    assert abs(torch_loss(sdxl_model_dir, other_crop, **CASES[case])[0] - got[0]) > 1e-6


def test_v_prediction_loss_differs_from_epsilon(tiny_model_dir: Path, v_prediction_model_dir: Path,
                                                shared_batch: dict) -> None:
    """Guards the parity test against both sides silently using the epsilon target."""
    eps = torch_loss(tiny_model_dir, shared_batch)[0]
    v = torch_loss(v_prediction_model_dir, shared_batch)[0]
    assert abs(eps - v) / eps > 1e-3


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_few_training_steps_track_each_other(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Same spec, same images, six steps on each backend: same loss scale, both falling.

    The backends draw noise and timesteps from different RNGs, so steps are compared in
    aggregate (mean level, first half vs second half), not one by one.
    """
    from jaxbooth.cli import main

    common = [f"--pretrained_model_name_or_path={tiny_model_dir}", "--resolution=64", "--train_batch_size=2",
              "--max_train_steps=6", "--learning_rate=1e-3", "--lr_warmup_steps=0", "--seed=0",
              "--report_to=none", "--log_every_steps=1", "--checkpointing_steps=1000", "--center_crop"]
    runs = {}
    for backend in ("jax", "torch"):
        out = tmp_path / backend
        assert main(["train", f"--backend={backend}", f"--output_dir={out}", *common]) == 0
        runs[backend] = np.array(_losses(out))
        shutil.rmtree(out / "unet")
    jax_losses, torch_losses = runs["jax"], runs["torch"]
    print({name: np.round(values, 4).tolist() for name, values in runs.items()})
    assert len(jax_losses) == len(torch_losses) == 6
    ratio = torch_losses.mean() / jax_losses.mean()
    assert 0.5 < ratio < 2, runs
    for losses in runs.values():
        assert losses[3:].mean() < losses[:3].mean(), runs
