"""`jaxbooth train --backend=jax` on an SDXL pipeline: a full fine-tune of the UNet and both text encoders
(--train_text_encoder), and UNet LoRA with both encoders frozen and cached (LoRA on the encoders:
test_sdxl_text_encoders.py); stock diffusers loads what it writes; time ids are the crops actually cached;
the options diffusers' SDXL script lacks are refused before any model loads."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from jaxbooth import data, sdxl
from jaxbooth.cli import main
from jaxbooth.jax_backend import caches, encode
from jaxbooth.jax_backend import train as train_lib
from jaxbooth.lora.files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from tests.jax_backend.test_caches import image_folder

pytest.importorskip("torch")
pytestmark = pytest.mark.requires_torch

RES = 64
ARGS = ["--backend=jax", f"--resolution={RES}", "--train_batch_size=1", "--lr_warmup_steps=0", "--seed=0",
        "--report_to=none", "--log_every_steps=1"]
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._sdxl_pipeline import write_sdxl_pipeline

    return write_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe", seed=0)


def train(base: Path, out: Path, *extra: str, script: tuple[str, ...] = ()) -> int:
    return main(["train", *script, f"--pretrained_model_name_or_path={base}", f"--output_dir={out}", *ARGS, *extra])


def spy_caches(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record what ``build_caches`` returns during a run."""
    built: list = []
    real = caches.build_caches

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(caches, "build_caches", spy)
    return built


FULL = ("--max_train_steps=3", "--checkpointing_steps=2", "--random_flip", "--learning_rate=1e-3",
        "--train_text_encoder")


@pytest.fixture(scope="module")
def full_run(sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, caches.Caches, list]:
    """Full fine-tune of the UNet and both text encoders; records the caches, and the trained params and
    optax transform the state is built from."""
    out = tmp_path_factory.mktemp("full") / "out"
    placed: list = []
    real_init = train_lib.init_state

    def spy_init(params_host, tx, mesh, seed):
        placed.append((params_host, tx))
        return real_init(params_host, tx, mesh, seed)

    with pytest.MonkeyPatch.context() as monkeypatch:
        built = spy_caches(monkeypatch)
        monkeypatch.setattr(train_lib, "init_state", spy_init)
        assert train(sdxl_dir, out, *FULL) == 0
    return out, built[0], placed


@pytest.fixture(scope="module")
def lora_run(sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, caches.Caches]:
    """UNet LoRA, both encoders frozen (their conditioning cached), on an imagefolder --dataset_name with
    custom captions and a checkpoint limit (diffusers' SDXL cases); records the caches."""
    from jaxbooth.data import example_class_dir
    from tests.torch_backend.test_sdxl import imagefolder

    tmp = tmp_path_factory.mktemp("lora")
    out = tmp / "out"
    imagefolder(tmp / "ds")  # diffusers' custom captions case: an imagefolder with a text column
    with pytest.MonkeyPatch.context() as monkeypatch:
        built = spy_caches(monkeypatch)
        assert train(sdxl_dir, out, "--max_train_steps=2", "--checkpointing_steps=1", "--checkpoints_total_limit=1",
                     f"--dataset_name={tmp / 'ds'}", "--caption_column=text", f"--cache_dir={tmp / 'hf-cache'}",
                     f"--instance_prompt={PROMPT}",
                     "--learning_rate=1e-2",
                     "--output_kohya_format", "--merge_lora_into_pipeline", "--center_crop", "--snr_gamma=5.0",
                     "--with_prior_preservation", f"--class_data_dir={example_class_dir()}",
                     "--class_prompt=a photo of a toy", "--num_class_images=5",
                     script=("train_dreambooth_lora_sdxl.py",)) == 0
    return out, built[0]


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def conditioning(pipe) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' SDXL encode_prompt of PROMPT: (prompt_embeds [1, 77, 64], pooled [1, 32])."""
    import torch

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    return embeds.numpy(), pooled.numpy()


def changed_parts(embeds: np.ndarray, pooled: np.ndarray, base: tuple[np.ndarray, np.ndarray]) -> list[float]:
    """How far each encoder's half of the prompt embeds, and the pooled embeds, moved from the base's."""
    width = embeds.shape[-1] // 2  # both tiny encoders have 32 features
    return [relative(embeds[..., :width], base[0][..., :width]), relative(embeds[..., width:], base[0][..., width:]),
            relative(pooled, base[1])]


def clip_weights(path: Path) -> dict[str, np.ndarray]:
    """A CLIP weights file keyed without ``text_model.`` (transformers 5 writes CLIPTextModel's without it,
    jaxbooth's export keeps it; transformers loads both)."""
    return {k.removeprefix("text_model."): v for k, v in safetensors.numpy.load_file(path).items()}


def test_full_run_writes_an_sdxl_pipeline_diffusers_loads(full_run, sdxl_dir: Path) -> None:
    """The UNet and both encoders trained and written (the checkpoint too); stock diffusers loads the
    pipeline, its conditioning moved in both encoders' halves and the pooled embeds, and it samples."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    out, _, _ = full_run
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert (out / "tokenizer_2/vocab.json").read_bytes() == (sdxl_dir / "tokenizer_2/vocab.json").read_bytes()
    base, final = safetensors.numpy.load_file(sdxl_dir / UNET_FILE), safetensors.numpy.load_file(out / UNET_FILE)
    assert base.keys() == final.keys()
    assert any(not np.array_equal(base[k], final[k]) for k in base), "training changed no UNet weight"
    assert "add_embedding.linear_1.weight" in final  # the text_time embedding is trained too
    encoders = {}
    for component in sdxl.TEXT_ENCODERS:
        assert (out / "checkpoint-2" / component / "model.safetensors").is_file(), component
        encoders[component] = [clip_weights(folder / component / "model.safetensors") for folder in (sdxl_dir, out)]
        base, final = encoders[component]
        assert base.keys() == final.keys()
        assert any(not np.array_equal(base[k], final[k]) for k in base), component
    base, final = encoders["text_encoder"]  # its last layer is outside the conditioning (hidden_states[-2]):
    unused = [k for k in base if k.startswith(("encoder.layers.4.", "final_layer_norm."))]
    assert len(unused) > 4 and all(np.array_equal(final[k], base[k]) for k in unused)  # no grad, no weight decay
    UNet2DConditionModel.from_pretrained(out, subfolder="checkpoint-2/unet")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    moved = changed_parts(*conditioning(pipe), conditioning(StableDiffusionXLPipeline.from_pretrained(sdxl_dir)))
    assert min(moved) > 1e-3, moved
    image = pipe(PROMPT, num_inference_steps=1, height=RES, width=RES,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (RES, RES, 3) and np.isfinite(image).all()


def test_full_run_shards_both_encoders_and_their_optimizer_state_over_fsdp(full_run,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The trained tree holds both encoders, and the fsdp rules (every param over the size floor) split their
    kernels, and the optimizer moments of them, on a 2-way fsdp mesh as they split the UNet's."""
    import jax
    from jax.sharding import AbstractMesh

    from jaxbooth.jax_backend import mesh as mesh_lib

    _, _, [(params, tx)] = full_run
    assert set(params) == {"unet", *sdxl.TEXT_ENCODERS}
    monkeypatch.setattr(mesh_lib, "FSDP_MIN_BYTES", 0)
    mesh = AbstractMesh((1, 2), (mesh_lib.DATA_AXIS, mesh_lib.FSDP_AXIS))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    trees = {"params": mesh_lib.param_shardings(abstract, mesh),
             "optimizer state": mesh_lib.param_shardings(jax.eval_shape(tx.init, abstract), mesh)}
    for name, shardings in trees.items():
        for component in ("unet", *sdxl.TEXT_ENCODERS):
            specs = [sharding.spec for path, sharding in jax.tree_util.tree_leaves_with_path(shardings)
                     if f"['{component}']" in (key := jax.tree_util.keystr(path)) and key.endswith("['kernel']")]
            assert specs and all(mesh_lib.FSDP_AXIS in spec for spec in specs), (name, component)


def test_sdxl_caches_the_frozen_conditioning_or_both_tokenizers_ids(full_run, lora_run) -> None:
    """Frozen encoders (the LoRA run): both encoders' embeddings and the pooled ones per prompt; trained ones
    (the full run): each tokenizer's ids per prompt, for the step to encode. Both: time ids per latent row."""
    _, frozen_built = lora_run
    frozen, prompts = frozen_built.frozen, len(frozen_built.prompts)
    assert frozen["text_embeddings"].shape == (prompts, 77, 64)  # both encoders' 32 features, concatenated
    assert frozen["pooled_embeddings"].shape == (prompts, 32)  # text_encoder_2's projection
    assert "input_ids" not in frozen
    from tests.torch_backend.test_sdxl import CAPTIONS

    # --dataset_name's custom captions (and the class prompt) are what was encoded, not the instance prompt
    assert set(frozen_built.prompts) == {*CAPTIONS, "a photo of a toy"}, frozen_built.prompts
    _, built, _ = full_run
    frozen, index = built.frozen, built.latent_index
    assert {"text_embeddings", "pooled_embeddings"}.isdisjoint(frozen)
    assert frozen["input_ids"].shape == frozen["input_ids_2"].shape == (len(built.prompts), 77)
    assert index.orientations == 2 and frozen["time_ids"].shape == (index.num_rows, 6)
    np.testing.assert_array_equal(frozen["time_ids"],
                                  sdxl.add_time_ids(index.original_sizes, index.crops_top_left, RES))
    assert len({tuple(row) for row in frozen["time_ids"].tolist()}) > 2, "every row got the same time ids"


@pytest.mark.slow  # one more run (~30 s on 2 cores); the resume path is the SD one (test_train.py), the caches too
def test_full_run_resumes_exactly(full_run, sdxl_dir: Path, tmp_path: Path) -> None:
    """3 steps straight == resuming the straight run's checkpoint-2 for 1 more, bit for bit."""
    out, _, _ = full_run
    resumed = tmp_path / "resumed"
    assert train(sdxl_dir, resumed, *FULL, f"--resume_from_checkpoint={out / 'checkpoint-2'}") == 0
    for weights in (UNET_FILE, *(f"{c}/model.safetensors" for c in sdxl.TEXT_ENCODERS)):
        straight, again = (safetensors.numpy.load_file(folder / weights) for folder in (out, resumed))
        for key in straight:
            np.testing.assert_array_equal(again[key], straight[key], err_msg=f"{weights}: {key}")


def _unet_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "timesteps": np.array([10, 700]),
            "hidden": rng.standard_normal((2, 77, 64)).astype(np.float32),
            "text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
            "time_ids": np.array([[64, 80, 0, 3, 64, 64], [96, 64, 10, 0, 64, 64]], np.float32)}


def _torch_unet_output(unet, x: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return unet(torch.from_numpy(x["sample"]), torch.from_numpy(x["timesteps"]), torch.from_numpy(x["hidden"]),
                    added_cond_kwargs={"text_embeds": torch.from_numpy(x["text_embeds"]),
                                       "time_ids": torch.from_numpy(x["time_ids"])}).sample.numpy()


def _jax_merged_output(base: Path, lora_file: Path, x: dict[str, np.ndarray]) -> np.ndarray:
    """jaxbooth's Flax UNet with the file's adapters merged (the JAX adapter transform)."""
    import jax
    import jax.numpy as jnp

    from jaxbooth.jax_backend import lora as lora_lib
    from jaxbooth.jax_backend import pretrained
    from jaxbooth.jax_backend.models.unet import FlaxUNet2DConditionModel
    from jaxbooth.lora.files import read_lora_file

    config, _, params = pretrained.load_pretrained(base, "unet")
    adapters = lora_lib.adapters_from_state(read_lora_file(lora_file), {"unet": params}, 1.0)
    merged = lora_lib.merge(params, adapters["unet"], 1.0)
    out = jax.jit(FlaxUNet2DConditionModel(config).apply)(
        {"params": merged}, jnp.asarray(x["sample"].transpose(0, 2, 3, 1)), jnp.asarray(x["timesteps"]),
        jnp.asarray(x["hidden"]), added_cond_kwargs={"text_embeds": jnp.asarray(x["text_embeds"]),
                                                     "time_ids": jnp.asarray(x["time_ids"])})
    return np.asarray(out).transpose(0, 3, 1, 2)


def test_lora_run_loads_in_stock_diffusers_with_the_jax_output(lora_run, sdxl_dir: Path) -> None:
    """load_lora_weights (diffusers file, then the kohya file, each on a fresh pipeline) gives the UNet
    output of jaxbooth's Flax UNet with the adapters merged; the merged pipeline gives it too, with both
    frozen encoders copied from the base."""
    from diffusers import StableDiffusionXLPipeline

    lora_run, _ = lora_run

    tensors = safetensors.numpy.load_file(lora_run / LORA_WEIGHTS_NAME)
    assert tensors and all(key.startswith("unet.") for key in tensors), sorted(tensors)[:3]
    assert sorted(p.name for p in lora_run.glob("checkpoint-*")) == ["checkpoint-2"]  # --checkpoints_total_limit=1
    assert (lora_run / "checkpoint-2" / LORA_WEIGHTS_NAME).is_file()
    records = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["train/prior_loss"] > 0 for r in records)
    x = _unet_inputs()
    jax_out = _jax_merged_output(sdxl_dir, lora_run / LORA_WEIGHTS_NAME, x)
    base_out = _torch_unet_output(StableDiffusionXLPipeline.from_pretrained(sdxl_dir).unet, x)
    assert relative(jax_out, base_out) > 1e-3, "the LoRA did not change the UNet"
    for weight_name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
        pipe.load_lora_weights(lora_run, weight_name=weight_name)
        assert relative(jax_out, _torch_unet_output(pipe.unet, x)) <= 1e-4, weight_name
    image = pipe(PROMPT, num_inference_steps=1, height=RES, width=RES, output_type="np").images[0]
    assert image.shape == (RES, RES, 3) and np.isfinite(image).all()  # diffusers' case ends with a pipeline call
    merged = StableDiffusionXLPipeline.from_pretrained(lora_run)  # --merge_lora_into_pipeline
    assert relative(jax_out, _torch_unet_output(merged.unet, x)) <= 1e-4
    for frozen in ("text_encoder/model.safetensors", "text_encoder_2/model.safetensors"):
        assert (lora_run / frozen).read_bytes() == (sdxl_dir / frozen).read_bytes(), frozen


def _cached_rows(monkeypatch: pytest.MonkeyPatch, dataset: data.Dataset, **options) -> tuple[list, np.ndarray]:
    """The pixels of every latent-cache row (the VAE replaced by a recorder) and the rows' time ids."""
    pixels: list[np.ndarray] = []

    def record(vae, params, stream):
        pixels.extend(np.asarray(p) for p in stream)
        zeros = np.zeros((len(pixels), 1), np.float32)
        return zeros, zeros

    monkeypatch.setattr(encode, "encode_pixel_stream", record)
    _, _, index = caches.encode_latent_cache(types.SimpleNamespace(vae=None, vae_params=None), dataset,
                                             resolution=RES, seed=3, **options)
    return pixels, sdxl.add_time_ids(index.original_sizes, index.crops_top_left, RES)


def test_time_ids_of_random_and_flipped_crops_are_the_crops_diffusers_records(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each cached row's time ids are what diffusers' loader (resize, flip, crop) records for those very pixels."""
    folder = image_folder(tmp_path / "img", [(96, 64), (64, 100)])  # wide: x offsets vary; tall: y offsets
    dataset = data.make_dreambooth_dataset(folder, "a photo of sks toy")
    pixels, time_ids = _cached_rows(monkeypatch, dataset, center_crop=False, random_flip=True)
    assert len(pixels) == len(time_ids) == 4 * caches.CROPS_PER_IMAGE
    rows = {}  # (image, flipped) -> that orientation's rows
    for k, example in enumerate(dataset.examples):
        for flipped in (False, True):
            rows[(example.path, flipped)] = [(pixels[r], time_ids[r]) for r in range(len(pixels))
                                             if r // caches.CROPS_PER_IMAGE == 2 * k + flipped]
    for (path, flipped), wanted in rows.items():
        unmatched = list(wanted)
        for seed in range(600):
            if not unmatched:
                break
            px, original, offset = data.load_image_with_info(path, RES, center_crop=False, flip=flipped,
                                                             crop_rng=np.random.default_rng(seed))
            match = next((i for i, (cached, _) in enumerate(unmatched) if np.array_equal(cached, px)), None)
            if match is not None:
                np.testing.assert_array_equal(unmatched.pop(match)[1], [*original, *offset, RES, RES], err_msg=path)
        assert not unmatched, f"{path} flipped={flipped}: no loader crop has the cached pixels"
    flipped_ids = np.stack([t for (_, flipped), items in rows.items() if flipped for _, t in items])
    straight_ids = np.stack([t for (_, flipped), items in rows.items() if not flipped for _, t in items])
    assert not np.array_equal(flipped_ids, straight_ids)  # a flip moves the wide image's x offsets


def test_time_ids_of_a_centre_crop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dataset = data.make_dreambooth_dataset(image_folder(tmp_path / "img", [(100, 64)]), "p")
    _, time_ids = _cached_rows(monkeypatch, dataset, center_crop=True, random_flip=False)
    np.testing.assert_array_equal(time_ids, [[64, 100, 0, 18, RES, RES]])  # torchvision CenterCrop's round(36/2)


def test_the_step_reads_pooled_by_prompt_and_time_ids_by_latent_row() -> None:
    from jaxbooth.jax_backend.train_step import added_conditions

    frozen = {"pooled_embeddings": np.arange(6.0).reshape(3, 2), "time_ids": np.arange(24.0).reshape(4, 6)}
    got = added_conditions(frozen, {"example_idx": np.array([3, 0]), "prompt_idx": np.array([1, 1])})
    np.testing.assert_array_equal(got["text_embeds"], [[2, 3], [2, 3]])
    np.testing.assert_array_equal(got["time_ids"], [frozen["time_ids"][3], frozen["time_ids"][0]])
    assert added_conditions({"text_embeddings": np.zeros(1)}, {}) is None  # SD: the UNet call is unchanged


def test_latents_mean_and_std_normalise_the_cached_posterior() -> None:
    """diffusers' SDXL script: (x - latents_mean) * scaling / latents_std; x is linear in the posterior noise."""
    rng = np.random.default_rng(0)
    mean, std, eps = (rng.standard_normal((2, 3, 3, 4)).astype(np.float32) for _ in range(3))
    config = types.SimpleNamespace(latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(2.0, 0.5, 1.0, 4.0))
    norm_mean, norm_std = caches.sdxl_posterior(mean, std, config)
    expected = (mean + std * eps - np.array(config.latents_mean)) / np.array(config.latents_std)
    np.testing.assert_allclose(norm_mean + norm_std * eps, expected, rtol=1e-5, atol=1e-6)
    plain = types.SimpleNamespace(latents_mean=None, latents_std=None)
    assert caches.sdxl_posterior(mean, std, plain)[0] is mean
    with pytest.raises(Exception, match="latents_std"):
        caches.sdxl_posterior(mean, std, types.SimpleNamespace(latents_mean=(0.0,) * 4, latents_std=None))


REFUSED = {  # each names diffusers' SDXL script's lack of it (sdxl.option_problems)
    "tokenizer_max_length": ["--tokenizer_max_length=32"],
    "text_encoder_use_attention_mask": ["--text_encoder_use_attention_mask"],
    "tokenizer_name": ["--tokenizer_name=openai/clip-vit-large-patch14"],
    "skip_save_text_encoder": ["--skip_save_text_encoder"],
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_sdxl_options_the_jax_backend_lacks_are_refused_before_loading(
        key: str, sdxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    from jaxbooth.jax_backend import loading

    monkeypatch.setattr(loading, "load_models", lambda *a, **k: pytest.fail("loaded models before refusing"))
    out = tmp_path / "never"
    assert train(sdxl_dir, out, "--max_train_steps=1", *REFUSED[key]) == 2
    err = capsys.readouterr().err
    assert f"--{key}" in err and "SDXL" in err and "Traceback" not in err, err
    assert f"Drop --{key}" in err, err
    assert not out.exists()
