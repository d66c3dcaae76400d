"""How the frozen LM runs on a packed batch: its embeddings, positions, decoder blocks (with
DeepMLF's MM blocks after the listed ones), the no-grad text prefix, recomputation, final norm.

Every decoder block is the LM's own Hugging Face module, called on all packed rows as one
"sequence" of batch 1; its attention (`attn_implementation="deepmlf"`) reads the layout from
a `VarlenContext`, so no padding row exists anywhere.

The no-grad text prefix. No trained parameter can influence a text row before the first MM
block whose FFN acts on text rows, so when gradients are needed the runner splits there:
1. text rows run blocks 0..k without autograd, and a key/value hook records each block's
   text keys and values;
2. fusion rows run blocks 0..k with autograd, attending to `[recorded text ; own]` keys
   (a second hook merges them into the packed layout), so they see exactly what the full
   pass would show them;
3. the two are merged into the packed layout and the remaining blocks run on all rows.
This is exact (tests/model/test_deepmlf.py) and removes the backward pass, and the stored
activations, of the text rows in the lower blocks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from deepmlf_fast.backbones.arch import ArchSpec, get_path
from deepmlf_fast.data.packing import PackedLayout
from deepmlf_fast.ops.hf_attention import VarlenContext

MMFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""`(layer index, hidden (R, D), fusion rows (B*n,) of hidden) -> hidden`: the MM block after a layer."""


class TextPrefix:
    """Key/value hooks of the split pass: record the text rows' keys and values (step 1),
    then give the fusion rows `[text ; fusion]` keys in the packed layout (step 2)."""

    def __init__(self, layout: PackedLayout):
        self.layout = layout
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv[layer_idx] = (k.detach(), v.detach())
        return k, v

    def merge(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion keys/values `(B*n, Hkv, d)` -> packed `(N, Hkv, d)` with the recorded text rows."""
        lay = self.layout
        text_k, text_v = self.kv[layer_idx]
        shape = (lay.n_rows, *k.shape[1:])
        full_k = k.new_empty(shape).index_copy(0, lay.text_rows, text_k).index_copy(0, lay.fusion_rows, k)
        full_v = v.new_empty(shape).index_copy(0, lay.text_rows, text_v).index_copy(0, lay.fusion_rows, v)
        return full_k, full_v


class LMRunner:
    """Runs a frozen HF causal LM (located through its `ArchSpec`) on packed rows.

    Holds references only: the LM's parameters stay owned by the model that wraps it.
    """

    def __init__(self, lm: nn.Module, spec: ArchSpec):
        self.lm = lm
        self.spec = spec
        base = get_path(lm, spec.base)
        self.layers: nn.ModuleList = get_path(base, spec.layers)
        self.embed_tokens: nn.Module = get_path(base, spec.embed_tokens)
        self.position_table = get_path(base, spec.position_table) if spec.position_table else None
        self.rotary = get_path(base, spec.rotary) if spec.rotary else None
        self.final_norm: nn.Module = get_path(base, spec.final_norm)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """`(V, D)` output embedding (tied to the input embedding in GPT-2 and SmolLM2)."""
        return self.lm.get_output_embeddings().weight

    def add_positions(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Learned absolute positions (GPT-2's table); rotary models get theirs per block."""
        if self.position_table is None:
            return hidden
        return hidden + self.position_table(position_ids)

    def run(
        self,
        hidden: torch.Tensor,
        layout: PackedLayout,
        mm: MMFn,
        mm_layers: tuple[int, ...],
        *,
        text_grad_free_until: int,
        mm_on_text_rows: bool,
        recompute: bool,
        backend: str,
    ) -> torch.Tensor:
        """Run every decoder block on packed `hidden (N, D)`, `mm(i, ...)` after each block i in
        `mm_layers`; -> `(N, D)` before the final norm.

        Args:
            text_grad_free_until: run text rows through blocks 0..k without autograd (the
                split above); -1 runs every block on all rows.
            mm_on_text_rows: the MM blocks change text rows (their FFN runs on all rows), so
                a split at k applies block k's MM after merging; else the MM blocks of the
                split region see the fusion rows only.
            recompute: activation checkpointing of the blocks that run with autograd.
            backend: attention backend ("auto", "triton", "reference").
        """
        mm_set = set(mm_layers)
        start = 0
        k = text_grad_free_until
        if k >= 0:
            hidden = self._run_split(hidden, layout, mm, mm_set, k, mm_on_text_rows, backend)
            if mm_on_text_rows and k in mm_set:
                hidden = mm(k, hidden, layout.fusion_rows)
            start = k + 1
        ctx = VarlenContext(layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen, backend)
        kwargs = self._kwargs(hidden, layout.position_ids, ctx)
        for i in range(start, len(self.layers)):
            if recompute:
                hidden = checkpoint(self._layer, i, hidden, kwargs, use_reentrant=False)
            else:
                hidden = self._layer(i, hidden, kwargs)
            if i in mm_set:
                hidden = mm(i, hidden, layout.fusion_rows)
        return hidden

    def _run_split(self, hidden, layout: PackedLayout, mm: MMFn, mm_set: set[int], k: int,
                   mm_on_text_rows: bool, backend: str) -> torch.Tensor:
        """Blocks 0..k: text rows without autograd, fusion rows with it; -> merged `(N, D)`."""
        prefix = TextPrefix(layout)
        text = hidden.index_select(0, layout.text_rows)
        fusion = hidden.index_select(0, layout.fusion_rows)
        with torch.no_grad():
            ctx = VarlenContext(layout.cu_seqlens_text, layout.cu_seqlens_text, layout.max_seqlen_text,
                                layout.max_seqlen_text, backend, kv_hook=prefix.record)
            kwargs = self._kwargs(text, layout.text_position_ids, ctx)
            text = text.detach()
            for i in range(k + 1):
                text = self._layer(i, text, kwargs)
        ctx = VarlenContext(layout.cu_seqlens_fusion, layout.cu_seqlens, layout.n_fusion, layout.max_seqlen,
                            backend, kv_hook=prefix.merge)
        kwargs = self._kwargs(fusion, layout.fusion_position_ids, ctx)
        local_rows = torch.arange(fusion.shape[0], device=fusion.device)
        for i in range(k + 1):
            fusion = self._layer(i, fusion, kwargs)
            if i in mm_set and not mm_on_text_rows:
                fusion = mm(i, fusion, local_rows)
        merged = fusion.new_empty(layout.n_rows, fusion.shape[1])
        return merged.index_copy(0, layout.text_rows, text.to(fusion.dtype)).index_copy(0, layout.fusion_rows, fusion)

    def _kwargs(self, hidden: torch.Tensor, position_ids: torch.Tensor, ctx: VarlenContext) -> dict:
        """Per-pass keyword arguments of the decoder blocks: the varlen context and, for
        rotary models, cos/sin and position ids."""
        kwargs = {"varlen": ctx}
        if self.rotary is not None:
            pos = position_ids[None]
            kwargs.update(position_embeddings=self.rotary(hidden[None], pos), position_ids=pos)
        return kwargs

    def _layer(self, i: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = self.layers[i](hidden[None], attention_mask=None, **kwargs)
        return (out[0] if isinstance(out, tuple) else out)[0]
