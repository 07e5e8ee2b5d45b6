"""Tests for jaxbooth/text.py: the tiny CLIP vocab, tokenizer loading, cached tokenize."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxbooth.errors import JaxboothError
from jaxbooth.text import (
    BOS_TOKEN,
    EOS_TOKEN,
    TINY_VOCAB_WORDS,
    load_tokenizer,
    make_tokenize_fn,
    write_tiny_clip_tokenizer,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A diffusers-style model folder holding only tokenizer/."""
    root = tmp_path_factory.mktemp("model")
    write_tiny_clip_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def _vocab(model_dir):
    return json.loads((model_dir / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))


def test_tiny_vocab_has_clip_layout_and_reports_its_size(model_dir, tmp_path):
    vocab = _vocab(model_dir)
    size = write_tiny_clip_tokenizer(tmp_path / "again")
    assert size == len(vocab) and 800 <= size <= 1500
    assert sorted(vocab.values()) == list(range(size))  # dense ids, as an embedding table needs
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # bytes, then bytes + "</w>", as CLIP
    assert vocab[BOS_TOKEN] == size - 2 and vocab[EOS_TOKEN] == size - 1  # eos is the largest id
    merges = (model_dir / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == size - 514


def test_tiny_vocab_is_deterministic(model_dir, tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (model_dir / "tokenizer" / name).read_bytes()


def test_dreambooth_prompt_tokenizes_to_whole_words(tokenizer, model_dir):
    vocab = _vocab(model_dir)
    ids = tokenizer("a photo of sks toy").input_ids
    words = ["a", "photo", "of", "sks", "toy"]
    assert ids == [vocab[BOS_TOKEN], *[vocab[w + "</w>"] for w in words], vocab[EOS_TOKEN]]
    assert tokenizer.bos_token_id == vocab[BOS_TOKEN] and tokenizer.eos_token_id == vocab[EOS_TOKEN]
    assert tokenizer.model_max_length == 77


def test_every_builtin_word_is_one_token(tokenizer, model_dir):
    vocab = _vocab(model_dir)
    for word in TINY_VOCAB_WORDS.split():
        assert tokenizer(word).input_ids[1:-1] == [vocab[word + "</w>"]], word


def test_unknown_words_fall_back_to_bytes_not_unk(tokenizer):
    ids = tokenizer("Zyzzyva 42!").input_ids
    assert len(ids) > 4 and tokenizer.eos_token_id not in ids[1:-1]


def test_tokenize_fn_pads_truncates_and_returns_int32(tokenizer):
    tokenize = make_tokenize_fn(tokenizer)
    ids, mask = tokenize(["a photo of sks toy", "a photo of a toy", "photo " * 200])
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (3, 77)
    assert mask[0].tolist() == [1] * 7 + [0] * 70
    assert (ids[0, 7:] == tokenizer.pad_token_id).all()
    assert (ids[0] != ids[1]).any()  # "sks" vs "a"
    assert ids[2, 0] == tokenizer.bos_token_id and ids[2, -1] == tokenizer.eos_token_id and mask[2].all()
    expected = tokenizer(["a photo of sks toy"], padding="max_length", truncation=True, max_length=77)
    assert ids[0].tolist() == expected["input_ids"][0]


def test_tokenize_fn_honours_max_length_and_caches_prompts(tokenizer):
    calls = []

    def counting(prompts, **kwargs):
        calls.append(list(prompts))
        return tokenizer(prompts, **kwargs)

    counting.model_max_length = tokenizer.model_max_length
    tokenize = make_tokenize_fn(counting, max_length=16)
    a = tokenize(["sks toy", "a toy", "sks toy"])
    b = tokenize(["a toy", "sks toy"])
    assert a[0].shape == (3, 16) and calls == [["a toy", "sks toy"]]
    np.testing.assert_array_equal(b[0], a[0][[1, 0]])
    assert tokenize([])[0].shape == (0, 16)


def test_tokenizer_name_wins_over_the_model_folder(model_dir, tmp_path):
    (tmp_path / "empty_model").mkdir()
    tok = load_tokenizer(tmp_path / "empty_model", tokenizer_name=model_dir / "tokenizer")
    assert tok("sks").input_ids[1] == _vocab(model_dir)["sks</w>"]


def test_missing_model_max_length_falls_back_to_77(tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "m" / "tokenizer")
    cfg_path = tmp_path / "m" / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["model_max_length"]
    cfg_path.write_text(json.dumps(cfg))
    assert load_tokenizer(tmp_path / "m").model_max_length == 77


def test_load_tokenizer_errors_name_what_was_looked_for(tmp_path):
    with pytest.raises(JaxboothError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "model").mkdir()
    with pytest.raises(JaxboothError, match=r"model[/\\]tokenizer does not exist"):
        load_tokenizer(tmp_path / "model")
    (tmp_path / "model" / "tokenizer").mkdir()
    (tmp_path / "model" / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(JaxboothError, match="lacks merges.txt"):
        load_tokenizer(tmp_path / "model")
    with pytest.raises(JaxboothError, match="tokenizer_2"):
        load_tokenizer(tmp_path / "model", subfolder="tokenizer_2")
