"""DeepMLF assembly: frozen decoder LM + fusion tokens + MM blocks + AV encoder + heads.

One packed batch, start to finish (`DeepMLF.forward`):
1. AV branch: `A = LayerNorm(AVEncoder(audio, vision))`, `(B, L_av, d_av)`, computed once
   and read by every MM block.
2. Embedding: each sample's real tokens, then its n fusion tokens, packed into `(N, D)` rows
   as the batch's `PackedLayout` places them (built on the host by the loader); no padding.
3. Backbone: `LMRunner` runs the LM's own decoder blocks on the packed rows; each block listed
   in `mm_layers` is a `FusionLayer` in the LM's layer list, which runs its MM block after the
   block (only fusion rows read A). Text rows below the first MM block run without autograd
   (exact; see `model/lm_runner.py`).
4. Readout: the heads read the final-norm states of the last real text token, the fusion
   tokens and mean(A). When the causal-LM term is on (training, `w_clm > 0`), the text rows'
   final states and their next-token targets go to `model/losses.py`, which projects them
   onto the vocabulary in chunks.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deepmlf_fast.backbones.arch import ArchSpec
from deepmlf_fast.config import ModelConfig, validate_model_config
from deepmlf_fast.data.packing import PackedLayout
from deepmlf_fast.errors import CheckpointError, ConfigError
from deepmlf_fast.layers import FusionTokens, GatedCrossAttention
from deepmlf_fast.model.av_encoder import AVEncoder, SoftPerm
from deepmlf_fast.model.fusion import FusionInputs, FusionLayer, MMBlock, add_lora, ffn_from_block, xattn_scale
from deepmlf_fast.model.heads import Heads
from deepmlf_fast.model.lm_runner import LMRunner
from deepmlf_fast.model.losses import CLMInputs
from deepmlf_fast.ops.dropout import Dropout
from deepmlf_fast.ops.linear_cross_entropy import IGNORE_INDEX

BACKBONE_PREFIX = "lm."


class DeepMLF(nn.Module):
    """DeepMLF around an already loaded, frozen HF causal LM (built by `model.build.build_deepmlf`).

    Args:
        cfg: the model configuration; lm: the frozen causal LM (`attn_implementation="deepmlf"`);
        spec: its architecture table; pad_id: the pad id decided when the backbone was loaded;
        init_seed: seeds every new module's initialisation (so a rebuilt model reproduces
            every untrained tensor).
    """

    def __init__(self, cfg: ModelConfig, lm: nn.Module, spec: ArchSpec, pad_id: int, init_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.pad_id = int(pad_id)
        self.lm = lm
        self.runner = LMRunner(lm, spec)
        lm_cfg = lm.config
        dim = lm_cfg.hidden_size
        self.mm_layers = tuple(sorted(cfg.fusion.mm_layers))
        check_model_config(cfg, lm_cfg)
        flags = cfg.flags
        norm_eps = getattr(lm_cfg, spec.norm_eps_attr) if flags.mm_norm_eps == "lm" else spec.official_mm_norm_eps
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            self.fusion_tokens = FusionTokens(cfg.fusion.n_tokens, dim)
            self.av_encoder = AVEncoder(cfg.av, flags.av_pooling)
            self.av_norm = nn.LayerNorm(cfg.av.d_model)
            blocks = {}
            for i in self.mm_layers:
                mlp = ffn_from_block(self.runner.layers[i], spec, lm_cfg, flags)
                if cfg.fusion.lora_rank > 0:
                    mlp = add_lora(mlp, cfg.fusion.lora_rank, cfg.fusion.lora_alpha, cfg.fusion.lora_dropout)
                blocks[str(i)] = MMBlock(
                    dim, cfg.av.d_model, cfg.fusion, mlp, spec.norm, norm_eps,
                    xattn_scale(dim, cfg.fusion.n_heads, flags),
                    cfg.fusion.dropout if spec.mm_ffn_dropout else 0.0,
                )
            self.mm_blocks = nn.ModuleDict(blocks)
            self.heads = Heads(dim, cfg.av.d_model, cfg.head_hidden)
        self.text_perm = SoftPerm(cfg.text.p_perm) if cfg.text.seqaug else None
        p_embd = getattr(lm_cfg, spec.embed_dropout_attr) if spec.embed_dropout_attr else 0.0
        self.embed_dropout = Dropout(p_embd)
        self.backend = "auto"
        self.to(device=self.lm.device)
        self.bind_backbone()

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        text_ids: torch.Tensor,
        layout: PackedLayout,
        audio: torch.Tensor,
        vision: torch.Tensor,
        audio_lengths: torch.Tensor | None = None,
        vision_lengths: torch.Tensor | None = None,
        *,
        clm: bool | None = None,
        return_hidden: bool = False,
    ) -> dict:
        """Predictions for one packed batch (`data.loader.Batch.model_inputs()`).

        Args:
            text_ids: `(N_text,)` every real token, sample-major; layout: where they go.
            audio: `(B, Ta, Da)`; vision: `(B, Tv, Dv)`; *_lengths: `(B,)` valid frames or None.
            clm: produce the causal-LM term's inputs (default: training with `w_clm > 0`).
            return_hidden: also return the final packed states `hidden (N, D)` (before the norm).
        Returns:
            dict with `pred`, `pred_text`, `pred_av` `(B,)`, `pred_fusion` `(B, n)` and, when
            the CLM term is on, `clm` (`losses.CLMInputs`).
        """
        self.bind_backbone()
        av, av_len = self.encode_av(audio, vision, audio_lengths, vision_lengths)
        hidden = self.embed(text_ids, layout)
        hidden = self.runner.run(
            hidden, layout, FusionInputs(av, av_len, layout.fusion_rows),
            text_grad_free_until=self._text_grad_free_until(), mm_on_text_rows=self.cfg.fusion.ffn_all_rows,
            recompute=self.cfg.recompute_lm_blocks and torch.is_grad_enabled(), backend=self.backend,
        )
        out = self.readout(hidden, layout, av, av_len)
        if clm if clm is not None else self.training and self.cfg.loss.w_clm > 0:
            text = self.runner.final_norm(hidden.index_select(0, layout.text_rows))  # (N_text, D)
            out["clm"] = CLMInputs(text, self.runner.lm_head_weight, self.clm_targets(text_ids, layout))
        if return_hidden:
            out["hidden"] = hidden
        return out

    def encode_av(self, audio, vision, audio_lengths=None, vision_lengths=None):
        """-> `A (B, L_av, d_av)` after the LayerNorm, and valid lengths `(B,)` or None."""
        av, lengths = self.av_encoder(audio, vision, audio_lengths, vision_lengths)
        return self.av_norm(av), lengths

    def embed(self, text_ids: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Packed input states `(N, D)`: token embeddings of the real text rows, the fusion
        tokens on theirs, learned positions (GPT-2), embedding dropout."""
        if self.text_perm is not None and self.training and torch.rand(()) < self.cfg.text.p_apply:
            # Official SeqAug permutes the L embedding rows of the padded sequence, pads included.
            width = max(self.cfg.text.max_tokens, layout.max_seqlen_text)
            ids = text_ids.new_full((layout.batch_size, width), self.pad_id)
            ids[layout.text_sample, layout.text_position_ids] = text_ids
            text = self.text_perm(self.runner.embed_tokens(ids))[layout.text_sample, layout.text_position_ids]
        else:
            text = self.runner.embed_tokens(text_ids)  # (N_text, D)
        hidden = text.new_empty(layout.n_rows, text.shape[1])
        hidden = hidden.index_copy(0, layout.text_rows, text)
        fusion = self.fusion_tokens(layout.batch_size).reshape(-1, text.shape[1]).to(text.dtype)  # (B*n, D)
        hidden = hidden.index_copy(0, layout.fusion_rows, fusion)
        return self.embed_dropout(self.runner.add_positions(hidden, layout.position_ids))

    def readout(self, hidden: torch.Tensor, layout: PackedLayout, av: torch.Tensor,
                av_lengths: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The four heads on the final-norm states of the last text token, the fusion tokens and mean(A)."""
        norm = self.runner.final_norm
        t_star = norm(hidden.index_select(0, layout.last_text_rows))  # (B, D)
        fusion = norm(hidden.index_select(0, layout.fusion_rows)).view(layout.batch_size, layout.n_fusion, -1)
        return self.heads(t_star.float(), fusion.float(), time_mean(av, av_lengths).float())

    def clm_targets(self, text_ids: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Next-token target of every real text row `(N_text,)` (official rule, reference §2.2):
        the last real token predicts the pad token, or id 0 when the transcript fills all L."""
        nxt = torch.cat([text_ids[1:], text_ids.new_full((1,), self.pad_id)])
        last = layout.cu_seqlens_text[1:].long() - 1
        end = torch.where(layout.text_lengths >= self.cfg.text.max_tokens, 0, self.pad_id).to(nxt.dtype)
        nxt = nxt.index_copy(0, last, end)
        return torch.where(nxt >= 0, nxt, torch.full_like(nxt, IGNORE_INDEX))

    def _text_grad_free_until(self) -> int:
        """Last block whose text rows run without autograd (-1: none). With the MM FFN on every
        row, text rows depend on trained parameters from the first MM block on; with it on
        fusion rows only, never."""
        if not (self.cfg.text_prefix_no_grad and torch.is_grad_enabled()):
            return -1
        return self.mm_layers[0] if self.cfg.fusion.ffn_all_rows else len(self.runner.layers) - 1

    # -- what trains, and how it is saved -----------------------------------------------------
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
        if "lm" not in self._modules:
            # Detached, its dropout still follows train/eval. Not `lm.train()`: after
            # `apply_deepmlf` the LM holds this model, which would be reached again.
            own = set(self.modules())
            for module in self.lm.modules():
                if module not in own:
                    module.training = mode
        return self

    def bind_backbone(self) -> None:
        """Make the LM's layer list run this model's MM blocks: block i in `mm_layers` becomes a
        `FusionLayer` around the LM's block pointing at `mm_blocks[str(i)]`, every other block
        the LM's own. A backbone shared by several models (a run's seeds, `build_deepmlf` on one
        `LoadedBackbone`) runs the MM blocks of the model that calls it, so `forward` binds first;
        when already bound this only checks."""
        layers = self.runner.layers
        for i, layer in enumerate(layers):
            inner = layer.layer if isinstance(layer, FusionLayer) else layer
            block = self.mm_blocks[str(i)] if str(i) in self.mm_blocks else None
            if block is None:
                if inner is not layer:
                    layers[i] = inner
            elif not (isinstance(layer, FusionLayer) and layer.mm is block):
                layers[i] = FusionLayer(inner, block, f"mm_blocks.{i}")

    def unbind_backbone(self) -> None:
        """Give the LM back its own blocks (no `FusionLayer` left); `forward` binds again."""
        layers = self.runner.layers
        for i, layer in enumerate(layers):
            if isinstance(layer, FusionLayer):
                layers[i] = layer.layer

    def set_backend(self, backend: str) -> None:
        """Choose the attention ops' backend: 'auto', 'triton' or 'reference'."""
        self.backend = backend
        for block in self.mm_blocks.values():
            block.xattn.backend = backend

    def fusion_parameters(self) -> list[nn.Parameter]:
        """The parameters that train: fusion tokens, MM blocks, AV encoder and norm, heads (never
        the frozen backbone, attached or not)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters that train plus buffers of the DeepMLF modules; never the backbone."""
        keep = {name for name, p in self.named_parameters() if p.requires_grad}
        keep |= {name for name, _ in self.named_buffers() if not name.startswith(BACKBONE_PREFIX)}
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def check_trained_keys(self, state: dict) -> None:
        """Raise CheckpointError unless `state` has exactly `trained_state_dict`'s keys."""
        strict_keys(set(self.trained_state_dict()), state, "checkpoint")

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what `trained_state_dict` saved; every key must match exactly."""
        self.check_trained_keys(state)
        self.load_state_dict(state, strict=False)

    def load_av_encoder(self, state: dict[str, torch.Tensor]) -> None:
        """Load a stage-1 AV encoder (`AVEncoder.state_dict()`); every key must match."""
        strict_keys(set(self.av_encoder.state_dict()), state, "AV encoder checkpoint")
        self.av_encoder.load_state_dict(state)

    def zero3_leaf_modules(self) -> list[type]:
        """Module types ZeRO-3 must gather as a whole: they pass their children's weights to a
        fused function instead of calling the children."""
        return [GatedCrossAttention]

    def functional_parameter_reads(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module reads a parameter owned by another one
        (ZeRO-3 registers them as external parameters): the heads' BatchNorm affine weights
        (read through `F.batch_norm`) and `nn.MultiheadAttention`'s output projection."""
        reads = [(self.heads, p) for p in self.heads.task_norm.parameters()]
        for module in self.modules():
            if isinstance(module, nn.MultiheadAttention):
                reads += [(module, p) for p in module.out_proj.parameters()]
        return reads


def strict_keys(expected: set[str], state: dict, what: str) -> None:
    """Raise CheckpointError naming missing and unexpected keys unless `state` has exactly `expected`."""
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{what} does not match the model: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")


def time_mean(av: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean of A `(B, L, d)` over time `(B, d)`, over valid steps when lengths are known."""
    if lengths is None:
        return av.mean(1)
    valid = (torch.arange(av.shape[1], device=av.device)[None, :] < lengths[:, None]).to(av.dtype)
    return (av * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1.0)


def check_model_config(cfg: ModelConfig, lm_config) -> None:
    """Validate a model configuration (`config.validate_model_config`) and what depends on the
    backbone's config (dimensions only; no weights): MM layers inside its blocks, text and
    fusion positions inside its position table, MM heads dividing its width, LoRA rank at most
    its width. Raises ConfigError naming the field, what was expected and what was found."""
    validate_model_config(cfg)
    n_layers, dim = lm_config.num_hidden_layers, lm_config.hidden_size
    f = cfg.fusion
    bad = [i for i in f.mm_layers if i >= n_layers]
    if bad:
        raise ConfigError(f"fusion.mm_layers: indices must be in [0, {n_layers - 1}] for this backbone, found {bad}")
    positions = getattr(lm_config, "max_position_embeddings", None) or getattr(lm_config, "n_positions", None)
    if positions is not None and cfg.text.max_tokens + f.n_tokens > positions:
        raise ConfigError(
            f"fusion.n_tokens: text.max_tokens ({cfg.text.max_tokens}) + fusion tokens ({f.n_tokens}) must fit the "
            f"backbone's {positions} positions, found {cfg.text.max_tokens + f.n_tokens}"
        )
    if dim % f.n_heads:
        raise ConfigError(f"fusion.n_heads: expected a divisor of the backbone width {dim}, found {f.n_heads}")
    if f.lora_rank > dim:
        raise ConfigError(f"fusion.lora_rank: expected 0 (no LoRA) to {dim} (the width), found {f.lora_rank}")
