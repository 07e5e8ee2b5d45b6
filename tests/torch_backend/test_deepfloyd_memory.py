"""``--pre_compute_text_embeddings`` on DeepFloyd IF: every prompt is encoded and T5 freed before the UNet's
optimizer is built, so T5 is never resident while the UNet trains (the seed's reason for the flag).

Two 1-step stage I runs, with and without the flag, on a tiny IF pipeline whose T5 has a wide feed-forward
(``wide_t5``) so its weights clearly outweigh the run-to-run noise of a scan of live tensors. The runs name
the family (``--model_family=deepfloyd_if``) where the seed's commands let ``model_index.json`` decide.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from tests.torch_backend._deepfloyd_seed import run_seed, write_images

ARGS = ("--resolution=64", "--train_batch_size=2", "--max_train_steps=1",
        "--learning_rate=1e-4", "--lr_warmup_steps=0", "--report_to=none", "--instance_prompt= A SKS Dog",
        "--tokenizer_max_length=77", "--text_encoder_use_attention_mask")


def wide_t5(base) -> int:
    """Replace the pipeline's T5 by one of the same width (the UNet projects its states) with a 8192-wide
    feed-forward; returns its parameter bytes."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_pretrained(base / "text_encoder")
    config.d_ff = 8192
    torch.manual_seed(0)
    model = T5EncoderModel(config)
    model.save_pretrained(base / "text_encoder")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def live_t5s() -> set[int]:
    """ids of the live T5 encoders (building the tiny pipeline can leave one alive in a test process)."""
    from transformers import T5EncoderModel

    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch module attributes
        warnings.simplefilter("ignore")
        return {id(o) for o in gc.get_objects() if isinstance(o, T5EncoderModel)}


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage behind a live tensor (parameters included)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                storage = o.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """For each run: the T5 models it loaded that are alive when the optimizer is built and at the first
    micro-step, and the live tensor bytes then; plus the T5's parameter bytes."""
    from jaxbooth.tiny_if import write_if_pipeline
    from jaxbooth.torch_backend import loop, train

    root = tmp_path_factory.mktemp("if-memory")
    base = write_if_pipeline(root / "if", "if-stage1")
    t5_bytes = wide_t5(base)
    instance = root / "dog"
    write_images(instance, 2, 64)
    seen: dict = {"t5_bytes": t5_bytes}
    # the resident run first: anything it left alive would count against the pre-computing run, never for it
    for name, extra in (("resident", []), ("pre_compute", ["--pre_compute_text_embeddings"])):
        record: dict = {"before": live_t5s()}
        seen[name] = record
        with pytest.MonkeyPatch.context() as mp:
            real_setup, real_loss = train.setup_optimization, loop.micro_step_loss

            def setup_optimization(*args, record=record, real=real_setup, **kwargs):
                record["t5_at_optimizer"] = len(live_t5s() - record["before"])
                return real(*args, **kwargs)

            def micro_step_loss(t, batch, micro_step, record=record, real=real_loss):
                if "t5_in_training" not in record:
                    record["t5_in_training"] = len(live_t5s() - record["before"])
                    record["tensor_bytes"] = live_tensor_bytes()
                    record["cached_embeddings"] = sum(v.untyped_storage().nbytes() for v in t.text._cache.values())
                    record["cache"] = dict(t.text._cache)
                return real(t, batch, micro_step)

            mp.setattr(train, "setup_optimization", setup_optimization)
            mp.setattr(loop, "micro_step_loss", micro_step_loss)
            assert run_seed(["train_dreambooth.py", f"--pretrained_model_name_or_path={base}",
                             "--model_family=deepfloyd_if", f"--instance_data_dir={instance}",
                             f"--output_dir={root / name}", *ARGS, *extra]) == 0
    seen["base"] = base
    return seen


def test_prompts_are_encoded_as_the_pipeline_encodes_them(runs: dict) -> None:
    """IF pipelines lower-case and strip the prompt before T5 (case-sensitive): the cached training embeddings
    of " A SKS Dog" are T5's states of "a sks dog" with IFPipeline.encode_prompt's tokenization."""
    from diffusers import IFPipeline

    pipe = IFPipeline.from_pretrained(runs["base"], safety_checker=None, feature_extractor=None, watermarker=None)
    expected, _ = pipe.encode_prompt(" A SKS Dog", do_classifier_free_guidance=False, clean_caption=False)
    as_written = pipe.text_encoder(**{k: v for k, v in pipe.tokenizer(
        " A SKS Dog", max_length=77, padding="max_length", truncation=True, return_tensors="pt").items()})[0]
    cached = runs["pre_compute"]["cache"][" A SKS Dog"]
    torch.testing.assert_close(cached.float(), expected[0].float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached.float(), as_written[0].float(), atol=1e-3)


def test_t5_is_not_resident_during_unet_training_with_pre_compute(runs: dict) -> None:
    pre, resident = runs["pre_compute"], runs["resident"]
    assert (pre["t5_at_optimizer"], pre["t5_in_training"]) == (0, 0)
    assert (resident["t5_at_optimizer"], resident["t5_in_training"]) == (1, 1)
    assert runs["t5_bytes"] > 4e6
    # pre-computing caches every prompt's embeddings up front, the resident run only the batch's so far
    extra_cache = pre["cached_embeddings"] - resident["cached_embeddings"]
    assert 0 <= extra_cache < runs["t5_bytes"] / 100
    assert resident["tensor_bytes"] - pre["tensor_bytes"] >= runs["t5_bytes"] - extra_cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_t5_is_not_on_the_gpu_while_the_unet_trains(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The peak CUDA memory from building the optimizer to the end of training drops by at least T5's bytes."""
    from jaxbooth.tiny_if import write_if_pipeline
    from jaxbooth.torch_backend import train

    base = write_if_pipeline(tmp_path / "if", "if-stage1")
    t5_bytes = wide_t5(base)
    write_images(tmp_path / "dog", 2, 64)
    peaks = {}
    real_setup, real_loop = train.setup_optimization, train.run_loop

    def setup_optimization(*args, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return real_setup(*args, **kwargs)

    for name, extra in (("resident", []), ("pre_compute", ["--pre_compute_text_embeddings"])):  # as in `runs`
        def run_loop(trainer, start, name=name):
            steps = real_loop(trainer, start)
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated()
            return steps

        monkeypatch.setattr(train, "setup_optimization", setup_optimization)
        monkeypatch.setattr(train, "run_loop", run_loop)
        assert run_seed(["train_dreambooth.py", f"--pretrained_model_name_or_path={base}",
                         f"--instance_data_dir={tmp_path / 'dog'}", f"--output_dir={tmp_path / name}", *ARGS,
                         *extra]) == 0
    # less the prompts pre-computing caches up front (two [77, 32] float32 rows, ~20 KB: under 1% of T5)
    assert peaks["resident"] - peaks["pre_compute"] >= 0.99 * t5_bytes
