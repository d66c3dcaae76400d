"""DeepMLF assembly: frozen decoder LM + fusion tokens + MM blocks + AV encoder + heads.

One batch, start to finish (`DeepMLF.forward`):
1. AV branch: `A = LayerNorm(AVEncoder(audio, vision))`, `(B, L_av, d_av)`, computed once
   and read by every MM block.
2. Packing (`PackedLayout`): each sample becomes `[its real text rows ; n fusion rows]`,
   concatenated into `(N, D)`; no padding rows exist.
3. Backbone: the LM's own decoder blocks run on the packed rows through the varlen
   attention op (`attn_implementation="deepmlf"`); after each block listed in
   `mm_layers` an MM block lets the fusion rows read A.
   Below the first MM block no text row can depend on a trained parameter, so (when
   gradients are needed) text rows run there without autograd, recording their keys and
   values, and the fusion rows run with autograd attending to that recorded prefix.
   This is exact and removes the backward pass over text rows of the lower blocks.
4. Heads read the final-norm states of the last real text token, the fusion tokens and
   mean(A). The causal-LM term (when its weight is > 0 and the model trains) projects
   only the text rows onto the vocabulary, in chunks (`linear_cross_entropy`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from deepmlf_fast.backbones.arch import ArchSpec, get_path
from deepmlf_fast.config import ModelConfig
from deepmlf_fast.errors import ConfigError
from deepmlf_fast.model.av_encoder import AVEncoder, SoftPerm
from deepmlf_fast.model.fusion import MMBlock, add_lora, ffn_from_block, xattn_scale
from deepmlf_fast.model.heads import Heads
from deepmlf_fast.model.packing import PackedLayout
from deepmlf_fast.ops.hf_attention import PackedKV
from deepmlf_fast.ops.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy

BACKBONE_PREFIX = "lm."


class DeepMLF(nn.Module):
    """DeepMLF around an already loaded, frozen HF causal LM (see `build_model`)."""

    def __init__(self, cfg: ModelConfig, lm: nn.Module, spec: ArchSpec, pad_id: int, init_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.pad_id = int(pad_id)
        self.lm = lm
        lm_cfg = lm.config
        dim = lm_cfg.hidden_size
        n_layers = lm_cfg.num_hidden_layers
        self.mm_layers = tuple(sorted(cfg.fusion.mm_layers))
        _check_mm_layers(self.mm_layers, n_layers, cfg.fusion.n_tokens)
        if dim % cfg.fusion.n_heads:
            raise ConfigError(f"fusion.n_heads: {cfg.fusion.n_heads} does not divide the backbone width {dim}")
        flags = cfg.flags
        base = get_path(lm, spec.base)
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            self.fusion_tokens = nn.Parameter(torch.randn(cfg.fusion.n_tokens, dim) * 0.02)
            self.av_encoder = AVEncoder(cfg.av, flags.av_pooling)
            self.av_norm = nn.LayerNorm(cfg.av.d_model)
            blocks = {}
            for i in self.mm_layers:
                layer = get_path(base, spec.layers)[i]
                ffn = ffn_from_block(layer, spec, lm_cfg, flags)
                if cfg.fusion.lora_rank > 0:
                    ffn = add_lora(ffn, cfg.fusion.lora_rank, cfg.fusion.lora_alpha, cfg.fusion.lora_dropout)
                blocks[str(i)] = MMBlock(
                    dim, cfg.av.d_model, cfg.fusion, ffn, spec.norm, getattr(lm_cfg, spec.norm_eps_attr),
                    xattn_scale(dim, cfg.fusion.n_heads, flags),
                    cfg.fusion.dropout if spec.mm_ffn_dropout else 0.0,
                )
            self.mm_blocks = nn.ModuleDict(blocks)
            self.heads = Heads(dim, cfg.av.d_model, cfg.head_hidden)
        self.text_perm = SoftPerm(cfg.text.p_perm) if cfg.text.seqaug else None
        p_embd = getattr(lm_cfg, spec.embed_dropout_attr) if spec.embed_dropout_attr else 0.0
        self.embed_dropout = nn.Dropout(p_embd)
        self.backend = "auto"
        self.to(device=self.lm.device)

    # -- parts of the frozen LM, reached through the architecture table ------------------
    @property
    def _base(self) -> nn.Module:
        return get_path(self.lm, self.spec.base)

    @property
    def layers(self) -> nn.ModuleList:
        return get_path(self._base, self.spec.layers)

    def detach_backbone(self) -> None:
        """Keep the frozen LM out of this module's tree; forward still runs it.

        Afterwards `parameters()`, `state_dict()`, `.to()` and module hooks see only
        DeepMLF's own modules. DeepSpeed is handed the model in this state, so ZeRO
        partitions and all-gathers only what trains, and the frozen (possibly 8-bit)
        backbone stays replicated on every rank. `trained_state_dict` keys do not change.
        """
        lm = self._modules.pop("lm", None)
        if lm is not None:
            object.__setattr__(self, "lm", lm)

    def train(self, mode: bool = True) -> "DeepMLF":
        super().train(mode)
        if "lm" not in self._modules:  # detached: its dropout still follows train/eval
            self.lm.train(mode)
        return self

    def set_backend(self, backend: str) -> None:
        """Choose the attention ops' backend: 'auto', 'triton' or 'reference'."""
        self.backend = backend
        for block in self.mm_blocks.values():
            block.backend = backend

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters that train plus buffers of the DeepMLF modules; never the backbone."""
        keep = {name for name, p in self.named_parameters() if p.requires_grad}
        keep |= {name for name, _ in self.named_buffers() if not name.startswith(BACKBONE_PREFIX)}
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what `trained_state_dict` saved; every key must match exactly."""
        expected = set(self.trained_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict(state, strict=False)

    # -- forward ----------------------------------------------------------------------------
    def encode_av(self, audio, vision, audio_lengths=None, vision_lengths=None):
        """-> `A (B, L_av, d_av)` after the LayerNorm, and valid lengths `(B,)` or None."""
        av, lengths = self.av_encoder(audio, vision, audio_lengths, vision_lengths)
        return self.av_norm(av), lengths

    def forward(
        self,
        input_ids: torch.Tensor,
        text_lengths: torch.Tensor,
        audio: torch.Tensor,
        vision: torch.Tensor,
        audio_lengths: torch.Tensor | None = None,
        vision_lengths: torch.Tensor | None = None,
        *,
        clm: bool | None = None,
        return_hidden: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Predictions for one batch.

        Args:
            input_ids: `(B, Lb)` right-padded token ids; text_lengths: `(B,)` real lengths >= 1.
            audio: `(B, Ta, Da)`; vision: `(B, Tv, Dv)`; *_lengths: `(B,)` or None.
            clm: compute the causal-LM loss (default: when training with `w_clm > 0`).
            return_hidden: also return the final packed hidden states `hidden (N, D)` and the layout.
        Returns:
            dict with `pred`, `pred_text`, `pred_av` `(B,)`, `pred_fusion` `(B, n)`, and
            `clm_loss` (scalar) when computed.
        """
        layout = PackedLayout.build(text_lengths, self.cfg.fusion.n_tokens, self.cfg.text.max_tokens, input_ids.device)
        av, av_len = self.encode_av(audio, vision, audio_lengths, vision_lengths)
        hidden = self._embed(input_ids, text_lengths, layout)
        hidden = self._run_layers(hidden, layout, av, av_len)

        final_norm = get_path(self._base, self.spec.final_norm)
        bsz, n = layout.batch_size, layout.n_fusion
        t_star = final_norm(hidden.index_select(0, layout.last_text_rows))  # (B, D)
        fusion = final_norm(hidden.index_select(0, layout.fusion_rows)).view(bsz, n, -1)  # (B, n, D)
        out = self.heads(t_star.float(), fusion.float(), _time_mean(av, av_len).float())
        if clm is None:
            clm = self.training and self.cfg.loss.w_clm > 0
        if clm:
            text_states = final_norm(hidden.index_select(0, layout.text_rows))  # (N_text, D)
            targets = self._clm_targets(input_ids, text_lengths)
            out["clm_loss"] = linear_cross_entropy(text_states, self.lm.get_output_embeddings().weight, targets)
        if return_hidden:
            out["hidden"] = hidden
            out["layout"] = layout
        return out

    def _embed(self, input_ids: torch.Tensor, text_lengths: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Packed input states `(N, D)`: token embeddings of real text, then fusion tokens."""
        embed = get_path(self._base, self.spec.embed_tokens)
        ids = input_ids
        if self.text_perm is not None and self.training and torch.rand(()) < self.cfg.text.p_apply:
            # Official SeqAug permutes the L embedding rows of the padded sequence, pads included.
            width = max(self.cfg.text.max_tokens, ids.shape[1])
            ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad_id)
            emb = self.text_perm(embed(ids))
        else:
            emb = embed(ids)  # (B, Lb, D)
        real = torch.arange(emb.shape[1], device=emb.device)[None, :] < text_lengths[:, None]
        text = emb[real]  # (N_text, D), sample-major like layout.text_rows
        bsz = layout.batch_size
        hidden = text.new_empty(layout.n_rows, text.shape[1])
        hidden = hidden.index_copy(0, layout.text_rows, text)
        hidden = hidden.index_copy(0, layout.fusion_rows, self.fusion_tokens.to(text.dtype).repeat(bsz, 1))
        if self.spec.position_table is not None:
            hidden = hidden + get_path(self._base, self.spec.position_table)(layout.position_ids)
        return self.embed_dropout(hidden)

    def _positions(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Per-pass keyword arguments for position handling (rotary cos/sin for Llama)."""
        if self.spec.rotary is None:
            return {}
        rotary = get_path(self._base, self.spec.rotary)
        pos = position_ids[None]
        return {"position_embeddings": rotary(hidden[None], pos), "position_ids": pos}

    def _layer(self, i: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = self.layers[i](hidden[None], attention_mask=None, **kwargs)
        return (out[0] if isinstance(out, tuple) else out)[0]

    def _run_layers(self, hidden, layout: PackedLayout, av, av_len) -> torch.Tensor:
        n_layers = len(self.layers)
        mm = set(self.mm_layers)
        split_end = -1
        if self.cfg.text_prefix_no_grad and torch.is_grad_enabled():
            split_end = self.mm_layers[0] if self.cfg.fusion.combine else n_layers - 1
        start = 0
        if split_end >= 0:
            hidden = self._run_split(hidden, layout, av, av_len, split_end)
            if self.cfg.fusion.combine:
                hidden = self._mm(split_end, hidden, layout, av, av_len)
            start = split_end + 1
        full = dict(
            cu_seq_lens_q=layout.cu_seqlens, cu_seq_lens_k=layout.cu_seqlens,
            max_length_q=layout.max_seqlen, max_length_k=layout.max_seqlen,
            deepmlf_backend=self.backend, **self._positions(hidden, layout.position_ids),
        )
        recompute = self.cfg.recompute_lm_blocks and torch.is_grad_enabled()
        for i in range(start, n_layers):
            if recompute:
                hidden = checkpoint(self._layer, i, hidden, full, use_reentrant=False)
            else:
                hidden = self._layer(i, hidden, full)
            if i in mm:
                hidden = self._mm(i, hidden, layout, av, av_len)
        return hidden

    def _run_split(self, hidden, layout: PackedLayout, av, av_len, split_end: int) -> torch.Tensor:
        """Blocks 0..split_end: text rows without autograd, fusion rows with it (exact)."""
        record: dict = {}
        text = hidden.index_select(0, layout.text_rows)
        fusion = hidden.index_select(0, layout.fusion_rows)
        with torch.no_grad():
            text = text.detach()
            kw = dict(
                cu_seq_lens_q=layout.cu_seqlens_text, cu_seq_lens_k=layout.cu_seqlens_text,
                max_length_q=layout.max_seqlen_text, max_length_k=layout.max_seqlen_text,
                deepmlf_backend=self.backend, deepmlf_record=record,
                **self._positions(text, layout.text_position_ids),
            )
            for i in range(split_end + 1):
                text = self._layer(i, text, kw)
        prefix = PackedKV(record, layout.text_rows, layout.fusion_rows, layout.n_rows, layout.cu_seqlens, layout.max_seqlen)
        kw = dict(
            cu_seq_lens_q=layout.cu_seqlens_fusion, cu_seq_lens_k=layout.cu_seqlens,
            max_length_q=layout.n_fusion, max_length_k=layout.max_seqlen,
            deepmlf_backend=self.backend, deepmlf_prefix=prefix,
            **self._positions(fusion, layout.fusion_position_ids),
        )
        local_rows = torch.arange(fusion.shape[0], device=fusion.device)
        for i in range(split_end + 1):
            fusion = self._layer(i, fusion, kw)
            if str(i) in self.mm_blocks and not self.cfg.fusion.combine:
                fusion = self.mm_blocks[str(i)](fusion, local_rows, layout.n_fusion, av, av_len)
        merged = fusion.new_empty(layout.n_rows, fusion.shape[1])
        return merged.index_copy(0, layout.text_rows, text.to(fusion.dtype)).index_copy(0, layout.fusion_rows, fusion)

    def _mm(self, i: int, hidden, layout: PackedLayout, av, av_len) -> torch.Tensor:
        block = self.mm_blocks[str(i)]
        dtype = hidden.dtype
        out = block(hidden.to(block.q_proj.weight.dtype), layout.fusion_rows, layout.n_fusion, av, av_len)
        return out.to(dtype)

    def _clm_targets(self, input_ids: torch.Tensor, text_lengths: torch.Tensor) -> torch.Tensor:
        """Next-token targets of every real text row (official rule, reference §2.2): the last
        real token predicts the pad token, or id 0 when the transcript fills all L positions."""
        bsz, width = input_ids.shape
        nxt = torch.cat([input_ids[:, 1:], input_ids.new_full((bsz, 1), self.pad_id)], dim=1)
        last = text_lengths - 1
        end_token = torch.where(text_lengths >= self.cfg.text.max_tokens, 0, self.pad_id)
        nxt = nxt.scatter(1, last[:, None], end_token[:, None].to(nxt.dtype))
        real = torch.arange(width, device=input_ids.device)[None, :] < text_lengths[:, None]
        targets = nxt[real]
        return torch.where(targets >= 0, targets, torch.full_like(targets, IGNORE_INDEX))


def _time_mean(av: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean of A over time `(B, d)`, over valid steps when lengths are known."""
    if lengths is None:
        return av.mean(1)
    valid = (torch.arange(av.shape[1], device=av.device)[None, :] < lengths[:, None]).to(av.dtype)
    return (av * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1.0)


def _check_mm_layers(mm_layers: tuple[int, ...], n_layers: int, n_tokens: int) -> None:
    if not mm_layers:
        raise ConfigError("fusion.mm_layers: at least one MM block is needed, found none")
    bad = [i for i in mm_layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"fusion.mm_layers: indices must be in [0, {n_layers - 1}] for this backbone, found {bad}")
    if len(set(mm_layers)) != len(mm_layers):
        raise ConfigError(f"fusion.mm_layers: duplicate indices in {list(mm_layers)}")
    if n_tokens < 1:
        raise ConfigError(f"fusion.n_tokens: must be >= 1, found {n_tokens}")
