"""`jaxbooth train train_dreambooth_lora_sdxl.py --backend=jax --train_text_encoder`: LoRA on the UNet and both
SDXL text encoders, as diffusers' script; stock diffusers loads what it writes and its encoders give the
conditioning the JAX step trained with; the encoders learn at --text_encoder_lr; a resume is exact. (The full
fine-tune with --train_text_encoder is test_sdxl_train.py's full run.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from jaxbooth import sdxl
from jaxbooth.data import example_class_dir
from jaxbooth.jax_backend import train as train_lib
from jaxbooth.lora.files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from tests.jax_backend.test_sdxl_train import PROMPT, RES, changed_parts, conditioning, relative, train

pytest.importorskip("torch")
pytestmark = pytest.mark.requires_torch

LR, TEXT_LR = 1e-3, 3e-4
LORA = ("--max_train_steps=2", "--checkpointing_steps=1", f"--learning_rate={LR}", f"--text_encoder_lr={TEXT_LR}",
        "--train_text_encoder", f"--instance_data_dir={example_class_dir()}", f"--instance_prompt={PROMPT}")
LORA_SCRIPT = ("train_dreambooth_lora_sdxl.py",)
# the first encoder's last layer feeds nothing: SDXL conditions on its penultimate hidden states
UNUSED_LAYER = "text_encoder.text_model.encoder.layers.4."


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests._sdxl_pipeline import write_sdxl_pipeline

    return write_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe", seed=0)


class RecordingValidator:
    """Stands in for the validator (sampling is sample.py's, tested there): records what the loop hands it."""

    written = ()

    def __init__(self) -> None:
        self.calls: list = []

    def should_run(self, step: int, epochs_done: int | None = None) -> bool:
        return step == 2

    def run(self, step: int, unet_params, text_params=None, *, writer=None) -> None:
        import jax

        self.calls.append((step, jax.device_get(text_params)))


@pytest.fixture(scope="module")
def lora_run(sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RecordingValidator]:
    out = tmp_path_factory.mktemp("lora") / "out"
    validator = RecordingValidator()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(train_lib, "make_validator", lambda *a, **k: validator)
        assert train(sdxl_dir, out, *LORA, "--output_kohya_format", "--merge_lora_into_pipeline",
                     script=LORA_SCRIPT) == 0
    return out, validator


def _jax_conditioning(base: Path, lora_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """The JAX step's conditioning (encode.sdxl_conditioning) with the file's encoder adapters merged."""
    from jaxbooth.jax_backend import encode, pretrained
    from jaxbooth.jax_backend import lora as lora_lib
    from jaxbooth.jax_backend.models import clip
    from jaxbooth.lora.files import read_lora_file
    from jaxbooth.text import load_tokenizer, make_tokenize_fn

    state = read_lora_file(lora_file)
    encoders, params, tokenizers = [], {}, []
    for component, tokenizer in zip(sdxl.TEXT_ENCODERS, sdxl.TOKENIZERS, strict=True):
        config, _, params[component] = pretrained.load_pretrained(base, component)
        encoders.append(clip.make_text_encoder(config, with_projection=config.has_projection))
        tokenizers.append(make_tokenize_fn(load_tokenizer(base, subfolder=tokenizer)))
    adapters = lora_lib.adapters_from_state({c: state[c] for c in sdxl.TEXT_ENCODERS}, params, 1.0)
    merged = lora_lib.merge_components(params, adapters, 1.0)
    return encode.encode_sdxl_prompts(tuple(encoders), tuple(merged[c] for c in sdxl.TEXT_ENCODERS),
                                      tuple(tokenizers), [PROMPT])


def test_lora_with_text_encoders_loads_in_stock_diffusers_as_the_jax_step_encodes(lora_run, sdxl_dir: Path) -> None:
    """diffusers' test_dreambooth_lora_sdxl_with_text_encoder (every key a LoRA key under unet / text_encoder /
    text_encoder_2), and more: load_lora_weights of the diffusers file, of the kohya file (lora_te1_ / lora_te2_
    names) and the merged pipeline give both encoders' conditioning as the JAX step computes it, moved off the
    base's in both halves and the pooled embeds; the LoRA pipeline runs."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    lora_run, _ = lora_run
    keys = list(safetensors.numpy.load_file(lora_run / LORA_WEIGHTS_NAME))
    assert all("lora" in key for key in keys)
    assert {key.split(".")[0] for key in keys} == {"unet", *sdxl.TEXT_ENCODERS}
    kohya = list(safetensors.numpy.load_file(lora_run / KOHYA_WEIGHTS_NAME))
    assert {key.split("_")[1] for key in kohya} == {"unet", "te1", "te2"}, sorted(kohya)[:3]
    base = conditioning(StableDiffusionXLPipeline.from_pretrained(sdxl_dir))
    jax_embeds, jax_pooled = _jax_conditioning(sdxl_dir, lora_run / LORA_WEIGHTS_NAME)
    assert min(changed_parts(jax_embeds, jax_pooled, base)) > 1e-3, "an encoder's LoRA changed nothing"
    for weight_name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
        pipe.load_lora_weights(lora_run, weight_name=weight_name)
        embeds, pooled = conditioning(pipe)
        assert relative(embeds, jax_embeds) <= 1e-4 and relative(pooled, jax_pooled) <= 1e-4, weight_name
    merged = StableDiffusionXLPipeline.from_pretrained(lora_run)  # --merge_lora_into_pipeline: both encoders
    embeds, pooled = conditioning(merged)
    assert relative(embeds, jax_embeds) <= 1e-4 and relative(pooled, jax_pooled) <= 1e-4
    image = pipe(PROMPT, num_inference_steps=1, height=RES, width=RES, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (RES, RES, 3) and np.isfinite(image).all()


def test_both_encoders_learn_at_text_encoder_lr(lora_run) -> None:
    """After one AdamW step from up = 0 each up weight moves by its group's lr (m / sqrt(v) = sign g): the UNet's
    adapters by --learning_rate, both encoders' by --text_encoder_lr."""
    lora_run, _ = lora_run
    first = safetensors.numpy.load_file(lora_run / "checkpoint-1" / LORA_WEIGHTS_NAME)
    for component, lr in (("unet", LR), ("text_encoder", TEXT_LR), ("text_encoder_2", TEXT_LR)):
        step = max(float(np.abs(v).max()) for k, v in first.items() if k.startswith(f"{component}.") and ".up." in k)
        assert step == pytest.approx(lr, rel=1e-3), component


def test_the_first_encoders_unused_last_layer_keeps_its_initial_adapters(lora_run) -> None:
    """Its output never reaches the loss, so torch leaves its adapters without a grad and AdamW skips them
    (no weight decay either); the JAX optimizer masks them alike, while the layer before it learns."""
    lora_run, _ = lora_run
    first = safetensors.numpy.load_file(lora_run / "checkpoint-1" / LORA_WEIGHTS_NAME)
    last = safetensors.numpy.load_file(lora_run / LORA_WEIGHTS_NAME)
    unused = [key for key in last if key.startswith(UNUSED_LAYER)]
    assert unused and all(np.array_equal(first[key], last[key]) for key in unused)
    assert all(not last[key].any() for key in unused if ".up." in key)
    used = UNUSED_LAYER.replace("layers.4", "layers.3")
    assert any(last[key].any() for key in last if key.startswith(used) and ".up." in key)


@pytest.mark.slow  # one more run (~35 s on 2 cores) past the file's budget; the orbax resume path is the SD one
def test_lora_resume_restores_both_encoders_adapters_exactly(lora_run, sdxl_dir: Path, tmp_path: Path) -> None:
    """2 steps straight == resuming the straight run's checkpoint-1 for 1 more, bit for bit, in every component."""
    lora_run, _ = lora_run
    resumed = tmp_path / "resumed"
    assert train(sdxl_dir, resumed, *LORA, f"--resume_from_checkpoint={lora_run / 'checkpoint-1'}",
                 script=LORA_SCRIPT) == 0
    straight = safetensors.numpy.load_file(lora_run / LORA_WEIGHTS_NAME)
    again = safetensors.numpy.load_file(resumed / LORA_WEIGHTS_NAME)
    assert straight.keys() == again.keys() and any(k.startswith("text_encoder_2.") for k in again)
    for key, value in straight.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_validation_gets_both_trained_encoders_merged_as_a_tuple(lora_run, sdxl_dir: Path) -> None:
    """SDXL validation samples with (text_encoder's, text_encoder_2's) params, the adapters merged: the very
    weights --merge_lora_into_pipeline writes, not the base's."""
    lora_run, validator = lora_run
    [(step, text_params)] = validator.calls
    assert step == 2 and isinstance(text_params, tuple) and len(text_params) == 2
    first, second = text_params
    assert "text_projection" in second and "text_projection" not in first
    for component, params in zip(sdxl.TEXT_ENCODERS, text_params, strict=True):
        merged = safetensors.numpy.load_file(lora_run / component / "model.safetensors")
        base = safetensors.numpy.load_file(sdxl_dir / component / "model.safetensors")
        # transformers 5 writes CLIPTextModel's keys without the ``text_model.`` that the projection model keeps
        key = next(k for k in merged if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))
        kernel = np.asarray(params["text_model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])
        np.testing.assert_allclose(kernel.T, merged[key], rtol=1e-5, atol=1e-6, err_msg=component)
        assert not np.allclose(kernel.T, base[key], rtol=1e-5, atol=1e-6), component
