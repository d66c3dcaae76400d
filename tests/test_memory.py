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
from helpers import load_tiny, make_batch, tiny_model_config, tiny_run_config


def _tiny_run(**optim) -> RunConfig:
    return tiny_run_config("runs/tiny", tiny_model_config("tiny-llama", dropout=0.0), optim=OptimConfig(**optim))


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
    int8 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant="llm-int8"))
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
    lines = {line.split("  ")[0]: line for line in out.splitlines()}

    def gib(*prefixes):
        return sum(float(lines[k][len(k):].split()[0]) for k in lines if k.startswith(prefixes))

    training = gib("frozen", "trained", "gradients", "fp32", "Adam", "ZeRO", "activations", "causal", "backward",
                   "bf16 weight")
    assert gib("training") == pytest.approx(training, abs=0.05)
    # Built one layer at a time: the backbone's lines plus one dense layer and a float32 working copy.
    layer = (4 * 4096 * 4096 + 3 * 4096 * 11008) * 4 + 4 * 4096 * 11008
    assert gib("backbone build") == pytest.approx(layer / 2**30, abs=0.01)
    assert gib("building") == pytest.approx(gib("frozen") + gib("backbone build"), abs=0.02)
    assert total == pytest.approx(max(training, gib("building")), abs=0.05)


def test_llama_7b_parameter_lines_equal_a_formula_from_the_architecture():
    """Llama-7B (D 4096, FFN 11008, 32 blocks, vocab 32000) + the MOSEI recipe (7 MM blocks, 12
    fusion tokens, AV width 30): every parameter line of the ZeRO-2 int8 estimate, from counts
    written out here."""
    from deepmlf_fast.config import apply_overrides
    from deepmlf_fast.presets import adapt_to_backbone, recipe

    cfg = apply_overrides(adapt_to_backbone(recipe("mosei-gpt2"), "llama-7b"),
                          {"model.quant": "llm-int8", "optim.batch_size": 32, "train.precision": "bf16"})
    d, ffn, blocks, vocab, dav = 4096, 11008, 32, 32000, 30
    linears = blocks * (4 * d * d + 3 * d * ffn)
    rows = blocks * (4 * d + 2 * ffn + d)  # q, k, v, o outputs; gate, up outputs; down output
    other = 2 * vocab * d + blocks * 2 * d + d  # embeddings, LM head, two norms per block, final norm
    n_mm = len(cfg.model.fusion.mm_layers)
    mm_block = (2 * d * d + 2 * d * dav + d + 1) + (3 * d * ffn + d + 1)  # cross-attention + gated FFN (norm, gate)
    av = cfg.model.av
    layer = 4 * dav * dav + 4 * dav + 2 * dav * av.ff_mult * dav + av.ff_mult * dav + dav + 4 * dav
    av_encoder = (74 + 35) * dav + 2 * av.n_layers * layer + 2 * dav * dav + dav  # MOSEI's audio, vision widths
    heads = (d + 1) * 2 + (dav + 1) + (2 * d + dav + 1) * 64 + 2 * 64 + 64 + 1
    trained = n_mm * mm_block + 12 * d + av_encoder + 2 * dav + heads
    est = estimate_memory(cfg, zero=2, gpus=1)
    gpu = {line.name: line.bytes for line in est.gpu}
    assert gpu["frozen backbone: decoder linears"] == linears + 4 * rows
    assert gpu["frozen backbone: embeddings, head, norms"] == 2 * other  # bf16
    assert gpu["trained parameters"] == 4 * trained
    assert gpu["gradients"] == 4 * trained and gpu["fp32 master weights"] == 4 * trained
    assert gpu["Adam moments"] == 8 * trained and gpu["ZeRO buckets"] == 2 * 5e7 * 4
    assert est.total == pytest.approx(sum(gpu.values()))


def test_readme_table_is_the_generated_one():
    from pathlib import Path

    from deepmlf_fast.memory import readme_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert readme_table() in readme, "README's Llama-7B estimate table is stale: paste memory.readme_table()"
