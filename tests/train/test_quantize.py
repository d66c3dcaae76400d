"""bitsandbytes on CPU: quantized frozen backbones (random-init and checkpoint paths) under DeepMLF."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

import bitsandbytes.functional as bnbf  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

from deepmlf_fast.backbones.load import load_backbone  # noqa: E402
from deepmlf_fast.backbones.quantize import quantize_linear_layers  # noqa: E402
from deepmlf_fast.model.deepmlf import DeepMLF  # noqa: E402
from deepmlf_fast.model.losses import deepmlf_loss  # noqa: E402
from helpers import make_batch, tiny_model_config  # noqa: E402

QUANT = {8: ("Linear8bitLt", dict(quant="llm-int8")), 4: ("Linear4bit", dict(quant="nf4"))}


def _logits(model, tok):
    ids = tok(["a gripping, beautifully acted film"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(ids).logits.float()


@pytest.mark.parametrize("bits,tol", [(8, 0.05), (4, 0.5)])
def test_random_init_quantizes_decoder_linears_like_transformers(bits, tol):
    dense_bb = load_backbone("tiny-llama", random_init=True)
    dense, tok = dense_bb.lm, dense_bb.tokenizer
    quant = load_backbone("tiny-llama", random_init=True, **QUANT[bits][1]).lm
    layer = quant.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert type(layer.get_submodule(name)).__name__ == QUANT[bits][0], name
    assert type(quant.lm_head) is torch.nn.Linear and type(quant.model.embed_tokens) is torch.nn.Embedding
    assert not any(p.requires_grad for p in quant.parameters())
    # The same seeded random weights, quantized: logits stay close to the dense model's.
    torch.testing.assert_close(_logits(quant, tok), _logits(dense, tok), atol=tol, rtol=0)


def test_gpt2_conv1d_layers_are_transposed_into_linear8bit():
    dense = load_backbone("tiny-gpt2", random_init=True).lm
    conv = dense.transformer.h[0].attn.c_attn
    quant = quantize_linear_layers(load_backbone("tiny-gpt2", random_init=True).lm,
                                   BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["c_proj"]))
    lin = quant.transformer.h[0].attn.c_attn
    assert type(lin).__name__ == "Linear8bitLt" and lin.weight.shape == conv.weight.t().shape
    assert type(quant.transformer.h[0].mlp.c_proj).__name__ == "Conv1D"  # skipped by name
    x = torch.randn(3, conv.weight.shape[0])
    with torch.no_grad():
        torch.testing.assert_close(lin(x).float(), conv(x), atol=0.02, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_backbone_initialises_and_trains_deepmlf(bits):
    """transformers' BitsAndBytesConfig path on CPU: MM FFNs start as the dequantized
    weights, a training step moves the trained parameters and leaves the backbone alone."""
    bb = load_backbone("tiny-llama", **QUANT[bits][1])
    lm, tok = bb.lm, bb.tokenizer
    src = lm.model.layers[1].mlp.up_proj
    assert type(src).__name__ == QUANT[bits][0]
    if bits == 8:
        want = bnbf.int8_vectorwise_dequant(src.weight.data, src.weight.SCB)
    else:
        want = bnbf.dequantize_4bit(src.weight.data, src.weight.quant_state)
    frozen = src.weight.data.view(torch.uint8).clone()  # packed 4-bit storage may hold NaN bit patterns

    model = DeepMLF(tiny_model_config("tiny-llama"), lm, bb.spec, bb.pad_id)
    torch.testing.assert_close(model.mm_blocks["1"].ffn.mlp.up_proj.weight.detach(), want.float(), atol=1e-6, rtol=0)

    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = make_batch(tok)
    model.train()
    loss, _ = deepmlf_loss(model(**batch), torch.tensor([1.0, -2.0, 0.5]), model.cfg.loss)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in lm.parameters())
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    assert any(n.startswith("mm_blocks.1.ffn.") for n in moved) and "fusion_tokens.weight" in moved
    assert torch.equal(src.weight.data.view(torch.uint8), frozen)


@pytest.mark.parametrize("quant, keeps", [("llm-int8", False), ("nf4", False), ("int8-weight-only", True),
                                          ("int8-dynamic", True), ("none", True)])
def test_cpu_runs_keep_freed_memory_except_with_whole_weight_copies(tmp_path, monkeypatch, quant, keeps):
    """bitsandbytes' CPU products copy each whole weight per call; a heap that keeps freed memory
    fragments under them (7B LLM.int8: 22.9 GiB peak against 13.5), so those runs give it back."""
    import deepmlf_fast.train.run as run
    from helpers import tiny_run_config

    calls = []
    monkeypatch.setattr(run, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = tiny_run_config(tmp_path)
    cfg.model.quant = quant
    run.Session(cfg, torch.device("cpu"))
    assert calls == ([1] if keeps else [])
