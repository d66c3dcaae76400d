"""Packed batches of (tokens, audio, vision, label), built by fancy-indexing whole-split arrays.

The collate function (run by the loader's workers) packs each batch: the real tokens of
every transcript, concatenated, and the `PackedLayout` that places them and the fusion
tokens, built on the host. The batch then moves to the device in one go (`Batch.to`), and
nothing in a training step reads a device tensor back.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deepmlf_fast.data.mmsa import MMSASplit
from deepmlf_fast.data.packing import PackedLayout
from deepmlf_fast.data.tokenize import TokenizedText
from deepmlf_fast.errors import DataError


@dataclass
class Batch:
    """One mini-batch of B samples.

    text_ids        int64   [N_text]     every real token, sample-major (no padding)
    layout          PackedLayout         rows of text and fusion tokens, lengths, positions
    audio           float32 [B, Ta, Da]
    vision          float32 [B, Tv, Dv]
    audio_lengths   int64   [B] or None  valid audio frames
    vision_lengths  int64   [B] or None
    labels          float32 [B]
    index           int64   [B]          sample indices in the split
    """

    text_ids: torch.Tensor
    layout: PackedLayout
    audio: torch.Tensor
    vision: torch.Tensor
    audio_lengths: torch.Tensor | None
    vision_lengths: torch.Tensor | None
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor (the layout's too) on `device`."""
        moved = {
            f.name: None if (t := getattr(self, f.name)) is None else t.to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader's pin-memory thread calls this on CUDA)."""
        return Batch(**{f.name: None if (t := getattr(self, f.name)) is None else t.pin_memory() for f in fields(self)})

    def model_inputs(self) -> dict:
        """The keyword arguments of `DeepMLF.forward` (and of the stage-1 AV model)."""
        return dict(text_ids=self.text_ids, layout=self.layout, audio=self.audio, vision=self.vision,
                    audio_lengths=self.audio_lengths, vision_lengths=self.vision_lengths)


class MMSADataset(Dataset):
    """A split and its tokens; items are sample indices, `collate` builds the packed `Batch`.

    `n_fusion` fusion tokens follow each transcript at positions `fusion_start..` (L).
    """

    def __init__(self, split: MMSASplit, tokens: TokenizedText, n_fusion: int, fusion_start: int):
        if len(tokens) != len(split):
            raise DataError(f"tokens: expected {len(split)} tokenized transcripts like the split, found {len(tokens)}")
        self.split = split
        self.tokens = tokens
        self.n_fusion = n_fusion
        self.fusion_start = fusion_start

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices: list[int]) -> Batch:
        """Gather samples `indices` [B] into a packed `Batch` (host tensors)."""
        idx = np.asarray(indices, dtype=np.int64)
        s = self.split
        text_lengths = self.tokens.lengths[idx]
        width = int(text_lengths.max())
        ids = self.tokens.ids[idx, :width]
        real = np.arange(width)[None, :] < text_lengths[:, None]  # row-major: sample-major tokens

        def lengths(x: np.ndarray | None) -> torch.Tensor | None:
            return None if x is None else torch.from_numpy(x[idx])

        return Batch(
            text_ids=torch.from_numpy(ids[real].astype(np.int64)),
            layout=PackedLayout.build(text_lengths, self.n_fusion, self.fusion_start),
            audio=torch.from_numpy(s.audio[idx]),
            vision=torch.from_numpy(s.vision[idx]),
            audio_lengths=lengths(s.audio_lengths),
            vision_lengths=lengths(s.vision_lengths),
            labels=torch.from_numpy(s.labels[idx]),
            index=torch.from_numpy(idx),
        )


class EpochSampler(Sampler[int]):
    """Sample order that depends only on (seed, epoch), optionally sharded over ranks.

    Call `set_epoch(e)` before each epoch: a run resumed at epoch e sees exactly the order
    an uninterrupted run would. With `world_size > 1`, rank r takes every world_size-th
    sample of the (padded) order, like `DistributedSampler`.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world_size > 1 and self.n:
            # Pad by cycling through the order so every rank gets len(self) samples, even when
            # the split has fewer samples than half the ranks (a rank with fewer batches than
            # the others would wait forever in DeepSpeed's collectives).
            total = len(self) * self.world_size
            order = (order * -(-total // self.n))[:total][self.rank :: self.world_size]
        return iter(order)

    def __len__(self) -> int:
        return -(-self.n // self.world_size)


def make_loader(
    split: MMSASplit,
    tokens: TokenizedText,
    n_fusion: int,
    fusion_start: int,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of packed `Batch`es over `split` whose order depends only on (seed, epoch):
    call `loader.sampler.set_epoch(e)` each epoch. `rank`/`world_size` shard the samples;
    `pin_memory` (for CUDA) makes the host-to-device copy of each batch asynchronous."""
    dataset = MMSADataset(split, tokens, n_fusion, fusion_start)
    sampler = EpochSampler(len(dataset), shuffle, 0 if seed is None else seed, rank, world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=dataset.collate,
        pin_memory=pin_memory,
    )
