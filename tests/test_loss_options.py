"""Proves jaxbooth/loss_options.py and jaxbooth/ema.py: kohya's loss options (multires noise, zero terminal
SNR, debiased estimation, huber / smooth-L1 with their schedules) and diffusers' EMA decay, the same on numpy,
jax and torch arrays, against hand-computed values."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from jaxbooth import diffusion, ema, loss_options
from jaxbooth.loss_options import LossOptions
from tests.test_diffusion import _converter

KINDS = ("numpy", "torch", "jax")
SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}


def _tables(kind, zero_snr=False):
    schedule = loss_options.training_schedule(diffusion.schedule_from_config(SD15), zero_snr)
    to_kind, _ = _converter(kind)
    return schedule.as_tables().map(lambda table: to_kind(np.array(table)))


def test_import_leaves_jax_and_torch_unloaded():
    code = "import sys, jaxbooth.loss_options, jaxbooth.ema; print(sorted({'jax', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_diffusion_still_exports_the_loss_names():
    assert diffusion.LossOptions is LossOptions
    assert diffusion.loss_from_prediction is loss_options.loss_from_prediction


# ------------------------------------------------------------------ zero terminal SNR


def test_zero_terminal_snr_schedule_ends_at_zero_and_matches_the_config_rescale():
    base = diffusion.schedule_from_config(SD15)
    rescaled = loss_options.zero_terminal_snr_schedule(base)
    assert base.alphas_cumprod[-1] > 0 and rescaled.alphas_cumprod[-1] == 0.0
    assert rescaled.alphas_cumprod[0] == pytest.approx(base.alphas_cumprod[0], rel=1e-6)
    from_config = diffusion.schedule_from_config({**SD15, "rescale_betas_zero_snr": True})
    np.testing.assert_array_equal(rescaled.betas, from_config.betas)
    assert loss_options.zero_terminal_snr_schedule(from_config) is from_config  # never rescaled twice
    assert loss_options.training_schedule(base, False) is base
    assert rescaled.as_tables().snr[-1] == 0.0


def test_zero_terminal_snr_config_samples_trailing_from_a_class_that_reads_it():
    pndm = loss_options.zero_terminal_snr_config(SD15)
    assert pndm["_class_name"] == "DDIMScheduler" and pndm["clip_sample"] is False
    assert pndm["rescale_betas_zero_snr"] is True and pndm["timestep_spacing"] == "trailing"
    assert "skip_prk_steps" not in pndm
    euler = loss_options.zero_terminal_snr_config({**SD15, "_class_name": "EulerDiscreteScheduler"})
    assert euler["_class_name"] == "EulerDiscreteScheduler" and euler["rescale_betas_zero_snr"] is True
    assert loss_options.training_scheduler_config(SD15, False) == SD15


# ------------------------------------------------------------------ debiased estimation and huber


def test_debiased_weights_by_hand():
    snr = np.array([4.0, 0.25, 1e6], np.float32)
    np.testing.assert_allclose(loss_options.debiased_estimation_weights(snr, "epsilon"),
                               [0.5, 2.0, 1 / math.sqrt(1000)], rtol=1e-6)  # SNR clamped at 1000
    np.testing.assert_allclose(loss_options.debiased_estimation_weights(snr, "v_prediction"),
                               [0.2, 0.8, 1 / 1001], rtol=1e-6)


def test_huber_losses_by_hand():
    pred, target = np.array([[3.0], [0.0]], np.float32), np.zeros((2, 1), np.float32)
    c = np.array([4.0, 4.0], np.float32)
    # d = 3, c = 4: sqrt(9 + 16) - 4 = 1, so huber = 2 * 4 * 1 = 8 and smooth_l1 = 2 * 1 = 2
    np.testing.assert_allclose(loss_options.elementwise_loss(pred, target, "huber", c), [[8.0], [0.0]])
    np.testing.assert_allclose(loss_options.elementwise_loss(pred, target, "smooth_l1", c), [[2.0], [0.0]])
    np.testing.assert_allclose(loss_options.elementwise_loss(pred, target, "l2"), [[9.0], [0.0]])
    small = np.array([[0.1]], np.float32)  # |d| << c: huber ~ d**2, as l2 (2 (sqrt(1.01) - 1) = 0.0099751)
    np.testing.assert_allclose(loss_options.elementwise_loss(small, np.zeros_like(small), "huber",
                                                             np.array([1.0], np.float32)), [[0.0099751]], rtol=1e-4)
    with pytest.raises(ValueError, match="thresholds"):
        loss_options.elementwise_loss(pred, target, "huber")


def test_huber_thresholds_by_hand():
    tables = _tables("numpy")
    t = np.array([0, 500, 1000 - 1])
    np.testing.assert_allclose(loss_options.huber_thresholds(t, tables, "constant", 0.1), [0.1] * 3)
    np.testing.assert_allclose(loss_options.huber_thresholds(t, tables, "exponential", 0.1),
                               [1.0, 0.1**0.5, 0.1 ** (999 / 1000)], rtol=1e-5)
    ac = diffusion.schedule_from_config(SD15).alphas_cumprod[t]
    sigma = np.sqrt((1 - ac) / ac)
    np.testing.assert_allclose(loss_options.huber_thresholds(t, tables, "snr", 0.1), 0.9 / (1 + sigma) ** 2 + 0.1,
                               rtol=1e-5)
    zero = loss_options.huber_thresholds(np.array([999]), _tables("numpy", zero_snr=True), "snr", 0.1)
    np.testing.assert_allclose(zero, [0.1])  # sigma is infinite at a zero terminal SNR


# ------------------------------------------------------------------ the same on every array kind


def _loss_inputs(seed=0):
    rng = np.random.default_rng(seed)
    shape = (4, 4, 8, 8)
    return (rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32),
            rng.standard_normal(shape).astype(np.float32), np.array([0, 999, 250, 600]))


OPTION_SETS = {
    "huber_snr_debiased_v": LossOptions(prediction_type="v_prediction", loss_type="huber",
                                        debiased_estimation_loss=True),
    "smooth_l1_exp_minsnr_prior": LossOptions(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.3,
                                              snr_gamma=5.0, with_prior_preservation=True, prior_loss_weight=0.5),
    "debiased_eps": LossOptions(debiased_estimation_loss=True),
}


@pytest.mark.parametrize("name", OPTION_SETS)
def test_loss_from_prediction_agrees_on_every_array_kind(name):
    options = OPTION_SETS[name]
    pred, x0, noise, t = _loss_inputs()
    results = {}
    for kind in KINDS:
        to_kind, to_numpy = _converter(kind)
        loss, aux = loss_options.loss_from_prediction(to_kind(pred), to_kind(x0), to_kind(noise), to_kind(t),
                                                      _tables(kind), options)
        results[kind] = [float(to_numpy(v)) for v in (loss, aux["instance_loss"], aux["prior_loss"])]
    np.testing.assert_allclose(results["jax"], results["numpy"], rtol=2e-6)
    np.testing.assert_allclose(results["torch"], results["numpy"], rtol=2e-6)


def test_loss_from_prediction_combines_weights_and_huber_as_written():
    """Reference: per-example mean of the huber errors times min-SNR times debiased weights, then the mean."""
    pred, x0, noise, t = _loss_inputs(1)
    tables = _tables("numpy")
    options = LossOptions(loss_type="huber", huber_schedule="constant", huber_c=0.2, snr_gamma=5.0,
                          debiased_estimation_loss=True)
    snr = tables.snr[t].astype(np.float64)
    weights = np.minimum(snr, 5.0) / snr / np.sqrt(np.minimum(snr, 1000.0))
    d = (pred - noise).astype(np.float64)
    errors = (2 * 0.2 * (np.sqrt(d**2 + 0.04) - 0.2)).reshape(4, -1).mean(1)
    loss, _ = loss_options.loss_from_prediction(pred, x0, noise, t, tables, options)
    assert float(loss) == pytest.approx(float((errors * weights).mean()), rel=1e-5)
    plain, _ = loss_options.loss_from_prediction(pred, x0, noise, t, tables, LossOptions())
    assert float(plain) == pytest.approx(float(((pred - noise).astype(np.float64) ** 2).mean()), rel=1e-6)


def _upsample_for(kind, channel_axis):
    if kind == "numpy":
        return lambda x, shape: loss_options.bilinear_upsample_numpy(x, shape, channel_axis)
    if kind == "torch":
        import torch

        return lambda x, shape: torch.nn.functional.interpolate(x, size=tuple(shape[2:]), mode="bilinear",
                                                                align_corners=False)
    import jax

    return lambda x, shape: jax.image.resize(x, shape, method="bilinear", antialias=False)


def test_multires_noise_shapes_halve_until_one():
    assert loss_options.multires_noise_shapes((2, 8, 8, 4), 6) == [(2, 8, 8, 4), (2, 4, 4, 4), (2, 2, 2, 4),
                                                                    (2, 1, 1, 4)]
    assert loss_options.multires_noise_shapes((2, 4, 16, 8), 2, channel_axis=1) == [(2, 4, 16, 8), (2, 4, 8, 4)]
    assert loss_options.multires_noise_shapes((1, 4, 6, 12), 10, channel_axis=1)[-1] == (1, 4, 1, 3)


def test_multires_noise_agrees_on_every_array_kind_and_layout():
    rng = np.random.default_rng(0)
    nchw = (2, 3, 8, 12)
    noise = rng.standard_normal(nchw).astype(np.float32)
    draws = [rng.standard_normal(s).astype(np.float32) for s in loss_options.multires_noise_shapes(nchw, 4, 1)]
    results = {}
    for kind in KINDS:
        to_kind, to_numpy = _converter(kind)
        if kind == "jax":  # NHWC, as the JAX backend draws it
            out = loss_options.multires_noise(to_kind(noise.transpose(0, 2, 3, 1)),
                                              [to_kind(d.transpose(0, 2, 3, 1)) for d in draws],
                                              _upsample_for(kind, -1), 0.3)
            results[kind] = to_numpy(out).transpose(0, 3, 1, 2)
        else:
            results[kind] = to_numpy(loss_options.multires_noise(to_kind(noise), [to_kind(d) for d in draws],
                                                                 _upsample_for(kind, 1), 0.3))
    for kind in ("torch", "jax"):
        np.testing.assert_allclose(results[kind], results["numpy"], atol=2e-6)
    assert results["numpy"].std(ddof=1) == pytest.approx(1.0, rel=1e-5)
    by_hand = noise + sum(0.3**i * loss_options.bilinear_upsample_numpy(d, nchw, 1) for i, d in enumerate(draws))
    np.testing.assert_allclose(results["numpy"], by_hand / by_hand.std(ddof=1), atol=1e-6)
    assert not np.allclose(results["numpy"], noise / noise.std(ddof=1), atol=0.05)  # the pyramid changes the noise


# ------------------------------------------------------------------ EMA


def test_ema_decay_is_diffusers_warmup():
    assert [ema.ema_decay(n, 0.9999) for n in (1, 2, 3)] == [0.0, 2 / 11, 3 / 12]
    assert ema.ema_decay(1000, 0.5) == 0.5
    assert ema.ema_decay(10**6, 0.9999) == 0.9999
    jnp = pytest.importorskip("jax.numpy")
    torch = pytest.importorskip("torch")
    steps = [1, 2, 3, 50, 10**6]
    np.testing.assert_allclose(np.asarray(ema.ema_decay(jnp.asarray(steps), 0.9999)),
                               [ema.ema_decay(n, 0.9999) for n in steps], rtol=1e-6)
    np.testing.assert_allclose(ema.ema_decay(torch.tensor(steps), 0.9999).numpy(),
                               [ema.ema_decay(n, 0.9999) for n in steps], rtol=1e-6)


def test_ema_update_matches_diffusers_ema_model():
    torch = pytest.importorskip("torch")
    training_utils = pytest.importorskip("diffusers.training_utils")
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    reference = training_utils.EMAModel([param], decay=0.6)
    average = param.detach().clone()
    for step, value in enumerate(([0.0, 1.0, 2.0], [5.0, 5.0, 5.0], [-1.0, 0.5, 9.0]), start=1):
        with torch.no_grad():
            param.copy_(torch.tensor(value))
        reference.step([param])
        average = ema.ema_update(average, param.detach(), ema.ema_decay(step, 0.6))
        np.testing.assert_allclose(average.numpy(), reference.shadow_params[0].numpy(), rtol=1e-6)
