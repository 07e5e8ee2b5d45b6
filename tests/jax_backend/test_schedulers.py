"""Parity of jaxbooth's JAX samplers with the diffusers PyTorch schedulers they mirror.

Both sides are driven with identical model outputs (fixed random arrays, one per step; no
model is called) and must produce the same latents after every step, fp32 relative error
(max |jax - torch| / max |torch|) <= 1e-5. Ancestral DDPM also draws noise every step: both
sides are fed the same draws (torch's own generator output, or the JAX sampler's keyed noise
patched into diffusers), since a JAX key cannot reproduce torch's generator.
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
    "ddpm": "DDPMScheduler",
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
    assert kinds == {"ddim", "ddpm", "dpm++", "euler", "pndm"}
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
        ("ddpm", {"thresholding": True}, "thresholding"),
        ("ddpm", {"variance_type": "fixed_large_log"}, "variance_type"),
        ("ddpm", {"timestep_spacing": "middle"}, "timestep_spacing"),
    ],
)
def test_unsupported_option_names_the_key(name: str, overrides: dict, key: str) -> None:
    with pytest.raises(JaxboothError, match=rf"scheduler_config.json: {key}=.*not supported"):
        make_sampler(name, {**SD_CONFIG, **overrides}, 10)


def test_bad_step_count_is_rejected() -> None:
    with pytest.raises(JaxboothError, match="num_inference_steps=0"):
        make_sampler("ddim", SD_CONFIG, 0)


# ----------------------------------------------------------------------------------------------
# Ancestral DDPM: identical model outputs and identical per-step noise on both sides
# ----------------------------------------------------------------------------------------------


def run_ddpm_parity(config: dict, steps: int) -> float:
    """Step DDPMSampler.step_with_noise and DDPMScheduler.step side by side, each step's noise
    drawn by diffusers from a seeded torch generator and the same draw fed to the JAX step."""
    ref = schedulers.DDPMScheduler.from_config(config)
    ref.set_timesteps(steps)
    sampler = make_sampler("DDPMScheduler", config, steps)
    np.testing.assert_array_equal(sampler.timesteps, ref.timesteps.numpy().astype(np.float32))
    assert sampler.init_noise_sigma == float(ref.init_noise_sigma) == 1.0
    outputs = _model_outputs(sampler.num_steps)
    noise = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    x_ref, x = torch.from_numpy(noise), jnp.asarray(noise)
    step = jax.jit(sampler.step_with_noise)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))
        x_ref = ref.step(torch.from_numpy(outputs[i]), t, x_ref,
                         generator=torch.Generator().manual_seed(100 + i)).prev_sample
        x = step(jnp.asarray(outputs[i]), jnp.int32(i), x, jnp.asarray(z.numpy()))
        worst = max(worst, _rel(x, x_ref.numpy()))
    return worst


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_matches_diffusers_every_step(prediction_type: str, spacing: str, steps: int,
                                           clip_sample: bool) -> None:
    config = {**SD_CONFIG, "_class_name": "DDPMScheduler", "prediction_type": prediction_type,
              "timestep_spacing": spacing, "clip_sample": clip_sample}
    assert run_ddpm_parity(config, steps) <= TOLERANCE


DDPM_DEFAULTS_CONFIG = {key: value for key, value in SD_CONFIG.items() if key != "clip_sample"}


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        ({"variance_type": "fixed_small_log"}, 10),
        ({"variance_type": "fixed_large"}, 10),
        ({"variance_type": "fixed_large", "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 25),
        ({"clip_sample": True, "clip_sample_range": 0.5}, 10),
        ({"steps_offset": 0}, 20),
        ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 10),
        ({}, 25),  # DDPMScheduler's own default clip_sample=True
        # The full 1000-step chain of a linear-beta DDPM, where 1 - a_t / a_prev cancels most.
        ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}, 1000),
    ],
)
def test_ddpm_options_match_diffusers(overrides: dict, steps: int) -> None:
    assert run_ddpm_parity({**DDPM_DEFAULTS_CONFIG, **overrides}, steps) <= TOLERANCE


def _ddpm_loop(sampler, outputs: jax.Array, keys: jax.Array, noise: jax.Array) -> jax.Array:
    """The whole DDPM loop in one fori_loop, noise drawn from `keys` by the sampler itself."""
    @jax.jit
    def loop(x: jax.Array, keys: jax.Array) -> jax.Array:
        def body(i: jax.Array, carry: tuple) -> tuple:
            x, state = carry
            return sampler.step(state, outputs[i], i, x)

        return jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x, keys)))[0]

    return loop(noise, keys)


def _example_keys(count: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(3), jnp.arange(count))


def test_ddpm_fori_loop_with_keyed_noise_matches_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.schedulers import scheduling_ddpm

    config, steps = {**SD_CONFIG, "prediction_type": "v_prediction"}, 10
    sampler = make_sampler("ddpm", config, steps)
    outputs = jnp.asarray(_model_outputs(sampler.num_steps))
    noise = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    keys = _example_keys(SHAPE[0])
    draws = [np.asarray(sampler.step_noise(keys, i, SHAPE)) for i in range(steps)]
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0][0], draws[0][1])
    fed = iter(draws)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kwargs: torch.from_numpy(np.array(next(fed))))

    ref = schedulers.DDPMScheduler.from_config(config)
    ref.set_timesteps(steps)
    x_ref = torch.from_numpy(noise)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(torch.from_numpy(np.array(outputs[i])), t, x_ref).prev_sample
    assert next(fed, None) is None, "diffusers drew noise a different number of times"
    assert _rel(_ddpm_loop(sampler, outputs, keys, jnp.asarray(noise)), x_ref.numpy()) <= TOLERANCE


def test_ddpm_image_depends_only_on_its_own_key() -> None:
    sampler = make_sampler("ddpm", SD_CONFIG, 10)
    outputs = jnp.asarray(_model_outputs(sampler.num_steps))
    noise = jnp.asarray(np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32))
    keys = _example_keys(SHAPE[0])
    both = np.asarray(_ddpm_loop(sampler, outputs, keys, noise))
    alone = np.asarray(_ddpm_loop(sampler, outputs[:, 1:], keys[1:], noise[1:]))
    np.testing.assert_allclose(alone[0], both[1], rtol=0, atol=1e-6)
    other = np.asarray(_ddpm_loop(sampler, outputs, _example_keys(3)[1:], noise))
    assert np.max(np.abs(other - both)) > 1e-3, "the per-step noise does not depend on the keys"


def test_ddpm_needs_keys_for_its_per_step_noise() -> None:
    sampler = make_sampler("ddpm", SD_CONFIG, 10)
    with pytest.raises(ValueError, match="per-example PRNG keys"):
        sampler.init_state(jnp.zeros(SHAPE))
    with pytest.raises(ValueError, match="shape"):
        sampler.init_state(jnp.zeros(SHAPE), _example_keys(3))


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_is_refused_with_the_fix(variance_type: str) -> None:
    with pytest.raises(JaxboothError, match=rf"variance_type='{variance_type}'.*set variance_type to 'fixed_small'"):
        make_sampler("DDPMScheduler", {**SD_CONFIG, "variance_type": variance_type}, 10)


def test_ddpm_timestep_past_the_schedule_is_refused() -> None:
    with pytest.raises(JaxboothError, match=r"steps_offset=1 puts timestep 1000 past num_train_timesteps=1000"):
        make_sampler("DDPMScheduler", SD_CONFIG, 1000)
