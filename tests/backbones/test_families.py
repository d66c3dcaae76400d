"""Every supported family runs through the same table-driven code: Qwen2 (q/k/v biases),
Mistral (sliding-window config), and GPT-2 with a BERT WordPiece vocabulary (the Chinese
GPT-2 of the SIMS recipe). Small random checkpoints are written locally and loaded through
the ordinary checkpoint path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BertTokenizerFast

from deepmlf_fast.backbones.load import load_backbone
from deepmlf_fast.backbones.offline import smollm2_tokenizer
from deepmlf_fast.config import AVEncoderConfig, FusionConfig, ModelConfig, TextConfig
from deepmlf_fast.data.packing import pack_padded
from deepmlf_fast.model.build import build_deepmlf
from deepmlf_fast.model.losses import deepmlf_loss

LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)


def _save(tmp_path, model_type: str, tokenizer, **kw):
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **kw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def _bert_tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "电", "影", "很", "好", "看", "不", "！"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), tokenize_chinese_chars=True)


@pytest.fixture(scope="module")
def smollm2_tok():
    return smollm2_tokenizer()


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gpt2-bert"])
def test_family_trains_through_deepmlf(tmp_path, family, smollm2_tok):
    if family == "gpt2-bert":
        tok = _bert_tokenizer(tmp_path)
        path = _save(tmp_path, "gpt2", tok, n_layer=3, n_embd=64, n_head=4, n_positions=128)
        texts = ["电影很好看！", "不好看"]
    else:
        tok = smollm2_tok
        extra = {"sliding_window": 4096} if family == "mistral" else {}
        path = _save(tmp_path, family, tok, **LLAMA_LIKE, **extra)
        texts = ["a fine film", "not good"]
    bb = load_backbone(path)
    tok = bb.tokenizer
    cfg = ModelConfig(backbone=path, av=AVEncoderConfig(audio_dim=5, vision_dim=20, max_len=8), text=TextConfig(max_tokens=12),
                      fusion=FusionConfig(n_tokens=3, mm_layers=(1, 2), n_heads=4))
    model = build_deepmlf(cfg, backbone=bb)[0].train()
    enc = tok(texts, padding=True, return_tensors="pt")
    if family == "gpt2-bert":
        assert enc["input_ids"][0, 0].item() == tok.cls_token_id and bb.pad_id == 0
    text_ids, layout = pack_padded(enc["input_ids"], enc["attention_mask"].sum(1), 3, 12)
    batch = dict(text_ids=text_ids, layout=layout, audio=torch.randn(2, 20, 5), vision=torch.randn(2, 16, 20))
    out = model(**batch, clm=True)
    (out["pred"].sum() + deepmlf_loss(out, torch.zeros(2), cfg.loss)[0]).backward()
    assert model.fusion_tokens.weight.grad is not None and torch.isfinite(out["pred"]).all()
    assert all(p.grad is None for p in model.lm.parameters())
    model.eval()
    with torch.no_grad():  # text rows never see the AV stream, whatever the family
        a = model(**batch, return_hidden=True)
        b = model(**dict(batch, audio=batch["audio"] + 5), return_hidden=True)
    rows = layout.text_rows
    assert torch.equal(a["hidden"][rows], b["hidden"][rows])
