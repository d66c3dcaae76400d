"""Tokenize each split's transcripts once, up front.

The official trainer re-tokenizes every batch and pads it to exactly L tokens
(reference §3.3); here a split is tokenized in one batched call and stored right-padded
to its longest transcript (with the pad id the backbone decided, so `ids` is the official
padded layout), and the loader packs each batch's real tokens. Token ids are the same:
`tokenizer(texts, truncation=True, max_length=L)`
with the tokenizer's default special tokens (none for GPT-2 BPE, [CLS] ... [SEP] for
BERT WordPiece).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from deepmlf_fast.errors import ConfigError, DataError


@dataclass
class TokenizedText:
    """The token ids of one split."""

    ids: np.ndarray  # int32 [N, Lmax], right-padded with pad_id; Lmax = max(lengths) <= max_tokens
    lengths: np.ndarray  # int64 [N], tokens per transcript, each in [1, max_tokens]

    def __len__(self) -> int:
        return len(self.lengths)


def tokenize_texts(texts: Sequence[str], tokenizer: Any, max_tokens: int, split_name: str, pad_id: int) -> TokenizedText:
    """Tokenize `texts` [N] in one batched call, truncating each to `max_tokens` tokens.

    Returns ids int32 [N, Lmax] right-padded with `pad_id` (`LoadedBackbone.pad_id`) and
    lengths int64 [N]. A transcript that yields no tokens raises `DataError` naming
    `split_name` and its index.
    """
    if max_tokens < 1:
        raise ConfigError(f"max_tokens: expected >= 1, found {max_tokens}")
    seqs = tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        i = int(empty[0])
        raise DataError(f"[{split_name}] raw_text[{i}]: expected at least one token, found 0 for {texts[i]!r}")
    width = int(lengths.max()) if len(lengths) else 0
    ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
    flat = np.fromiter((t for seq in seqs for t in seq), dtype=np.int32, count=int(lengths.sum()))
    # Row-major boolean assignment fills each row's first lengths[i] slots in order.
    ids[np.arange(width)[None, :] < lengths[:, None]] = flat
    return TokenizedText(ids=ids, lengths=lengths)
