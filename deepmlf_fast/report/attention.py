"""The fusion tokens' attention over AV time in each MM block, computed from a trained model.

The fused op never materialises its attention probabilities (the Triton path cannot), so
they are recomputed here from what each MM block receives and from the block's weights:

1. `capture_mm_inputs` registers a forward pre-hook on every MM block (`model.mm_blocks[str(i)]`)
   that records the block's inputs — the packed states with the fusion rows, A and the AV
   lengths — without changing the model's code or its outputs.
2. `cross_attention_probs` applies the block's `GatedCrossAttention` arithmetic up to the
   softmax: pre-norm, query and key projections, the block's softmax scale, and the same
   AV length mask as the op (steps at or past a sample's length get probability 0; a sample
   with no valid step attends to nothing, all zeros, as the op then leaves its tokens unchanged).

Probabilities are those of evaluation (no dropout).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch

from deepmlf_fast.layers import GatedCrossAttention
from deepmlf_fast.ops.cross_attention import normalize


@contextlib.contextmanager
def capture_mm_inputs(model) -> Iterator[dict[int, list[tuple]]]:
    """Record what enters each MM block while the block stays unchanged.

    Yields `{block index i: [(fusion (B, n, D), av (B, L_av, d_av), av_lengths (B,) or None), ...]}`,
    one tuple per forward call, detached: `fusion` are the fusion rows of the packed states
    entering MM block i (sample-major, in the block's dtype). The hooks are removed on exit.
    """
    captured: dict[int, list[tuple]] = {i: [] for i in model.mm_layers}

    def hook(i: int):
        def pre_hook(_module, args):
            hidden, fusion_rows, av, av_lengths = args  # MMBlock.forward's positional inputs
            fusion = hidden.index_select(0, fusion_rows).view(av.shape[0], -1, hidden.shape[-1])
            captured[i].append((fusion.detach(), av.detach(), None if av_lengths is None else av_lengths.detach()))

        return pre_hook

    handles = [model.mm_blocks[str(i)].register_forward_pre_hook(hook(i)) for i in model.mm_layers]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def cross_attention_probs(xattn: GatedCrossAttention, x: torch.Tensor, av: torch.Tensor,
                          av_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities `(B, H, F, L)` fp32 of `xattn`'s queries `x (B, F, D)` over
    `av (B, L, kv_dim)`: each row sums to 1 over a sample's valid steps (`t < av_lengths[b]`,
    every step when `av_lengths` is None) and is 0 elsewhere."""
    bsz, n_q, dim = x.shape
    n_kv = av.shape[1]
    heads = xattn.n_heads
    head_dim = dim // heads
    scale = 1.0 / math.sqrt(head_dim) if xattn.scale is None else xattn.scale  # the op's default
    x = x.float()
    xn = normalize(x, xattn.norm.weight.float(), None if getattr(xattn.norm, "bias", None) is None
                   else xattn.norm.bias.float(), xattn.norm_kind, xattn.norm.eps)
    q = (xn @ xattn.q_proj.weight.float().t()).view(bsz, n_q, heads, head_dim).transpose(1, 2)  # (B, H, F, Dh)
    k = (av.float() @ xattn.kv_proj.weight[:dim].float().t()).view(bsz, n_kv, heads, head_dim).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, F, L)
    visible = torch.ones(bsz, n_kv, dtype=torch.bool, device=x.device)
    if av_lengths is not None:
        visible = torch.arange(n_kv, device=x.device)[None, :] < av_lengths[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a sample without valid steps: all -inf -> NaN -> 0


@torch.no_grad()
def attention_maps(model, loader, eval_ctx, n_samples: int) -> dict:
    """Run the first `n_samples` samples of `loader` (in loader order) through `model` in
    eval mode and compute every MM block's cross-attention.

    Returns `{"probs": {i: (S, F, L) float32 mean over heads}, "valid": (S, L) bool valid AV
    steps, "index": (S,) the samples' indices in the split}` with S <= n_samples."""
    from deepmlf_fast.train.step import forward_step

    model.eval()
    probs: dict[int, list[np.ndarray]] = {i: [] for i in model.mm_layers}
    valid, index, seen = [], [], 0
    for batch in loader:
        with capture_mm_inputs(model) as captured:
            step = forward_step(model, batch, eval_ctx)
        take = min(n_samples - seen, len(step.batch.index))
        for i in model.mm_layers:
            (fusion, av, av_lengths), = captured[i]
            p = cross_attention_probs(model.mm_blocks[str(i)].xattn, fusion[:take], av[:take],
                                      None if av_lengths is None else av_lengths[:take])
            probs[i].append(p.mean(1).cpu().numpy())
        steps = torch.arange(av.shape[1], device=av.device).expand(take, -1)  # (take, L)
        valid.append((steps < av_lengths[:take, None] if av_lengths is not None else steps >= 0).cpu().numpy())
        index.append(step.batch.index[:take].cpu().numpy())
        seen += take
        if seen >= n_samples:
            break
    return {"probs": {i: np.concatenate(v) for i, v in probs.items()}, "valid": np.concatenate(valid),
            "index": np.concatenate(index)}
