"""diffusers' old Flax pipeline API on jaxbooth (`jaxbooth.FlaxStableDiffusionPipeline` and the XL twin).

The guide's Flax inference code runs as written (but for its import line) on a `jaxbooth train` output,
on 1 and on 8 simulated devices; its pmap-style path gives each device the images the plain path gives
with that device's key; the plain path gives `jaxbooth generate`'s images for the same seed; LoRA outputs
load merged on their base; an SDXL pipeline samples through the XL twin; wrong inputs are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxbooth import cli
from jaxbooth.errors import JaxboothError
from jaxbooth.jax_backend.flax_pipeline import FlaxStableDiffusionPipeline, FlaxStableDiffusionXLPipeline
from tests.jax_backend.test_train import TINY_ARGS
from tests.test_generate_lora import lora_folder, make_lora

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a photo of sks toy"
STEPS = 2

# The guide's Flax inference snippet (seed lines 400-425), as the page has it.
GUIDE_SNIPPET = '''import jax
import numpy as np
from flax.jax_utils import replicate
from flax.training.common_utils import shard
from diffusers import FlaxStableDiffusionPipeline

pipeline, params = FlaxStableDiffusionPipeline.from_pretrained("path-to-your-trained-model", dtype=jax.numpy.bfloat16)

prompt = "A photo of sks dog in a bucket"
prng_seed = jax.random.PRNGKey(0)
num_inference_steps = 50

num_samples = jax.device_count()
prompt = num_samples * [prompt]
prompt_ids = pipeline.prepare_inputs(prompt)

# 分片输入和随机数生成器
params = replicate(params)
prng_seed = jax.random.split(prng_seed, jax.device_count())
prompt_ids = shard(prompt_ids)

images = pipeline(prompt_ids, params, prng_seed, num_inference_
steps, jit=True).images
images = pipeline.numpy_to_pil(np.asarray(images.reshape((num_samples,) + images.shape[-3:])))
image.save("dog-bucket.png")
'''

# After the guide's code, in the 8-device process: device d's images equal the plain path (unreplicated
# params, ids [B, 77], one key; jit=False: on one device) run on device d's prompts with key prng_seed[d];
# the plain path on the mesh (jit=True, the batch split over the 8 devices) gives example 0 the image device
# 0's first example got (both drew it from fold_in(prng_seed[0], 0)).
CHECKS = '''
import json
snippet = np.stack([np.asarray(image) for image in images])
host_params = jax.tree.map(lambda x: np.asarray(x[0]), params)  # what from_pretrained returned
ids = np.asarray(prompt_ids)
per_device = [pipeline(ids[d], host_params, prng_seed[d], num_inference_steps).images for d in range(len(ids))]
per_device = np.stack([np.asarray(image) for image in pipeline.numpy_to_pil(np.concatenate(per_device))])
meshed = pipeline(ids.reshape(-1, ids.shape[-1]), host_params, prng_seed[0], num_inference_steps, jit=True).images
meshed = np.stack([np.asarray(image) for image in pipeline.numpy_to_pil(meshed)])
json.dump({"devices": jax.device_count(), "snippet": list(snippet.shape), "meshed": list(meshed.shape),
           "pmap_vs_plain": int(np.abs(snippet.astype(int) - per_device).max()),
           "mesh_vs_pmap": int(np.abs(meshed[0].astype(int) - snippet[0]).max())}, open("checks.json", "w"))
'''


def guide_code(model: Path) -> str:
    """The snippet with only what must change: the import line (diffusers has no Flax classes), the model path,
    the step count (2, for test time; 50 takes ~25 s a run on the tiny model on CPU), the page's line wrap inside
    `num_inference_steps`, and the last line's slip (`image` for `images[0]`)."""
    code = GUIDE_SNIPPET
    for old, new in [("from diffusers import", "from jaxbooth import"),
                     ("path-to-your-trained-model", str(model)),
                     ("num_inference_steps = 50", f"num_inference_steps = {STEPS}"),
                     ("num_inference_\nsteps", "num_inference_steps"),
                     ('image.save("dog-bucket.png")', 'images[0].save("dog-bucket.png")')]:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `jaxbooth train` output (a full fine-tune of the tiny pipeline, 1 step)."""
    out = tmp_path_factory.mktemp("train") / "out"
    assert cli.main(["train", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--output_dir={out}",
                     *TINY_ARGS, "--max_train_steps=1"]) == 0
    return out


@pytest.fixture(scope="module")
def guide_runs(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The guide's code run in a fresh Python on 1 and on 8 CPU devices (both at once); device count -> its folder."""
    runs = {}
    for devices in (1, 8):
        folder = tmp_path_factory.mktemp(f"guide{devices}")
        code = guide_code(trained) + (CHECKS if devices > 1 else "")
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
        env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(REPO))
        runs[devices] = (folder, subprocess.Popen([sys.executable, "-c", code], cwd=folder, env=env, text=True,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for _, proc in runs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    return {devices: folder for devices, (folder, _) in runs.items()}


@pytest.mark.parametrize("devices", [1, 8])
def test_the_guides_flax_code_runs_on_a_train_output(guide_runs: dict[int, Path], devices: int) -> None:
    with Image.open(guide_runs[devices] / "dog-bucket.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"  # the tiny UNet's sample_size x the VAE's scale
        assert np.asarray(image).std() > 0


def test_pmap_style_inputs_give_each_device_the_plain_paths_images_for_its_key(guide_runs: dict[int, Path]) -> None:
    checks = json.loads((guide_runs[8] / "checks.json").read_text())
    assert checks["devices"] == 8
    assert checks["snippet"] == [8, 64, 64, 3] and checks["meshed"] == [8, 64, 64, 3]
    assert checks["pmap_vs_plain"] == 0 and checks["mesh_vs_pmap"] == 0, checks


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> tuple[FlaxStableDiffusionPipeline, dict]:
    """The tiny pipeline, loaded with old keywords that are harmless here."""
    return FlaxStableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, from_pt=True,
                                                       revision="main", scheduler="DDIMScheduler")


def test_the_plain_path_gives_jaxbooth_generates_images_for_the_same_seed(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(str(trained), scheduler="DDIMScheduler")
    ids = pipeline.prepare_inputs([PROMPT] * 2)
    output = pipeline(ids, params, jax.random.PRNGKey(3), STEPS, jit=True)
    assert output.images.dtype == np.float32 and output.images.shape == (2, 64, 64, 3)
    assert output.nsfw_content_detected == [False, False]
    ours = np.stack([np.asarray(image) for image in pipeline.numpy_to_pil(output.images)])
    assert cli.main(["generate", str(trained), PROMPT, "-n", "2", "--steps", str(STEPS), "--guidance", "7.5",
                     "--scheduler", "DDIMScheduler", "--seed", "3", "--out", str(tmp_path)]) == 0
    theirs = np.stack([np.asarray(Image.open(path)) for path in sorted(tmp_path.glob("*.png"))])
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours[0], ours[1])


def test_a_lora_output_loads_merged_on_its_base(base, tiny_model_dir: Path, tmp_path: Path) -> None:
    pipeline, base_params = base
    lora = lora_folder(tmp_path / "lora", make_lora(tiny_model_dir), tiny_model_dir)
    lora_pipeline, lora_params = FlaxStableDiffusionPipeline.from_pretrained(lora)
    assert lora_pipeline.model_dir == tiny_model_dir.resolve()
    ids = pipeline.prepare_inputs(PROMPT)
    key = jax.random.key(0)
    adapted = pipeline(ids, lora_params, key, STEPS).images  # same architecture: the base pipeline runs it
    plain = pipeline(ids, base_params, key, STEPS).images
    assert np.abs(adapted - plain).mean() > 1 / 255
    np.testing.assert_array_equal(lora_params["vae"]["decoder"]["conv_out"]["kernel"],
                                  base_params["vae"]["decoder"]["conv_out"]["kernel"])


def test_replicated_params_give_the_plain_paths_images(base) -> None:
    """flax.jax_utils.replicate's params (a leading device axis) work with plain ids too, on and off the mesh."""
    from flax.jax_utils import replicate

    pipeline, params = base
    ids, key = pipeline.prepare_inputs(PROMPT), jax.random.PRNGKey(5)  # the LoRA test's shapes: compiled once
    plain = pipeline(ids, params, key, STEPS).images
    replicated = replicate(params)
    np.testing.assert_array_equal(pipeline(ids, replicated, key, STEPS).images, plain)
    np.testing.assert_array_equal(pipeline(ids, replicated, key, STEPS, jit=True).images, plain)


def test_prepare_inputs_and_numpy_to_pil_as_the_old_api(base) -> None:
    pipeline, _ = base
    ids = pipeline.prepare_inputs([PROMPT, "a dog " * 100])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert pipeline.prepare_inputs(PROMPT).shape == (1, 77)
    np.testing.assert_array_equal(pipeline.prepare_inputs(PROMPT)[0], ids[0])
    images = np.linspace(0.0, 1.0, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    pils = pipeline.numpy_to_pil(images)
    assert [image.size for image in pils] == [(4, 4), (4, 4)]
    np.testing.assert_array_equal(np.asarray(pils[1]), np.round(images[1] * 255).astype(np.uint8))
    assert len(FlaxStableDiffusionPipeline.numpy_to_pil(images[0])) == 1


def test_the_xl_twin_samples_an_sdxl_pipeline(tmp_path_factory: pytest.TempPathFactory) -> None:
    from jaxbooth.tiny import write_tiny_pipeline

    folder = write_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe", "tiny", seed=0, family="sdxl")
    pipeline, params = FlaxStableDiffusionXLPipeline.from_pretrained(folder)
    assert sorted(params) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    ids = pipeline.prepare_inputs([PROMPT, "a dog"])
    assert ids.dtype == np.int32 and ids.shape == (2, 2, 77)
    key = jax.random.PRNGKey(0)
    zeros = pipeline(ids, params, key, STEPS, 5.0).images  # no negatives: force_zeros_for_empty_prompt
    empty = pipeline(ids, params, key, STEPS, 5.0, neg_prompt_ids=pipeline.prepare_inputs(["", ""])).images
    assert zeros.shape == (2, 64, 64, 3) and 0.0 <= zeros.min() and zeros.max() <= 1.0
    assert not np.array_equal(zeros, empty)
    with pytest.raises(JaxboothError, match="FlaxStableDiffusionXLPipeline"):
        FlaxStableDiffusionPipeline.from_pretrained(folder)


def test_wrong_classes_keywords_and_inputs_are_refused(base, tiny_model_dir: Path) -> None:
    with pytest.raises(JaxboothError, match="load it with jaxbooth.FlaxStableDiffusionPipeline"):
        FlaxStableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    with pytest.raises(JaxboothError, match="unknown keyword safty_checker=.*did you mean 'safety_checker'"):
        FlaxStableDiffusionPipeline.from_pretrained(tiny_model_dir, safty_checker=None)
    with pytest.raises(JaxboothError, match="local_files_only=.*HF_HUB_OFFLINE"):
        FlaxStableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    with pytest.raises(JaxboothError, match="safety_checker= is taken only as None"):
        FlaxStableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=object())
    with pytest.raises(JaxboothError, match="scheduler='DDIMSchedular'.*did you mean 'DDIMScheduler'"):
        FlaxStableDiffusionPipeline.from_pretrained(tiny_model_dir, scheduler="DDIMSchedular")
    pipeline, params = base
    ids = pipeline.prepare_inputs(PROMPT)
    with pytest.raises(JaxboothError, match="prng_seed has 2 keys but prompt_ids are not sharded"):
        pipeline(ids, params, jax.random.split(jax.random.PRNGKey(0), 2))
    with pytest.raises(JaxboothError, match=r"params has components .*from_pretrained\(\.\.\., scheduler=NAME\)"):
        pipeline(ids, {**params, "scheduler": None}, jax.random.PRNGKey(0))
    with pytest.raises(JaxboothError, match="latents=: initial latents are not taken"):
        pipeline(ids, params, jax.random.PRNGKey(0), latents=np.zeros((1, 32, 32, 4)))
