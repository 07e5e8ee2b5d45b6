"""Proves jaxbooth/diffusion.py: schedule parity with diffusers DDPMScheduler, the training
math on numpy / jax / torch arrays, and the train_dreambooth.py loss and Min-SNR weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxbooth import diffusion
from jaxbooth.errors import JaxboothError

requires_torch = pytest.mark.requires_torch

_RNG_BETAS = np.random.default_rng(0).uniform(1e-4, 2e-2, size=50)

# Scheduler configs as checkpoints ship them; DDPMScheduler.from_config is what
# train_dreambooth.py builds from each.
CONFIGS = {
    "ddpm_defaults": {},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "sd15_pndm": {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    "sd2_v_ddim": {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "timestep_spacing": "leading",
    },
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
    "linear_odd_T": {
        "beta_schedule": "linear",
        "beta_start": 0.001,
        "beta_end": 0.03,
        "num_train_timesteps": 37,
    },
    "trained_betas": {"trained_betas": _RNG_BETAS.tolist(), "num_train_timesteps": 50},
    "zero_snr_v": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    },
    "zero_snr_cosine": {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True},
}
KINDS = ("numpy", "torch", "jax")


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _ddpm(cfg, schedule=None):
    """diffusers' DDPMScheduler for cfg; with `schedule`, running on our alphas_cumprod so that
    a test isolates the formula under test from schedule construction (tested on its own)."""
    schedulers = pytest.importorskip("diffusers.schedulers")
    scheduler = schedulers.DDPMScheduler.from_config(cfg)
    if schedule is not None:
        torch = pytest.importorskip("torch")
        scheduler.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod.astype(np.float32))
    return scheduler


def _converter(kind):
    """(to_kind, to_numpy) for one array kind."""
    if kind == "numpy":
        return np.asarray, np.asarray
    if kind == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy, lambda t: t.detach().numpy()
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray, np.asarray


def _inputs(num_timesteps, shape=(6, 4, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    timesteps = np.concatenate([[0, num_timesteps - 1], rng.integers(0, num_timesteps, shape[0] - 2)])
    return x0, noise, timesteps.astype(np.int64)


# ------------------------------------------------------------------------------------------
# Schedule construction
# ------------------------------------------------------------------------------------------


@requires_torch
@pytest.mark.parametrize("name", CONFIGS)
def test_schedule_matches_ddpm_scheduler(name):
    cfg = CONFIGS[name]
    reference = _ddpm(cfg)
    schedule = diffusion.schedule_from_config(cfg)
    assert schedule.num_train_timesteps == reference.config.num_train_timesteps
    assert schedule.prediction_type == reference.config.prediction_type
    assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == np.float64
    if CONFIGS[name].get("rescale_betas_zero_snr"):
        # diffusers rescales with torch's CPU float32 sqrt (MKL, up to 1 ulp off IEEE); betas
        # come from ratios of nearly equal numbers, so only absolute agreement is meaningful.
        np.testing.assert_allclose(schedule.betas, reference.betas.numpy(), rtol=0, atol=5e-6)
        np.testing.assert_allclose(
            schedule.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-5, atol=0
        )
        return
    np.testing.assert_array_equal(schedule.betas, reference.betas.numpy())
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-7, atol=0)


@requires_torch
@pytest.mark.parametrize("name", ["sd15_pndm", "cosine", "trained_betas"])
def test_tables_are_diffusers_float32_sqrt(torch, name):
    reference = _ddpm(CONFIGS[name]).alphas_cumprod
    tables = diffusion.schedule_from_config(CONFIGS[name]).as_tables()
    assert all(table.dtype == np.float32 and table.shape == reference.shape for table in tables)
    # Correctly rounded float32 sqrt, which is what diffusers computes on CUDA ...
    ieee = lambda x: x.double().sqrt().float().numpy()
    np.testing.assert_array_equal(tables.sqrt_alphas_cumprod, ieee(reference))
    np.testing.assert_array_equal(tables.sqrt_one_minus_alphas_cumprod, ieee(1 - reference))
    # ... and within 1 ulp of torch's CPU float32 `** 0.5` (MKL sqrt is not correctly rounded).
    np.testing.assert_allclose(tables.sqrt_alphas_cumprod, (reference**0.5).numpy(), rtol=1.2e-7)
    np.testing.assert_allclose(
        tables.sqrt_one_minus_alphas_cumprod, ((1 - reference) ** 0.5).numpy(), rtol=1.2e-7
    )


def test_schedule_arrays_are_read_only():
    schedule = diffusion.schedule_from_config({})
    with pytest.raises(ValueError):
        schedule.alphas_cumprod[0] = 0.5


def test_zero_snr_schedule_ends_at_zero_signal():
    tables = diffusion.schedule_from_config(CONFIGS["zero_snr_v"]).as_tables()
    assert tables.sqrt_alphas_cumprod[-1] == 0 and tables.snr[-1] == 0
    assert np.all(tables.snr[:-1] > 0)


def test_unknown_beta_schedule_names_key_and_supported_values():
    with pytest.raises(JaxboothError) as err:
        diffusion.schedule_from_config({"beta_schedule": "scaled_linaer"})
    message = str(err.value)
    assert "scheduler/scheduler_config.json" in message and "beta_schedule='scaled_linaer'" in message
    assert all(repr(name) in message for name in diffusion.BETA_SCHEDULES)
    assert "did you mean 'scaled_linear'" in message


def test_unknown_prediction_type_in_config_is_rejected():
    with pytest.raises(JaxboothError, match=r"prediction_type='v-prediction'.*'v_prediction'"):
        diffusion.schedule_from_config({"prediction_type": "v-prediction"})


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        ({"num_train_timesteps": "1000"}, "num_train_timesteps='1000' should be int"),
        ({"num_train_timesteps": 0}, "must be at least 1"),
        ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}, r"trained_betas has shape \(2,\)"),
        ({"trained_betas": ["a"], "num_train_timesteps": 1}, "list of numbers"),
        ({"beta_end": 1.5}, r"betas must lie in \[0, 1\]"),
        ({"rescale_betas_zero_snr": "yes"}, "rescale_betas_zero_snr='yes' should be bool"),
    ],
)
def test_bad_config_values_raise_jaxbooth_error(cfg, pattern):
    with pytest.raises(JaxboothError, match=pattern):
        diffusion.schedule_from_config(cfg)


def test_load_schedule_reads_model_folder(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(CONFIGS["sd2_v_ddim"]))
    schedule = diffusion.load_schedule(tmp_path)
    expected = diffusion.schedule_from_config(CONFIGS["sd2_v_ddim"])
    assert schedule.prediction_type == "v_prediction"
    np.testing.assert_array_equal(schedule.alphas_cumprod, expected.alphas_cumprod)


def test_load_schedule_errors_name_the_path(tmp_path):
    path = tmp_path / "scheduler" / "scheduler_config.json"
    with pytest.raises(JaxboothError, match="cannot read the scheduler config") as err:
        diffusion.load_schedule(tmp_path)
    assert str(path) in str(err.value)
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(JaxboothError, match="invalid JSON") as err:
        diffusion.load_schedule(tmp_path)
    assert str(path) in str(err.value)
    path.write_text(json.dumps({"beta_schedule": "cosine"}))
    with pytest.raises(JaxboothError, match="beta_schedule='cosine'") as err:
        diffusion.load_schedule(tmp_path)
    assert str(path) in str(err.value)


def test_import_leaves_jax_and_torch_unloaded():
    code = "import sys, jaxbooth.diffusion; print(sorted({'jax', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------
# Forward noising, targets and SNR on every array kind
# ------------------------------------------------------------------------------------------


@requires_torch
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["sd15_pndm", "zero_snr_v", "cosine"])
def test_add_noise_and_velocity_match_ddpm_scheduler(torch, kind, name):
    schedule = diffusion.schedule_from_config(CONFIGS[name])
    reference = _ddpm(CONFIGS[name], schedule)
    to_kind, to_numpy = _converter(kind)
    tables = schedule.as_tables().map(to_kind)
    x0, noise, timesteps = _inputs(schedule.num_train_timesteps)
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps))
    expected_noisy = reference.add_noise(*args).numpy()
    expected_v = reference.get_velocity(*args).numpy()

    ours = [to_kind(x0), to_kind(noise), to_kind(timesteps)]
    noisy = diffusion.add_noise(*ours, tables)
    v = diffusion.velocity(*ours, tables)
    assert type(noisy) is type(ours[0]) and noisy.dtype == ours[0].dtype
    np.testing.assert_allclose(to_numpy(noisy), expected_noisy, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(to_numpy(v), expected_v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_coefficients_broadcast_over_nhwc_like_nchw(kind):
    to_kind, to_numpy = _converter(kind)
    tables = diffusion.schedule_from_config(CONFIGS["sd15_pndm"]).as_tables()
    x0, noise, timesteps = _inputs(1000, shape=(3, 4, 5, 6))
    nchw = diffusion.add_noise(to_kind(x0), to_kind(noise), to_kind(timesteps), tables)
    nhwc = diffusion.add_noise(
        to_kind(x0.transpose(0, 2, 3, 1).copy()),
        to_kind(noise.transpose(0, 2, 3, 1).copy()),
        to_kind(timesteps),
        tables,
    )
    np.testing.assert_allclose(to_numpy(nhwc).transpose(0, 3, 1, 2), to_numpy(nchw), rtol=1e-6)


def test_add_noise_works_under_jax_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    tables = diffusion.schedule_from_config(CONFIGS["sd15_pndm"]).as_tables()
    x0, noise, timesteps = _inputs(1000, shape=(4, 8, 8, 4))

    @jax.jit
    def step(tables, x0, noise, timesteps):
        noisy = diffusion.add_noise(x0, noise, timesteps, tables)
        target = diffusion.training_target(x0, noise, timesteps, tables, "v_prediction")
        weights = diffusion.min_snr_loss_weights(
            diffusion.compute_snr(timesteps, tables), 5.0, "v_prediction"
        )
        return noisy, diffusion.dreambooth_loss(
            noisy, target, with_prior_preservation=True, prior_loss_weight=1.0, snr_weights=weights
        )[0]

    noisy, loss = step(tables.map(jnp.asarray), x0, noise, jnp.asarray(timesteps, jnp.int32))
    expected = diffusion.add_noise(x0, noise, timesteps, tables)
    np.testing.assert_allclose(np.asarray(noisy), expected, rtol=1e-6, atol=1e-7)
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("kind", KINDS)
def test_training_target_picks_noise_or_velocity(kind):
    to_kind, to_numpy = _converter(kind)
    tables = diffusion.schedule_from_config({}).as_tables().map(to_kind)
    x0, noise, timesteps = (to_kind(a) for a in _inputs(1000))
    assert diffusion.training_target(x0, noise, timesteps, tables, "epsilon") is noise
    np.testing.assert_array_equal(
        to_numpy(diffusion.training_target(x0, noise, timesteps, tables, "v_prediction")),
        to_numpy(diffusion.velocity(x0, noise, timesteps, tables)),
    )
    with pytest.raises(JaxboothError, match="prediction_type='sample' cannot be trained"):
        diffusion.training_target(x0, noise, timesteps, tables, "sample")


@requires_torch
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["sd15_pndm", "zero_snr_v", "trained_betas"])
def test_compute_snr_matches_diffusers_training_utils(torch, kind, name):
    training_utils = pytest.importorskip("diffusers.training_utils")
    to_kind, to_numpy = _converter(kind)
    schedule = diffusion.schedule_from_config(CONFIGS[name])
    reference = _ddpm(CONFIGS[name], schedule)
    timesteps = _inputs(schedule.num_train_timesteps)[2]
    expected = training_utils.compute_snr(reference, torch.from_numpy(timesteps)).numpy()
    snr = diffusion.compute_snr(to_kind(timesteps), schedule.as_tables().map(to_kind))
    assert snr.dtype == to_kind(expected).dtype
    # The reference squares a ratio of torch CPU sqrts, each up to 1 ulp off IEEE.
    np.testing.assert_allclose(to_numpy(snr), expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Min-SNR weights and the DreamBooth loss against train_dreambooth.py written in torch
# ------------------------------------------------------------------------------------------


def _train_dreambooth_weights(torch, snr, timesteps, snr_gamma, prediction_type):
    """The mse_loss_weights lines of diffusers examples/dreambooth/train_dreambooth.py."""
    divisor = snr + 1 if prediction_type == "v_prediction" else snr
    return torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / divisor


@requires_torch
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [5.0, 1.3])
def test_min_snr_weights_match_train_dreambooth(torch, kind, prediction_type, snr_gamma):
    to_kind, to_numpy = _converter(kind)
    tables = diffusion.schedule_from_config(CONFIGS["sd15_pndm"]).as_tables()
    timesteps = np.array([0, 1, 10, 100, 400, 500, 700, 999])
    snr = tables.snr[timesteps]
    expected = _train_dreambooth_weights(
        torch, torch.from_numpy(snr), torch.from_numpy(timesteps), snr_gamma, prediction_type
    ).numpy()
    weights = diffusion.min_snr_loss_weights(to_kind(snr), snr_gamma, prediction_type)
    np.testing.assert_array_equal(to_numpy(weights), expected)
    assert weights.dtype == to_kind(snr).dtype


@requires_torch
def test_min_snr_weights_under_zero_terminal_snr_follow_diffusers(torch):
    tables = diffusion.schedule_from_config(CONFIGS["zero_snr_v"]).as_tables()
    timesteps = np.array([0, 500, 999])
    snr = tables.snr[timesteps]
    for prediction_type in ("epsilon", "v_prediction"):
        expected = _train_dreambooth_weights(
            torch, torch.from_numpy(snr), torch.from_numpy(timesteps), 5.0, prediction_type
        ).numpy()
        with np.errstate(invalid="ignore"):  # epsilon: 0/0 = NaN at t=999, as in diffusers
            weights = diffusion.min_snr_loss_weights(snr, 5.0, prediction_type)
        np.testing.assert_array_equal(weights, expected)
    assert diffusion.min_snr_loss_weights(snr, 5.0, "v_prediction")[-1] == 0


def test_min_snr_weights_reject_sample_prediction():
    with pytest.raises(JaxboothError, match="cannot be trained"):
        diffusion.min_snr_loss_weights(np.ones(2, np.float32), 5.0, "sample")


def _reference_loss(torch, pred, target, with_prior_preservation, prior_loss_weight, weights):
    """train_dreambooth.py's loss block; the instance half uses its own SNR weights."""
    F = torch.nn.functional
    prior_loss = torch.tensor(0.0)
    if with_prior_preservation:
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        prior_loss = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
        weights = None if weights is None else torch.chunk(weights, 2, dim=0)[0]
    if weights is None:
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
    instance_loss = loss
    if with_prior_preservation:
        loss = loss + prior_loss_weight * prior_loss
    return loss, instance_loss, prior_loss


@requires_torch
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_prior_preservation", [False, True])
@pytest.mark.parametrize("use_snr", [False, True])
def test_dreambooth_loss_matches_train_dreambooth(torch, kind, with_prior_preservation, use_snr):
    to_kind, to_numpy = _converter(kind)
    rng = np.random.default_rng(1)
    pred = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    target = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, 4).astype(np.float32) if use_snr else None
    expected = _reference_loss(
        torch,
        torch.from_numpy(pred),
        torch.from_numpy(target),
        with_prior_preservation,
        0.7,
        None if weights is None else torch.from_numpy(weights),
    )
    got = diffusion.dreambooth_loss(
        to_kind(pred),
        to_kind(target),
        with_prior_preservation=with_prior_preservation,
        prior_loss_weight=0.7,
        snr_weights=None if weights is None else to_kind(weights),
    )
    for ours, theirs in zip(got, expected, strict=True):
        assert np.asarray(to_numpy(ours)).dtype == np.float32
        np.testing.assert_allclose(to_numpy(ours), theirs.numpy(), rtol=1e-6)
    if not with_prior_preservation:
        assert float(to_numpy(got[2])) == 0.0


@requires_torch
def test_dreambooth_loss_upcasts_half_precision_and_keeps_grad(torch):
    pred = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    total, _, _ = diffusion.dreambooth_loss(pred, target, with_prior_preservation=True)
    assert total.dtype == torch.float32
    total.backward()
    assert pred.grad is not None and pred.grad.shape == pred.shape


def test_dreambooth_loss_rejects_bad_shapes():
    x = np.zeros((3, 2, 2, 2), np.float32)
    with pytest.raises(ValueError, match="batch 3 is odd"):
        diffusion.dreambooth_loss(x, x, with_prior_preservation=True)
    with pytest.raises(ValueError, match=r"snr_weights has shape \(2,\), expected \(3,\)"):
        diffusion.dreambooth_loss(x, x, with_prior_preservation=False, snr_weights=np.ones(2, np.float32))


# ------------------------------------------------------------------------------------------
# Offset noise
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("shape", "channel_axis", "offset_shape"),
    [((2, 8, 6, 4), -1, (2, 1, 1, 4)), ((2, 4, 8, 6), 1, (2, 4, 1, 1))],
    ids=["nhwc", "nchw"],
)
def test_offset_noise_broadcasts_per_batch_and_channel(kind, shape, channel_axis, offset_shape):
    to_kind, to_numpy = _converter(kind)
    assert diffusion.offset_noise_shape(shape, channel_axis) == offset_shape
    rng = np.random.default_rng(2)
    noise = rng.standard_normal(shape).astype(np.float32)
    offset = rng.standard_normal(offset_shape).astype(np.float32)
    out = diffusion.offset_noise(to_kind(noise), to_kind(offset), channel_axis=channel_axis)
    assert tuple(out.shape) == shape
    np.testing.assert_allclose(to_numpy(out) - noise, np.broadcast_to(0.1 * offset, shape), atol=1e-6)
    assert diffusion.OFFSET_NOISE_SCALE == 0.1


def test_offset_noise_rejects_draw_in_other_layout():
    noise = np.zeros((2, 4, 4, 4), np.float32)  # square, so a wrong layout would broadcast silently
    with pytest.raises(ValueError, match=r"expected \(2, 1, 1, 4\)"):
        diffusion.offset_noise(noise, np.zeros((2, 4, 1, 1), np.float32))
