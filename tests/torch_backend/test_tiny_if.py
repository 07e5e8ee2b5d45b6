"""`jaxbooth tiny-model --family if-stage1|if-stage2`: folders that stock diffusers IF pipelines load and
sample from (stage II upscaling stage I's output), with a real T5 Unigram tokenizer and the IF UNet options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from jaxbooth import tiny, tiny_if
from jaxbooth.errors import JaxboothError

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Stage I through the CLI, stage II through the library; each loaded by DiffusionPipeline, 2 steps."""
    from diffusers import DiffusionPipeline

    from jaxbooth.cli import main

    root = tmp_path_factory.mktemp("if")
    assert main(["tiny-model", str(root / "stage1"), "--family", "if-stage1"]) == 0
    stage2 = tiny.write_tiny_pipeline(root / "stage2", family="if-stage2")
    first, second = DiffusionPipeline.from_pretrained(root / "stage1"), DiffusionPipeline.from_pretrained(stage2)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    low = first(PROMPT, num_inference_steps=2, output_type="pt", clean_caption=False,
                generator=torch.Generator().manual_seed(0)).images
    high = second(PROMPT, image=low, num_inference_steps=2, output_type="pt", clean_caption=False,
                  generator=torch.Generator().manual_seed(0)).images
    return dict(root=root, stage1=root / "stage1", stage2=stage2, first=first, second=second, low=low, high=high)


def test_stock_pipelines_load_and_generate(built: dict) -> None:
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    assert type(built["first"]) is IFPipeline and type(built["second"]) is IFSuperResolutionPipeline
    for pipe in (built["first"], built["second"]):
        assert pipe.safety_checker is None and pipe.feature_extractor is None and pipe.watermarker is None
    assert built["low"].shape == (1, 3, 64, 64) and torch.isfinite(built["low"]).all()
    assert built["high"].shape == (1, 3, 256, 256) and torch.isfinite(built["high"]).all()
    assert built["low"].abs().max() > 0 and built["high"].std() > 0


def test_folders_mirror_the_real_if_layouts(built: dict) -> None:
    for key, cls, extra in (("stage1", "IFPipeline", set()),
                            ("stage2", "IFSuperResolutionPipeline", {"image_noising_scheduler"})):
        index = json.loads((built[key] / "model_index.json").read_text())
        assert index["_class_name"] == cls
        assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
        assert index["tokenizer"] == ["transformers", "T5Tokenizer"]
        assert all(index[name] == [None, None] for name in ("safety_checker", "feature_extractor", "watermarker"))
        present = {p.name for p in built[key].iterdir() if p.is_dir()}
        assert present == {"scheduler", "text_encoder", "tokenizer", "unet"} | extra
        assert {"tokenizer.json", "spiece.model"} <= {p.name for p in (built[key] / "tokenizer").iterdir()}


def test_unet_and_scheduler_configs_have_the_if_options(built: dict) -> None:
    first, second = built["first"], built["second"]
    t5_width = first.text_encoder.config.d_model
    for pipe in (first, second):
        unet = pipe.unet.config
        assert unet.out_channels == 6 and unet.addition_embed_type == "text"
        assert unet.encoder_hid_dim == t5_width and unet.encoder_hid_dim_type == "text_proj"
        assert unet.cross_attention_dim != t5_width  # the text projection is a real change of width
        assert unet.resnet_time_scale_shift == "scale_shift" and unet.cross_attention_norm == "group_norm"
        assert unet.mid_block_type == "UNetMidBlock2DSimpleCrossAttn" and "SimpleCrossAttnDownBlock2D" in \
            unet.down_block_types
        scheduler = pipe.scheduler.config
        assert (scheduler.variance_type, scheduler.beta_schedule, scheduler.thresholding) == \
            ("learned_range", "squaredcos_cap_v2", True)
    assert (first.unet.config.in_channels, first.unet.config.class_embed_type, first.unet.config.sample_size) == \
        (3, None, 64)
    assert (second.unet.config.in_channels, second.unet.config.class_embed_type, second.unet.config.sample_size) == \
        (6, "timestep", 256)
    assert second.unet.config.only_cross_attention is True and second.unet.config.resnet_skip_time_act is True
    assert (first.scheduler.config.sample_max_value, second.scheduler.config.sample_max_value) == (1.5, 1.0)
    noising = second.image_noising_scheduler.config
    assert noising.beta_schedule == "squaredcos_cap_v2" and noising.variance_type == "fixed_small"


def test_t5_tokenizer_is_a_real_unigram_model(built: dict) -> None:
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(built["stage1"] / "tokenizer")
    ids = tokenizer(PROMPT).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert len(pieces) >= 6 and pieces[-1] == "</s>" and ids[-1] == tokenizer.eos_token_id == 1
    assert pieces[0] == "▁a" and "▁dog" in pieces and "<unk>" not in pieces
    assert tokenizer.pad_token_id == 0 and tokenizer.model_max_length == tiny_if.T5_MAX_LENGTH
    assert len(tokenizer) == built["first"].text_encoder.config.vocab_size == tiny_if.VOCAB_SIZE
    padded = tokenizer(PROMPT, padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[len(ids):] == [0] * (77 - len(ids))
    assert tiny_if.t5_tokenizer().get_vocab() == tokenizer.get_vocab()  # training is deterministic


def test_spiece_model_holds_the_same_vocab(built: dict) -> None:
    """The hand-encoded sentencepiece proto parses with protobuf's own schema to the tokenizer's pieces."""
    pytest.importorskip("google.protobuf")
    from transformers import T5Tokenizer
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((built["stage2"] / "tokenizer" / "spiece.model").read_bytes())
    vocab = T5Tokenizer.from_pretrained(built["stage2"] / "tokenizer").get_vocab()
    assert [p.piece for p in proto.pieces] == sorted(vocab, key=vocab.get)
    assert [p.type for p in proto.pieces[:4]] == [3, 3, 2, 1]  # CONTROL <pad>, </s>; UNKNOWN <unk>; NORMAL
    assert (proto.trainer_spec.model_type, proto.trainer_spec.unk_id, proto.trainer_spec.bos_id) == (1, 2, -1)
    assert proto.normalizer_spec.add_dummy_prefix and proto.normalizer_spec.escape_whitespaces


def test_same_seed_same_weights(built: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    again = tiny.write_tiny_pipeline(tmp_path / "again", family="if-stage1", seed=0)
    for file in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        ours, theirs = load_file(built["stage1"] / file), load_file(again / file)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_without_torch_the_error_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(JaxboothError, match=r"install the torch extra: pip install 'jaxbooth\[torch\]'"):
        tiny.write_tiny_pipeline(tmp_path / "x", family="if-stage2")
    assert not (tmp_path / "x").exists()
