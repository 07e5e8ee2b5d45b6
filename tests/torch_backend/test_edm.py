"""--do_edm_style_training on the torch backend, as diffusers' train_dreambooth_lora_sdxl.py: the step's
loss equals the script's lines run on stock diffusers schedulers and the tiny SDXL UNet, a CLI run
trains through it, and what the script refuses is refused before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jaxbooth.cli import main
from jaxbooth.diffusion import LossOptions
from jaxbooth.torch_backend import loss as loss_lib
from tests._sdxl_pipeline import RESOLUTION, write_sdxl_pipeline
from tests.torch_backend._helpers import metrics

pytest.importorskip("peft")

ARGS = ("--backend=torch", f"--resolution={RESOLUTION}", "--train_batch_size=1", "--lr_warmup_steps=0", "--seed=0",
        "--report_to=none", "--log_every_steps=1", "--learning_rate=1e-2", "--max_train_steps=2",
        "--instance_prompt=a photo of sks toy")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sdxl_pipeline(tmp_path_factory.mktemp("edm") / "pipe")


@pytest.fixture(scope="module")
def unet(sdxl_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(sdxl_dir / "unet").eval()


def scheduler_folder(root: Path, sdxl_dir: Path, scheduler: str, config: dict) -> Path:
    """The tiny pipeline's model_index.json naming ``scheduler``, with that scheduler's config (all the
    schedule is read from; the UNet comes from the module fixture)."""
    folder = root / scheduler / config.get("prediction_type", "epsilon")
    (folder / "scheduler").mkdir(parents=True)
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", scheduler]}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": scheduler, **config}))
    return folder


def script_loss(unet, model_dir: Path, model_input, noise, indices, hidden, added, with_prior: bool,
                prior_loss_weight: float) -> torch.Tensor:
    """train_dreambooth_lora_sdxl.py's EDM lines, on the scheduler it builds (the per-half weighting: see below)."""
    import diffusers

    scheduler_type = json.loads((model_dir / "model_index.json").read_text())["scheduler"][1]
    cls = diffusers.EDMEulerScheduler if "EDM" in scheduler_type else diffusers.EulerDiscreteScheduler
    noise_scheduler = cls.from_pretrained(model_dir, subfolder="scheduler")

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler.sigmas.to(dtype=dtype)
        step_indices = [(noise_scheduler.timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    timesteps = noise_scheduler.timesteps[indices]
    noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
    sigmas = get_sigmas(timesteps, len(noisy_model_input.shape), noisy_model_input.dtype)
    if "EDM" in scheduler_type:
        inp_noisy_latents = noise_scheduler.precondition_inputs(noisy_model_input, sigmas)
    else:
        inp_noisy_latents = noisy_model_input / ((sigmas**2 + 1) ** 0.5)
    model_pred = unet(inp_noisy_latents, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
    weighting = None
    if "EDM" in scheduler_type:
        model_pred = noise_scheduler.precondition_outputs(noisy_model_input, model_pred, sigmas)
    else:
        if noise_scheduler.config.prediction_type == "epsilon":
            model_pred = model_pred * (-sigmas) + noisy_model_input
        elif noise_scheduler.config.prediction_type == "v_prediction":
            model_pred = model_pred * (-sigmas / (sigmas**2 + 1) ** 0.5) + (noisy_model_input / (sigmas**2 + 1))
        weighting = (sigmas**-2.0).float()
    target = model_input

    def weighted(pred, tgt, w):
        if w is None:
            return F.mse_loss(pred.float(), tgt.float(), reduction="mean")
        return torch.mean((w.float() * (pred.float() - tgt.float()) ** 2).reshape(tgt.shape[0], -1), 1).mean()

    if not with_prior:
        return weighted(model_pred, target, weighting)
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    # jaxbooth weights each half by its own rows' sigmas; the script multiplies each half by all of them
    # (edm.edm_loss's docstring). With EDMEulerScheduler there is no weighting and this is the script verbatim.
    w, w_prior = (None, None) if weighting is None else torch.chunk(weighting, 2, dim=0)
    return weighted(model_pred, target, w) + prior_loss_weight * weighted(model_pred_prior, target_prior, w_prior)


CASES = {  # id: (scheduler class in model_index.json, its config, prior preservation)
    "euler-epsilon": ("EulerDiscreteScheduler", {"beta_start": 0.00085, "beta_end": 0.012,
                                                 "beta_schedule": "scaled_linear"}, False),
    "euler-v-prior": ("EulerDiscreteScheduler", {"beta_schedule": "linear", "prediction_type": "v_prediction"}, True),
    "edm-epsilon": ("EDMEulerScheduler", {}, False),
    "edm-v-prior": ("EDMDPMSolverMultistepScheduler", {"sigma_data": 0.7, "prediction_type": "v_prediction",
                                                       "sigma_schedule": "exponential"}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_equals_the_scripts_lines_on_stock_diffusers(case: str, unet, sdxl_dir: Path, tmp_path: Path) -> None:
    scheduler, config, prior = CASES[case]
    model_dir = scheduler_folder(tmp_path, sdxl_dir, scheduler, config)
    g = torch.Generator().manual_seed(len(case))
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g),
             "time_ids": torch.tensor([[64.0, 96, 0, 17, 64, 64], [80, 64, 9, 0, 64, 64]])}
    indices = torch.tensor([3, 990])  # low and high noise: the weighting spans ~1e4
    options = LossOptions(with_prior_preservation=prior, prior_loss_weight=0.5)
    schedule = loss_lib.edm_schedule(model_dir, False, torch.device("cpu"))  # an EDM scheduler needs no flag
    if "EDM" not in scheduler:
        assert schedule is None
        schedule = loss_lib.edm_schedule(model_dir, True, torch.device("cpu"))
    with torch.no_grad():
        ours, aux = loss_lib.edm_denoising_loss(unet, latents, noise, indices, hidden, schedule, options,
                                                added_cond_kwargs=added)
        expected = script_loss(unet, model_dir, latents, noise, indices, hidden, added, prior, 0.5)
    torch.testing.assert_close(ours, expected, rtol=2e-5, atol=0)
    assert (aux["prior_loss"] > 0) == prior
    torch.testing.assert_close(ours, aux["instance_loss"] + 0.5 * aux["prior_loss"])


# --- a CLI run -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two 2-step SDXL LoRA runs from one seed on two images, DDPM and EDM-style; the EDM one validates after its
    one epoch."""
    from diffusers import UNet2DConditionModel

    from jaxbooth.data import example_instance_dir
    from jaxbooth.torch_backend import loop, validation

    tmp = tmp_path_factory.mktemp("edm-runs")
    out: dict = {"ddpm": tmp / "ddpm", "edm": tmp / "edm", "timesteps": [], "schedulers": []}
    (tmp / "images").mkdir()
    for name in sorted(p.name for p in example_instance_dir().iterdir())[:2]:  # two images: one epoch is two steps
        shutil.copy(example_instance_dir() / name, tmp / "images" / name)
    script = ["train", "train_dreambooth_lora_sdxl.py", f"--pretrained_model_name_or_path={sdxl_dir}", *ARGS,
              f"--instance_data_dir={tmp / 'images'}"]
    assert main([*script, f"--output_dir={out['ddpm']}"]) == 0
    real_forward, real_loss = UNet2DConditionModel.forward, loop.edm_denoising_loss
    real_scheduler = validation.validation_scheduler
    current: dict = {}

    def forward(self, sample, timestep, *args, **kwargs):
        if current:
            out["timesteps"].append(timestep.detach().clone())
        return real_forward(self, sample, timestep, *args, **kwargs)

    def edm_denoising_loss(*args, **kwargs):
        current["in"] = True
        try:
            return real_loss(*args, **kwargs)
        finally:
            current.clear()

    def validation_scheduler(name, config):
        out["schedulers"].append(name)
        return real_scheduler(name, config)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UNet2DConditionModel, "forward", forward)
        patch.setattr(loop, "edm_denoising_loss", edm_denoising_loss)
        patch.setattr(validation, "validation_scheduler", validation_scheduler)
        assert main([*script, f"--output_dir={out['edm']}", "--do_edm_style_training",
                     "--validation_prompt=a photo of sks toy", "--num_validation_images=1",
                     "--validation_epochs=1"]) == 0
    return out


def test_an_edm_style_run_trains_through_the_edm_loss(runs: dict) -> None:
    ddpm, edm_run = metrics(runs["ddpm"]), metrics(runs["edm"])
    assert [r["step"] for r in edm_run] == [1, 2] and (runs["edm"] / "pytorch_lora_weights.safetensors").exists()
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in edm_run)
    # same seed, so the same latents, noise and draws: only the EDM formulation differs
    assert all(abs(a["train/loss"] - b["train/loss"]) > 1e-3 * abs(b["train/loss"]) for a, b in zip(edm_run, ddpm,
                                                                                                   strict=True))
    # each training step's UNet call got the Euler schedule's float timesteps (T-1-i), through edm_denoising_loss
    assert len(runs["timesteps"]) == 2
    assert all(t.dtype == torch.float32 and t.item() == int(t.item()) for t in runs["timesteps"])
    # validation samples with the pipeline's own scheduler, as the script does under EDM
    assert runs["schedulers"] == ["EulerDiscreteScheduler"]


# --- refusals before any model loads ---------------------------------------------------------------------------------

@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxbooth.torch_backend import models

    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("models loaded before the refusal"))


def refused(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_min_snr_with_edm_is_refused_naming_both(sdxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 no_model_loads: None) -> None:
    err = refused(capsys, f"--pretrained_model_name_or_path={sdxl_dir}", f"--output_dir={tmp_path}", *ARGS,
                  "--do_edm_style_training", "--snr_gamma=5.0")
    assert "--do_edm_style_training" in err and "--snr_gamma=5.0" in err and "Min-SNR" in err


def test_an_edm_pipeline_with_min_snr_is_refused(sdxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 no_model_loads: None) -> None:
    playground = scheduler_folder(tmp_path, sdxl_dir, "EDMDPMSolverMultistepScheduler", {})
    err = refused(capsys, f"--pretrained_model_name_or_path={playground}", f"--output_dir={tmp_path / 'out'}",
                  *ARGS, "--snr_gamma=5.0")
    assert "EDMDPMSolverMultistepScheduler" in err and "drop --snr_gamma" in err


def test_the_jax_backend_refuses_edm_by_name(sdxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [a for a in ARGS if a != "--backend=torch"]
    err = refused(capsys, f"--pretrained_model_name_or_path={sdxl_dir}", f"--output_dir={tmp_path}", *argv,
                  "--backend=jax", "--do_edm_style_training")
    assert "--do_edm_style_training is only supported by the torch backend; use --backend=torch" in err


def test_a_non_sdxl_pipeline_refuses_edm(tmp_path: Path, sdxl_dir: Path, capsys: pytest.CaptureFixture,
                                         no_model_loads: None) -> None:
    sd = tmp_path / "sd"
    shutil.copytree(sdxl_dir / "scheduler", sd / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    (sd / "model_index.json").write_text(json.dumps(index))
    err = refused(capsys, f"--pretrained_model_name_or_path={sd}", f"--output_dir={tmp_path / 'out'}", *ARGS,
                  "--do_edm_style_training")
    assert "not an SDXL pipeline" in err and "Drop --do_edm_style_training" in err
