"""``loss.py`` against diffusers' own training math, and the per-step randomness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jaxbooth import diffusion
from jaxbooth.torch_backend.loss import LossOptions, denoising_loss, draw_inputs, make_generator, step_seed


class ToyUNet(torch.nn.Module):
    """Stands in for the UNet: output depends on the input, the timestep and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=0.3)

    def forward(self, x, t, encoder_hidden_states, return_dict=True):
        text = encoder_hidden_states.mean((1, 2)).reshape(-1, 1, 1, 1)
        return (self.conv(x) + t.float().reshape(-1, 1, 1, 1) / 1000 + text,)


def diffusers_reference(unet, scheduler, latents, noise, timesteps, hidden, *, snr_gamma=None, prior=False,
                        prior_weight=1.0) -> torch.Tensor:
    """train_dreambooth.py's loss block, written with diffusers' scheduler and compute_snr."""
    from diffusers.training_utils import compute_snr

    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    v = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v else noise
    if prior:
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        prior_loss = F.mse_loss(pred_prior.float(), target_prior.float())
    if snr_gamma is None:
        loss = F.mse_loss(pred.float(), target.float())
    else:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / (snr + 1 if v else snr)
        loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3)) * weights).mean()
    return loss + prior_weight * prior_loss if prior else loss


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(4, 4, 8, 8, generator=g), "noise": torch.randn(4, 4, 8, 8, generator=g),
            "timesteps": torch.tensor([1, 300, 700, 998]), "hidden": torch.randn(4, 7, 16, generator=g)}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma, prior", [(None, False), (5.0, False), (None, True)])
def test_loss_matches_train_dreambooth_loss_block(prediction: str, snr_gamma, prior: bool, batch: dict,
                                                  tiny_model_dir: Path) -> None:
    from diffusers import DDPMScheduler

    config = json.loads((tiny_model_dir / diffusion.SCHEDULER_CONFIG).read_text()) | {"prediction_type": prediction}
    scheduler = DDPMScheduler.from_config(config)
    tables = diffusion.schedule_from_config(config).as_tables().map(torch.from_numpy)
    unet = ToyUNet()
    options = LossOptions(prediction_type=prediction, snr_gamma=snr_gamma, with_prior_preservation=prior,
                          prior_loss_weight=0.5)
    with torch.no_grad():
        got, aux = denoising_loss(unet, batch["latents"], batch["noise"], batch["timesteps"], batch["hidden"],
                                  tables, options)
        want = diffusers_reference(unet, scheduler, batch["latents"], batch["noise"], batch["timesteps"],
                                   batch["hidden"], snr_gamma=snr_gamma, prior=prior, prior_weight=0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (aux["prior_loss"] > 0) == prior


def test_loss_has_gradients_for_the_unet(batch: dict, tiny_model_dir: Path) -> None:
    tables = diffusion.load_schedule(tiny_model_dir).as_tables().map(torch.from_numpy)
    unet = ToyUNet()
    loss, _ = denoising_loss(unet, batch["latents"], batch["noise"], batch["timesteps"], batch["hidden"], tables,
                             LossOptions())
    loss.backward()
    assert unet.conv.weight.grad is not None and unet.conv.weight.grad.abs().sum() > 0


def test_step_seed_depends_on_seed_step_and_process_only() -> None:
    assert step_seed(0, 5, 0) == step_seed(0, 5, 0)
    seeds = {step_seed(s, m, p) for s in (0, 1) for m in range(50) for p in range(4)}
    assert len(seeds) == 2 * 50 * 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_draws_repeat_for_the_same_step_and_include_offset_noise() -> None:
    mean, std = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    options = LossOptions(offset_noise=True, latent_scaling_factor=0.5)
    a = draw_inputs(mean, std, make_generator(3, 7, 0, torch.device("cpu")), 1000, options)
    b = draw_inputs(mean, std, make_generator(3, 7, 0, torch.device("cpu")), 1000, options)
    c = draw_inputs(mean, std, make_generator(3, 8, 0, torch.device("cpu")), 1000, options)
    for x, y in ((a.latents, b.latents), (a.noise, b.noise), (a.timesteps, b.timesteps)):
        assert torch.equal(x, y)
    assert not torch.equal(a.noise, c.noise)
    assert a.timesteps.dtype == torch.long and ((0 <= a.timesteps) & (a.timesteps < 1000)).all()
    assert a.latents.std() < 0.6  # scaled by the VAE factor
    # offset noise: a per-(example, channel) constant on top of white noise, as diffusers adds
    plain = draw_inputs(mean, std, make_generator(3, 7, 0, torch.device("cpu")), 1000, LossOptions())
    shift = (a.noise - plain.noise).flatten(2)
    assert torch.allclose(shift, shift[..., :1].expand_as(shift)) and shift.abs().max() > 0
