"""An official-style DeepMLF: the released code's compute pattern, re-implemented in our own words
from deepmlf-reference.md (§1.3-1.11, §2.1-2.2, §3.3), as the baseline of the step benchmark.

What it does on every batch, like the released code:

1. tokenises the raw transcripts on the host with the LM's tokenizer, padding every transcript to
   exactly L tokens (`padding="max_length"`), and moves the ids to the device;
2. encodes audio/video with the AV encoder after strided pooling (deepmlf-fast's `AVEncoder` is
   reused for this part, with pooling 'strided'; it is not where the official code is slow),
   then a LayerNorm;
3. appends the F fusion tokens after the L padded text embeddings and runs the Hugging Face model
   (attention 'sdpa' or 'eager') over all L + F positions with the dense causal + key-padding mask
   HF builds from `[text_mask ; ones(F)]`, pad rows included;
4. Flamingo-style surgery: every decoder layer listed in `mm_layers` is wrapped so that an MM block
   runs right after it: sigmoid-gated `MultiheadCrossAttention` (explicit softmax, scale 1/sqrt(D))
   from the fusion positions to A, then a sigmoid-gated FFN over *all* positions whose weights are
   copied from the wrapped layer's FFN (biases keep their random init; exact GELU for GPT-2;
   `down(act(gate) + up)` for Llama). The AV sequence reaches the wrapped layers through an
   attribute set before the LM forward and cleared after it;
5. takes the final-norm states, applies the LM head to all L + F positions over the full
   vocabulary, and computes the CLM cross-entropy on the first L positions (targets = ids shifted
   left, last column id 0, ignored where the input position is padding);
6. the four regression heads and their L1 losses.

Differences from the released code that do not change the compute pattern: the fusion tokens are
appended as `inputs_embeds` instead of through a wrapped embedding module fed dummy ids, and
LoRA in the MM FFN is not implemented (the benchmark runs every recipe with LoRA off).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from baselines.official_xattn import OfficialGatedCrossAttention
from deepmlf_fast.backbones.arch import ArchSpec, get_path
from deepmlf_fast.backbones.weights import dense_linear
from deepmlf_fast.config import ModelConfig
from deepmlf_fast.model.av_encoder import AVEncoder, SoftPerm

CLM_IGNORE = -1


class OfficialGPTFFN(nn.Module):
    """Linear(D -> 4D) -> exact GELU -> Linear(4D -> D), both with biases."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.fc_in = nn.Linear(dim, inner)
        self.fc_out = nn.Linear(inner, dim)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x)))


class OfficialLlamaFFN(nn.Module):
    """The released Llama MM FFN: `down(act(gate(x)) + up(x))` (an addition where SwiGLU multiplies)."""

    def __init__(self, dim: int, inner: int, act: str, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, inner, bias=bias)
        self.up = nn.Linear(dim, inner, bias=bias)
        self.down = nn.Linear(inner, dim, bias=bias)
        self.act = ACT2FN[act]

    def forward(self, x):
        return self.down(self.act(self.gate(x)) + self.up(x))


class OfficialMMBlock(nn.Module):
    """Gated cross-attention on the fusion positions, then a gated FFN on every position."""

    def __init__(self, dim: int, kv_dim: int, n_heads: int, n_text: int, norm: str, eps: float, dropout: float,
                 ffn: nn.Module, ffn_dropout: float):
        super().__init__()
        self.n_text = n_text
        self.xattn = OfficialGatedCrossAttention(dim, kv_dim, n_heads, norm=norm, eps=eps, dropout=dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=eps) if norm == "layernorm" else nn.RMSNorm(dim, eps=eps)
        self.ffn = ffn
        self.ffn_dropout = nn.Dropout(ffn_dropout)
        self.alpha_2 = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor, av: torch.Tensor) -> torch.Tensor:
        """h `(B, L + F, D)`, av `(B, L_av, 30)` -> `(B, L + F, D)`."""
        text, fusion = h[:, : self.n_text], h[:, self.n_text :]
        fusion = self.xattn(fusion, av)
        h = torch.cat([text.to(fusion.dtype), fusion], dim=1)
        return h + torch.sigmoid(self.alpha_2) * self.ffn_dropout(self.ffn(self.ln_2(h)))


class DecoderLayerWithMM(nn.Module):
    """A frozen decoder layer followed by its MM block (the Flamingo-style wrapper)."""

    def __init__(self, layer: nn.Module, mm: OfficialMMBlock):
        super().__init__()
        self.layer = layer
        self.mm = mm
        self.av: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        if self.av is None:
            raise RuntimeError("DecoderLayerWithMM: the AV sequence was not set before the LM forward")
        h = self.mm(h, self.av).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def __getattr__(self, name):
        # HF reads attributes of its layers (attention_type, ...): answer for the wrapped layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


class OfficialHeads(nn.Module):
    """text / fusion / AV regressors and the multimodal MLP (Linear -> BatchNorm -> ReLU -> Linear)."""

    def __init__(self, dim: int, av_dim: int, hidden: int):
        super().__init__()
        self.w_text = nn.Linear(dim, 1)
        self.w_bn = nn.Linear(dim, 1)
        self.w_av = nn.Linear(av_dim, 1)
        self.w_task = nn.Sequential(nn.Linear(2 * dim + av_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                    nn.Linear(hidden, 1))


def _restore_hf_modules(lm: nn.Module) -> None:
    """Put back the LM's own Hugging Face modules where deepmlf-fast's loader swapped them
    (`backbones.load.fuse_elementwise`): the released code runs GPT-2 with the Python `gelu_new`
    and torch's `nn.Dropout`."""
    from transformers.activations import GELUTanh

    from deepmlf_fast.ops.dropout import Dropout

    act = getattr(lm.config, "activation_function", None) or getattr(lm.config, "hidden_act", None)
    for parent in lm.modules():
        for name, child in list(parent.named_children()):
            if type(child) is GELUTanh and act is not None and type(ACT2FN[act]) is not GELUTanh:
                setattr(parent, name, ACT2FN[act])
            elif type(child) is Dropout:
                setattr(parent, name, nn.Dropout(child.p))


class OfficialStyleDeepMLF(nn.Module):
    """See the module docstring. Build with `OfficialStyleDeepMLF(cfg, lm, tokenizer, spec)` (official
    initialisation around an already loaded LM) or `from_deepmlf(model, tokenizer)` (same values as a
    deepmlf-fast model, for parity checks and same-weights benchmarks)."""

    def __init__(self, cfg: ModelConfig, lm: nn.Module, tokenizer, spec: ArchSpec, attn_implementation: str = "sdpa"):
        super().__init__()
        if cfg.fusion.lora_rank:
            raise NotImplementedError("OfficialStyleDeepMLF: LoRA in the MM FFN is not implemented; use lora_rank=0")
        if not cfg.fusion.ffn_all_rows:
            raise NotImplementedError("OfficialStyleDeepMLF: only the FFN on all rows (`combine`, every released recipe)")
        if cfg.fusion.gate != "sigmoid":
            raise NotImplementedError(f"OfficialStyleDeepMLF: the released gates are sigmoid; fusion.gate is "
                                      f"{cfg.fusion.gate!r}")
        self.cfg, self.spec, self.tokenizer = cfg, spec, tokenizer
        self.n_text, self.n_fusion = cfg.text.max_tokens, cfg.fusion.n_tokens
        self.lm = lm
        lm.set_attn_implementation(attn_implementation)
        lm.requires_grad_(False)
        lm_cfg = lm.config
        dim = lm_cfg.hidden_size
        device = next(lm.parameters()).device
        eps = 1e-5 if spec.norm == "layernorm" else 1e-6  # MMBlock's own LayerNorm / _LlamaRMSNorm defaults
        dropout = cfg.fusion.dropout
        self.fusion_tokens = nn.Parameter(torch.randn(self.n_fusion, dim) * 0.02)
        self.av_encoder = AVEncoder(cfg.av, "strided")
        self.av_norm = nn.LayerNorm(cfg.av.d_model)
        self.text_perm = SoftPerm(cfg.text.p_perm) if cfg.text.seqaug else None
        layers = get_path(get_path(lm, spec.base), spec.layers)
        self.mm_blocks = nn.ModuleDict()
        for i in sorted(cfg.fusion.mm_layers):
            ffn = self._ffn_copy(layers[i], lm_cfg)
            block = OfficialMMBlock(dim, cfg.av.d_model, cfg.fusion.n_heads, self.n_text, spec.norm, eps, dropout, ffn,
                                    dropout if spec.mm_ffn_dropout else 0.0)
            self.mm_blocks[str(i)] = block
        self.heads = OfficialHeads(dim, cfg.av.d_model, cfg.head_hidden)
        self.to(device)
        # Surgery: wrap the listed decoder layers so their MM block runs right after them.
        self._wrappers = []
        for i, block in self.mm_blocks.items():
            wrapper = DecoderLayerWithMM(layers[int(i)], block)
            layers[int(i)] = wrapper
            self._wrappers.append(wrapper)

    def _ffn_copy(self, layer: nn.Module, lm_cfg) -> nn.Module:
        """MM FFN with the wrapped layer's FFN weights (no biases copied), official flavour."""
        dense = [dense_linear(get_path(layer, p)) for p in self.spec.ffn_paths]
        dim, inner = dense[0][0].shape[1], dense[0][0].shape[0]
        if self.spec.ffn == "mlp":
            ffn = OfficialGPTFFN(dim, inner)
            targets = [ffn.fc_in, ffn.fc_out]
        else:
            ffn = OfficialLlamaFFN(dim, inner, getattr(lm_cfg, self.spec.act_attr), bias=dense[0][1] is not None)
            targets = [ffn.gate, ffn.up, ffn.down]
        with torch.no_grad():
            for target, (w, _bias) in zip(targets, dense):
                target.weight.copy_(w)
        return ffn

    # -- construction from a deepmlf-fast model ------------------------------------------------
    @classmethod
    def from_deepmlf(cls, model, tokenizer, *, share_lm: bool = False, attn_implementation: str = "sdpa"):
        """Official-style twin of a `deepmlf_fast` DeepMLF holding the same values in every tensor.

        `share_lm=True` takes over `model.lm` (wrapping its layers, so `model` must not be used
        afterwards); otherwise the LM is deep-copied.
        """
        lm = model.lm if share_lm else copy.deepcopy(model.lm)
        _restore_hf_modules(lm)
        off = cls(model.cfg, lm, tokenizer, model.spec, attn_implementation=attn_implementation)
        off.load_from_deepmlf(model)
        return off

    @torch.no_grad()
    def load_from_deepmlf(self, model) -> None:
        """Copy fusion tokens, AV encoder, MM blocks and heads from a deepmlf-fast DeepMLF."""
        self.fusion_tokens.copy_(model.fusion_tokens.weight)
        self.av_encoder.load_state_dict(model.av_encoder.state_dict())
        self.av_norm.load_state_dict(model.av_norm.state_dict())
        for i, src in model.mm_blocks.items():
            dst = self.mm_blocks[i]
            xa, ffn = src.xattn, src.ffn
            dst.xattn.load_weights(
                xa.norm.weight, getattr(xa.norm, "bias", None), xa.q_proj.weight, xa.kv_proj.weight,
                xa.o_proj.weight, xa.gate.alpha,
            )
            dst.ln_2.load_state_dict(ffn.norm.state_dict())
            dst.alpha_2.copy_(ffn.gate.alpha)
            if self.spec.ffn == "mlp":
                pairs = [(dst.ffn.fc_in, ffn.mlp.fc_in), (dst.ffn.fc_out, ffn.mlp.fc_out)]
            else:
                pairs = [(dst.ffn.gate, ffn.mlp.gate_proj), (dst.ffn.up, ffn.mlp.up_proj),
                         (dst.ffn.down, ffn.mlp.down_proj)]
            for d, s in pairs:
                d.load_state_dict(s.state_dict())
        h = model.heads
        self.heads.w_text.load_state_dict(h.text.state_dict())
        self.heads.w_bn.load_state_dict(h.fusion.state_dict())
        self.heads.w_av.load_state_dict(h.av.state_dict())
        self.heads.w_task[0].load_state_dict(h.task_in.state_dict())
        self.heads.w_task[1].load_state_dict(h.task_norm.state_dict())
        self.heads.w_task[3].load_state_dict(h.task_out.state_dict())

    # -- forward ----------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, texts: list[str], audio: torch.Tensor, vision: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw transcripts + AV features -> predictions, full logits and the padded ids/mask."""
        device = audio.device
        # 1. Host tokenisation of this batch, padded to exactly L.
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.n_text,
                             return_tensors="pt")
        ids = enc["input_ids"].to(device)
        tmask = enc["attention_mask"].to(device)
        bsz = ids.shape[0]
        # 2. AV branch.
        av = self.av_norm(self.av_encoder(audio, vision)[0])  # (B, L_av, 30)
        # 3. [padded text ; fusion] embeddings and the key-padding mask.
        base = get_path(self.lm, self.spec.base)
        emb = get_path(base, self.spec.embed_tokens)(ids)  # (B, L, D)
        if self.text_perm is not None and self.training and torch.rand(()) < self.cfg.text.p_apply:
            emb = self.text_perm(emb)
        fusion = self.fusion_tokens.to(emb.dtype)[None].expand(bsz, -1, -1)
        inputs = torch.cat([emb, fusion], dim=1)  # (B, L + F, D)
        mask = torch.cat([tmask, tmask.new_ones(bsz, self.n_fusion)], dim=1)
        # 4. The HF forward with MM blocks inside the wrapped layers.
        for w in self._wrappers:
            w.av = av
        try:
            hidden = base(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            for w in self._wrappers:
                w.av = None
        # 5. Full-vocabulary logits for every position (fusion rows included, as released).
        logits = self.lm.get_output_embeddings()(hidden)  # (B, L + F, V)
        # 6. Heads.
        hidden = hidden.float()
        lengths = tmask.sum(1)
        t_star = hidden[torch.arange(bsz, device=device), lengths - 1]  # (B, D)
        fo = hidden[:, self.n_text :]  # (B, F, D)
        a_bar = av.mean(1).float()
        h = self.heads
        return {
            "pred": h.w_task(torch.cat([fo.mean(1), t_star, a_bar], dim=-1)).squeeze(-1),
            "pred_text": h.w_text(t_star).squeeze(-1),
            "pred_fusion": h.w_bn(fo).squeeze(-1),
            "pred_av": h.w_av(a_bar).squeeze(-1),
            "logits": logits,
            "ids": ids,
            "text_mask": tmask,
        }

    def loss(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L1 terms of the four heads plus gamma times the CLM cross-entropy on the text positions."""
        w = self.cfg.loss
        y = labels.float()
        parts = {
            "task": (out["pred"] - y).abs().mean(),
            "fusion": (out["pred_fusion"] - y[:, None]).abs().mean(),
            "av": (out["pred_av"] - y).abs().mean(),
            "text": (out["pred_text"] - y).abs().mean(),
        }
        total = parts["task"] + w.w_fusion * parts["fusion"] + w.w_av * parts["av"] + w.w_text * parts["text"]
        if w.w_clm > 0:
            ids, tmask = out["ids"], out["text_mask"]
            targets = ids.roll(-1, dims=1)
            targets[:, -1] = 0
            targets = targets.masked_fill(tmask == 0, CLM_IGNORE)
            text_logits = out["logits"][:, : self.n_text].float()
            parts["clm"] = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=CLM_IGNORE)
            total = total + w.w_clm * parts["clm"]
        return total, {k: v.detach() for k, v in parts.items()}
