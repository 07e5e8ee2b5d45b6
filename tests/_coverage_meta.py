"""Meta checks of tests/test_spec_coverage.py: keys whose account is a behaviour, not a difference.

Each ``check(env, backend)`` raises AssertionError (or a pytest failure) when the key does not do
what its docstring says on that backend.
"""

from __future__ import annotations

import json
import shutil

import pytest

from jaxbooth.errors import JaxboothError
from tests import _coverage_probes as jp
from tests import _coverage_torch as tp
from tests._coverage_env import Env, make_spec


def backend_dispatch(env: Env, backend: str) -> None:
    """--backend picks the trainer: `jaxbooth train --backend=X` runs X's train() and not the other."""
    from unittest import mock

    from jaxbooth import cli
    from jaxbooth.jax_backend import train as jax_train
    from jaxbooth.torch_backend import train as torch_train

    ran: list[str] = []
    argv = [f"--backend={backend}", f"--pretrained_model_name_or_path={env.tiny}", f"--output_dir={env.fresh('cli')}",
            f"--instance_data_dir={env.two_images}", "--instance_prompt=a photo of sks toy", "--seed=0",
            "--report_to=none"]
    with mock.patch.object(jax_train, "train", lambda spec: ran.append("jax")), \
            mock.patch.object(torch_train, "train", lambda spec: ran.append("torch")):
        assert cli.cmd_train(argv) == 0
    assert ran == [backend]
    other = "torch" if backend == "jax" else "jax"
    only_other = {"jax": "--use_8bit_adam", "torch": "--attention=chunked"}[backend]
    with pytest.raises(JaxboothError, match=f"--backend={other}"):
        cli.cmd_train([*argv, only_other])


def family_must_match_the_pipeline(env: Env, backend: str) -> None:
    """model_family is jaxbooth's own key: both backends read the family from model_index.json, so
    'sd' behaves as 'auto' on an SD pipeline, and a family the pipeline's class is not (the SDXL
    script's preset sets 'sdxl') is refused by name before anything loads."""
    sdxl = env.root / "sdxl-index"
    if not sdxl.exists():
        shutil.copytree(env.tiny, sdxl)
        index = json.loads((sdxl / "model_index.json").read_text())
        (sdxl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    probe = jp.jax_paths if backend == "jax" else tp.torch_inputs
    assert probe(make_spec(env, {"model_family": "sd"}), env) == probe(make_spec(env, {}), env)
    with pytest.raises(JaxboothError, match="_class_name=StableDiffusionXLPipeline .*model_family=sd"):
        probe(make_spec(env, {"model_family": "sd", "pretrained_model_name_or_path": str(sdxl)}), env)
    with pytest.raises(JaxboothError, match="_class_name=StableDiffusionPipeline .*model_family=sdxl"):
        probe(make_spec(env, {"model_family": "sdxl"}), env)


def jax_always_precomputes(env: Env, backend: str) -> None:
    """The JAX backend encodes every prompt once with a frozen text encoder (caches.build_caches) and
    trains from those embeddings; the encoder's params are never part of the train state, so
    pre_compute_text_embeddings is how it always runs."""
    frozen = jp.jax_caches(make_spec(env, {}), env)[0]
    assert "text_embeddings" in frozen and "input_ids" not in frozen


def data_axis_follows_the_devices(env: Env, backend: str) -> None:
    """data x fsdp must equal the device count, so data_parallelism is fixed by fsdp_parallelism: the
    key only states it, and a value that does not fit is refused (derived.mesh_shape, which train() uses)."""
    assert jp.jax_mesh(make_spec(env, {"data_parallelism": 8}), env) == jp.jax_mesh(make_spec(env, {}), env)
    with pytest.raises(JaxboothError, match="--data_parallelism=4"):
        jp.jax_mesh(make_spec(env, {"data_parallelism": 4}), env)
