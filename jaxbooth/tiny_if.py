"""Tiny random-weight DeepFloyd IF pipelines (stage I and stage II) in diffusers format, built offline.

IF is torch-only in jaxbooth, so the components are stock diffusers/transformers classes with a fixed
seed, written by the stock pipeline's ``save_pretrained``: the folder is what a user's
``IFPipeline`` / ``IFSuperResolutionPipeline`` folder holds, loadable with nothing else (safety
checker, feature extractor and watermarker are null). UNet and scheduler options are the real
checkpoints' (diffusers' ``scripts/convert_if.py`` and its IF pipeline tests), shrunk. The tokenizer
is a real Unigram model trained here with ``tokenizers`` on a built-in word list, saved as
``tokenizer.json`` (what transformers 5 loads without sentencepiece) plus an equivalent
``spiece.model``, the one file the real IF tokenizer folders ship.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import struct
import tempfile
from pathlib import Path

from jaxbooth.deepfloyd import LOW_RESOLUTION  # noqa: F401  (stage II upscales stage I's 64 px output)
from jaxbooth.errors import JaxboothError

STAGES = ("if-stage1", "if-stage2")
RESOLUTION = {"if-stage1": 64, "if-stage2": 256}  # the seed's --resolution for each stage
T5_MAX_LENGTH = 512  # the T5 tokenizer's model_max_length; IF pipelines themselves cut prompts at 77
VOCAB_SIZE = 256
_SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5 ids 0, 1, 2

_T5 = {
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    "small": dict(d_model=64, d_kv=16, d_ff=128, num_layers=4, num_heads=4, relative_attention_num_buckets=32),
}
# Shared by both stages: SimpleCrossAttn blocks (added k/v projections for the text), T5 states
# projected by encoder_hid_proj ("text_proj") and attention-pooled into the time embedding
# (addition_embed_type "text"), scale_shift resnets, group-norm on the text, gelu.
_IF_COMMON = dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_norm="group_norm",
                  addition_embed_type="text", resnet_time_scale_shift="scale_shift", act_fn="gelu",
                  out_channels=6)  # 3 noise + 3 variance channels (the schedulers' "learned_range")
_STAGE1 = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                 addition_embed_type_num_heads=2, cross_attention_dim=64,
                 down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                 up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")),
    "small": dict(block_out_channels=(64, 128, 256), layers_per_block=2, attention_head_dim=32,
                  addition_embed_type_num_heads=4, cross_attention_dim=256,
                  down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 2,
                  up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",)),
}
# Stage II (convert_if.py get_super_res_unet): the noise level enters as a timestep-embedded class
# label, per-block layer counts, no self-attention, 1/0.7071 output scales, gelu time embedding.
_STAGE2_COMMON = dict(in_channels=6, class_embed_type="timestep", only_cross_attention=True,
                      time_embedding_act_fn="gelu", resnet_skip_time_act=True,
                      resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071)
_STAGE2 = {
    # tiny: narrow (8-16-32 channels, groups of 8) because it trains at 256 px: a CPU step of batch 2 ~1 s, not ~4 s
    "tiny": dict(block_out_channels=(8, 16, 32), norm_num_groups=8, layers_per_block=(1, 1, 2), attention_head_dim=8,
                 addition_embed_type_num_heads=2, cross_attention_dim=64, time_embedding_dim=64,
                 down_block_types=("ResnetDownsampleBlock2D",) * 2 + ("SimpleCrossAttnDownBlock2D",),
                 up_block_types=("SimpleCrossAttnUpBlock2D",) + ("ResnetUpsampleBlock2D",) * 2),
    "small": dict(block_out_channels=(32, 64, 128, 256), layers_per_block=(1, 1, 2, 2), attention_head_dim=32,
                  addition_embed_type_num_heads=4, cross_attention_dim=256, time_embedding_dim=256,
                  down_block_types=("ResnetDownsampleBlock2D",) * 2 + ("SimpleCrossAttnDownBlock2D",) * 2,
                  up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 2),
}
# convert_if.py: both stages sample with a learned-range variance and dynamic thresholding; stage II
# noises its upscaled input with a plain cosine-schedule DDPM.
SCHEDULER = dict(variance_type="learned_range", beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                 thresholding=True, dynamic_thresholding_ratio=0.95)
SAMPLE_MAX_VALUE = {"if-stage1": 1.5, "if-stage2": 1.0}
IMAGE_NOISING_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2")


def t5_config(size: str, vocab_size: int) -> dict:
    """T5 v1.1 encoder options (gated-gelu, untied embeddings), as google/t5-v1_1-xxl has, shrunk."""
    return dict(vocab_size=vocab_size, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                layer_norm_epsilon=1e-6, dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, **_T5[size])


def unet_config(family: str, size: str) -> dict:
    """Keyword arguments of ``UNet2DConditionModel`` for ``family`` (if-stage1 / if-stage2) and ``size``."""
    text = dict(encoder_hid_dim=_T5[size]["d_model"])
    if family == "if-stage1":
        return dict(sample_size=RESOLUTION[family], in_channels=3, **_IF_COMMON, **text, **_STAGE1[size])
    return dict(sample_size=RESOLUTION[family], **_IF_COMMON, **_STAGE2_COMMON, **text, **_STAGE2[size])


def _corpus() -> list[str]:
    """Prompt-like lines from jaxbooth's tiny word list, minus the rare identifier ``sks`` (so it splits)."""
    from jaxbooth.text import TINY_VOCAB_WORDS

    words = [w for w in TINY_VOCAB_WORDS.split() if w != "sks"]
    return [f"a photo of {word}" for word in words] + ["A photo of a dog, in the style of Monet."]


def train_unigram(vocab_size: int = VOCAB_SIZE) -> list[tuple[str, float]]:
    """A T5-layout Unigram vocab: <pad>=0, </s>=1, <unk>=2, then pieces ("▁" marks a word start).

    Deterministic: the trainer's scores vary in the 11th digit between runs and its ordering of
    equal scores is unstable, so scores are rounded and pieces sorted; the printable ASCII characters
    the corpus lacks come last (lowest score), so no ASCII text maps to <unk>.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = _corpus()
    missing = sorted(set(string.ascii_letters + string.digits + string.punctuation) - set("".join(corpus)))
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - len(missing), special_tokens=_SPECIAL,
                                      unk_token="<unk>", show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    learned = [(piece, round(score, 4)) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"]
               if piece not in _SPECIAL]
    learned.sort(key=lambda item: (-item[1], item[0]))
    floor = learned[-1][1] - 1.0
    return [(piece, 0.0) for piece in _SPECIAL] + learned + [(char, floor) for char in missing]


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 ids are ten-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def spiece_model_bytes(vocab: list[tuple[str, float]]) -> bytes:
    """A sentencepiece ModelProto for ``vocab`` (Unigram, identity normalisation), protobuf-encoded by hand.

    Field numbers from sentencepiece_model.proto: ModelProto.pieces=1 (piece=1, score=2, type=3;
    NORMAL=1 UNKNOWN=2 CONTROL=3), trainer_spec=2 (model_type=3 UNIGRAM=1, vocab_size=4, unk/bos/eos/
    pad_id=40..43), normalizer_spec=3 (name=1, add_dummy_prefix=3, remove_extra_whitespaces=4,
    escape_whitespaces=5).
    """
    kinds = {"<pad>": 3, "</s>": 3, "<unk>": 2}
    out = b"".join(_message(1, _message(1, piece.encode()) + _field(2, 5, struct.pack("<f", score))
                            + _field(3, 0, _varint(kinds.get(piece, 1)))) for piece, score in vocab)
    trainer = (_field(3, 0, _varint(1)) + _field(4, 0, _varint(len(vocab))) + _field(40, 0, _varint(2))
               + _field(41, 0, _varint(-1)) + _field(42, 0, _varint(1)) + _field(43, 0, _varint(0)))
    normalizer = _message(1, b"identity") + b"".join(_field(n, 0, _varint(1)) for n in (3, 4, 5))
    return out + _message(2, trainer) + _message(3, normalizer)


def t5_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A transformers ``T5Tokenizer`` on a freshly trained vocab (no sentinel ids: IF never uses them)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=train_unigram(vocab_size), extra_ids=0, model_max_length=T5_MAX_LENGTH)


def write_spiece_model(tokenizer, path: str | os.PathLike) -> None:
    """The tokenizer's vocab as ``spiece.model`` (what sentencepiece and the real IF folders use)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    scores = dict(json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"])
    Path(path).write_bytes(spiece_model_bytes([(piece, scores[piece]) for piece, _ in vocab]))


def _require_torch(family: str) -> None:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise JaxboothError(f"tiny-model --family {family} builds the pipeline with torch and diffusers ({error}); "
                            "install the torch extra: pip install 'jaxbooth[torch]'") from None


def write_if_pipeline(out_dir: str | os.PathLike, family: str, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight IF pipeline folder (``family`` if-stage1 or if-stage2); returns its path.

    Built in a temporary sibling and renamed into place, like ``jaxbooth.tiny``.
    """
    if family not in STAGES:
        raise JaxboothError(f"tiny-model: family {family!r} is not one of {STAGES}")
    if size not in _T5:
        raise JaxboothError(f"tiny-model: size {size!r} is not one of {tuple(_T5)}")
    _require_torch(family)
    import torch
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from jaxbooth.tiny import write_json

    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = t5_tokenizer()
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(T5Config(**t5_config(size, len(tokenizer))))
        unet = UNet2DConditionModel(**unet_config(family, size))
        scheduler = DDPMScheduler(**SCHEDULER, sample_max_value=SAMPLE_MAX_VALUE[family])
        parts = dict(tokenizer=tokenizer, text_encoder=text_encoder,
                     unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, watermarker=None,
                     requires_safety_checker=False)
        if family == "if-stage1":
            pipe = IFPipeline(**parts)
        else:
            pipe = IFSuperResolutionPipeline(**parts, image_noising_scheduler=DDPMScheduler(**IMAGE_NOISING_SCHEDULER))
        pipe.save_pretrained(staging)
        write_spiece_model(tokenizer, staging / "tokenizer" / "spiece.model")
        write_json(staging / "jaxbooth_tiny.json", {"size": size, "seed": seed, "family": family,
                                                    "resolution": RESOLUTION[family]})
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
