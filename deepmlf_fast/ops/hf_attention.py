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
* packed with a recorded key/value prefix (`deepmlf_record` / `deepmlf_prefix`), used by
  DeepMLF to run the text rows without autograd and the fusion rows with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepmlf_fast.ops.attention import padded_attention, varlen_attention

ATTN_NAME = "deepmlf"


@dataclass
class PackedKV:
    """Layout that merges recorded text keys/values with fusion-row keys/values.

    Sample b's keys are `[text_b ; fusion_b]` in the combined packed layout; `text_rows` and
    `fusion_rows` give each recorded text row and each fusion row its row there.
    """

    store: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """layer index -> (k, v), each `(N_text, Hkv, d)`, recorded without autograd."""
    text_rows: torch.Tensor
    fusion_rows: torch.Tensor
    n_rows: int
    cu_seqlens_k: torch.Tensor
    max_seqlen_k: int

    def merge(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combined `(N_text + N_fusion, Hkv, d)` keys and values for one layer."""
        text_k, text_v = self.store[layer_idx]
        shape = (self.n_rows, *k.shape[1:])
        full_k = k.new_empty(shape).index_copy(0, self.text_rows, text_k).index_copy(0, self.fusion_rows, k)
        full_v = v.new_empty(shape).index_copy(0, self.text_rows, text_v).index_copy(0, self.fusion_rows, v)
        return full_k, full_v


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
    backend = kwargs.get("deepmlf_backend", "auto")
    causal = getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        if query.shape[0] != 1:
            raise ValueError(f"packed attention expects batch 1 (all rows packed), found batch {query.shape[0]}")
        q = query[0].transpose(0, 1)  # (S, Hq, d)
        k = key[0].transpose(0, 1)  # (K, Hkv, d)
        v = value[0].transpose(0, 1)
        cu_k, max_q, max_k = kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"]
        record = kwargs.get("deepmlf_record")
        if record is not None:
            record[module.layer_idx] = (k.detach(), v.detach())
        prefix: PackedKV | None = kwargs.get("deepmlf_prefix")
        if prefix is not None:
            k, v = prefix.merge(module.layer_idx, k, v)
            cu_k, max_k = prefix.cu_seqlens_k, prefix.max_seqlen_k
        _check_window(window, max_k)
        out = varlen_attention(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scaling, dropout_p=dropout, backend=backend
        )
        return out.unsqueeze(0), None
    _check_window(window, key.shape[2])
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={ATTN_NAME!r} expects a 2-D key padding mask, found shape "
            f"{tuple(attention_mask.shape)}; call deepmlf_fast.ops.hf_attention.register() before loading the model"
        )
    out = padded_attention(
        query, key, value, attention_mask, causal=causal, scale=scaling, dropout_p=dropout, backend=backend
    )
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
