"""MM blocks: the gated formula at init, FFN initialisation from the LM block, LoRA, parity."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepmlf_fast.backbones.arch import get_path
from deepmlf_fast.config import PARITY_FLAGS, FusionConfig, ParityFlags, parity_flags
from deepmlf_fast.model.fusion import MLP, MMBlock, ffn_from_block, xattn_scale

from helpers import load_tiny, make_batch, make_model


@pytest.mark.parametrize("gate", ["sigmoid", "tanh"])
def test_mm_block_at_init_equals_direct_formula(gate):
    torch.manual_seed(0)
    dim, heads, dkv, n, bsz, lav = 32, 4, 30, 3, 2, 5
    cfg = FusionConfig(n_heads=heads, gate=gate, gate_init=0.3, ffn_gate_init=-0.2, dropout=0.0, ffn_all_rows=True)
    block = MMBlock(dim, dkv, cfg, MLP(dim, 64, nn.GELU()), "layernorm", 1e-5, 1 / math.sqrt(dim // heads), 0.0)
    block.eval()
    hidden = torch.randn(11, dim)
    fusion_rows = torch.tensor([3, 4, 5, 8, 9, 10])
    av = torch.randn(bsz, lav, dkv)
    out = block(hidden, fusion_rows, av, None)

    act = torch.sigmoid if gate == "sigmoid" else torch.tanh
    g1, g2 = act(torch.tensor(0.3)), act(torch.tensor(-0.2))
    x = hidden[fusion_rows].view(bsz, n, dim)
    xa, ffn = block.xattn, block.ffn
    xn = F.layer_norm(x, (dim,), xa.norm.weight, xa.norm.bias, 1e-5)
    wk, wv = xa.kv_proj.weight[:dim], xa.kv_proj.weight[dim:]
    y = torch.zeros(bsz, n, dim)
    for b in range(bsz):
        q, k, v = xn[b] @ xa.q_proj.weight.t(), av[b] @ wk.t(), av[b] @ wv.t()
        heads_out = []
        for h in range(heads):
            s = slice(h * 8, (h + 1) * 8)
            p = torch.softmax(q[:, s] @ k[:, s].t() / math.sqrt(8), dim=-1)
            heads_out.append(p @ v[:, s])
        y[b] = torch.cat(heads_out, dim=-1) @ xa.o_proj.weight.t()
    expected = hidden.clone()
    expected[fusion_rows] = (x + g1 * y).view(-1, dim)
    expected = expected + g2 * ffn.mlp(F.layer_norm(expected, (dim,), ffn.norm.weight, ffn.norm.bias, 1e-5))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fusion_only_ffn_leaves_text_rows_untouched():
    torch.manual_seed(0)
    block = MMBlock(32, 30, FusionConfig(n_heads=4, ffn_all_rows=False, dropout=0.0), MLP(32, 64, nn.GELU()),
                    "rmsnorm", 1e-6, 0.25, 0.0)
    hidden = torch.randn(7, 32)
    rows = torch.tensor([5, 6])
    out = block(hidden, rows, torch.randn(1, 4, 30), None)
    keep = torch.tensor([0, 1, 2, 3, 4])
    assert torch.equal(out[keep], hidden[keep]) and not torch.equal(out[rows], hidden[rows])


def test_mm_block_on_packed_rows_gathers_and_writes_back_only_the_fusion_rows():
    """Rows are sample-major; a sample with no visible AV step keeps its fusion rows (tanh gate
    at 0 closes the FFN, so the cross-attention alone is compared)."""
    torch.manual_seed(0)
    cfg = FusionConfig(n_heads=4, gate="tanh", gate_init=0.5, ffn_gate_init=0.0, ffn_all_rows=False, dropout=0.0)
    block = MMBlock(32, 30, cfg, MLP(32, 64, nn.GELU()), "layernorm", 1e-5, 0.25, 0.0).double()
    hidden = torch.randn(10, 32, dtype=torch.float64)
    rows = torch.tensor([1, 2, 4, 6, 7, 9])
    av = torch.randn(2, 7, 30, dtype=torch.float64)
    out = block(hidden, rows, av, torch.tensor([7, 0]))
    others = torch.ones(10, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(out[others], hidden[others])
    q = hidden[rows].view(2, 3, 32)
    torch.testing.assert_close(out[rows[:3]], block.xattn(q[:1], av[:1])[0], atol=1e-12, rtol=1e-12)
    assert torch.equal(out[rows[3:]], hidden[rows[3:]])


def test_gpt2_ffn_copy_corrected_reproduces_the_lm_mlp():
    lm, spec = load_tiny("tiny-gpt2").lm, load_tiny("tiny-gpt2").spec
    block = get_path(lm, spec.base).h[1]
    x = torch.randn(6, lm.config.hidden_size)
    lm.eval()
    ffn = ffn_from_block(block, spec, lm.config, parity_flags("corrected"))
    torch.testing.assert_close(ffn(x), block.mlp(x), atol=1e-6, rtol=1e-6)
    official = ffn_from_block(block, spec, lm.config, parity_flags("official"))
    assert torch.equal(official.fc_in.weight, ffn.fc_in.weight)
    assert not torch.equal(official.fc_in.bias, block.mlp.c_fc.bias)  # official keeps random biases
    assert isinstance(official.act, nn.GELU) and official.act.approximate == "none"


def test_llama_ffn_copy_is_swiglu_and_official_is_additive():
    lm, spec = load_tiny("tiny-llama").lm, load_tiny("tiny-llama").spec
    block = get_path(lm, spec.base).layers[2]
    x = torch.randn(5, lm.config.hidden_size)
    ffn = ffn_from_block(block, spec, lm.config, parity_flags("corrected"))
    torch.testing.assert_close(ffn(x), block.mlp(x), atol=1e-6, rtol=1e-6)
    official = ffn_from_block(block, spec, lm.config, parity_flags("official"))
    mlp = block.mlp
    torch.testing.assert_close(official(x), mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) + mlp.up_proj(x)))


def test_lora_trains_only_adapters_and_starts_at_the_copy():
    lm, spec = load_tiny("tiny-llama").lm, load_tiny("tiny-llama").spec
    lora, _ = make_model("tiny-llama", lora_rank=4, lora_alpha=8.0)
    trainable = {n for n, p in lora.mm_blocks.named_parameters() if p.requires_grad and ".mlp." in f".{n}"}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_ffn = [p for n, p in lora.mm_blocks.named_parameters() if ".mlp." in f".{n}" and "lora_" not in n]
    assert frozen_ffn and not any(p.requires_grad for p in frozen_ffn)
    block = get_path(lm, spec.base).layers[3]
    x = torch.randn(4, lm.config.hidden_size)
    lora.eval()
    with torch.no_grad():  # LoRA's B starts at zero, so the adapted FFN is the copied one
        torch.testing.assert_close(lora.mm_blocks["3"].ffn.mlp(x), block.mlp(x), atol=1e-6, rtol=1e-6)


def test_parity_modes_differ_in_every_listed_flag_and_nothing_else():
    corrected, official = PARITY_FLAGS["corrected"], PARITY_FLAGS["official"]
    for f in dataclasses.fields(ParityFlags):
        assert getattr(corrected, f.name) != getattr(official, f.name), f.name
    assert xattn_scale(768, 16, official) == pytest.approx(1 / math.sqrt(768))
    assert xattn_scale(768, 16, corrected) == pytest.approx(1 / math.sqrt(48))
