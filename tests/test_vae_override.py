"""The VAE override as diffusers' scripts take it: a standalone AutoencoderKL folder (config.json at its
root, e.g. stabilityai/sd-vae-ft-mse) or a pipeline with vae/, on both backends; anything else is one
error naming the flag."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.hub import resolve_vae_dir


@pytest.fixture(scope="module")
def standalone_vae(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline's VAE as a standalone folder, its weights scaled so it differs from the base."""
    import safetensors.numpy

    folder = tmp_path_factory.mktemp("vae") / "sd-vae-ft-tiny"
    shutil.copytree(tiny_model_dir / "vae", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = {k: (v * 1.5).astype(v.dtype) for k, v in safetensors.numpy.load_file(weights).items()}
    safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def test_both_layouts_resolve_and_anything_else_is_refused(tiny_model_dir: Path, standalone_vae: Path,
                                                           tmp_path: Path) -> None:
    assert resolve_vae_dir(tiny_model_dir) == tiny_model_dir
    assert resolve_vae_dir(standalone_vae) == standalone_vae
    (tmp_path / "empty").mkdir()
    with pytest.raises(JaxboothError, match="--pretrained_vae_model_name_or_path"):
        resolve_vae_dir(tmp_path / "empty")


def test_jax_loads_a_standalone_vae(tiny_model_dir: Path, standalone_vae: Path) -> None:
    from jaxbooth.jax_backend.loading import load_models, resolve_model_paths
    from jaxbooth.spec import load_spec_from_dict

    def vae_params(**extra):
        spec = load_spec_from_dict({"pretrained_model_name_or_path": str(tiny_model_dir), **extra})
        return load_models(spec, resolve_model_paths(spec)).vae_params

    base, override = vae_params(), vae_params(pretrained_vae_model_name_or_path=str(standalone_vae))
    import jax

    pairs = zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(override), strict=True)
    assert any(not np.allclose(a, b) for a, b in pairs), "the override VAE was not the one loaded"


@pytest.mark.requires_torch
def test_torch_loads_a_standalone_vae(tiny_model_dir: Path, standalone_vae: Path) -> None:
    pytest.importorskip("diffusers")
    from jaxbooth.text import load_tokenizer
    from jaxbooth.torch_backend import models

    tokenizer = load_tokenizer(tiny_model_dir)
    base = models.load_models(tiny_model_dir, tokenizer=tokenizer).vae.state_dict()
    override = models.load_models(tiny_model_dir, vae_dir=standalone_vae, tokenizer=tokenizer).vae.state_dict()
    assert any(not np.allclose(base[k].numpy(), override[k].numpy()) for k in base)
