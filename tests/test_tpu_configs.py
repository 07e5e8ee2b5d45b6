"""tpu_configs/: every run spec loads, validates for the JAX backend, builds its mesh on the slice's
device count, comments each override, and fits the memory plan written in base.yaml.

The meshes are built in one subprocess with ``--xla_force_host_platform_device_count`` set to the
largest slice, each over the first ``chips`` CPU devices (the flag must be set before jax starts).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxbooth import spec as spec_lib
from jaxbooth.errors import JaxboothError
from tests._logs import WarningCollector

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "tpu_configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name != "base.yaml")
REQUIRED = ["--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5",
            "--instance_data_dir=dog", "--instance_prompt=a photo of sks dog"]
# "# slice: v5p-8 | chips: 4 | hosts: 1 | HBM per chip: 95 GB": the numbers base.yaml cites its sources for
HEADER = re.compile(r"^# slice: (\S+) \| chips: (\d+) \| hosts: (\d+) \| HBM per chip: (\d+) (GB|GiB)$", re.M)

# The memory plan of base.yaml: SD 1.x parameter counts, bytes per trained and frozen parameter,
# activation budget per 512-px image.
UNET_PARAMS, TEXT_ENCODER_PARAMS, VAE_PARAMS = 859.5e6, 123.1e6, 83.7e6
TRAINED_BYTES, FROZEN_BYTES = 16, 4
IMAGE_BUDGET, IMAGE_BUDGET_REMAT = 12e9, 6e9


def slice_info(path: Path) -> dict:
    match = HEADER.search(path.read_text())
    assert match, f"{path.name}: no '# slice: NAME | chips: N | hosts: H | HBM per chip: X GB' header line"
    name, chips, hosts, hbm, unit = match.groups()
    return {"name": name, "chips": int(chips), "hosts": int(hosts),
            "hbm_bytes": int(hbm) * (2**30 if unit == "GiB" else 10**9)}


def load(path: Path, *extra: str) -> spec_lib.RunSpec:
    return spec_lib.load_spec(["--config", str(path), *REQUIRED, *extra])


def test_every_slice_of_the_issue_has_a_config():
    assert {p.stem for p in CONFIGS} == {"v4-8", "v4-32", "v5litepod-8", "v5litepod-16", "v5p-8", "v5p-32",
                                         "v6e-8", "gpu-80gb"}


@pytest.fixture
def spec_warnings():
    """Warnings logged on the jaxbooth logger, by a handler of its own (it may not propagate to caplog's)."""
    handler, logger = WarningCollector(), logging.getLogger("jaxbooth")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_spec_warnings_sees_what_the_loader_warns(spec_warnings):
    load(CONFIG_DIR / "base.yaml", "--prior_loss_weight=0.5")  # set without prior preservation: a warning
    assert any("prior_loss_weight" in message for message in spec_warnings)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_validates_and_says_how_to_run_it(path, spec_warnings):
    info = slice_info(path)
    assert info["name"] == path.stem
    assert info["chips"] % info["hosts"] == 0
    text = path.read_text()
    assert "extends: base.yaml" in text.splitlines()
    assert f"jaxbooth train --config tpu_configs/{path.name}" in text
    spec = load(path)
    assert spec_warnings == []
    assert spec.backend == "jax" and spec.optim.max_train_steps is not None
    spec_lib.check_backend(spec, "jax")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_override_changes_base_and_says_why(path):
    base = spec_lib.load_spec(["--config", str(CONFIG_DIR / "base.yaml")]).flat()
    data = yaml.safe_load(path.read_text())
    data.pop("extends")
    keys = [key for value in data.values() for key in value]  # each file writes section: {key: value}
    spec = load(path).flat()
    assert 1 <= len(keys) <= 5, keys
    lines = path.read_text().splitlines()
    for key in keys:
        assert spec[key] != base[key], f"{path.name}: {key} repeats base.yaml's value"
        i = next(n for n, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
        has_comment = "#" in lines[i] or lines[i - 1].strip().startswith("#")
        assert has_comment, f"{path.name}:{i + 1}: {key} is overridden without a comment saying why"


def plan_fits(*, hbm_bytes: float, fsdp: int, batch: int, remat: bool, train_text_encoder: bool) -> bool:
    """base.yaml's memory plan: sharded trained state + replicated frozen params + per-image budget <= HBM."""
    trained = UNET_PARAMS + (TEXT_ENCODER_PARAMS if train_text_encoder else 0)
    frozen = VAE_PARAMS + (0 if train_text_encoder else TEXT_ENCODER_PARAMS)
    state = TRAINED_BYTES * trained / fsdp + FROZEN_BYTES * frozen
    return hbm_bytes - state >= batch * (IMAGE_BUDGET_REMAT if remat else IMAGE_BUDGET)


def test_the_memory_plan_rejects_replicated_state_on_a_16_gb_chip():
    # why v5litepod-8 shards: replicated, the UNet's training state leaves ~1 GB of 16 GB
    assert not plan_fits(hbm_bytes=16e9, fsdp=1, batch=1, remat=True, train_text_encoder=False)
    assert plan_fits(hbm_bytes=16e9, fsdp=8, batch=1, remat=True, train_text_encoder=False)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_fits_the_memory_plan_of_base_yaml(path):
    spec, info = load(path), slice_info(path)
    assert plan_fits(hbm_bytes=info["hbm_bytes"], fsdp=spec.parallelism.fsdp_parallelism,
                     batch=spec.optim.train_batch_size, remat=spec.precision.gradient_checkpointing,
                     train_text_encoder=spec.model.train_text_encoder), info


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "gpu-80gb"], ids=lambda p: p.stem)
def test_tpu_config_refuses_a_slice_of_another_size(path):
    spec, chips = load(path), slice_info(path)["chips"]
    assert spec_lib.mesh_shape(spec, chips)[0] * spec_lib.mesh_shape(spec, chips)[1] == chips
    with pytest.raises(JaxboothError, match="devices"):
        spec_lib.mesh_shape(spec, chips * 2)


MESH_SCRIPT = """
import json, sys
import jax
from jaxbooth import spec as spec_lib
from jaxbooth.jax_backend.mesh import make_mesh
out = {}
for path, chips in json.loads(sys.argv[1]):
    spec = spec_lib.load_spec(["--config", path, *json.loads(sys.argv[2])])
    shape = spec_lib.mesh_shape(spec, chips)
    mesh = make_mesh(shape, jax.devices()[:chips])
    out[path] = {"shape": list(shape), "axes": dict(mesh.shape), "devices": int(mesh.devices.size),
                 "distinct": len({d.id for d in mesh.devices.flat})}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def built_meshes() -> dict:
    """Every config's mesh, built in one jax process with as many CPU devices as the largest slice."""
    wanted = [(str(p), slice_info(p)["chips"]) for p in CONFIGS]
    most = max(chips for _, chips in wanted)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={most}"}
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps(wanted), json.dumps(REQUIRED)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_mesh_on_the_slice_device_count(path, built_meshes):
    chips = slice_info(path)["chips"]
    built = built_meshes[str(path)]
    data, fsdp = built["shape"]
    assert data * fsdp == chips
    assert built["axes"] == {"data": data, "fsdp": fsdp}
    assert built["devices"] == built["distinct"] == chips
