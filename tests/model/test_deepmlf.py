"""DeepMLF assembly: the packed model against an independent padded implementation of the
official layout, information flow, gradient flow, and the no-grad text prefix."""

from __future__ import annotations

import pytest
import torch

from deepmlf_fast.backbones.arch import get_path
from deepmlf_fast.data.packing import PackedLayout
from deepmlf_fast.ops.cross_attention import gated_cross_attention_reference
from deepmlf_fast.ops.gate import gate_value

from deepmlf_fast.errors import CheckpointError
from deepmlf_fast.model.losses import deepmlf_loss
from deepmlf_fast.ops.linear_cross_entropy import linear_cross_entropy

from helpers import make_batch, make_model


def _clm(out):
    """The causal-LM cross-entropy of a forward's `clm` inputs."""
    clm = out["clm"]
    return linear_cross_entropy(clm.hidden, clm.weight, clm.targets)


def padded_reference(model, text_ids, layout, audio, vision):
    """The official computation, written independently of the packed path: text padded to
    L, fusion tokens at positions L..L+n-1, one dense causal + key-padding mask, eager
    attention, MM blocks on the last n positions."""
    cfg, spec = model.cfg, model.spec
    L, n = cfg.text.max_tokens, cfg.fusion.n_tokens
    base = get_path(model.lm, spec.base)
    text_lengths = layout.text_lengths
    bsz = text_lengths.shape[0]
    ids = torch.full((bsz, L), model.pad_id, dtype=torch.long)
    for b, row in enumerate(text_ids.split(text_lengths.tolist())):
        ids[b, : len(row)] = row
    h = torch.cat([get_path(base, spec.embed_tokens)(ids), model.fusion_tokens.weight.expand(bsz, n, -1)], dim=1)
    pos = torch.arange(L + n)
    if spec.position_table:
        h = h + get_path(base, spec.position_table)(pos)
    valid = torch.cat([torch.arange(L)[None] < text_lengths[:, None], torch.ones(bsz, n, dtype=torch.bool)], 1)
    allowed = torch.tril(torch.ones(L + n, L + n, dtype=torch.bool))[None] & valid[:, None, :]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None]  # (B, 1, Q, K)
    kw = {}
    if spec.rotary:
        kw = {"position_embeddings": get_path(base, spec.rotary)(h, pos[None]), "position_ids": pos[None]}
    av, _ = model.encode_av(audio, vision)
    model.lm.set_attn_implementation("eager")
    try:
        for i, layer in enumerate(model.runner.layers):
            h = layer(h, attention_mask=mask, **kw)
            h = h[0] if isinstance(h, tuple) else h
            if str(i) in model.mm_blocks:
                xa, ffn = model.mm_blocks[str(i)].xattn, model.mm_blocks[str(i)].ffn
                hf = gated_cross_attention_reference(
                    h[:, L:], av, xa.norm.weight, getattr(xa.norm, "bias", None), xa.q_proj.weight,
                    xa.kv_proj.weight, xa.o_proj.weight, xa.gate.alpha, n_heads=xa.n_heads,
                    norm=xa.norm_kind, norm_eps=xa.norm.eps, scale=xa.scale, gate=xa.gate.kind,
                )
                h = torch.cat([h[:, :L], hf], dim=1)
                h = h + gate_value(ffn.gate.alpha, ffn.gate.kind) * ffn.mlp(ffn.norm(h))
    finally:
        model.lm.set_attn_implementation("deepmlf")
    hn = get_path(base, spec.final_norm)(h)
    t_star = hn[torch.arange(bsz), text_lengths - 1]
    return model.heads(t_star, hn[:, L:], av.mean(1))


@pytest.mark.parametrize("parity", ["corrected", "official"])
def test_packed_model_matches_padded_official_layout(backbone, parity):
    model, tok = make_model(backbone, parity=parity)
    model.eval()
    batch = make_batch(tok)
    with torch.no_grad():
        ours = model(**batch)
        ref = padded_reference(model, **batch)
    for key in ("pred", "pred_text", "pred_fusion", "pred_av"):
        torch.testing.assert_close(ours[key], ref[key], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ffn_all_rows", [True, False])
def test_text_states_bit_identical_whatever_the_av(backbone, ffn_all_rows):
    model, tok = make_model(backbone, ffn_all_rows=ffn_all_rows)
    model.eval()
    a = make_batch(tok, seed=1)
    b = dict(a, audio=a["audio"] * 3 + 1, vision=torch.randn_like(a["vision"]))
    with torch.no_grad():
        oa, ob = model(**a, return_hidden=True), model(**b, return_hidden=True)
    rows = a["layout"].text_rows
    assert torch.equal(oa["hidden"][rows], ob["hidden"][rows])
    assert torch.equal(oa["pred_text"], ob["pred_text"])
    assert not torch.equal(oa["hidden"][a["layout"].fusion_rows], ob["hidden"][a["layout"].fusion_rows])


def test_gradients_reach_every_trained_part_and_nothing_frozen(backbone):
    model, tok = make_model(backbone)
    model.train()
    out = model(**make_batch(tok))
    loss = out["pred"].sum() + out["pred_fusion"].sum() + out["pred_text"].sum() + out["pred_av"].sum() + _clm(out)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("lm."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for prefix in ("fusion_tokens", "av_encoder.", "mm_blocks.1.", "mm_blocks.3.", "heads."):
        grads = [p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and sum(grads) > 0, prefix


@pytest.mark.parametrize("ffn_all_rows", [True, False])
def test_no_grad_text_prefix_is_exact(backbone, ffn_all_rows):
    model, tok = make_model(backbone, ffn_all_rows=ffn_all_rows, mm_layers=(2, 3))
    model.eval()  # no dropout, so both paths see identical computations
    batch = make_batch(tok)
    results = []
    for split in (True, False):
        model.cfg.text_prefix_no_grad = split
        model.zero_grad()
        out = model(**batch, clm=True)
        (out["pred"].sum() + out["pred_fusion"].sum() + _clm(out)).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1["pred"], o2["pred"], atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4, msg=k)


def test_clm_targets_follow_the_official_rule():
    model, _ = make_model("tiny-gpt2")
    L, pad = model.cfg.text.max_tokens, model.pad_id
    ids = torch.tensor([5, 6, 7] + list(range(10, 10 + L)))
    targets = model.clm_targets(ids, PackedLayout.build(torch.tensor([3, L]), 4, L))
    # short transcript: next tokens, then its last token predicts the pad token;
    # a transcript filling all L positions ends with the official id-0 artefact.
    assert targets.tolist() == [6, 7, pad] + list(range(11, 10 + L)) + [0]


def test_batch_of_one_trains():
    """A batch of one in training mode (a trailing batch): BatchNorm cannot form batch statistics,
    so the task head normalises with the running ones (here far from the identity) and leaves
    them as they were; the prediction and the loss are those of that formula written out, the
    gradients reach every trained part and no frozen one, and steps on the sample lower its loss."""
    model, tok = make_model("tiny-llama")
    heads, norm = model.heads, model.heads.task_norm
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=g))
        norm.running_var.copy_(torch.rand(norm.num_features, generator=g) * 3 + 0.2)
        norm.weight.copy_(torch.rand(norm.num_features, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(norm.num_features, generator=g) * 0.5)
    stats = [t.clone() for t in (norm.running_mean, norm.running_var, norm.num_batches_tracked)]
    batch, label = make_batch(tok, texts=["fine"]), torch.tensor([2.5])
    seen = {}
    hook = heads.register_forward_hook(lambda module, args, out: seen.update(args=args))
    model.train()
    out = model(**batch)
    hook.remove()
    assert heads.training and out["pred"].shape == (1,)
    for before, after in zip(stats, (norm.running_mean, norm.running_var, norm.num_batches_tracked)):
        assert torch.equal(before, after)
    t_star, fusion, a_bar = seen["args"]
    z = heads.task_in(torch.cat([fusion.mean(1), t_star, a_bar], dim=-1))
    z = (z - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    pred = heads.task_out(torch.relu(z)).squeeze(-1)
    torch.testing.assert_close(out["pred"], pred, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pred, heads.task_out(torch.relu(heads.task_in(
        torch.cat([fusion.mean(1), t_star, a_bar], dim=-1)))).squeeze(-1))  # the normalisation matters

    loss, parts = deepmlf_loss(out, label, model.cfg.loss)
    torch.testing.assert_close(parts["task"], (pred - label).abs().mean().detach())
    torch.testing.assert_close(parts["clm"], _clm(out).detach())
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("lm."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for prefix in ("fusion_tokens", "av_encoder.", "mm_blocks.1.", "mm_blocks.3.", "heads.task_in.",
                   "heads.task_norm.", "heads.task_out."):
        assert sum(p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(prefix)) > 0, prefix

    def eval_loss():  # the four L1 terms (the CLM term reads text rows the frozen LM mostly decides)
        with torch.no_grad():
            parts = deepmlf_loss(model.eval()(**batch), label, model.cfg.loss)[1]
        return sum(parts.values()).item()

    start = eval_loss()
    opt = torch.optim.Adam(model.fusion_parameters(), lr=3e-3)
    for _ in range(8):
        opt.zero_grad()
        deepmlf_loss(model.train()(**batch), label, model.cfg.loss)[0].backward()
        opt.step()
    assert eval_loss() < 0.5 * start
    assert torch.equal(norm.num_batches_tracked, stats[2])  # still never updated from one sample


def test_trained_state_dict_excludes_backbone_and_round_trips():
    model, _ = make_model("tiny-gpt2", seed=3)
    state = model.trained_state_dict()
    assert state and not any(k.startswith("lm.") for k in state)
    assert "heads.task_norm.running_mean" in state
    other, _ = make_model("tiny-gpt2", seed=4)
    assert not torch.equal(other.fusion_tokens.weight, model.fusion_tokens.weight)
    other.load_trained_state_dict(state)
    assert torch.equal(other.fusion_tokens.weight, model.fusion_tokens.weight)
    with pytest.raises(CheckpointError, match="missing"):
        other.load_trained_state_dict({k: v for k, v in state.items() if k != "fusion_tokens.weight"})


def test_recomputed_lm_blocks_give_the_same_gradients(backbone):
    model, tok = make_model(backbone)
    model.train()
    batch = make_batch(tok)
    grads = []
    for recompute in (False, True):
        model.cfg.recompute_lm_blocks = recompute
        model.zero_grad()
        torch.manual_seed(0)  # same dropout draws; checkpointing replays the RNG state
        out = model(**batch, clm=True)
        (out["pred"].sum() + out["pred_fusion"].sum() + _clm(out)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5, msg=k)


def test_av_length_masks_make_av_padding_irrelevant_end_to_end():
    model, tok = make_model("tiny-gpt2")
    model.cfg.av.length_masks = True
    model.eval()
    batch = make_batch(tok, ta=40, tv=30)
    lengths = dict(audio_lengths=torch.tensor([40, 12, 25]), vision_lengths=torch.tensor([30, 9, 30]))
    noisy = dict(batch, audio=batch["audio"].clone(), vision=batch["vision"].clone())
    noisy["audio"][1, 12:] = 7.0
    noisy["vision"][1, 9:] = -7.0
    with torch.no_grad():
        a = model(**batch, **lengths)
        b = model(**noisy, **lengths)
        c = model(**noisy)  # without lengths the official behaviour sees the padding
    torch.testing.assert_close(a["pred"], b["pred"])
    assert not torch.allclose(a["pred"][1], c["pred"][1])


def test_fusion_layers_sit_in_the_lm_and_keep_its_state_dict_keys(backbone):
    from deepmlf_fast.model.fusion import FusionLayer

    model, _ = make_model(backbone, mm_layers=(1, 3))
    layers = model.runner.layers
    assert [i for i, layer in enumerate(layers) if isinstance(layer, FusionLayer)] == [1, 3]
    assert layers[3].mm is model.mm_blocks["3"] and "FusionLayer(\n          mm=mm_blocks.3\n" in repr(model)
    bound = model.lm.state_dict()
    model.unbind_backbone()
    own = model.lm.state_dict()
    assert not any(isinstance(layer, FusionLayer) for layer in layers)
    assert list(bound) == list(own) and all(torch.equal(bound[k], own[k]) for k in own)
    model.bind_backbone()
    model.lm.load_state_dict(own, strict=True)


def test_models_sharing_one_backbone_each_run_their_own_mm_blocks(backbone):
    """A run's seeds share the loaded LM: each model's forward runs its own MM blocks."""
    first, tok = make_model(backbone, seed=0, mm_layers=(1, 3))
    batch = make_batch(tok)
    first.eval()
    with torch.no_grad():
        before = first(**batch)["pred_fusion"]
        second, _ = make_model(backbone, seed=1, mm_layers=(2,))
        second.eval()
        other = second(**batch)["pred_fusion"]
        after = first(**batch)["pred_fusion"]
    assert torch.equal(before, after) and not torch.allclose(before, other)
