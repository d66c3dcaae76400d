"""Batches: shapes, dtypes, packed text and its host-built layout, deterministic shuffling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmlf_fast.data.loader import Batch, EpochSampler, MMSADataset, make_loader
from deepmlf_fast.data.mmsa import from_mmsa_dict
from deepmlf_fast.data.tokenize import TokenizedText
from deepmlf_fast.errors import DataError

N_FUSION, FUSION_START = 2, 8


@pytest.fixture
def split(make_raw):
    return from_mmsa_dict(make_raw(n=10, ta=7, tv=9), "mosi").train


@pytest.fixture
def tokens():
    # Stored padding (-1) is never read: batches hold only real tokens.
    lengths = np.array([3, 1, 5, 2, 2, 4, 1, 3, 2, 6])
    ids = np.full((10, 6), -1, dtype=np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.arange(n) + 10 * i + 1
    return TokenizedText(ids=ids, lengths=lengths.astype(np.int64))


def test_collate_shapes_and_values(split, tokens):
    batch = MMSADataset(split, tokens, N_FUSION, FUSION_START).collate([3, 0, 6])
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.text_ids.dtype == torch.int64 and batch.text_ids.tolist() == [31, 32, 1, 2, 3, 61]
    lay = batch.layout
    assert lay.text_lengths.tolist() == [2, 3, 1] and lay.text_lengths.dtype == torch.int64
    assert lay.n_rows == 6 + 3 * N_FUSION and not lay.text_rows.is_cuda  # built on the host
    assert lay.position_ids[lay.fusion_rows].tolist() == [FUSION_START, FUSION_START + 1] * 3
    assert batch.audio.dtype == torch.float32 and batch.audio.shape == (3, 7, 5)
    assert batch.vision.dtype == torch.float32 and batch.vision.shape == (3, 9, 20)
    assert torch.equal(batch.audio, torch.from_numpy(split.audio[[3, 0, 6]]))
    assert torch.equal(batch.vision, torch.from_numpy(split.vision[[3, 0, 6]]))
    assert torch.equal(batch.labels, torch.from_numpy(split.labels[[3, 0, 6]])) and batch.labels.dtype == torch.float32
    assert batch.audio_lengths.tolist() == split.audio_lengths[[3, 0, 6]].tolist()
    assert batch.vision_lengths.dtype == torch.int64
    assert batch.index.tolist() == [3, 0, 6] and batch.index.dtype == torch.int64


def test_missing_lengths_and_to(make_raw, tokens):
    raw = make_raw(n=10)
    del raw["train"]["audio_lengths"], raw["train"]["vision_lengths"]
    batch = MMSADataset(from_mmsa_dict(raw, "mosi").train, tokens, N_FUSION, FUSION_START).collate([1, 2])
    assert batch.audio_lengths is None and batch.vision_lengths is None
    moved = batch.to("cpu")
    assert moved.audio_lengths is None and torch.equal(moved.text_ids, batch.text_ids)
    assert torch.equal(moved.layout.fusion_rows, batch.layout.fusion_rows)


def test_token_count_must_match(split):
    short = TokenizedText(ids=np.ones((3, 2), np.int32), lengths=np.full(3, 2, np.int64))
    with pytest.raises(DataError, match=r"tokens: expected 10 tokenized transcripts like the split, found 3"):
        MMSADataset(split, short, N_FUSION, FUSION_START)


def order(loader):
    return [i for batch in loader for i in batch.index.tolist()]


def test_loader_order_and_determinism(split, tokens):
    plain = make_loader(split, tokens, N_FUSION, FUSION_START, batch_size=4, shuffle=False)
    assert order(plain) == list(range(10)) and [len(b) for b in plain] == [4, 4, 2]
    a = make_loader(split, tokens, N_FUSION, FUSION_START, batch_size=4, shuffle=True, seed=7)
    b = make_loader(split, tokens, N_FUSION, FUSION_START, batch_size=4, shuffle=True, seed=7)
    c = make_loader(split, tokens, N_FUSION, FUSION_START, batch_size=4, shuffle=True, seed=8)
    first = order(a)
    assert sorted(first) == list(range(10)) and first == order(b) and first != order(c)
    assert order(a) == first  # the order depends only on (seed, epoch) ...
    a.sampler.set_epoch(1)
    b.sampler.set_epoch(1)
    second = order(a)
    assert second != first and second == order(b)  # ... so a resumed run replays it exactly
    shards = [make_loader(split, tokens, N_FUSION, FUSION_START, 4, True, seed=7, rank=r, world_size=3) for r in range(3)]
    parts = [order(s) for s in shards]
    assert all(len(p) == 4 for p in parts) and set().union(*parts) == set(range(10))
    assert [len(x) for x in make_loader(split, tokens, N_FUSION, FUSION_START, 4, True, seed=1, drop_last=True)] == [4, 4]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_rank_gets_as_many_samples_as_the_others(n, world, shuffle):
    """A split smaller than the world (even smaller than half of it) still gives every rank
    the same number of samples, and together they cover the split: a rank with fewer batches
    would wait forever in the others' collectives."""
    shards = [list(EpochSampler(n, shuffle, seed=3, rank=r, world_size=world)) for r in range(world)]
    per_rank = -(-n // world)
    assert [len(s) for s in shards] == [per_rank] * world
    assert set().union(*map(set, shards)) == set(range(n))
    assert all(0 <= i < n for s in shards for i in s)
