"""Proves jaxbooth/edm.py: the sigma/timestep tables and the preconditioning equal diffusers'
EulerDiscreteScheduler and EDMEulerScheduler (what train_dreambooth_lora_sdxl.py trains with under
--do_edm_style_training), the loss's weighting, which pipelines train EDM-style, and the refusals
(spec, capability table, pipeline) that keep --do_edm_style_training honest on both backends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxbooth import capabilities, edm
from jaxbooth.diffusion import LossOptions
from jaxbooth.errors import JaxboothError

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers")

# Scheduler configs as pipelines ship them; the script builds EulerDiscreteScheduler.from_pretrained on each.
EULER_CONFIGS = {
    "sdxl": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 timestep_spacing="leading", _class_name="EulerDiscreteScheduler"),
    "ddpm_defaults": {},
    "v_linear_odd_T": dict(beta_schedule="linear", beta_start=0.001, beta_end=0.03, num_train_timesteps=37,
                           prediction_type="v_prediction"),
    "v_zero_snr": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       prediction_type="v_prediction", rescale_betas_zero_snr=True),
    "v_continuous_cosine": dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                timestep_type="continuous"),
}
EDM_CONFIGS = {
    "defaults": {},
    "exponential": dict(sigma_schedule="exponential", _class_name="EDMDPMSolverMultistepScheduler"),
    "v_small": dict(sigma_min=0.01, sigma_max=20.0, rho=5.0, num_train_timesteps=50, sigma_data=0.7,
                    prediction_type="v_prediction"),
}
# float32 ulps: torch's CPU sqrt/pow/exp/log differ from IEEE numpy by at most 1-2 ulp
SIGMA_RTOL, TIMESTEP_ATOL = 4e-7, 2.5e-7


def reference(name: str, cfg: dict):
    cls = schedulers.EDMEulerScheduler if name == edm.EDM else schedulers.EulerDiscreteScheduler
    return cls.from_config(cfg)


def ours(name: str, cfg: dict) -> edm.EdmSchedule:
    return edm.edm_schedule(cfg) if name == edm.EDM else edm.euler_schedule(cfg)


CASES = [(edm.EULER, key, cfg) for key, cfg in EULER_CONFIGS.items()] + \
        [(edm.EDM, key, cfg) for key, cfg in EDM_CONFIGS.items()]
IDS = [f"{name}-{key}" for name, key, _ in CASES]


@pytest.mark.parametrize(("name", "key", "cfg"), CASES, ids=IDS)
def test_tables_equal_the_diffusers_scheduler(name: str, key: str, cfg: dict) -> None:
    ref, mine = reference(name, cfg), ours(name, cfg)
    count = len(ref.timesteps)  # Euler: T; EDM: T+1 (sigma_max .. sigma_min)
    assert mine.scheduler == name and mine.num_train_timesteps == ref.config.num_train_timesteps
    assert mine.sigmas.dtype == mine.timesteps.dtype == np.float32
    np.testing.assert_allclose(mine.sigmas, ref.sigmas[:count].numpy(), rtol=SIGMA_RTOL, atol=0)
    np.testing.assert_allclose(mine.timesteps, ref.timesteps.numpy(), rtol=0, atol=TIMESTEP_ATOL)
    assert mine.prediction_type == ref.config.prediction_type
    if name == edm.EDM:
        assert mine.sigma_data == ref.config.sigma_data


@pytest.mark.parametrize(("name", "key", "cfg"), CASES, ids=IDS)
def test_draws_noise_and_preconditioning_equal_the_scheduler(name: str, key: str, cfg: dict) -> None:
    """The script's lines on the stock scheduler (timesteps[indices], get_sigmas, add_noise,
    precondition_inputs / scale_model_input, precondition_outputs / step's x0) against ours."""
    ref = reference(name, cfg)
    mine = ours(name, cfg).map(lambda table: torch.from_numpy(table.copy()))
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, ref.config.num_train_timesteps, (6,), generator=gen)
    indices[:2] = torch.tensor([0, ref.config.num_train_timesteps - 1])  # both ends of the draw
    x0, noise, out = (torch.randn(6, 4, 3, 3, generator=gen) for _ in range(3))
    timesteps = ref.timesteps[indices]
    # get_sigmas: look each timestep up in scheduler.timesteps
    sigmas = ref.sigmas[[(ref.timesteps == t).nonzero().item() for t in timesteps]].reshape(-1, 1, 1, 1)
    sigma = edm.lookup(mine.sigmas, indices, 4)
    torch.testing.assert_close(sigma, sigmas, rtol=SIGMA_RTOL, atol=0)
    torch.testing.assert_close(mine.timesteps[indices], timesteps, rtol=0, atol=TIMESTEP_ATOL)
    noisy = ref.add_noise(x0, noise, timesteps)
    torch.testing.assert_close(edm.add_noise(x0, noise, sigma), noisy, rtol=1e-6, atol=1e-6)
    c = edm.preconditioning(sigma, mine)
    if name == edm.EDM:
        model_input = ref.precondition_inputs(noisy, sigmas)
        estimate = ref.precondition_outputs(noisy, out, sigmas)
        torch.testing.assert_close(ref.precondition_noise(sigmas.flatten()), timesteps, rtol=0, atol=TIMESTEP_ATOL)
        assert c.weight is None
    else:  # the scheduler's own scale_model_input and step's pred_original_sample, row by row
        model_input, estimate = torch.empty_like(noisy), torch.empty_like(noisy)
        for row, t in enumerate(timesteps):
            ref._step_index = None
            model_input[row] = ref.scale_model_input(noisy[row:row + 1], t)[0]
            ref._step_index = None
            estimate[row] = ref.step(out[row:row + 1], t, noisy[row:row + 1]).pred_original_sample[0]
        torch.testing.assert_close(c.weight, sigmas**-2.0, rtol=1e-6, atol=0)
    torch.testing.assert_close(noisy * c.c_in, model_input, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(edm.denoised(noisy, out, c), estimate, rtol=1e-5, atol=1e-5)


def test_the_math_runs_on_numpy_and_torch_alike() -> None:
    schedule = edm.edm_schedule(EDM_CONFIGS["v_small"])
    rng = np.random.default_rng(1)
    x0, noise, out = (rng.standard_normal((4, 2, 3, 3)).astype(np.float32) for _ in range(3))
    indices = np.array([0, 7, 30, 49])
    results = []
    for convert in (np.asarray, lambda a: torch.from_numpy(np.array(a))):
        s = schedule.map(convert)
        sigma = edm.lookup(s.sigmas, convert(indices), 4)
        noisy = edm.add_noise(convert(x0), convert(noise), sigma)
        c = edm.preconditioning(sigma, s)
        loss, aux = edm.loss_from_prediction(convert(out), convert(x0), noisy, sigma, s,
                                             LossOptions(with_prior_preservation=True, prior_loss_weight=0.5))
        results.append([np.asarray(v) for v in (noisy * c.c_in, edm.denoised(noisy, convert(out), c), loss,
                                                 aux["instance_loss"], aux["prior_loss"])])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_weighted_loss_with_prior_weights_each_row_by_its_own_sigma() -> None:
    """Euler weights sigma**-2 on both halves; each row its own weight (the script broadcasts the whole
    batch's weights over each half, which only runs at batch size 1; see edm.edm_loss)."""
    estimate = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(4, 1)
    x0 = np.zeros((4, 1), np.float32)
    weight = np.array([1.0, 0.5, 0.25, 2.0], np.float32).reshape(4, 1)
    total, instance, prior = edm.edm_loss(estimate, x0, weight, with_prior_preservation=True, prior_loss_weight=3.0)
    assert instance == pytest.approx((1 * 1 + 0.5 * 4) / 2) and prior == pytest.approx((0.25 * 9 + 2 * 16) / 2)
    assert total == pytest.approx(instance + 3 * prior)
    plain, _, zero = edm.edm_loss(estimate, x0, None, with_prior_preservation=False)
    assert plain == pytest.approx(30 / 4) and zero == 0


def test_min_snr_is_refused_inside_the_loss_too() -> None:
    schedule = edm.euler_schedule({})
    sigma = edm.lookup(schedule.sigmas, np.array([3]), 2)
    with pytest.raises(JaxboothError, match="--snr_gamma=5.0 with --do_edm_style_training"):
        edm.loss_from_prediction(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32),
                                 np.zeros((1, 2), np.float32), sigma, schedule, LossOptions(snr_gamma=5.0))


def test_untrainable_configs_are_named() -> None:
    with pytest.raises(JaxboothError, match="prediction_type='sample'"):
        edm.euler_schedule({"prediction_type": "sample"})
    with pytest.raises(JaxboothError, match="sigma_schedule='karas'.*did you mean 'karras'"):
        edm.edm_schedule({"sigma_schedule": "karas"})
    with pytest.raises(JaxboothError, match="timestep_type='continous'"):
        edm.euler_schedule({"timestep_type": "continous"})


def test_imports_neither_torch_nor_jax() -> None:
    code = "import sys, jaxbooth.edm; bad = {'torch', 'jax', 'flax'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- which pipelines train EDM-style, and the refusals ------------------------------------------------------------

def pipeline(tmp_path: Path, cls: str = "StableDiffusionXLPipeline", scheduler: str = "EulerDiscreteScheduler",
             cfg: dict | None = None) -> Path:
    """A model folder with only model_index.json and the scheduler config (all these checks read)."""
    (tmp_path / "scheduler").mkdir(parents=True, exist_ok=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls, "scheduler": ["diffusers", scheduler]}))
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": scheduler,
                                                                              **(cfg or {})}))
    return tmp_path


def test_the_flag_trains_euler_and_an_edm_pipeline_always_trains_edm(tmp_path: Path) -> None:
    sdxl = pipeline(tmp_path / "sdxl", cfg=EULER_CONFIGS["sdxl"])
    assert edm.load_schedule(sdxl, False) is None
    assert edm.load_schedule(sdxl, True).scheduler == edm.EULER
    playground = pipeline(tmp_path / "pg", scheduler="EDMDPMSolverMultistepScheduler", cfg={"sigma_data": 0.5})
    for flag in (False, True):  # as the script's determine_scheduler_type: "EDM" in the class name
        assert edm.load_schedule(playground, flag).scheduler == edm.EDM
    assert edm.pipeline_problems(sdxl, True, "torch") == [] and edm.pipeline_problems(playground, False, "torch") == []


def test_pipeline_refusals_name_the_key_and_the_fix(tmp_path: Path) -> None:
    sd = pipeline(tmp_path / "sd", cls="StableDiffusionPipeline", scheduler="PNDMScheduler")
    assert edm.pipeline_problems(sd, False, "torch") == []
    [problem] = edm.pipeline_problems(sd, True, "torch")
    assert "not an SDXL pipeline" in problem and "Drop --do_edm_style_training" in problem
    playground = pipeline(tmp_path / "pg", scheduler="EDMDPMSolverMultistepScheduler")
    [problem] = edm.pipeline_problems(playground, False, "jax")
    assert "EDMDPMSolverMultistepScheduler" in problem and "--backend=torch" in problem
    [problem] = edm.pipeline_problems(playground, False, "torch", snr_gamma=5.0)
    assert "--snr_gamma=5.0" in problem and "drop --snr_gamma" in problem


def spec_with(**flags):
    from jaxbooth.spec import load_spec

    return load_spec([f"--{key}" if value is True else f"--{key}={value}" for key, value in flags.items()])


def test_the_spec_refuses_min_snr_with_edm_naming_both() -> None:
    with pytest.raises(JaxboothError) as info:
        spec_with(do_edm_style_training=True, snr_gamma=5.0)
    assert "--do_edm_style_training" in str(info.value) and "--snr_gamma=5.0" in str(info.value)
    assert spec_with(do_edm_style_training=True).sdxl.do_edm_style_training
    assert spec_with(snr_gamma=5.0).optim.snr_gamma == 5.0


def test_jax_refuses_edm_by_name_and_auto_picks_torch() -> None:
    spec = spec_with(do_edm_style_training=True)
    capabilities.check_backend(spec, "torch")
    with pytest.raises(JaxboothError) as info:
        capabilities.check_backend(spec, "jax")
    assert "--do_edm_style_training is only supported by the torch backend; use --backend=torch" in str(info.value)
    with pytest.raises(JaxboothError, match="--do_edm_style_training is only supported by the torch"):
        spec_with(do_edm_style_training=True, backend="jax")
    for device in (capabilities.DeviceInfo("cpu", None, 1), capabilities.DeviceInfo("gpu", 80 * 10**9, 8)):
        backend, reason = capabilities.choose_backend(spec, device)
        assert backend == "torch" and "--do_edm_style_training is torch-only" in reason
    with pytest.raises(JaxboothError, match="--do_edm_style_training needs the torch backend, which does not run on"):
        capabilities.choose_backend(spec, capabilities.DeviceInfo("tpu", None, 8))
    assert capabilities.backend_support("do_edm_style_training") == "torch only"


def test_the_jax_loader_refuses_an_edm_scheduler_pipeline_before_any_weight_loads(tmp_path: Path) -> None:
    from jaxbooth.jax_backend import loading

    playground = pipeline(tmp_path / "pg", scheduler="EDMDPMSolverMultistepScheduler")  # no weights at all
    with pytest.raises(JaxboothError, match="EDMDPMSolverMultistepScheduler.*--backend=torch"):
        loading.resolve_model_paths(spec_with(pretrained_model_name_or_path=playground, backend="jax"))
