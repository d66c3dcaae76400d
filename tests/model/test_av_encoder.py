"""AV encoder pieces: pooling, soft permutation, sinusoid table, length masks, stage-1 model."""

from __future__ import annotations

import math

import pytest
import torch

from deepmlf_fast.config import AVEncoderConfig
from deepmlf_fast.model.av_encoder import AVEncoder, AVPretrainModel, SoftPerm, pool_time, sinusoid_table


def test_strided_and_contiguous_pooling_by_hand():
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1)  # frames 0..6 -> pooled to 3 (P = 3, padded with 6, 6)
    strided, _ = pool_time(x, 3, "strided")  # step t averages frames t, t+3, t+6
    contiguous, _ = pool_time(x, 3, "contiguous")  # step t averages frames 3t..3t+2
    assert strided.flatten().tolist() == pytest.approx([(0 + 3 + 6) / 3, (1 + 4 + 6) / 3, (2 + 5 + 6) / 3])
    assert contiguous.flatten().tolist() == pytest.approx([1.0, 4.0, 6.0])
    same, _ = pool_time(x, 7, "strided")
    assert torch.equal(same, x)


def test_masked_pooling_ignores_padding_frames():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0, 100.0, 100.0]]).unsqueeze(-1)
    pooled, lengths = pool_time(x, 3, "contiguous", torch.tensor([3]))
    assert pooled.flatten().tolist() == pytest.approx([1.5, 3.0, 0.0]) and lengths.tolist() == [2]
    pooled, lengths = pool_time(x, 3, "strided", torch.tensor([3]))
    assert pooled.flatten().tolist() == pytest.approx([1.0, 2.0, 3.0]) and lengths.tolist() == [3]


def test_soft_perm_semantics():
    torch.manual_seed(0)
    x = torch.arange(2 * 6 * 4, dtype=torch.float32).view(2, 6, 4)
    perm = SoftPerm(1.0).train()
    y = perm(x)
    # p = 1: every channel is replaced by the same time permutation for the whole batch
    order = [int(v) // 4 for v in y[0, :, 0]]
    assert sorted(order) == list(range(6))
    assert torch.equal(y, x[:, order])
    assert torch.equal(SoftPerm(0.0).train()(x), x)
    assert torch.equal(SoftPerm(1.0).eval()(x), x)
    keep = (SoftPerm(0.3).train()(x.repeat(200, 1, 1)) == x.repeat(200, 1, 1)).all(1).float().mean()
    assert 0.6 < float(keep) < 0.8  # about 1 - p of the (sample, channel) pairs kept


def test_sinusoid_table_matches_the_fairseq_formula():
    table = sinusoid_table(5, 30)
    half = 15
    freq = math.exp(-math.log(10000.0) / (half - 1))
    assert torch.all(table[0] == 0)
    assert table[3, 2].item() == pytest.approx(math.sin(3 * freq**2), abs=1e-6)
    assert table[3, half + 2].item() == pytest.approx(math.cos(3 * freq**2), abs=1e-6)


def test_length_masks_make_padding_irrelevant():
    torch.manual_seed(0)
    cfg = AVEncoderConfig(audio_dim=5, vision_dim=20, max_len=4, length_masks=True, p_perm=0.0)
    enc = AVEncoder(cfg, "contiguous").eval()
    audio, vision = torch.randn(2, 12, 5), torch.randn(2, 8, 20)
    a_len, v_len = torch.tensor([6, 12]), torch.tensor([4, 8])
    out, lengths = enc(audio, vision, a_len, v_len)
    audio2, vision2 = audio.clone(), vision.clone()
    audio2[0, 6:] = 50.0
    vision2[0, 4:] = -50.0
    out2, _ = enc(audio2, vision2, a_len, v_len)
    valid = lengths[0]
    assert lengths.tolist() == [2, 4]
    torch.testing.assert_close(out[0, :valid], out2[0, :valid])
    torch.testing.assert_close(out[1], out2[1])


def test_pretrain_model_shapes_and_grad():
    cfg = AVEncoderConfig(audio_dim=5, vision_dim=20, max_len=10)
    model = AVPretrainModel(cfg, "strided", out_len=6).train()
    pred = model(torch.randn(3, 25, 5), torch.randn(3, 40, 20))["pred"]
    assert pred.shape == (3,)
    pred.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert set(model.encoder.state_dict()) == set(AVEncoder(cfg, "strided").state_dict())
