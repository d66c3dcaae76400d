"""Tokenizing a split once: ids, lengths, truncation, padding, special tokens."""

from __future__ import annotations

import numpy as np
import pytest

from deepmlf_fast.backbones.tokenizer import pad_token_id
from deepmlf_fast.data.tokenize import tokenize_texts
from deepmlf_fast.errors import ConfigError, DataError

LONG = " ".join(["the film is good"] * 20)


def test_gpt2_ids_lengths_padding(gpt2_tokenizer):
    tok = tokenize_texts(["Hello world", "Hello", "Hello world Hello world"], gpt2_tokenizer, 50, "train",
                         pad_token_id(gpt2_tokenizer))
    assert tok.ids.dtype == np.int32 and tok.lengths.dtype == np.int64
    assert tok.ids.shape == (3, 4)  # padded to the longest found, not to 50
    assert tok.lengths.tolist() == [2, 1, 4]
    assert tok.ids.tolist() == [[15496, 995, 50256, 50256], [15496, 50256, 50256, 50256], [15496, 995, 18435, 995]]
    assert pad_token_id(gpt2_tokenizer) == 50256  # GPT-2 has no pad token: pad := eos


def test_gpt2_truncation_matches_official_call(gpt2_tokenizer):
    texts = [LONG, "Hello world", "a b"]
    tok = tokenize_texts(texts, gpt2_tokenizer, 50, "test", pad_token_id(gpt2_tokenizer))
    assert tok.lengths.tolist() == [50, 2, 2] and tok.ids.shape == (3, 50)
    full = gpt2_tokenizer(LONG)["input_ids"]
    assert len(full) == 80 and tok.ids[0].tolist() == full[:50]  # right truncation, no special tokens
    # The official trainer's per-batch call (pad := eos, padding to exactly L) gives the same ids.
    official = gpt2_tokenizer(texts, padding="max_length", truncation=True, max_length=50, return_tensors="np")
    assert np.array_equal(official["input_ids"], tok.ids)
    assert official["attention_mask"].sum(1).tolist() == tok.lengths.tolist()


def test_bert_special_tokens_pad_zero(bert_tokenizer):
    assert pad_token_id(bert_tokenizer) == 0
    tok = tokenize_texts(["the film is good", "bad", "the film is very very bad ."], bert_tokenizer, 6, "valid", 0)
    assert tok.lengths.tolist() == [6, 3, 6]
    assert tok.ids.tolist() == [[2, 5, 6, 7, 8, 3], [2, 9, 3, 0, 0, 0], [2, 5, 6, 7, 10, 3]]  # [SEP] kept at L


def test_zero_token_transcript_names_split_and_index(gpt2_tokenizer):
    with pytest.raises(DataError, match=r"\[valid\] raw_text\[1\]: expected at least one token, found 0 for ''"):
        tokenize_texts(["Hello", "", "world"], gpt2_tokenizer, 50, "valid", 0)


def test_bad_max_tokens(gpt2_tokenizer):
    with pytest.raises(ConfigError, match="max_tokens: expected >= 1, found 0"):
        tokenize_texts(["Hello"], gpt2_tokenizer, 0, "train", 0)
