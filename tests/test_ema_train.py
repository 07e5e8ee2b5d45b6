"""``--use_ema`` / ``--ema_decay`` and ``--zero_terminal_snr`` in real training runs, one per backend.

Each run trains the tiny pipeline two steps with a checkpoint after each: the checkpoints hold the raw weights
of steps 1 and 2, so the output must be their EMA by diffusers' warmup decay (step 1 copies, step 2 decays by
min(0.5, 2/11)), and differ from the raw step-2 weights. The checkpoints hold the average for a resume (orbax's
state on JAX, accelerate's registered object on torch). The same runs set ``--zero_terminal_snr``: the step trains
on a schedule whose last SNR is 0, and the saved scheduler samples with rescaled betas and trailing timesteps.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.numpy

from jaxbooth import ema
from jaxbooth.cli import main

EMA_DECAY = 0.5
EMA_ARGS = ("--use_ema", f"--ema_decay={EMA_DECAY}", "--zero_terminal_snr")


def _train(backend: str, model_dir: Path, out: Path, *extra: str) -> None:
    assert main(["train", f"--backend={backend}", f"--pretrained_model_name_or_path={model_dir}",
                 f"--output_dir={out}", "--instance_prompt=a photo of sks toy", "--resolution=32",
                 "--train_batch_size=1", "--learning_rate=1e-3", "--max_train_steps=2", "--checkpointing_steps=1",
                 "--seed=0", "--report_to=none", *EMA_ARGS, *extra]) == 0


def _ema_run(backend: str, model_dir: Path, root: Path, spy: tuple[object, str, object]) -> SimpleNamespace:
    """The run, with `spy` patched in to record the last SNR of the training tables (``last_snr``)."""
    out = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(*spy)
        _train(backend, model_dir, out)
    return SimpleNamespace(out=out)


@pytest.fixture(scope="module")
def jax_ema_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """--use_ema --ema_decay=0.5 --zero_terminal_snr on the JAX backend."""
    from jaxbooth.jax_backend import train

    seen: list = []
    real = train.make_train_step

    def spy(**static):
        seen.append(float(np.asarray(static["tables"].snr)[-1]))
        return real(**static)

    run = _ema_run("jax", tiny_model_dir, tmp_path_factory.mktemp("jax-ema"), (train, "make_train_step", spy))
    run.last_snr = seen
    return run


@pytest.fixture(scope="module")
def torch_ema_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """--use_ema --ema_decay=0.5 --zero_terminal_snr on the torch backend."""
    pytest.importorskip("torch")
    from jaxbooth.torch_backend import train

    seen: list = []
    real = train.run_loop

    def spy(trainer, start_step):
        seen.append(float(trainer.tables.snr[-1]))
        return real(trainer, start_step)

    run = _ema_run("torch", tiny_model_dir, tmp_path_factory.mktemp("torch-ema"), (train, "run_loop", spy))
    run.last_snr = seen
    return run


def _unet(folder: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_output_is_the_ema_of_the_raw_weights(backend: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(f"{backend}_ema_run")
    first, second, output = _unet(run.out / "checkpoint-1"), _unet(run.out / "checkpoint-2"), _unet(run.out)
    decay = ema.ema_decay(2, EMA_DECAY)
    assert decay == pytest.approx(2 / 11)
    moved = 0
    for key, raw in second.items():
        expected = ema.ema_update(first[key], raw, np.float32(decay))  # step 1's average is step 1's weights
        np.testing.assert_allclose(output[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)
        moved += int(not np.allclose(output[key], raw, rtol=0, atol=1e-6))
    assert moved > len(second) // 2, "the output is the raw step-2 weights, not their average"


def test_a_jax_checkpoint_holds_the_average_in_its_orbax_state(jax_ema_run: SimpleNamespace) -> None:
    """The average lives in the optimizer state, which orbax saves and a resume restores whole (resume
    exactness of the state: tests/jax_backend/test_train.py::test_resume_continues_exactly)."""
    import jax
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore((jax_ema_run.out / "checkpoint-2" / "state").absolute())
    opt_state = state["opt_state"]
    averages = opt_state["ema_params"] if isinstance(opt_state, dict) else opt_state[2]
    assert int(np.asarray(opt_state["ema_micro_steps"] if isinstance(opt_state, dict) else opt_state[1])) == 2
    raw = jax.tree_util.tree_leaves(state["params"])
    kept = jax.tree_util.tree_leaves(averages)
    assert len(raw) == len(kept) and any(not np.array_equal(a, b) for a, b in zip(raw, kept, strict=True))


def test_a_torch_checkpoint_holds_the_average_for_accelerate_to_restore(torch_ema_run: SimpleNamespace) -> None:
    """accelerate pickles the registered EmaWeights into state/ (load_state restores it through
    EmaWeights.load_state_dict): after step 1 the average is step 1's weights (decay 0)."""
    import torch

    saved = torch.load(torch_ema_run.out / "checkpoint-1" / "state" / "custom_checkpoint_0.pkl", weights_only=False)
    assert saved["optimizer_steps"] == 1 and saved["decay"] == EMA_DECAY
    first = _unet(torch_ema_run.out / "checkpoint-1")
    assert len(saved["averages"]) == len(first)
    assert sorted(tuple(a.shape) for a in saved["averages"]) == sorted(v.shape for v in first.values())
    averages = [a.numpy() for a in saved["averages"]]  # a0 - (a0 - w1): w1 up to float rounding
    for key, value in first.items():
        assert any(a.shape == value.shape and np.allclose(a, value, rtol=0, atol=1e-6) for a in averages), key


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_zero_terminal_snr_trains_to_zero_and_saves_a_trailing_rescaled_scheduler(
        backend: str, request: pytest.FixtureRequest) -> None:
    runs = request.getfixturevalue(f"{backend}_ema_run")
    assert runs.last_snr == [0.0]
    config = json.loads((runs.out / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"


def test_torch_validation_samples_the_ema_weights_then_restores_the_raw_ones() -> None:
    torch = pytest.importorskip("torch")
    from jaxbooth.torch_backend.loop import validate_with_ema
    from jaxbooth.torch_backend.optim import EmaWeights

    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    averages = EmaWeights([param], decay=0.5)
    with torch.no_grad():
        param.add_(1.0)
    averages.step()  # step 1 copies: [2, 3]
    with torch.no_grad():
        param.add_(1.0)  # raw [3, 4]
    averages.step()  # decay min(0.5, 2/11): [2, 3] + 9/11 * [1, 1]
    sampled: list = []
    validate_with_ema(SimpleNamespace(ema=averages, validate=lambda step: sampled.append(param.detach().clone())), 2)
    np.testing.assert_allclose(sampled[0].numpy(), [2 + 9 / 11, 3 + 9 / 11], rtol=1e-6)
    np.testing.assert_array_equal(param.detach().numpy(), [3.0, 4.0])
    restored = EmaWeights([torch.nn.Parameter(torch.zeros(2))], decay=0.5)
    restored.load_state_dict(averages.state_dict())
    assert restored.optimizer_steps == 2
    np.testing.assert_array_equal(restored.averages[0].numpy(), averages.averages[0].numpy())


def test_jax_ema_state_steps_once_per_accumulation_window() -> None:
    """optim.with_ema under gradient accumulation: the average moves after micro-steps 2 and 4 only, by the decay of
    optimizer steps 1 and 2, toward the params those updates produced."""
    import jax.numpy as jnp
    import optax

    from jaxbooth.jax_backend import optim

    tx = optim.make_optimizer(learning_rate_schedule=0.1, gradient_accumulation_steps=2, ema_decay=EMA_DECAY)
    params = {"unet": {"w": jnp.array([1.0, -2.0])}}
    state = tx.init(params)
    np.testing.assert_array_equal(optim.ema_params(state)["unet"]["w"], [1.0, -2.0])
    after_update = []
    for micro, grad in enumerate(([1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 1.0]), start=1):
        before = optim.ema_params(state)["unet"]["w"]
        updates, state = tx.update({"unet": {"w": jnp.array(grad)}}, state, params)
        params = optax.apply_updates(params, updates)
        average = optim.ema_params(state)["unet"]["w"]
        if micro % 2:
            np.testing.assert_array_equal(average, before)
        else:
            after_update.append(np.asarray(params["unet"]["w"]))
    first, second = after_update
    expected = ema.ema_update(first, second, np.float32(ema.ema_decay(2, EMA_DECAY)))
    np.testing.assert_allclose(optim.ema_params(state)["unet"]["w"], expected, rtol=1e-6)
    assert not np.allclose(expected, second)
    np.testing.assert_array_equal(optim.output_params(params, state, False)["unet"]["w"], params["unet"]["w"])
    with pytest.raises(ValueError, match="no EMA"):
        optim.ema_params(optim.make_optimizer(learning_rate_schedule=0.1).init(params))


def test_torch_refuses_ddpm_loss_options_under_edm_style_training(tiny_model_dir: Path) -> None:
    pytest.importorskip("torch")
    from jaxbooth import spec as spec_lib
    from jaxbooth.torch_backend import train

    base = spec_lib.replace_flat(spec_lib.RunSpec(), do_edm_style_training=True)
    assert train.edm_loss_problems(base, tiny_model_dir) == []
    spec = spec_lib.replace_flat(base, zero_terminal_snr=True, loss_type="huber")
    problems = train.edm_loss_problems(spec, tiny_model_dir)
    assert len(problems) == 2 and "--zero_terminal_snr" in problems[0] and "--loss_type" in problems[1]
    assert train.edm_loss_problems(spec_lib.replace_flat(spec, do_edm_style_training=False), tiny_model_dir) == []
