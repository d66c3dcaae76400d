"""`--quant int8-weight-only` / `fp8` / `int8-dynamic` on whole backbones: streamed checkpoint loading, DeepMLF's
outputs and trained gradients against the dense backbone, and a short run's metrics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepmlf_fast.backbones.load import load_backbone
from deepmlf_fast.backbones.quantize import TORCH_METHODS, quantization_config, quantize_linear_layers
from deepmlf_fast.config import AVPretrainConfig, DataConfig, OptimConfig, RunConfig, choices
from deepmlf_fast.errors import BackboneError
from deepmlf_fast.layers.weight_only import WeightOnlyLinear
from deepmlf_fast.model.deepmlf import DeepMLF
from deepmlf_fast.model.losses import deepmlf_loss
from deepmlf_fast.train.run import train_run

from helpers import make_batch, tiny_model_config, tiny_run_config

AGAINST_DENSE = {"int8-weight-only": 0.15, "fp8": 0.6, "int8-dynamic": 0.25}
"""Largest relative error (norm of the difference over the dense norm) of DeepMLF's predictions
and trained gradients against the original dense backbone: a sanity bound, measured on the tiny
random checkpoint over seeds 0-2 at 0.005-0.075 (int8-weight-only), 0.015-0.32 (fp8; e4m3 keeps 3
mantissa bits) and 0.008-0.125 (int8-dynamic); predictions near zero make the worst ratios. The
close check is against the dense backbone holding the dequantized weights (`AGAINST_DEQUANTIZED`)."""
AGAINST_DEQUANTIZED = {"int8-weight-only": 1e-4, "fp8": 1e-4, "int8-dynamic": 0.1}
"""The same against a dense backbone holding exactly the dequantized weights: the weight-only
methods multiply those weights (fp32 rounding only, measured below 2.4e-6); int8-dynamic also
rounds each row of the activations and output gradients to int8, measured at 0.005-0.057 over
seeds 0-2."""


def test_methods_are_the_config_choices_and_old_configs_keep_their_quantization():
    assert set(choices("model.quant")) == {"none", "llm-int8", "nf4", *TORCH_METHODS}
    with pytest.raises(BackboneError, match=r"model.quant: expected one of .*found 'int4'"):
        quantization_config("int4", torch.float32)
    # A config.json written before `model.quant` (a run to resume or report) reads as its method.
    for old, method in (({"load_in_8bit": True, "load_in_4bit": False}, "llm-int8"), ({"load_in_4bit": True}, "nf4"),
                        ({"load_in_8bit": False}, "none")):
        d = RunConfig().to_dict()
        del d["model"]["quant"]
        d["model"].update(old)
        assert RunConfig.from_dict(d).model.quant == method


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("quant", ["int8-weight-only", "fp8", "int8-dynamic"])
def test_checkpoint_is_streamed_into_the_bytes_of_quantizing_the_loaded_model(backbone, quant):
    """Layer by layer from the safetensors file (GPT-2: Conv1D layout, tied head) gives exactly
    what loading the whole checkpoint with transformers and quantizing it gives."""
    streamed = load_backbone(backbone, quant=quant).lm
    whole = load_backbone(backbone).lm
    quantize_linear_layers(whole, quantization_config(quant, torch.float32))
    s, w = streamed.state_dict(), whole.state_dict()
    assert s.keys() == w.keys()
    for key in w:
        assert torch.equal(s[key], w[key]), key
    kinds = {type(m).__name__ for m in streamed.modules()}
    assert TORCH_METHODS[quant].layer.__name__ in kinds and "Linear" in kinds  # lm_head stays dense
    assert streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    assert all(not p.requires_grad for p in streamed.parameters())


def test_a_sharded_checkpoint_is_read_shard_by_shard(tmp_path):
    """A checkpoint split into safetensors shards (an index file, as hub checkpoints of 7B come):
    the same bytes as the single-file one, and each part's tensors read from its own shard."""
    from deepmlf_fast.backbones.load import resolve_backbone
    from deepmlf_fast.backbones.stream import SAFETENSORS_INDEX, safetensors_files

    source = resolve_backbone("tiny-llama").path
    dense = load_backbone("tiny-llama").lm
    dense.save_pretrained(tmp_path, max_shard_size="2MB")
    for f in source.iterdir():  # tokenizer and config files
        if not f.name.startswith("model") and f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    files = safetensors_files(tmp_path)
    assert (tmp_path / SAFETENSORS_INDEX).exists() and len(set(files.values())) > 2
    sharded = load_backbone(str(tmp_path), quant="int8-weight-only").lm
    single = load_backbone("tiny-llama", quant="int8-weight-only").lm
    s, w = sharded.state_dict(), single.state_dict()
    assert s.keys() == w.keys() and all(torch.equal(s[k], w[k]) for k in w)


@pytest.mark.parametrize("quant", ["int8-weight-only", "fp8", "int8-dynamic"])
@pytest.mark.parametrize("seed", [0, 1])
def test_deepmlf_outputs_and_trained_gradients_are_those_of_the_dequantized_weights(quant, seed):
    """DeepMLF on the 8-bit backbone against DeepMLF on a dense backbone holding exactly the
    dequantized weights (weight-only, fp32: to rounding), and against the original dense backbone
    (loosely)."""
    dense_bb, q_bb, deq_bb = (load_backbone("tiny-llama", quant=q) for q in ("none", quant, "none"))
    for name, module in q_bb.lm.named_modules():
        if isinstance(module, WeightOnlyLinear):
            deq_bb.lm.get_submodule(name).weight.data.copy_(module.dequantized())
    cfg = tiny_model_config("tiny-llama")
    models = [DeepMLF(cfg, bb.lm, bb.spec, bb.pad_id, init_seed=seed).eval() for bb in (q_bb, deq_bb, dense_bb)]
    src = q_bb.lm.model.layers[1].mlp.up_proj
    assert isinstance(src, WeightOnlyLinear)
    # The MM FFN starts as the weights the quantized layer stands for.
    torch.testing.assert_close(models[0].mm_blocks["1"].ffn.mlp.up_proj.weight.detach(), src.dequantized(),
                               rtol=0, atol=0)
    batch = make_batch(dense_bb.tokenizer, seed=seed)
    got = []
    for model in models:
        out = model(**batch)
        loss, _ = deepmlf_loss(out, torch.tensor([1.0, -2.0, 0.5]), model.cfg.loss)
        loss.backward()
        tensors = {k: out[k] for k in ("pred", "pred_fusion", "pred_text")}
        # Gradients through the quantized blocks (fusion tokens, the MM blocks below the last LM block).
        tensors.update({n: p.grad for n, p in model.named_parameters()
                        if n in ("fusion_tokens.weight", "mm_blocks.1.xattn.q_proj.weight",
                                 "mm_blocks.3.ffn.mlp.up_proj.weight")})
        got.append(tensors)
    ours, deq, dense = got
    assert len(ours) == 6
    for key in ours:
        assert _rel(ours[key], deq[key]) < AGAINST_DEQUANTIZED[quant], key
        assert _rel(ours[key], dense[key]) < AGAINST_DENSE[quant], key
    assert all(p.grad is None for p in q_bb.lm.parameters())


@pytest.mark.parametrize("quant", ["int8-weight-only", "int8-dynamic"])
def test_a_short_run_on_the_int8_backbone_reaches_the_dense_runs_metrics(tmp_path, quant):
    """Same data, seed and schedule: test MAE and correlation within 0.03 of the dense run's
    (the two runs differ only by the 8-bit rounding of the frozen weights, and for int8-dynamic of
    the frozen blocks' activations and output gradients)."""
    results = {}
    for method in ("none", quant):
        model = dataclasses.replace(tiny_model_config("tiny-llama"), quant=method)
        cfg = tiny_run_config(tmp_path / method, model, data=DataConfig(dataset="mosi", synthetic_sizes=(96, 48, 48)),
                              optim=OptimConfig(batch_size=16, grad_accum=1, lr_mm=1e-3, lr_av=1e-3, max_epochs=3,
                                                cosine_epochs=3, warmup_epochs=0.5),
                              pretrain=AVPretrainConfig(enabled=False))
        results[method] = train_run(cfg)
    for key in ("MAE", "Corr"):
        assert abs(results[quant][key] - results["none"][key]) < 0.03, (key, results)
