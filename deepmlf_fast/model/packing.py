"""Row layout of a packed DeepMLF batch: `[text_0, fusion_0, text_1, fusion_1, ...]`.

Padding costs nothing: sample b contributes its `len_b` real text rows followed by its
n fusion rows. Causal attention over each sample (`cu_seqlens`) then reproduces the
official visibility exactly: text sees earlier text only, fusion tokens see all real
text and earlier fusion tokens. Position ids follow the official padded layout: text
0..len_b-1, fusion tokens L..L+n-1 (L = `TextConfig.max_tokens`).

The layout is built on the host from the lengths (the kernels need host-side maxima)
and moved to the device once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class PackedLayout:
    """Index tensors describing one packed batch (all on the same device)."""

    n_fusion: int
    n_rows: int
    cu_seqlens: torch.Tensor
    """(B+1,) int32 starts of each sample (text + fusion)."""
    max_seqlen: int
    text_rows: torch.Tensor
    """(N_text,) int64 packed row of every real text token, sample-major."""
    fusion_rows: torch.Tensor
    """(B*n,) int64 packed row of every fusion token, sample-major."""
    last_text_rows: torch.Tensor
    """(B,) int64 packed row of each sample's last real text token."""
    position_ids: torch.Tensor
    """(N,) int64 position of every packed row."""
    text_position_ids: torch.Tensor
    fusion_position_ids: torch.Tensor
    cu_seqlens_text: torch.Tensor
    """(B+1,) int32 starts in the text-only packing (rows in `text_rows` order)."""
    max_seqlen_text: int
    cu_seqlens_fusion: torch.Tensor
    """(B+1,) int32 starts in the fusion-only packing (`arange(B+1) * n`)."""

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @classmethod
    def build(cls, text_lengths: torch.Tensor, n_fusion: int, fusion_start: int, device=None) -> "PackedLayout":
        """Layout for `text_lengths (B,)` (>= 1 each), n fusion tokens at positions
        `fusion_start..fusion_start+n-1`."""
        lens = text_lengths.detach().to("cpu", torch.int64)
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
        layout = cls(
            n_fusion=n_fusion,
            n_rows=int(cu[-1]),
            cu_seqlens=cu.to(torch.int32),
            max_seqlen=int(seq.max()),
            text_rows=text_rows,
            fusion_rows=fusion_rows,
            last_text_rows=cu[:-1] + lens - 1,
            position_ids=position_ids,
            text_position_ids=pos_text,
            fusion_position_ids=fusion_pos,
            cu_seqlens_text=cu_text.to(torch.int32),
            max_seqlen_text=int(lens.max()),
            cu_seqlens_fusion=(torch.arange(bsz + 1) * n_fusion).to(torch.int32),
        )
        return layout.to(device) if device is not None else layout

    def to(self, device) -> "PackedLayout":
        """Copy every tensor field to `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
            for f in fields(self)
        }
        return PackedLayout(**moved)
