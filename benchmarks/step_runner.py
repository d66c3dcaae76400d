"""Run one provider of the whole-step benchmark in this process and print/write a JSON result.

    python benchmarks/step_runner.py --config tiny-gpt2 --provider ours --device cpu --steps 10

`test_bench_step.py` launches it once per (configuration, provider), so each provider has the
process to itself: its peak memory is not mixed with the other's, and nothing it allocated or
compiled leaks into the other's timing.

What is measured (after building the model and the batch, and `gc.collect()`):
* time: `--warmup` untimed steps (the first allocates optimizer state and warms caches), then
  `--steps` timed steps, each bracketed by `perf_counter` (with `torch.cuda.synchronize()` on CUDA).
  Wall-clock is right here: a step takes milliseconds to seconds, and the official pattern's host
  work (tokenisation) is part of what it costs.
* parity: before anything is timed, one deterministic forward + backward (no dropout, no
  SoftPerm) records the loss terms and two gradients, which the test compares across providers;
  the official side of a bf16 configuration also records them in fp32 (its weights cast to fp32
  and back), the reference both sides' bf16 values are judged against;
* FLOPs: deepmlf-fast's exact count of its step (`flops.deepmlf_step_flops`), or for the
  official style what PyTorch counts while one more step runs (`flops.counted_flops`, before
  the timed steps); the achieved FLOP/s over the median step time, next to the measured rate of
  the step's dominant matrix product (rows x D x FFN width, same dtype and threads) in this
  process, measured again right after every timed step, for as long as it took (at most 3 s;
  `harness.gemm_rate`): `fraction_of_gemm` is the
  median over steps of each step's FLOP/s over the GEMM rate next to it, the fraction of the
  machine's GEMM rate the whole step reaches even while a shared machine's speed drifts;
* peak memory of training, warm-up included (so optimizer state, gradients and activations count):
  - CUDA: `torch.cuda.max_memory_allocated()` minus the allocation at the reset after the build;
  - CPU: the kernel's peak RSS (VmHWM) minus the RSS after the build, with the peak reset to the
    current RSS after the build by writing 5 to /proc/self/clear_refs, so build-time transients do
    not count. The parent runs this process with `MALLOC_MMAP_THRESHOLD_` fixed, so freed large
    tensors go back to the OS and RSS follows live memory. If the reset is refused, the whole-run
    `ru_maxrss` is used instead (an upper bound, reported as such).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402
import shapes  # noqa: E402
from deepmlf_fast.host import keep_freed_memory  # noqa: E402
from flops import counted_flops, deepmlf_step_flops  # noqa: E402
from step_common import (  # noqa: E402
    PROVIDERS,
    build_provider,
    make_batch,
    make_train_step,
    parity_values,
    parity_values_fp32,
    proc_status_mb,
    reset_peak_rss,
    write_json,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="step configuration name (benchmarks/shapes.py)")
    ap.add_argument("--provider", required=True, choices=PROVIDERS)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="official-style HF attention")
    ap.add_argument("--out", default=None, help="JSON output path (default: stdout)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    step_cfg = shapes.step_config(args.config)
    run_cfg = step_cfg.run_config()
    cfg = run_cfg.model
    device = torch.device(args.device)

    t0 = time.perf_counter()
    module, tok, note = build_provider(args.provider, cfg, device, attn_implementation=args.attn,
                                       precision=step_cfg.precision)
    module.train()
    batch = make_batch(run_cfg, tok, step_cfg.batch, device)
    parity = parity_values(args.provider, module, cfg, batch, step_cfg.precision)
    # What bf16 parity values are judged against (test_bench_step): the official side's forward +
    # backward in fp32, on these weights cast to fp32 and back (exact), before anything is timed.
    parity_fp32 = (parity_values_fp32(args.provider, module, cfg, batch)
                   if step_cfg.precision == "bf16" and args.provider == "official" else None)
    step = make_train_step(args.provider, module, cfg, batch, precision=step_cfg.precision)
    build_s = time.perf_counter() - t0
    gc.collect()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
        mem_method = "cuda max_memory_allocated"
    else:
        base_mb = proc_status_mb("VmRSS")
        mem_method = "VmHWM after clear_refs" if reset_peak_rss() and base_mb is not None else "ru_maxrss (upper bound)"
        if args.provider.startswith("ours"):
            # What deepmlf-fast's trainer sets on a CPU (`train.run.Session`); only now, so
            # memory the build freed cannot be reused by training without showing in its peak.
            keep_freed_memory()

    losses = []
    for _ in range(args.warmup):
        losses.append(float(step()))
    b, n = step_cfg.batch, cfg.fusion.n_tokens
    if args.provider.startswith("ours"):
        flops = deepmlf_step_flops(module, batch.packed.layout).total
    else:
        flops = counted_flops(step)  # one more step, counted: a warm-up step too
    lm_cfg = module.lm.config
    inner = getattr(lm_cfg, "intermediate_size", None) or getattr(lm_cfg, "n_inner", None) or 4 * lm_cfg.hidden_size
    dtype = torch.bfloat16 if step_cfg.precision == "bf16" else torch.float32
    gemm_shape = (batch.real_tokens + b * n, lm_cfg.hidden_size, inner)
    times, gemm_rates = [], []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
        # The GEMM rate right after each step, over as long as the step took (at most 3 s): a
        # shared machine's speed drifts by tens of percent within seconds, so each step is
        # compared with the machine as it was then, averaged alike.
        gemm_rates.append(harness.gemm_rate(*gemm_shape, dtype, args.device, min(times[-1], 3.0)))

    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 - base_mb
    elif mem_method.startswith("VmHWM"):
        peak_mb = proc_status_mb("VmHWM") - base_mb
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - (base_mb or 0.0)

    tokens = batch.real_tokens + b * n if args.provider.startswith("ours") else b * (cfg.text.max_tokens + n)
    median = sorted(times)[len(times) // 2]
    gemm = sorted(gemm_rates)[len(gemm_rates) // 2]
    fractions = sorted(flops / t / g for t, g in zip(times, gemm_rates))
    write_json(args.out, {
        "config": step_cfg.name, "provider": args.provider, "device": args.device, "backbone": cfg.backbone,
        "dtype": step_cfg.precision, "batch": b, "n_fusion": n, "mm_layers": list(cfg.fusion.mm_layers),
        "w_clm": cfg.loss.w_clm, "times_s": times, "peak_mb": peak_mb, "mem_method": mem_method,
        "rss_after_build_mb": base_mb if not cuda else None, "build_s": build_s, "losses": losses,
        "tokens_per_step": tokens, "text_source": batch.text_source, "attn": args.attn, "note": note,
        "threads": torch.get_num_threads(), "flops": flops, "achieved_flops_per_s": flops / median,
        "gemm_flops_per_s": gemm, "gemm_flops_per_s_each": gemm_rates,
        "fraction_of_gemm": fractions[len(fractions) // 2], "parity": parity, "parity_fp32": parity_fp32,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
