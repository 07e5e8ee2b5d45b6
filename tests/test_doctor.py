"""`jaxbooth doctor`: the report a user reads before a long run, and the late-failing checks it catches early."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxbooth import cli, doctor
from jaxbooth.spec import load_spec

BASE = ["--instance_prompt=a sks dog"]


def test_doctor_reports_devices_mesh_cache_and_backend_choice(capsys, tmp_path: Path, tiny_model_dir: Path):
    pytest.importorskip("jax")
    cache = tmp_path / "xla"
    cache.mkdir()
    (cache / "entry").write_bytes(b"x" * 4096)
    status = cli.main(["doctor", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={tmp_path}/out",
                       f"--compilation_cache_dir={cache}", "--train_batch_size=2", *BASE])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "jax devices            1 x cpu (cpu)" in out and "processes              1 (this is 0)" in out
    assert "data 1 x fsdp 1 over 1 device(s); global batch 2 per optimizer step" in out
    assert f"compilation cache      {cache} (4 KB in 1 files)" in out
    assert "backend                backend auto -> jax" in out
    assert "checks                 ok" in out


def test_doctor_names_each_late_failure_with_its_fix_and_exits_1(capsys, tmp_path: Path, monkeypatch):
    pytest.importorskip("jax")
    real = doctor.hub_token_problem
    monkeypatch.setattr(doctor, "hub_token_problem", lambda spec: real(spec, lambda: None))  # no saved login here
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    status = cli.main(["doctor", "--push_to_hub", f"--output_dir={blocker}/out", "--data_parallelism=4", *BASE])
    out = capsys.readouterr().out
    assert status == 1
    assert "problem: the mesh: --data_parallelism=4 x --fsdp_parallelism=1 = 4, but there are 1 devices" in out
    assert "problem: --push_to_hub: no Hub token found" in out and "hf auth login" in out
    assert f"problem: --output_dir={blocker}/out: cannot write in {blocker}" in out


def test_hub_token_found_anywhere_is_enough():
    spec = load_spec(["--push_to_hub", *BASE])
    assert doctor.hub_token_problem(spec, lambda: "hf_saved") is None
    assert doctor.hub_token_problem(load_spec(["--push_to_hub", "--hub_token=hf_x", *BASE]), lambda: None) is None
    assert doctor.hub_token_problem(load_spec(BASE), lambda: None) is None  # no push: nothing to check


def test_disk_need_follows_the_kept_checkpoints(tiny_model_dir: Path, tmp_path: Path):
    unet = doctor.folder_size(tiny_model_dir / "unet")[0]
    spec = load_spec([f"--output_dir={tmp_path}", "--max_train_steps=1000", "--checkpointing_steps=100", *BASE])
    assert doctor.checkpoint_bytes(spec, tiny_model_dir) == 3 * unet * 10
    limited = load_spec([f"--output_dir={tmp_path}", "--max_train_steps=1000", "--checkpointing_steps=100",
                         "--checkpoints_total_limit=2", *BASE])
    need = doctor.checkpoint_bytes(limited, tiny_model_dir)
    assert need == 3 * unet * 2
    assert doctor.disk_problem(limited, need, lambda path: need) is None
    problem = doctor.disk_problem(limited, need, lambda path: need - 1)
    assert "checkpoints to keep" in problem and "--checkpoints_total_limit" in problem
    assert doctor.checkpoint_bytes(spec, None) is None  # a Hub id: nothing on disk to measure


def test_help_lists_what_doctor_checks(capsys):
    assert cli.main(["doctor", "--help"]) == 0
    assert "Hub token" in capsys.readouterr().out
