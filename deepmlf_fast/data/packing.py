"""Row layout of a packed DeepMLF batch: `[text_0, fusion_0, text_1, fusion_1, ...]`.

Padding costs nothing: sample b contributes its `len_b` real text rows followed by its n
fusion rows. Causal attention over each sample (`cu_seqlens`) then reproduces the official
visibility exactly: text sees earlier text only, fusion tokens see all real text and earlier
fusion tokens. Position ids follow the official padded layout: text 0..len_b-1, fusion tokens
L..L+n-1 (L = `TextConfig.max_tokens`).

The layout is built on the host from the lengths, in the loader's collate (its workers), and
travels to the device with the batch: the kernels need its maxima as Python ints, and a
layout built from device lengths would stall the pipeline on a device-to-host copy every step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class PackedLayout:
    """Index tensors describing one packed batch (all on the same device)."""

    n_fusion: int
    fusion_start: int
    """Position id of the first fusion token (L)."""
    n_rows: int
    cu_seqlens: torch.Tensor
    """(B+1,) int32 starts of each sample (text + fusion)."""
    max_seqlen: int
    text_lengths: torch.Tensor
    """(B,) int64 real text tokens per sample (>= 1)."""
    text_rows: torch.Tensor
    """(N_text,) int64 packed row of every real text token, sample-major."""
    text_sample: torch.Tensor
    """(N_text,) int64 sample of every real text token."""
    fusion_rows: torch.Tensor
    """(B*n,) int64 packed row of every fusion token, sample-major."""
    last_text_rows: torch.Tensor
    """(B,) int64 packed row of each sample's last real text token."""
    position_ids: torch.Tensor
    """(N,) int64 position of every packed row."""
    text_position_ids: torch.Tensor
    """(N_text,) int64 position of every text token in its sample (0..len_b-1)."""
    fusion_position_ids: torch.Tensor
    cu_seqlens_text: torch.Tensor
    """(B+1,) int32 starts in the text-only packing (rows in `text_rows` order)."""
    max_seqlen_text: int
    cu_seqlens_fusion: torch.Tensor
    """(B+1,) int32 starts in the fusion-only packing (`arange(B+1) * n`)."""

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def n_text(self) -> int:
        return self.text_rows.numel()

    @classmethod
    def build(cls, text_lengths, n_fusion: int, fusion_start: int) -> "PackedLayout":
        """Layout for host lengths `text_lengths (B,)` (numpy or CPU tensor, each >= 1) with n
        fusion tokens at positions `fusion_start..fusion_start+n-1`. Runs on the host."""
        lens = torch.as_tensor(np.asarray(text_lengths), dtype=torch.int64)
        if lens.dim() != 1 or lens.numel() == 0 or bool((lens < 1).any()):
            raise ValueError(f"text_lengths: expected a non-empty (B,) vector of lengths >= 1, found {lens.tolist()}")
        bsz = lens.numel()
        seq = lens + n_fusion
        cu = torch.zeros(bsz + 1, dtype=torch.int64)
        cu[1:] = seq.cumsum(0)
        cu_text = torch.zeros(bsz + 1, dtype=torch.int64)
        cu_text[1:] = lens.cumsum(0)
        sample_of_text = torch.repeat_interleave(torch.arange(bsz), lens)
        pos_text = torch.arange(int(cu_text[-1])) - cu_text[sample_of_text]
        text_rows = cu[sample_of_text] + pos_text
        fusion_rows = (cu[:-1, None] + lens[:, None] + torch.arange(n_fusion)[None, :]).reshape(-1)
        position_ids = torch.empty(int(cu[-1]), dtype=torch.int64)
        fusion_pos = (fusion_start + torch.arange(n_fusion)).repeat(bsz)
        position_ids[text_rows] = pos_text
        position_ids[fusion_rows] = fusion_pos
        return cls(
            n_fusion=n_fusion,
            fusion_start=fusion_start,
            n_rows=int(cu[-1]),
            cu_seqlens=cu.to(torch.int32),
            max_seqlen=int(seq.max()),
            text_lengths=lens,
            text_rows=text_rows,
            text_sample=sample_of_text,
            fusion_rows=fusion_rows,
            last_text_rows=cu[:-1] + lens - 1,
            position_ids=position_ids,
            text_position_ids=pos_text,
            fusion_position_ids=fusion_pos,
            cu_seqlens_text=cu_text.to(torch.int32),
            max_seqlen_text=int(lens.max()),
            cu_seqlens_fusion=(torch.arange(bsz + 1) * n_fusion).to(torch.int32),
        )

    def to(self, device, non_blocking: bool = False) -> "PackedLayout":
        """A copy with every tensor field on `device`."""
        moved = {
            f.name: v.to(device, non_blocking=non_blocking) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
            for f in fields(self)
        }
        return PackedLayout(**moved)

    def pin_memory(self) -> "PackedLayout":
        """Page-locked copies, so `to(cuda, non_blocking=True)` is truly asynchronous
        (called by the DataLoader's pin-memory thread)."""
        return PackedLayout(**{
            f.name: v.pin_memory() if isinstance(v := getattr(self, f.name), torch.Tensor) else v for f in fields(self)
        })


def pack_padded(input_ids: torch.Tensor, text_lengths, n_fusion: int, fusion_start: int) -> tuple[torch.Tensor, PackedLayout]:
    """`(text_ids (N_text,), layout)` from right-padded `input_ids (B, Lb)` and lengths `(B,)`,
    for callers that hold a padded batch. Reading device lengths costs one device-to-host
    copy; the training loader packs on the host instead."""
    layout = PackedLayout.build(torch.as_tensor(text_lengths).to("cpu"), n_fusion, fusion_start).to(input_ids.device)
    return input_ids[layout.text_sample, layout.text_position_ids], layout
