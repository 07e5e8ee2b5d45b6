"""Joining a multi-host run: what the environment and the spec say, and the call JAX gets, before any device query."""

from __future__ import annotations

import sys
import types

import pytest

from jaxbooth import api, distributed, pipelines
from jaxbooth.errors import JaxboothError
from jaxbooth.spec import load_spec

BASE = ["--pretrained_model_name_or_path=m", "--instance_data_dir=d", "--instance_prompt=p"]
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}


@pytest.mark.parametrize(("environ", "found"), [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, None),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, "Cloud TPU pod slice of 4 workers"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, "multi-slice TPU"),
    (SLURM, "SLURM job of 2 tasks"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),  # one task: a single host
    ({k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}, None),  # not inside a task (salloc shell)
])
def test_the_launch_environment_says_when_a_process_is_one_host_of_several(environ, found):
    cluster = distributed.detected_cluster(environ)
    assert (cluster is None) if found is None else (found in cluster)


def test_explicit_peers_win_then_multi_host_then_detection(monkeypatch):
    monkeypatch.setattr(distributed.os, "environ", dict(SLURM))
    explicit = load_spec([*BASE, "--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1"])
    assert distributed.multi_host_mode(explicit)[0] == "explicit"
    assert distributed.multi_host_mode(load_spec(BASE)) == ("discover", "a SLURM job of 2 tasks (SLURM_NTASKS)")
    monkeypatch.setattr(distributed.os, "environ", {})
    assert distributed.multi_host_mode(load_spec(BASE)) is None
    assert distributed.multi_host_mode(load_spec([*BASE, "--multi_host"])) == ("discover", "--multi_host")


@pytest.fixture
def fake_jax(monkeypatch):
    """jax.distributed recorded; a device query before initialize fails as real JAX refuses it."""
    pytest.importorskip("jax")
    import jax

    calls: list = []
    state = {"initialized": False}

    def initialize(*args, **kwargs):
        if calls and calls[-1][0] == "devices":
            raise RuntimeError("jax.distributed.initialize() must be called before any JAX computations")
        calls.append(("initialize", kwargs))
        state["initialized"] = True

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["initialized"])
    monkeypatch.setattr(api, "probe_device", lambda: calls.append(("devices", {})) or _cpu())
    monkeypatch.setattr(pipelines, "detected_family", lambda spec: None)  # no model folder to read here
    return calls


def _cpu():
    from jaxbooth.spec import DeviceInfo

    return DeviceInfo(platform="cpu", memory_bytes=None, count=1)


def test_backend_auto_joins_a_detected_pod_before_it_asks_for_devices(fake_jax, monkeypatch):
    monkeypatch.setattr(distributed.os, "environ", {"TPU_WORKER_HOSTNAMES": "w-0,w-1"})
    assert api.resolve_backend(load_spec(BASE)) == "jax"
    assert fake_jax == [("initialize", {}), ("devices", {})]  # discovery: no arguments, JAX finds the peers


def test_explicit_flags_are_passed_on_once(fake_jax, monkeypatch):
    from jaxbooth.jax_backend import mesh

    monkeypatch.setattr(distributed.os, "environ", {})
    spec = load_spec([*BASE, "--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1"])
    api.resolve_backend(spec)
    mesh.initialize_distributed(spec)  # the backend's start-up again: already joined, nothing more
    assert fake_jax == [("initialize", {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                        "process_id": 1}), ("devices", {})]


def test_a_single_host_never_initializes(fake_jax, monkeypatch):
    monkeypatch.setattr(distributed.os, "environ", {})
    api.resolve_backend(load_spec(BASE))
    assert fake_jax == [("devices", {})]


def test_a_failed_join_is_one_error_naming_why_and_the_fix(monkeypatch):
    pytest.importorskip("jax")
    import jax

    from jaxbooth.jax_backend import mesh

    def refuse(*args, **kwargs):
        raise RuntimeError("no coordinator")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.os, "environ", {})
    with pytest.raises(JaxboothError, match=r"--multi_host\) failed: no coordinator; pass --coordinator_address"):
        mesh.initialize_distributed(load_spec([*BASE, "--multi_host"]))


def test_torch_launches_never_import_jax_to_decide(monkeypatch):
    monkeypatch.setattr(distributed.os, "environ", {})
    monkeypatch.setitem(sys.modules, "jaxbooth.jax_backend.mesh", types.ModuleType("boom"))  # would fail if used
    api.join_multi_host_run(load_spec([*BASE, "--backend=torch"]))
