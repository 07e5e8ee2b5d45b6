"""Parity of jaxbooth's JAX samplers with the diffusers PyTorch schedulers they mirror.

Both sides are driven with identical model outputs (fixed random arrays, one per step; no
model is called) and must produce the same latents after every step, fp32 relative error
(max |jax - torch| / max |torch|) <= 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.schedulers import SAMPLER_NAMES, canonical_sampler_name, make_sampler

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

pytestmark = pytest.mark.requires_torch

# Stable Diffusion 1.x's scheduler_config.json (a PNDMScheduler config, as shipped).
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
# Other shipped configs, as each sampler sees them through from_config.
PIPELINE_CONFIGS = {
    "sd2_ddim_v": {**SD_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
    "sdxl_euler": {**SD_CONFIG, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                   "timestep_spacing": "leading", "use_karras_sigmas": False, "sample_max_value": 1.0},
    "ddpm_tiny": {**SD_CONFIG, "_class_name": "DDPMScheduler", "variance_type": "fixed_small",
                  "prediction_type": "epsilon", "timestep_spacing": "leading"},
}
TORCH_CLASSES = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
SHAPE = (2, 8, 8, 4)
TOLERANCE = 1e-5


def _model_outputs(num: int, seed: int = 0) -> np.ndarray:
    """A fixed plausible sequence: one 'true' prediction plus per-step perturbations."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(SHAPE).astype(np.float32)
    return (base + 0.3 * rng.standard_normal((num, *SHAPE))).astype(np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def run_parity(name: str, config: dict, steps: int) -> float:
    """Step jaxbooth's sampler and diffusers' scheduler side by side; return the worst error."""
    kind = canonical_sampler_name(name)
    ref = getattr(schedulers, TORCH_CLASSES[kind]).from_config(config)
    ref.set_timesteps(steps)
    sampler = make_sampler(name, config, steps)
    np.testing.assert_allclose(sampler.timesteps, ref.timesteps.numpy().astype(np.float32), rtol=1e-6)
    assert sampler.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    outputs = _model_outputs(sampler.num_steps)
    noise = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
    x = jnp.asarray(noise) * sampler.init_noise_sigma
    state = sampler.init_state(x)
    scale, step = jax.jit(sampler.scale_model_input), jax.jit(sampler.step)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        model_in_ref = ref.scale_model_input(x_ref, t)
        worst = max(worst, _rel(scale(state, x, jnp.int32(i)), model_in_ref.numpy()))
        x_ref = ref.step(torch.from_numpy(outputs[i]), t, x_ref).prev_sample
        x, state = step(state, jnp.asarray(outputs[i]), jnp.int32(i), x)
        worst = max(worst, _rel(x, x_ref.numpy()))
    return worst


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", [None, "trailing"])
@pytest.mark.parametrize("name", ["DDIMScheduler", "dpm++", "euler", "PNDMScheduler"])
def test_sampler_matches_diffusers_every_step(name: str, spacing: str | None, prediction_type: str,
                                              steps: int) -> None:
    config = {**SD_CONFIG, "prediction_type": prediction_type}
    if spacing is not None:
        config["timestep_spacing"] = spacing
    assert run_parity(name, config, steps) <= TOLERANCE


@pytest.mark.parametrize("config_name", sorted(PIPELINE_CONFIGS))
@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler", "pndm"])
def test_sampler_matches_diffusers_on_shipped_configs(name: str, config_name: str) -> None:
    assert run_parity(name, PIPELINE_CONFIGS[config_name], 25) <= TOLERANCE


@pytest.mark.parametrize(
    ("name", "overrides", "steps"),
    [
        ("ddim", {"timestep_spacing": "linspace"}, 10),
        ("ddim", {"prediction_type": "sample"}, 10),
        ("ddim", {"clip_sample": True, "set_alpha_to_one": True}, 10),  # DDIM's own defaults
        ("dpm++", {"timestep_spacing": "leading"}, 25),
        ("dpm++", {"prediction_type": "sample"}, 10),
        ("dpm++", {"use_karras_sigmas": True}, 25),
        ("dpm++", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, 20),
        ("dpm++", {"solver_type": "heun", "final_sigmas_type": "sigma_min"}, 12),
        ("dpm++", {"solver_order": 1}, 10),
        ("dpm++", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                   "timestep_spacing": "trailing"}, 10),
        ("euler", {"timestep_spacing": "leading"}, 25),
        ("euler", {"use_karras_sigmas": True}, 25),
        ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, 10),
        ("euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 10),
        ("pndm", {"skip_prk_steps": False}, 10),
        ("pndm", {"skip_prk_steps": False, "prediction_type": "v_prediction"}, 25),
        ("pndm", {"timestep_spacing": "linspace"}, 10),
    ],
)
def test_sampler_options_match_diffusers(name: str, overrides: dict, steps: int) -> None:
    assert run_parity(name, {**SD_CONFIG, **overrides}, steps) <= TOLERANCE


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler", "pndm"])
def test_whole_loop_in_fori_loop_matches_diffusers(name: str) -> None:
    config, steps = {**SD_CONFIG, "prediction_type": "v_prediction"}, 10
    sampler = make_sampler(name, config, steps)
    outputs = jnp.asarray(_model_outputs(sampler.num_steps))
    noise = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)

    @jax.jit
    def loop(x: jax.Array) -> jax.Array:
        def body(i: jax.Array, carry: tuple) -> tuple:
            x, state = carry
            return sampler.step(state, outputs[i], i, x)

        x = x * sampler.init_noise_sigma
        return jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))[0]

    ref = getattr(schedulers, TORCH_CLASSES[name]).from_config(config)
    ref.set_timesteps(steps)
    x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        ref.scale_model_input(x_ref, t)  # no model here; only Euler's bookkeeping needs the call
        x_ref = ref.step(torch.from_numpy(np.array(outputs[i])), t, x_ref).prev_sample
    assert _rel(loop(jnp.asarray(noise)), x_ref.numpy()) <= TOLERANCE


def test_every_listed_name_builds_a_sampler() -> None:
    kinds = {canonical_sampler_name(name) for name in SAMPLER_NAMES}
    assert kinds == {"ddim", "dpm++", "euler", "pndm"}
    for name in SAMPLER_NAMES:
        assert make_sampler(name, SD_CONFIG, 4).num_steps >= 4


def test_unknown_sampler_lists_choices_and_suggests() -> None:
    with pytest.raises(JaxboothError, match=r"did you mean 'EulerDiscreteScheduler'.*DDIMScheduler"):
        make_sampler("EulerDiscreteSchedular", SD_CONFIG, 10)


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("dpm++", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ("dpm++", {"solver_order": 3}, "solver_order"),
        ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("ddim", {"timestep_spacing": "middle"}, "timestep_spacing"),
    ],
)
def test_unsupported_option_names_the_key(name: str, overrides: dict, key: str) -> None:
    with pytest.raises(JaxboothError, match=rf"scheduler_config.json: {key}=.*not supported"):
        make_sampler(name, {**SD_CONFIG, **overrides}, 10)


def test_bad_step_count_is_rejected() -> None:
    with pytest.raises(JaxboothError, match="num_inference_steps=0"):
        make_sampler("ddim", SD_CONFIG, 0)
