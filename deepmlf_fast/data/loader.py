"""Batches of (tokens, audio, vision, label) built by fancy-indexing whole-split arrays."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepmlf_fast.data.mmsa import MMSASplit
from deepmlf_fast.data.tokenize import TokenizedText
from deepmlf_fast.errors import DataError


@dataclass
class Batch:
    """One mini-batch of B samples.

    input_ids       int64   [B, Lb]      right-padded with the pad id; Lb = max(text_lengths)
    text_lengths    int64   [B]          real tokens per transcript
    audio           float32 [B, Ta, Da]
    vision          float32 [B, Tv, Dv]
    audio_lengths   int64   [B] or None  valid audio frames
    vision_lengths  int64   [B] or None
    labels          float32 [B]
    index           int64   [B]          sample indices in the split
    """

    input_ids: torch.Tensor
    text_lengths: torch.Tensor
    audio: torch.Tensor
    vision: torch.Tensor
    audio_lengths: torch.Tensor | None
    vision_lengths: torch.Tensor | None
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""
        moved = {
            f.name: None if (t := getattr(self, f.name)) is None else t.to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return Batch(**moved)


class MMSADataset(Dataset):
    """A split and its tokens; items are sample indices, `collate` builds the `Batch`."""

    def __init__(self, split: MMSASplit, tokens: TokenizedText, pad_id: int):
        if len(tokens) != len(split):
            raise DataError(f"tokens: expected {len(split)} tokenized transcripts like the split, found {len(tokens)}")
        self.split = split
        self.tokens = tokens
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices: list[int]) -> Batch:
        """Gather samples `indices` [B] into a `Batch`, text padded to the batch's longest."""
        idx = np.asarray(indices, dtype=np.int64)
        s = self.split
        text_lengths = self.tokens.lengths[idx]
        width = int(text_lengths.max())
        ids = self.tokens.ids[idx, :width].astype(np.int64)
        # Re-pad so the batch uses this dataset's pad id whatever the tokens were stored with.
        ids[np.arange(width)[None, :] >= text_lengths[:, None]] = self.pad_id

        def lengths(x: np.ndarray | None) -> torch.Tensor | None:
            return None if x is None else torch.from_numpy(x[idx])

        return Batch(
            input_ids=torch.from_numpy(ids),
            text_lengths=torch.from_numpy(text_lengths),
            audio=torch.from_numpy(s.audio[idx]),
            vision=torch.from_numpy(s.vision[idx]),
            audio_lengths=lengths(s.audio_lengths),
            vision_lengths=lengths(s.vision_lengths),
            labels=torch.from_numpy(s.labels[idx]),
            index=torch.from_numpy(idx),
        )


def make_loader(
    split: MMSASplit,
    tokens: TokenizedText,
    pad_id: int,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader of `Batch`es over `split`; with `seed`, the shuffle order is reproducible."""
    dataset = MMSADataset(split, tokens, pad_id)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=dataset.collate,
    )
