"""Class-image top-up (`jax_backend/class_images.py`) on the tiny pipeline: shortfall only, resumable, split
over hosts, from the run's loaded models. Names, seeds and file modes are checked over both backends in
tests/test_shared_outputs.py."""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxbooth.class_images import image_seed
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend import class_images
from jaxbooth.jax_backend.class_images import ensure_class_images, load_generation_sampler, sampler_from_loaded
from tests._loaded import loaded_models
from tests._logs import logged_warning

PROMPT = "a photo of a toy"
STEPS = 2  # enough to exercise the loop; quality is not the point here
NAME = re.compile(r"^(\d+)-([0-9a-f]{40})\.jpg$")


@pytest.fixture(scope="module")
def sampler(tiny_model_dir: Path):
    """One loaded sampler for the module, so the denoising loop compiles once."""
    return load_generation_sampler(tiny_model_dir, dtype=jnp.float32)


def generated(folder: Path) -> dict[int, Path]:
    """index -> file for every `N-<sha1>.jpg` in `folder`."""
    return {int(m.group(1)): path for path in folder.iterdir() if (m := NAME.match(path.name))}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), np.int16)


def write_png(path: Path, value: int) -> None:
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_generates_the_shortfall_then_only_what_is_missing(tiny_model_dir: Path, sampler, tmp_path: Path) -> None:
    folder = tmp_path / "class"  # does not exist yet: created
    assert ensure_class_images(tiny_model_dir, folder, PROMPT, 3, sample_batch_size=2, num_inference_steps=STEPS,
                               seed=0, sampler=sampler) == 3
    first = generated(folder)
    assert sorted(first) == [0, 1, 2]
    before = {path.name: path.read_bytes() for path in first.values()}

    assert ensure_class_images(tiny_model_dir, folder, PROMPT, 5, sample_batch_size=2, num_inference_steps=STEPS,
                               seed=0, sampler=sampler) == 2
    second = generated(folder)
    assert sorted(second) == [0, 1, 2, 3, 4]
    assert {name: (folder / name).read_bytes() for name in before} == before  # old files untouched
    assert len({path.name.split("-")[1] for path in second.values()}) == 5, "a resumed run repeated an image"
    assert all(Image.open(path).size == (64, 64) for path in second.values())
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_enough_images_returns_without_loading_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "class"
    folder.mkdir()
    for value in range(3):
        write_png(folder / f"user-{value}.png", value * 50)
    (folder / ".DS_Store").write_bytes(b"junk")  # hidden files never count (nor fail)

    def fail(*args, **kwargs):
        raise AssertionError("loaded a model although the folder has enough images")

    monkeypatch.setattr(class_images, "load_generation_sampler", fail)
    assert ensure_class_images(tmp_path / "no-model", folder, PROMPT, 3) == 0
    assert ensure_class_images(tmp_path / "no-model", folder, PROMPT, 2) == 0
    assert len(list(folder.iterdir())) == 4


def test_unreadable_class_file_fails_before_generating(tmp_path: Path) -> None:
    folder = tmp_path / "class"
    folder.mkdir()
    write_png(folder / "ok.png", 0)
    (folder / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(JaxboothError, match="broken.jpg"):
        ensure_class_images(tmp_path / "no-model", folder, PROMPT, 5)
    with logged_warning("broken.jpg"):  # skipped with skip_bad: 1 usable image counts
        assert class_images.existing_class_images(folder, skip_bad=True) == [folder / "ok.png"]


def test_two_hosts_write_disjoint_files_that_cover_the_shortfall(
        tiny_model_dir: Path, sampler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 'hosts' as threads in one process; the barrier makes both count before either writes."""
    folder = tmp_path / "class"
    folder.mkdir()
    write_png(folder / "user.png", 128)
    barrier = threading.Barrier(2, timeout=600)
    monkeypatch.setattr(class_images, "_barrier", lambda name: barrier.wait())
    written: dict[int, int] = {}
    errors: list[BaseException] = []

    def host(rank: int) -> None:
        try:
            written[rank] = ensure_class_images(tiny_model_dir, folder, PROMPT, 6, sample_batch_size=2,
                                                num_inference_steps=STEPS, seed=3, process_index=rank,
                                                process_count=2, sampler=sampler)
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=host, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert written == {0: 3, 1: 2}
    files = generated(folder)
    assert sorted(files) == [1, 2, 3, 4, 5]  # after user.png, as diffusers numbers them
    assert len({path.name for path in files.values()}) == 5


def test_sampler_and_precision_defaults_follow_diffusers() -> None:
    assert class_images.default_sampler_name({"_class_name": "PNDMScheduler"}) == "PNDMScheduler"
    assert class_images.default_sampler_name({"_class_name": "DDPMScheduler"}) == "DDPMScheduler"
    assert class_images.default_sampler_name({"_class_name": "LCMScheduler"}) == "DPMSolverMultistepScheduler"
    assert class_images.generation_dtype(None, "gpu") == jnp.float16
    assert class_images.generation_dtype(None, "tpu") == jnp.float32
    assert class_images.generation_dtype("bf16") == jnp.bfloat16
    assert class_images.generation_dtype("no") == jnp.float32
    with pytest.raises(JaxboothError, match="prior_generation_precision"):
        class_images.generation_dtype("int8")


def test_images_do_not_depend_on_the_batch_size(tiny_model_dir: Path, sampler, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Image i comes from its own seed: batches of 1 and of 3 make the same images, one padded
    sampler call per batch (4 images in batches of 3: two calls of 3, one compiled loop)."""
    calls: list[tuple[list[int], list[np.ndarray]]] = []
    generate = sampler.generate

    def recording_generate(prompts, *, seed, **settings):
        images = generate(prompts, seed=seed, **settings)
        calls.append((list(seed), [np.asarray(image, np.int16) for image in images]))
        return images

    monkeypatch.setattr(sampler, "generate", recording_generate)
    made: dict[int, dict[int, np.ndarray]] = {}
    for batch in (1, 3):
        calls.clear()
        folder = tmp_path / f"batch{batch}"
        ensure_class_images(tiny_model_dir, folder, PROMPT, 4, sample_batch_size=batch, num_inference_steps=STEPS,
                            seed=5, sampler=sampler)
        assert [len(seeds) for seeds, _ in calls] == [batch] * -(-4 // batch)  # ceil(4 / batch) calls, all padded
        assert sorted(generated(folder)) == [0, 1, 2, 3]
        made[batch] = {seed: image for seeds, images in calls for seed, image in zip(seeds, images, strict=True)}
    assert calls[1][0] == [image_seed(5, 3)] * 3  # the last batch: one image, padded with its seed
    seeds = [image_seed(5, index) for index in range(4)]
    assert sorted(made[1]) == sorted(made[3]) == sorted(seeds)
    for seed in seeds:  # the pixels before JPEG: equal up to float rounding (batch-shaped kernels)
        np.testing.assert_allclose(made[1][seed], made[3][seed], atol=1)
    assert not np.array_equal(made[1][seeds[0]], made[1][seeds[1]]), "two class images share their noise"


def test_generates_from_the_loaded_models_without_loading_again(tiny_model_dir: Path, sampler, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's LoadedModels make the same images as the pipeline loaded alone (both float32)."""
    alone = tmp_path / "alone"
    ensure_class_images(tiny_model_dir, alone, PROMPT, 2, num_inference_steps=STEPS, seed=1, sampler=sampler)
    models = loaded_models(tiny_model_dir)

    def fail(*args, **kwargs):
        raise AssertionError("loaded the pipeline again although LoadedModels were given")

    monkeypatch.setattr(class_images, "load_generation_sampler", fail)
    monkeypatch.setattr("jaxbooth.text.load_tokenizer", fail)
    shared = tmp_path / "shared"
    assert ensure_class_images(None, shared, PROMPT, 2, num_inference_steps=STEPS, seed=1, precision="fp32",
                               models=models) == 2
    a, b = generated(alone), generated(shared)
    assert sorted(a) == sorted(b) == [0, 1]
    for index in a:
        np.testing.assert_allclose(pixels(a[index]), pixels(b[index]), atol=2)


def test_loaded_models_sample_at_the_generation_precision(tiny_model_dir: Path) -> None:
    models = loaded_models(tiny_model_dir)
    made = sampler_from_loaded(dataclasses.replace(models, unet=models.unet.clone(gradient_checkpointing=True)),
                               dtype=jnp.bfloat16)
    leaves = [leaf.dtype for leaf in jax.tree.leaves(made.unet_params)]
    assert set(leaves) == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(made.vae_params)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(models.unet_params)} == {jnp.dtype(jnp.float32)}  # untouched
    with pytest.raises(ValueError, match="vae_params"):
        sampler_from_loaded(dataclasses.replace(models, vae_params=None), dtype=jnp.float32)
