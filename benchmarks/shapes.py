"""The one shape registry of the benchmark suite (Liger's rule: no shape is hard-coded in a test).

Every benchmark shape is derived here from the project's own presets:

* model dimensions (`Dims`), the transcript-length draw and the two attention shapes are the
  package's (`deepmlf_fast.bench.shapes`, which `deepmlf bench` measures at), re-exported here;
* the sweep axes are the ones the paper's configurations span: F in {8, 12, 20}, L_av in {50, 500}
  (50 = the released pooling, 500 = unpooled MOSEI/MOSI frames), batch in {1, 8, 32}.

Tiers.
* `small`: the CPU list: tiny widths and batches, so CI runs every provider that works on CPU in
  seconds with `--benchmark-disable`;
* `full`: the GPU list: every preset backbone x batch x L_av at its recipe's F, plus an F sweep.
* step configurations have their own tiers: `smoke` (tiny backbones, CI), `table` (the recorded
  tables; which ones run depends on the device).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deepmlf_fast.bench.shapes import (  # noqa: F401 - the suite's names for the package's shapes
    CrossAttnShape, SelfAttnShape, dims, length_draw, run_config, text_lengths,
)
from deepmlf_fast.config import FusionConfig, RunConfig

FUSION_TOKENS = (8, 12, 20)
AV_LENGTHS = (50, 500)
BATCHES = (1, 8, 32)

FULL_BACKBONES = ("gpt2", "gpt2-large", "smollm2-1.7b", "llama-7b")
"""The GPU backbones of the issue: GPT-2 base/large and SmolLM2-1.7B (released recipes), Llama-7B."""
GQA_BACKBONE = "smollm2-135m"
"""Llama-7B and SmolLM2-1.7B use plain multi-head attention; SmolLM2-135M (9 query / 3 kv heads) is
the preset that exercises grouped-query attention at full width."""
SWEEP_BACKBONE = "gpt2"


# --------------------------------------------------------------------------------------
# Microbenchmark shapes
# --------------------------------------------------------------------------------------
def cross_attention_shapes(tier: str) -> list[CrossAttnShape]:
    """Cross-attention shapes of a tier ('small' for CPU, 'full' for GPU)."""
    if tier == "small":
        return [
            CrossAttnShape(dims("tiny-gpt2"), batch=2, n_fusion=8, av_len=50),
            CrossAttnShape(dims("tiny-llama"), batch=2, n_fusion=20, av_len=500),
            CrossAttnShape(dims("gpt2"), batch=1, n_fusion=12, av_len=50),
        ]
    _check_tier(tier)
    shapes = [
        CrossAttnShape(dims(bb), batch=b, n_fusion=dims(bb).n_fusion, av_len=lav)
        for bb in FULL_BACKBONES for b in BATCHES for lav in AV_LENGTHS
    ]
    sweep = dims(SWEEP_BACKBONE)
    shapes += [
        CrossAttnShape(sweep, batch=max(BATCHES), n_fusion=f, av_len=lav)
        for f in FUSION_TOKENS if f != sweep.n_fusion for lav in AV_LENGTHS
    ]
    return shapes


def self_attention_shapes(tier: str) -> list[SelfAttnShape]:
    """Self-attention shapes of a tier ('small' for CPU, 'full' for GPU)."""
    if tier == "small":
        return [
            SelfAttnShape(dims("tiny-gpt2"), batch=4, n_fusion=8),
            SelfAttnShape(dims("tiny-llama"), batch=4, n_fusion=20),  # GQA 4/2
        ]
    _check_tier(tier)
    shapes = [
        SelfAttnShape(dims(bb), batch=b, n_fusion=dims(bb).n_fusion)
        for bb in (*FULL_BACKBONES, GQA_BACKBONE) for b in BATCHES
    ]
    sweep = dims(SWEEP_BACKBONE)
    shapes += [
        SelfAttnShape(sweep, batch=max(BATCHES), n_fusion=f) for f in FUSION_TOKENS if f != sweep.n_fusion
    ]
    return shapes


def _check_tier(tier: str) -> None:
    if tier != "full":
        raise ValueError(f"tier must be 'small' or 'full', found {tier!r}")


# --------------------------------------------------------------------------------------
# Whole-step configurations
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepConfig:
    """One whole-training-step comparison (official-style vs deepmlf-fast)."""

    name: str
    backbone: str
    batch: int
    precision: str = "fp32"
    """'fp32', or 'bf16': the backbone in bf16 and bf16 autocast on both sides."""
    random_init: bool = False
    """Build the architecture with random weights (no checkpoint needed; same weights both sides)."""
    tier: str = "table"
    devices: tuple[str, ...] = ("cpu",)
    clm: bool | None = None
    """Force the causal-LM term on/off; None keeps the recipe's gamma."""

    def run_config(self) -> RunConfig:
        """The recipe of the backbone, sized for the benchmark (see `step_run_config`)."""
        return step_run_config(self)


def step_run_config(step: StepConfig) -> RunConfig:
    """Recipe of `step.backbone` with the benchmark's overrides.

    * LoRA off (rank 0): the official-style baseline has no LoRA path, so both sides fine-tune
      the copied MM FFNs fully (the GPT-2 recipes' setting);
    * the released sigmoid gates at their released initial values (the demo recipe, which the
      SmolLM2-135M configuration starts from, uses tanh gates; the official-style model has none);
    * parity 'official' on both sides (1/sqrt(D) scale, strided pooling, weights-only FFN copy,
      additive Llama FFN), so both compute the same function;
    * the precision and random-init switch of the step configuration.
    """
    cfg = run_config(step.backbone)
    model = cfg.model
    released = FusionConfig()
    fusion = dataclasses.replace(model.fusion, lora_rank=0, gate=released.gate, gate_init=released.gate_init,
                                 ffn_gate_init=released.ffn_gate_init)
    loss = model.loss
    if step.clm is not None:
        loss = dataclasses.replace(loss, w_clm=(loss.w_clm or 1.0) if step.clm else 0.0)
    model = dataclasses.replace(model, fusion=fusion, loss=loss, parity="official", random_init=step.random_init)
    return dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, precision=step.precision))


STEP_CONFIGS: tuple[StepConfig, ...] = (
    # CI smoke: tiny random backbones, one with the CLM term (GPT-2 recipe), one GQA Llama without.
    StepConfig("tiny-gpt2", "tiny-gpt2", batch=8, tier="smoke", devices=("cpu", "cuda")),
    StepConfig("tiny-llama", "tiny-llama", batch=8, tier="smoke", devices=("cpu", "cuda")),
    # Recorded CPU table: real SmolLM2-135M (30 layers, MOSI recipe: no CLM) and GPT-2 base
    # architecture with random weights (MOSEI recipe: CLM gamma 1.1).
    StepConfig("smollm2-135m-b16", "smollm2-135m", batch=16, devices=("cpu",)),
    # The SmolLM2 recipe's own precision (bf16 backbone + autocast on both sides).
    StepConfig("smollm2-135m-b16-bf16", "smollm2-135m", batch=16, precision="bf16", devices=("cpu",)),
    StepConfig("gpt2-random-b16", "gpt2", batch=16, random_init=True, devices=("cpu",)),
    # The released batch 32 (GPU table; on CPU too, for the speed-up at both batch sizes).
    StepConfig("gpt2-random-b32", "gpt2", batch=32, random_init=True, devices=("cpu", "cuda")),
    StepConfig("gpt2-large-random-b32", "gpt2-large", batch=32, random_init=True, devices=("cuda",)),
    StepConfig("llama-7b-random-b32", "llama-7b", batch=32, precision="bf16", random_init=True, devices=("cuda",)),
)


def step_configs(tier: str, device: str) -> list[StepConfig]:
    """Step configurations of a tier ('smoke' or 'table') that run on `device` ('cpu' or 'cuda')."""
    if tier not in ("smoke", "table"):
        raise ValueError(f"step tier must be 'smoke' or 'table', found {tier!r}")
    return [s for s in STEP_CONFIGS if s.tier == tier and device in s.devices]


def step_config(name: str) -> StepConfig:
    """A step configuration by name."""
    for s in STEP_CONFIGS:
        if s.name == name:
            return s
    raise KeyError(f"step config {name!r}: expected one of {[s.name for s in STEP_CONFIGS]}")


# -- Llama-3.2-Vision (mllama) decoder, patched by apply_deepmlf_kernels_to_mllama -----------------
@dataclass(frozen=True)
class MllamaShape:
    """A slice of an mllama text decoder (self-attention layers and gated cross-attention layers)
    with one image per sample: `tiles` tiles of `tile_tokens` vision tokens (the last tile of every
    second sample padding, as a narrow aspect ratio leaves it), BOS before the image."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    cross_layers: tuple[int, ...]
    batch: int
    text_len: int
    tiles: int
    tile_tokens: int

    @property
    def key(self) -> str:
        return f"{self.name}-B{self.batch}-S{self.text_len}-K{self.tiles * self.tile_tokens}"


MLLAMA_SHAPES = {
    # CPU: a few seconds per case.
    "small": (MllamaShape("tiny", 128, 4, 2, 256, 5, (3,), batch=2, text_len=64, tiles=4, tile_tokens=17),),
    # GPU: Llama-3.2-11B-Vision's text widths (4096, 32/8 heads, 14336 FFN), its first five layers
    # (cross-attention at 3, as released), 4 tiles of 1601 tokens (448-pixel tiles, 14-pixel patches + CLS).
    "full": (MllamaShape("llama-3.2-11b-vision-l5", 4096, 32, 8, 14336, 5, (3,), batch=4, text_len=512, tiles=4,
                         tile_tokens=1601),),
}


def mllama_shapes(tier: str) -> list[MllamaShape]:
    """The mllama decoder shapes of a tier ('small' for CPU, 'full' for GPU)."""
    if tier not in MLLAMA_SHAPES:
        _check_tier(tier)
    return list(MLLAMA_SHAPES[tier])
