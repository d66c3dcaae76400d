"""Audiovisual encoder (reference §1.3) and its stage-1 pretraining model (§2.8).

    audio (B, Ta, Da) ─ SoftPerm ─ pool to L_av ─ [BN] ─ Linear·√d ─ +sinusoid ─ drop ─ 3-layer pre-norm encoder ─┐
    video (B, Tv, Dv) ─ SoftPerm ─ pool to L_av ─ [BN] ─ Linear·√d ─ +sinusoid ─ drop ─ 3-layer pre-norm encoder ─┴ concat ─ Linear ─► A (B, L_av, d)

The official code uses no length masks; `AVEncoderConfig.length_masks` adds them
(masked pooling, encoder key-padding masks, lengths returned for cross-attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepmlf_fast.config import AVEncoderConfig
from deepmlf_fast.ops.dropout import Dropout


class SoftPerm(nn.Module):
    """SeqAug soft permutation (training only).

    Draws one permutation pi of the T time steps (shared by the batch) and, per
    (sample, channel), keeps the channel with probability 1-p or replaces it by its
    time-permuted copy: `x'[b,t,j] = M[b,j] x[b,t,j] + (1-M[b,j]) x[b,pi(t),j]`.
    Runs on whatever device `x` lives on.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d)
        if not self.training or self.p <= 0.0 or x.shape[1] < 2:
            return x
        perm = torch.randperm(x.shape[1], device=x.device)
        keep = torch.rand(x.shape[0], 1, x.shape[2], device=x.device) >= self.p  # (B, 1, d)
        return torch.where(keep, x, x[:, perm])


def pool_time(
    x: torch.Tensor, out_len: int, mode: str, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average-pool `(B, T, d)` to `(B, out_len, d)`.

    The sequence is padded at the end with copies of its last frame to `P*out_len`
    frames, `P = ceil(T/out_len)`. "strided" (official) averages frames t, t+out_len, ...;
    "contiguous" averages the window [t*P, (t+1)*P). With `lengths`, only valid frames are
    averaged and the pooled lengths are returned; otherwise the second output is None.
    """
    bsz, steps, dim = x.shape
    if steps == out_len:
        return x, lengths
    p = -(-steps // out_len)
    pad = p * out_len - steps
    if pad:
        x = torch.cat([x, x[:, -1:].expand(bsz, pad, dim)], dim=1)
    if mode == "strided":
        grouped, axis = x.view(bsz, p, out_len, dim), 1
    elif mode == "contiguous":
        grouped, axis = x.view(bsz, out_len, p, dim), 2
    else:
        raise ValueError(f"pooling mode must be 'strided' or 'contiguous', found {mode!r}")
    if lengths is None:
        return grouped.mean(axis), None
    frame = torch.arange(p * out_len, device=x.device)
    valid = (frame[None, :] < lengths[:, None]).to(x.dtype)  # (B, P*out_len)
    valid = valid.view(bsz, p, out_len) if mode == "strided" else valid.view(bsz, out_len, p)
    total = (grouped * valid.unsqueeze(-1)).sum(axis)
    count = valid.sum(axis).unsqueeze(-1)
    pooled = total / count.clamp_min(1.0)
    new_len = torch.clamp(lengths, max=out_len) if mode == "strided" else -(-lengths // p)
    return pooled, new_len


def sinusoid_table(n_positions: int, dim: int) -> torch.Tensor:
    """fairseq/tensor2tensor sinusoid table `(n_positions, dim)`; row 0 (padding) is zero."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = torch.arange(n_positions, dtype=torch.float32)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    table[0] = 0.0
    return table


class ModalityEncoder(nn.Module):
    """One modality: [BatchNorm] -> projection·√d -> sinusoidal positions -> dropout -> encoder."""

    def __init__(self, in_dim: int, cfg: AVEncoderConfig, batch_norm: bool):
        super().__init__()
        self.scale = math.sqrt(cfg.d_model)
        self.norm = nn.BatchNorm1d(in_dim) if batch_norm else None
        self.proj = nn.Linear(in_dim, cfg.d_model, bias=False)
        self.dropout = Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, cfg.ff_mult * cfg.d_model, cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        # x: (B, L, in_dim) pooled; valid: (B, L) bool or None
        if self.norm is not None:
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        h = self.proj(x)  # (B, L, d)
        # Official padding rule: a step whose first projected channel is exactly 0 is padding
        # (position 0, zero embedding); other steps get position t+1.
        real = h[..., 0] != 0 if valid is None else valid
        pos = torch.arange(1, h.shape[1] + 1, device=h.device)[None, :] * real  # (B, L)
        table = sinusoid_table(h.shape[1] + 1, h.shape[2]).to(device=h.device, dtype=h.dtype)
        h = self.dropout(self.scale * h + table[pos])
        return self.encoder(h, src_key_padding_mask=None if valid is None else ~valid)


class AVEncoder(nn.Module):
    """Encode raw audio and video features into the fused AV sequence `A (B, L_av, d)`."""

    def __init__(self, cfg: AVEncoderConfig, pooling: str):
        super().__init__()
        self.cfg = cfg
        self.pooling = pooling
        self.perm_audio = SoftPerm(cfg.p_perm)
        self.perm_vision = SoftPerm(cfg.p_perm)
        self.audio = ModalityEncoder(cfg.audio_dim, cfg, cfg.batch_norm_audio)
        self.vision = ModalityEncoder(cfg.vision_dim, cfg, cfg.batch_norm_vision)
        self.fuse = nn.Linear(2 * cfg.d_model, cfg.d_model)

    def forward(
        self,
        audio: torch.Tensor,
        vision: torch.Tensor,
        audio_lengths: torch.Tensor | None = None,
        vision_lengths: torch.Tensor | None = None,
        out_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """audio `(B, Ta, Da)`, vision `(B, Tv, Dv)` -> `A (B, L_av, d)` and, with length
        masks, the number of valid AV steps `(B,)` (else None). `out_len` overrides L_av."""
        out_len = out_len or self.cfg.max_len
        use_masks = self.cfg.length_masks and audio_lengths is not None and vision_lengths is not None
        a, a_len = pool_time(self.perm_audio(audio), out_len, self.pooling, audio_lengths if use_masks else None)
        v, v_len = pool_time(self.perm_vision(vision), out_len, self.pooling, vision_lengths if use_masks else None)
        steps = torch.arange(out_len, device=audio.device)
        a_valid = steps[None, :] < a_len[:, None] if use_masks else None
        v_valid = steps[None, :] < v_len[:, None] if use_masks else None
        z = torch.cat([self.audio(a, a_valid), self.vision(v, v_valid)], dim=-1)  # (B, L_av, 2d)
        lengths = torch.maximum(a_len, v_len) if use_masks else None
        return self.fuse(z), lengths


class AVPretrainModel(nn.Module):
    """Stage 1 (`bienc`): the AV encoder plus a linear regressor on the last AV step."""

    def __init__(self, cfg: AVEncoderConfig, pooling: str, out_len: int | None = None):
        super().__init__()
        self.encoder = AVEncoder(cfg, pooling)
        self.clf = nn.Linear(cfg.d_model, 1)
        self.out_len = out_len

    def forward(self, audio, vision, audio_lengths=None, vision_lengths=None, **text) -> dict[str, torch.Tensor]:
        """-> `{"pred": (B,)}` from the last (valid) step of A. Takes a batch's model inputs;
        the text ones (`text_ids`, `layout`) are ignored."""
        a, lengths = self.encoder(audio, vision, audio_lengths, vision_lengths, out_len=self.out_len)
        if lengths is None:
            last = a[:, -1]
        else:
            last = a[torch.arange(a.shape[0], device=a.device), (lengths - 1).clamp_min(0)]
        return {"pred": self.clf(last).squeeze(-1)}
