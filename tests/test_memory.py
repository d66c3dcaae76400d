"""`deepmlf estimate-memory`: exact parameter counts, the activation model, ZeRO sharding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepmlf_fast.backbones.load import resolve_backbone
from deepmlf_fast.cli import main
from deepmlf_fast.config import OptimConfig, RunConfig
from deepmlf_fast.errors import BackboneError
from deepmlf_fast.memory import count_parameters, estimate_memory
from helpers import load_tiny, make_batch, tiny_model_config


def _tiny_run(**optim) -> RunConfig:
    return RunConfig(model=tiny_model_config("tiny-llama", dropout=0.0), optim=OptimConfig(**optim))


@pytest.fixture(scope="module")
def tiny_counts():
    return count_parameters(_tiny_run())


def test_meta_device_counts_equal_the_built_model(tiny_counts):
    from deepmlf_fast.model.deepmlf import DeepMLF

    bb = load_tiny("tiny-llama")
    lm = bb.lm
    model = DeepMLF(tiny_model_config("tiny-llama", dropout=0.0), lm, bb.spec, bb.pad_id)
    linears = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert tiny_counts.trained == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert tiny_counts.quantizable == sum(m.weight.numel() for m in linears)
    assert tiny_counts.quantizable_rows == sum(m.out_features for m in linears)
    assert tiny_counts.quantizable + tiny_counts.backbone_other == sum(p.numel() for p in lm.parameters())
    assert tiny_counts.mm_block == max(sum(p.numel() for p in b.parameters()) for b in model.mm_blocks.values())


def test_activation_model_matches_what_autograd_saves(tiny_counts):
    """The estimate's activation lines against the bytes autograd keeps for a real step
    of tiny-llama (CPU reference attention, which saves padded q/k/v, so within 25%)."""
    from deepmlf_fast.model.deepmlf import DeepMLF

    bb = load_tiny("tiny-llama")
    lm = bb.lm
    model = DeepMLF(tiny_model_config("tiny-llama", dropout=0.0), lm, bb.spec, bb.pad_id).train()
    batch = make_batch(bb.tokenizer, texts=["word " * 14] * 8)
    assert batch["layout"].text_lengths.tolist() == [15] * 8
    weights = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(lm.parameters())}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    cfg = _tiny_run(batch_size=8)
    est = estimate_memory(cfg, zero=0, text_tokens=15, counts=tiny_counts)
    activations = sum(line.bytes for line in est.gpu if line.name.startswith("activations"))
    assert activations == pytest.approx(sum(saved.values()), rel=0.25)


def test_zero_stages_and_offload_shard_what_they_should(tiny_counts):
    cfg = _tiny_run()

    def lines(zero, offload=False):
        est = estimate_memory(cfg, zero=zero, gpus=4, offload=offload, counts=tiny_counts)
        return {line.name: line.bytes for line in est.gpu}, {line.name: line.bytes for line in est.host}

    p = tiny_counts.trained
    z0, z1, z2, z3 = (lines(z)[0] for z in range(4))
    assert z0["Adam moments"] == 8 * p and z1["Adam moments"] == 2 * p
    assert z1["gradients"] == 4 * p and z2["gradients"] == p
    assert z2["trained parameters"] == 4 * p and z3["trained parameters"] == p
    assert "fp32 master weights" not in z0 and "fp32 master weights" not in z3 and z2["fp32 master weights"] == p
    gpu, host = lines(2, offload=True)
    assert "Adam moments" not in gpu and host["Adam moments"] == 2 * p
    # The frozen backbone is replicated whatever the stage.
    assert z0["frozen backbone: decoder linears"] == z3["frozen backbone: decoder linears"]
    int8 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, load_in_8bit=True))
    q = {line.name: line.bytes for line in estimate_memory(int8, counts=tiny_counts).gpu}
    assert q["frozen backbone: decoder linears"] == tiny_counts.quantizable + 4 * tiny_counts.quantizable_rows


def test_llama_7b_preset_resolves_only_as_an_architecture_without_weights():
    if resolve_backbone("llama-7b", random_init=True).path is not None:
        pytest.skip("Llama-7B weights are in the local cache")
    with pytest.raises(BackboneError, match=r"'huggyllama/llama-7b'.*--random-init"):
        resolve_backbone("llama-7b")


def test_cli_prints_the_llama_7b_table(capsys):
    """`deepmlf estimate-memory` builds Llama-7B + DeepMLF on the meta device: 6.74B backbone params."""
    assert main(["estimate-memory", "--backbone", "llama-7b", "--dataset", "mosei", "--zero", "2",
                 "--load-in-8bit", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "6.48B params, int8 weights" in out and "262M params" in out  # 6,476 + 262 = 6,738M: Llama-7B
    assert "ZeRO-2" in out and "assumptions:" in out
    total = float(next(line for line in out.splitlines() if line.startswith("total (estimate)")).split()[2])
    assert 20 < total < 80, out
