"""What `jaxbooth train` fills in when a key is not given: the built-in model runs at its own size."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxbooth import run_defaults, tiny
from jaxbooth.spec import given_keys, load_spec


def test_given_keys_sees_flags_and_config_files(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  resolution: 256\n")
    assert {"resolution", "learning_rate"} <= given_keys(["--config", str(config), "--learning_rate=1e-5"])
    assert "resolution" not in given_keys(["--learning_rate=1e-5"])


@pytest.fixture
def builtin(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> Path:
    monkeypatch.setattr(tiny, "builtin_tiny_model", lambda: tiny_model_dir)
    return tiny_model_dir


def test_builtin_model_trains_at_its_own_resolution_unless_given(builtin: Path) -> None:
    argv = ["--max_train_steps=1"]
    spec = run_defaults.fill_defaults(load_spec(argv), given_keys(argv))
    assert spec.model.pretrained_model_name_or_path == str(builtin)
    assert spec.data.resolution == tiny.RESOLUTION["tiny"]
    argv = ["--max_train_steps=1", "--resolution=128"]
    assert run_defaults.fill_defaults(load_spec(argv), given_keys(argv)).data.resolution == 128


def test_a_given_model_keeps_the_diffusers_default_resolution(tiny_model_dir: Path) -> None:
    argv = [f"--pretrained_model_name_or_path={tiny_model_dir}"]
    assert run_defaults.fill_defaults(load_spec(argv), given_keys(argv)).data.resolution == 512
