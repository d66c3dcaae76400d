"""8-bit (and 4-bit) frozen linears at Llama-7B's GEMM shapes, every `--quant` method against the
bf16 `nn.Linear` and bitsandbytes' LLM.int8 in one run.

    python3 -P benchmarks/bench_quant.py                        # CPU, the recorded table
    python3 -P benchmarks/bench_quant.py --device cuda          # the GPU check's rows
    python3 -P benchmarks/bench_quant.py --blocks 19,20,21,22   # also sweep ops.weight_only's CPU block

Shapes: 4096x4096 (q/k/v/o), 4096x11008 (gate/up), 11008x4096 (down), each with `rows` = a
batch's packed rows (batch 4 and 16 of MOSEI-length transcripts plus fusion tokens). Each
method is timed forward only (inference, frozen blocks below the first MM block) and forward
plus the input's gradient (a training step's frozen blocks above it), under bf16 autocast as
in training. Methods are interleaved repetition by repetition (this kind of machine drifts),
medians reported, and every ratio is against the same repetitions' bf16 and LLM.int8.
Writes benchmarks/results/quant_gemm_<device>.md and .csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
"""(in, out) of Llama-7B's decoder linears."""
ROWS = (232, 928)
"""Packed rows of a MOSEI batch of 4 and of 16 (50 transcript tokens + 8 fusion tokens each)."""
METHODS = ("bf16", "llm-int8", "nf4", "int8-weight-only", "fp8", "int8-dynamic")


def _block_words(elements: int | None) -> str:
    return "the whole weight at once" if elements is None else f"blocks of {elements} dense elements"


def make_layer(method: str, k: int, n: int, device: torch.device) -> nn.Module:
    """A bias-free `(k -> n)` frozen linear quantized by `method` ("bf16": dense), random weights."""
    from deepmlf_fast.backbones.quantize import quantization_config, quantize_linear_layers

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(k, n, bias=False, dtype=torch.bfloat16))
    holder[0].weight.data.normal_(0, 0.02)
    if method != "bf16":
        quantize_linear_layers(holder, quantization_config(method, torch.bfloat16), device=device)
    return holder.requires_grad_(False).to(device)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def measure(layers: dict[str, nn.Module], x: torch.Tensor, reps: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """{method: (forward ms, forward + input-gradient ms)}, medians over interleaved repetitions."""
    def fwd(layer):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            layer(x)

    def fwd_bwd(layer):
        xg = x.detach().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = layer(xg)
        y.backward(torch.ones_like(y))

    samples = {m: ([], []) for m in layers}
    for rep in range(reps + 1):  # the first round warms up
        for method, layer in layers.items():
            f, b = timed(lambda: fwd(layer), device), timed(lambda: fwd_bwd(layer), device)
            if rep:
                samples[method][0].append(f)
                samples[method][1].append(b)
    return {m: (statistics.median(f), statistics.median(b)) for m, (f, b) in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--blocks", help="comma-separated log2 block sizes to sweep for int8-weight-only on CPU")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from harness import describe_device, git_commit, versions

    from deepmlf_fast.ops import weight_only

    device = torch.device(args.device)
    if device.type == "cpu":
        from deepmlf_fast.host import keep_freed_memory

        # Every method on a kept heap (freed blocks reused, not refaulted): what the kernels cost. A
        # CPU run keeps it for the weight-only methods only (`quantize.WHOLE_WEIGHT_COPIES`).
        keep_freed_memory()
    info = describe_device(device.type)
    methods = list(args.methods)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        methods = [m for m in methods if m not in ("llm-int8", "nf4")]
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else []
    rows_out = []
    for k, n in SHAPES:
        layers = {m: make_layer(m, k, n, device) for m in methods}
        for b in blocks:
            layers[f"int8-weight-only block 2^{b}"] = layers["int8-weight-only"]
        for rows in args.rows:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device=device)
            if blocks:
                res = {}
                chosen = weight_only.cpu_block_elements
                try:
                    for b in blocks:
                        weight_only.cpu_block_elements = lambda dtype, b=b: 1 << b
                        key = f"int8-weight-only block 2^{b}"
                        res[key] = measure({"bf16": layers["bf16"], key: layers[key]}, x, args.reps, device)[key]
                finally:
                    weight_only.cpu_block_elements = chosen
                res.update(measure({m: layers[m] for m in methods}, x, args.reps, device))
            else:
                res = measure({m: layers[m] for m in methods}, x, args.reps, device)
            base, int8 = res["bf16"], res.get("llm-int8")
            for method, (f, b) in res.items():
                rows_out.append({
                    "shape": f"{k}x{n}", "rows": rows, "method": method, "fwd_ms": f"{f:.2f}", "fwd_bwd_ms": f"{b:.2f}",
                    "vs_bf16_fwd": f"{f / base[0]:.2f}", "vs_bf16_fwd_bwd": f"{b / base[1]:.2f}",
                    "speedup_vs_llm_int8_fwd": f"{int8[0] / f:.2f}" if int8 else "",
                    "speedup_vs_llm_int8_fwd_bwd": f"{int8[1] / b:.2f}" if int8 else "",
                })
                print(f"{k}x{n} rows {rows} {method:28s} fwd {f:8.2f} ms  fwd+bwd {b:8.2f} ms  "
                      f"x bf16 {f / base[0]:.2f}/{b / base[1]:.2f}", flush=True)
        del layers
    write(args.out, device, info.name, rows_out, args)
    return 0


def write(out: Path, device: torch.device, name: str, rows: list[dict], args) -> None:
    from harness import git_commit, versions

    from deepmlf_fast.ops import weight_only

    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quant_gemm_{device.type}"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    v = versions()
    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "not installed"
    isa = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else "cuda"
    head = [
        f"# 8-bit frozen linears at Llama-7B shapes ({device.type})", "",
        f"- device: {name}; ISA path (ATen): {isa}; threads: {torch.get_num_threads()}",
        f"- torch {v['torch']}, bitsandbytes {bnb}, transformers {v['transformers']}; commit {git_commit()}; "
        f"{datetime.date.today().isoformat()}",
        f"- bf16 activations (autocast), {args.reps} interleaved repetitions, medians; "
        "`x bf16`: time over the bf16 nn.Linear's; `vs LLM.int8`: LLM.int8's time over this one's",
        "- fwd: forward only; fwd+bwd: forward and the input's gradient (frozen weights, no weight gradient)",
        *([f"- int8-weight-only's CPU forward converts {_block_words(weight_only.cpu_block_elements(torch.bfloat16))} "
           "(`ops.weight_only.cpu_block_elements`, measured on this machine)"] if device.type == "cpu" else []), "",
        "| shape (in x out) | rows | method | fwd ms | fwd+bwd ms | x bf16 (fwd / fwd+bwd) | vs LLM.int8 (fwd / fwd+bwd) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    body = [f"| {r['shape']} | {r['rows']} | {r['method']} | {r['fwd_ms']} | {r['fwd_bwd_ms']} | "
            f"{r['vs_bf16_fwd']} / {r['vs_bf16_fwd_bwd']} | "
            f"{r['speedup_vs_llm_int8_fwd'] or '-'} / {r['speedup_vs_llm_int8_fwd_bwd'] or '-'} |" for r in rows]
    Path(f"{stem}.md").write_text("\n".join(head + body) + "\n")
    print(f"wrote {stem}.md and .csv")


if __name__ == "__main__":
    raise SystemExit(main())
