"""Apply DeepMLF to a causal LM you already loaded, train it a few steps, and take it off again.

    python examples/apply_deepmlf.py                       # the tiny random Llama preset (no download)
    python examples/apply_deepmlf.py --model /path/to/ckpt # any local GPT-2 / Llama / SmolLM2 / Qwen2 / Mistral
    python examples/apply_deepmlf.py --train-run runs/ex   # the same model through `deepmlf train`'s loop

Data: the embedded synthetic MOSI-shaped set (`deepmlf_fast.data.make_synthetic`): transcripts with
audio (5) and vision (20) feature sequences and a sentiment label in [-3, 3].
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepmlf_fast.backbones.load import resolve_backbone
from deepmlf_fast.config import AVEncoderConfig, FusionConfig, ModelConfig, RunConfig, TextConfig, TrainConfig
from deepmlf_fast.data import load_mmsa, make_loader, make_synthetic, tokenize_texts
from deepmlf_fast.integrations import apply_deepmlf, revert_deepmlf
from deepmlf_fast.model.losses import deepmlf_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local checkpoint directory (default: the tiny-llama preset)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--train-run", default=None, metavar="DIR", help="train with train_run into DIR instead")
    args = ap.parse_args()
    path = args.model or str(resolve_backbone("tiny-llama").path)

    # 1. The model as you have it, and DeepMLF applied to it in place.
    lm = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n_layers = lm.config.num_hidden_layers
    cfg = ModelConfig(
        av=AVEncoderConfig(audio_dim=5, vision_dim=20, max_len=20),
        fusion=FusionConfig(n_tokens=8, mm_layers=(n_layers // 2, n_layers - 1), n_heads=4),
        text=TextConfig(max_tokens=32),
    )
    dm = apply_deepmlf(lm, cfg, tokenizer=tok)
    print(f"{type(lm).__name__}: {sum(p.numel() for p in dm.fusion_parameters()):,} trained parameters "
          f"(MM blocks after layers {list(dm.mm_layers)}), {sum(p.numel() for p in lm.parameters()):,} in all")

    if args.train_run:
        from deepmlf_fast.train.run import train_run

        run = RunConfig(train=TrainConfig(output_dir=args.train_run, device="cpu"))
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, synthetic_sizes=(128, 32, 32)),
                                  optim=dataclasses.replace(run.optim, max_epochs=2, batch_size=16, grad_accum=1),
                                  pretrain=dataclasses.replace(run.pretrain, enabled=False))
        print("test MAE", train_run(run, model=dm, tokenizer=tok, overwrite=True)["MAE"])
        return

    # 2. A few steps on the synthetic data with the project's loader and loss.
    data = load_mmsa(make_synthetic(Path(tempfile.mkdtemp()) / "demo.pkl", "mosi", 128, 32, 32), "mosi")
    tokens = tokenize_texts(data.train.raw_text, tok, cfg.text.max_tokens, "train", dm.pad_id)
    loader = make_loader(data.train, tokens, cfg.fusion.n_tokens, cfg.text.max_tokens, 16, True, seed=0)
    optimizer = torch.optim.AdamW(dm.fusion_parameters(), lr=1e-3)
    dm.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            loss, _ = deepmlf_loss(dm(**batch.model_inputs()), batch.labels, cfg.loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 5 == 0 or step == 1:
                print(f"step {step:3d}  loss {loss.item():.4f}")
            if step == args.steps:
                break

    # 3. Save what trained; take DeepMLF off again (the LM computes exactly what it did before).
    trained = dm.trained_state_dict()
    revert_deepmlf(lm)
    print(f"saved {len(trained)} DeepMLF tensors; reverted: {not hasattr(lm, 'deepmlf')}")


if __name__ == "__main__":
    main()
