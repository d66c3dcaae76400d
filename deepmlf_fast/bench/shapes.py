"""Shapes of the recipes as the kernels see them: one backbone's dimensions with its DeepMLF
recipe (`Dims`), a cross-attention call of one MM block (`CrossAttnShape`) and the LM's
self-attention over a batch of ragged transcripts plus fusion tokens (`SelfAttnShape`).
`deepmlf bench` measures at these shapes; the benchmark suite (`benchmarks/shapes.py`) builds
its sweeps from them.

Model dimensions come from `backbones.registry.BACKBONES` and the DeepMLF recipe of that
backbone in `presets` (fusion tokens F, MM-block heads, text length L, AV length L_av, AV
width). Backbones without a released recipe (Llama-7B, SmolLM2-135M, the tiny test models) get
the closest recipe through `presets.adapt_to_backbone`, exactly as `--backbone` does.

Transcript lengths. Real transcripts are short and ragged, which is what padded attention wastes
work on. The lengths are drawn once, with seed `LENGTH_SEED`, from a Gamma(shape 4, scale 5)
distribution rounded to integers and clipped to [1, L=50]: mean 20 tokens, sd 10, about 1 % of
samples truncated at 50. This is a modelling choice, not a fit to MOSI/MOSEI (their token counts
depend on the tokenizer); for comparison, the Rotten Tomatoes sentences the step benchmark
tokenises average 25 GPT-2 tokens. A batch of B samples uses the first B lengths of the draw,
so every provider and every run sees identical lengths.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from deepmlf_fast.backbones.load import backbone_config
from deepmlf_fast.backbones.registry import BACKBONES
from deepmlf_fast.config import RunConfig, with_av_widths
from deepmlf_fast.presets import adapt_to_backbone, recipe

LENGTH_SEED = 20250415
"""Seed of the transcript-length draw (the arXiv v1 date of DeepMLF)."""
MAX_DRAW = 32
"""Lengths drawn; the largest batch of any shape."""

# Recipe each backbone's DeepMLF configuration comes from (the released one where it exists).
RECIPE_OF = {
    "gpt2": "mosei-gpt2",
    "gpt2-large": "mosei-gpt2-large",
    "gpt2-chinese": "sims-gpt2-chinese",
    "smollm2-1.7b": "mosi-smollm2-1.7b",
    "smollm2-135m": "demo",
    "llama-7b": "mosi-smollm2-1.7b",
    "tiny-gpt2": "mosei-gpt2",
    "tiny-llama": "mosi-smollm2-1.7b",
}


def text_lengths(batch: int) -> tuple[int, ...]:
    """Transcript lengths (tokens) of a batch: the first `batch` values of the fixed draw."""
    if not 1 <= batch <= MAX_DRAW:
        raise ValueError(f"batch must be in [1, {MAX_DRAW}], found {batch}")
    return _length_draw()[:batch]


def length_draw(n: int, seed: int = LENGTH_SEED) -> np.ndarray:
    """`n` transcript lengths (tokens) like real MOSI/MOSEI ones: gamma(4, 5), mean ~20,
    rounded and clipped to [1, 50]."""
    return np.clip(np.rint(np.random.default_rng(seed).gamma(4.0, 5.0, n)), 1, 50).astype(int)


@functools.lru_cache(maxsize=1)
def _length_draw() -> tuple[int, ...]:
    return tuple(int(v) for v in length_draw(MAX_DRAW))


# --------------------------------------------------------------------------------------
# Backbone dimensions and recipes
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    """What the kernels see of one backbone + its DeepMLF recipe."""

    backbone: str
    family: str
    d_model: int
    n_layers: int
    n_heads: int
    """LM self-attention query heads."""
    n_kv_heads: int
    head_dim: int
    vocab: int
    mm_heads: int
    """MM-block cross-attention heads (head dim = d_model // mm_heads)."""
    n_fusion: int
    """F of the backbone's recipe."""
    text_len: int
    """L: transcripts are padded (official) or truncated (ours) to this many tokens."""
    av_len: int
    av_dim: int
    norm: str
    """MM-block pre-norm: 'layernorm' (GPT-2 family) or 'rmsnorm' (Llama family)."""


def run_config(backbone: str) -> RunConfig:
    """The DeepMLF recipe of `backbone`: its released recipe, or the closest one adapted to it."""
    cfg = recipe(RECIPE_OF[backbone])
    if cfg.model.backbone != backbone:
        cfg = adapt_to_backbone(cfg, backbone)
    return with_av_widths(cfg)  # the dataset's standard widths: benchmarks read no data file


@functools.lru_cache(maxsize=None)
def dims(backbone: str) -> Dims:
    """Dimensions of a preset backbone and its recipe."""
    preset = BACKBONES[backbone]
    c = backbone_config(backbone)
    d_model, n_heads = c.hidden_size, c.num_attention_heads
    cfg = run_config(backbone).model
    return Dims(
        backbone=backbone,
        family=preset.family,
        d_model=d_model,
        n_layers=c.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
        head_dim=d_model // n_heads,
        vocab=c.vocab_size,
        mm_heads=cfg.fusion.n_heads,
        n_fusion=cfg.fusion.n_tokens,
        text_len=cfg.text.max_tokens,
        av_len=cfg.av.max_len,
        av_dim=cfg.av.d_model,
        norm="layernorm" if preset.family == "gpt2" else "rmsnorm",
    )


@dataclass(frozen=True)
class CrossAttnShape:
    """Gated cross-attention of one MM block: F fusion queries against L_av AV steps."""

    dims: Dims
    batch: int
    n_fusion: int
    av_len: int

    @property
    def key(self) -> str:
        d = self.dims
        return f"{d.backbone}/B{self.batch}/F{self.n_fusion}/Lav{self.av_len}/D{d.d_model}/H{d.mm_heads}"

    @property
    def id(self) -> str:
        return f"{self.dims.backbone}-B{self.batch}-F{self.n_fusion}-Lav{self.av_len}"


@dataclass(frozen=True)
class SelfAttnShape:
    """LM self-attention over `[text_b ; F fusion tokens]`: padded to L + F, or packed."""

    dims: Dims
    batch: int
    n_fusion: int

    @property
    def lengths(self) -> tuple[int, ...]:
        """Real transcript lengths of the batch."""
        return text_lengths(self.batch)

    @property
    def padded_len(self) -> int:
        """T = L + F, the official padded sequence length."""
        return self.dims.text_len + self.n_fusion

    @property
    def seq_lens(self) -> tuple[int, ...]:
        """Packed per-sample lengths `len_b + F`."""
        return tuple(n + self.n_fusion for n in self.lengths)

    @property
    def key(self) -> str:
        d = self.dims
        kv = f"/KV{d.n_kv_heads}" if d.n_kv_heads != d.n_heads else ""
        return f"{d.backbone}/B{self.batch}/F{self.n_fusion}/T{self.padded_len}/H{d.n_heads}{kv}/d{d.head_dim}"

    @property
    def id(self) -> str:
        return f"{self.dims.backbone}-B{self.batch}-F{self.n_fusion}"
