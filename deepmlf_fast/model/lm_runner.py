"""How the frozen LM runs on a packed batch: its embeddings, positions, decoder blocks (each
`model.fusion.FusionLayer` among them runs its MM block), the no-grad text prefix,
recomputation, final norm.

Every decoder block is the LM's own Hugging Face module, called on all packed rows as one
"sequence" of batch 1; its attention (`attn_implementation="deepmlf"`) reads the layout from
a `VarlenContext`, so no padding row exists anywhere. A `FusionLayer` also gets the pass's
`FusionInputs` (the AV sequence and where the fusion rows are).

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

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from deepmlf_fast.backbones.arch import ArchSpec, get_path
from deepmlf_fast.data.packing import PackedLayout
from deepmlf_fast.model.fusion import FusionInputs, FusionLayer
from deepmlf_fast.ops.hf_attention import VarlenContext


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
        fusion: FusionInputs,
        *,
        text_grad_free_until: int,
        mm_on_text_rows: bool,
        recompute: bool,
        backend: str,
    ) -> torch.Tensor:
        """Run every decoder block on packed `hidden (N, D)` (the fusion layers' MM blocks read
        `fusion`, whose rows are `layout.fusion_rows`); -> `(N, D)` before the final norm.

        Args:
            text_grad_free_until: run text rows through blocks 0..k without autograd (the
                split above); -1 runs every block on all rows.
            mm_on_text_rows: the MM blocks change text rows (their FFN runs on all rows), so
                a split at k applies block k's MM after merging; else the MM blocks of the
                split region see the fusion rows only.
            recompute: activation checkpointing of the blocks that run with autograd.
            backend: attention backend ("auto", "triton", "reference").
        """
        start = 0
        k = text_grad_free_until
        if k >= 0:
            hidden = self._run_split(hidden, layout, fusion, k, mm_on_text_rows, backend)
            if mm_on_text_rows and isinstance(self.layers[k], FusionLayer):
                hidden = self.layers[k].fuse(hidden, fusion)
            start = k + 1
        ctx = VarlenContext(layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen, backend)
        kwargs = self._kwargs(hidden, layout.position_ids, ctx)
        for i in range(start, len(self.layers)):
            if recompute:
                # Only the frozen block is recomputed; an MM block (small, trained) keeps its activations.
                hidden = checkpoint(self._layer, i, hidden, kwargs, None, use_reentrant=False)
                if isinstance(self.layers[i], FusionLayer):
                    hidden = self.layers[i].fuse(hidden, fusion)
            else:
                hidden = self._layer(i, hidden, kwargs, fusion)
        return hidden

    def _run_split(self, hidden, layout: PackedLayout, fusion: FusionInputs, k: int, mm_on_text_rows: bool,
                   backend: str) -> torch.Tensor:
        """Blocks 0..k: text rows without autograd (no MM block), fusion rows with it; -> merged `(N, D)`."""
        prefix = TextPrefix(layout)
        text = hidden.index_select(0, layout.text_rows)
        fused = hidden.index_select(0, layout.fusion_rows)
        with torch.no_grad():
            ctx = VarlenContext(layout.cu_seqlens_text, layout.cu_seqlens_text, layout.max_seqlen_text,
                                layout.max_seqlen_text, backend, kv_hook=prefix.record)
            kwargs = self._kwargs(text, layout.text_position_ids, ctx)
            text = text.detach()
            for i in range(k + 1):
                text = self._layer(i, text, kwargs, None)
        ctx = VarlenContext(layout.cu_seqlens_fusion, layout.cu_seqlens, layout.n_fusion, layout.max_seqlen,
                            backend, kv_hook=prefix.merge)
        kwargs = self._kwargs(fused, layout.fusion_position_ids, ctx)
        # Here the fusion rows are all the rows; with the MM FFN on text rows too, block k's MM
        # waits for the merge (the caller applies it).
        local = None if mm_on_text_rows else fusion.at(torch.arange(fused.shape[0], device=fused.device))
        for i in range(k + 1):
            fused = self._layer(i, fused, kwargs, local)
        merged = fused.new_empty(layout.n_rows, fused.shape[1])
        return merged.index_copy(0, layout.text_rows, text.to(fused.dtype)).index_copy(0, layout.fusion_rows, fused)

    def _kwargs(self, hidden: torch.Tensor, position_ids: torch.Tensor, ctx: VarlenContext) -> dict:
        """Per-pass keyword arguments of the decoder blocks: the varlen context and, for
        rotary models, cos/sin and position ids."""
        kwargs = {"varlen": ctx}
        if self.rotary is not None:
            pos = position_ids[None]
            kwargs.update(position_embeddings=self.rotary(hidden[None], pos), position_ids=pos)
        return kwargs

    def _layer(self, i: int, hidden: torch.Tensor, kwargs: dict, fusion: FusionInputs | None) -> torch.Tensor:
        """Block i on packed `hidden (R, D)` -> `(R, D)`; a fusion layer also runs its MM block
        when `fusion` is given."""
        layer = self.layers[i]
        if fusion is not None and isinstance(layer, FusionLayer):
            kwargs = {**kwargs, "fusion": fusion}
        out = layer(hidden[None], attention_mask=None, **kwargs)
        return (out[0] if isinstance(out, tuple) else out)[0]
