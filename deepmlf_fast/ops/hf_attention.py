"""`attn_implementation="deepmlf"` for Hugging Face models, through transformers' own
AttentionInterface (no monkey patching).

    import deepmlf_fast.ops.hf_attention as hfa
    hfa.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="deepmlf")

The registered function understands three layouts:
* padded (what `model(input_ids, attention_mask=...)` produces): it receives the 2-D
  key-padding mask (we register FlashAttention's mask builder, so transformers hands over
  the `(B, K)` mask instead of a dense 4-D one) and routes to `padded_attention`;
* packed (`cu_seq_lens_q/k`, `max_length_q/k` keyword arguments, the names transformers'
  FlashAttention path and `DataCollatorWithFlattening` use): straight to `varlen_attention`;
* packed with a `VarlenContext` (keyword `varlen`): the caller's own layout, backend and an
  optional hook that may replace each layer's keys and values before attention (a caller
  can record them, or prepend keys computed elsewhere). Nothing here knows what the hook does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from deepmlf_fast.ops.attention import padded_attention, varlen_attention

ATTN_NAME = "deepmlf"

KVHook = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""`(layer_idx, k (Nk, Hkv, d), v) -> (k', v')`; the keys the context's `cu_seqlens_k` describe."""


@dataclass
class VarlenContext:
    """One packed pass through a decoder: where each sample's queries and keys are, which
    backend runs the attention, and an optional per-layer key/value hook."""

    cu_seqlens_q: torch.Tensor
    """(B+1,) int32 query row starts."""
    cu_seqlens_k: torch.Tensor
    """(B+1,) int32 key row starts, after the hook."""
    max_seqlen_q: int
    max_seqlen_k: int
    backend: str = "auto"
    kv_hook: KVHook | None = None
    plans: dict = field(default_factory=dict, repr=False, compare=False)
    """The reference attention's `PaddingPlan`s of this layout, made by the first block that
    needs one and reused by the others (`varlen_attention`'s `plan_cache`)."""


def deepmlf_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: `query (B, Hq, S, d)`, `key/value (B, Hkv, K, d)`
    -> `(B, S, Hq, d)` output and no attention weights."""
    causal = getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    ctx: VarlenContext | None = kwargs.get("varlen")
    if ctx is None and kwargs.get("cu_seq_lens_q") is not None:
        ctx = VarlenContext(kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"],
                            kwargs["max_length_k"])
    if ctx is not None:
        if query.shape[0] != 1:
            raise ValueError(f"packed attention expects batch 1 (all rows packed), found batch {query.shape[0]}")
        q = query[0].transpose(0, 1)  # (S, Hq, d)
        k = key[0].transpose(0, 1)  # (K, Hkv, d)
        v = value[0].transpose(0, 1)
        if ctx.kv_hook is not None:
            k, v = ctx.kv_hook(module.layer_idx, k, v)
        _check_window(window, ctx.max_seqlen_k)
        out = varlen_attention(
            q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k,
            causal=causal, scale=scaling, dropout_p=dropout, backend=ctx.backend, plan_cache=ctx.plans,
        )
        return out.unsqueeze(0), None
    _check_window(window, key.shape[2])
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={ATTN_NAME!r} expects a 2-D key padding mask, found shape "
            f"{tuple(attention_mask.shape)}; call deepmlf_fast.ops.hf_attention.register() before loading the model"
        )
    out = padded_attention(query, key, value, attention_mask, causal=causal, scale=scaling, dropout_p=dropout)
    return out, None


def _check_window(window: int | None, n_keys: int) -> None:
    if window is not None and n_keys > window:
        raise NotImplementedError(
            f"sliding-window attention (window {window}) over {n_keys} keys is not supported by "
            f"attn_implementation={ATTN_NAME!r}"
        )


def register() -> str:
    """Register `deepmlf` with transformers' attention and mask interfaces; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_NAME, deepmlf_attention)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)
    return ATTN_NAME
