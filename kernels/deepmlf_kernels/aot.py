"""Compile the Triton kernels ahead of time for H100 (sm_90), no GPU needed.

    python -m deepmlf_kernels.aot            # covering set, about a minute on 2 cores
    python -m deepmlf_kernels.aot --full     # every specialization (for a many-core box)

The interpreter accepts code the GPU compiler rejects (a `tl.dot` with a dimension < 16,
say), so CPU tests alone do not prove the kernels build. This compiles them through
`triton.compile(..., target=GPUTarget("cuda", 90, 32))` down to PTX and cubin, exactly as
the launchers would specialise them: the preset head dims (30, 32, 48, 64, 80, 128),
fp32/bf16/fp16, causal or not, dropout on/off, with and without `seqused_k`, every
autotune config, unit last-dim strides and 16-byte aligned pointers.

The default covering set gives every value of every axis at least once: the attention
kernels at every head dim in bf16 and at a masked (30, 80) and an unmasked (64, 128) head
dim in fp16/fp32, with the flag combinations and autotune tiles rotating through those
cases (likewise for the gated linear): 60 kernels. `--full` compiles the whole cross
product, about 2,400. The exit status is 1 if any compile fails, so CI can run it. It must
run without TRITON_INTERPRET=1: the interpreter replaces `@triton.jit` functions by
objects `triton.compile` cannot take.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

TARGET_ARCH = 90
HEAD_DIMS = (30, 32, 48, 64, 80, 128)
DTYPES = ("bf16", "fp16", "fp32")
FLAGS = tuple(itertools.product((True, False), repeat=3))  # (causal, dropout, seqused)


def _kernels():
    from deepmlf_kernels import attention as attn
    from deepmlf_kernels import gated_linear as gl

    return attn, gl


def _registry():
    attn, gl = _kernels()
    return {
        "attn_fwd": attn._varlen_attn_fwd_kernel,
        "attn_bwd_preprocess": attn._varlen_attn_bwd_preprocess_kernel,
        "attn_bwd_dq": attn._varlen_attn_bwd_dq_kernel,
        "attn_bwd_dkdv": attn._varlen_attn_bwd_dkdv_kernel,
        "attn_dropout_mask": attn._attn_dropout_mask_kernel,
        "gated_linear_fwd": gl._gated_linear_fwd_kernel,
        "gated_linear_bwd": gl._gated_linear_bwd_kernel,
        "gated_linear_mask": gl._gated_linear_mask_kernel,
    }


def _job(kernel, pointers, constexprs, num_warps=4, num_stages=1, unit_strides=()):
    """One compile: pointer element types by argument name, constexpr values, options.
    Integer arguments are i32 and float arguments fp32, as the launchers pass them."""
    constexprs = dict(constexprs, **{name: 1 for name in unit_strides})
    return kernel, pointers, constexprs, {"num_warps": num_warps, "num_stages": num_stages}


def _attention_jobs(full: bool):
    attn, _ = _kernels()
    configs = attn._fwd_kernel.configs
    if full:
        pairs = list(itertools.product(DTYPES, HEAD_DIMS))
        cases = [(dt, d, fl, c) for dt, d in pairs for fl in FLAGS for c in configs]
    else:  # every head dim in bf16, fp16/fp32 on a masked and an unmasked one; flags and tiles rotate
        pairs = [("bf16", d) for d in HEAD_DIMS] + [("fp16", 30), ("fp16", 80), ("fp32", 64), ("fp32", 128)]
        cases = [(dt, d, FLAGS[i % len(FLAGS)], configs[i % len(configs)]) for i, (dt, d) in enumerate(pairs)]

    jobs = []
    for dt, d, (causal, dropout, seqused), cfg in cases:
        common = dict(Q=dt, K=dt, V=dt, LSE="fp32", CU_Q="i32", CU_K="i32", SEQUSED_K="i32", SEED="i64")
        cx = dict(HEAD_DIM=d, BLOCK_D=attn.block_d(d), CAUSAL=causal, HAS_SEQUSED=seqused, DROPOUT=dropout,
                  UPCAST=False, **cfg.kwargs)
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        unit = ("stride_qd", "stride_kd", "stride_vd")
        jobs.append(_job("attn_fwd", dict(common, O=dt), cx, unit_strides=unit, **opts))
        grads = dict(common, DO=dt, DELTA="fp32")
        jobs.append(_job("attn_bwd_dq", dict(grads, DQ=dt), cx, unit_strides=unit + ("stride_dod",), **opts))
        jobs.append(_job("attn_bwd_dkdv", dict(grads, DK=dt, DV=dt), cx, unit_strides=unit + ("stride_dod",), **opts))
    for dt, d in itertools.product(DTYPES, sorted({attn.block_d(d) for d in HEAD_DIMS} | {30})):
        jobs.append(_job("attn_bwd_preprocess", dict(O=dt, DO=dt, DELTA="fp32"),
                         dict(HEAD_DIM=d, BLOCK_M=attn.PREPROCESS_BLOCK_M, BLOCK_D=attn.block_d(d)),
                         unit_strides=("stride_dod",)))
    jobs.append(_job("attn_dropout_mask", dict(SEED="i64", MASK="i8"), dict(BLOCK_M=64, BLOCK_N=64)))
    return jobs


def _gated_linear_jobs(full: bool):
    _, gl = _kernels()
    configs = gl._fwd_kernel.configs
    flags = list(itertools.product((True, False), repeat=2))  # (per-channel gate, dropout)
    if full:
        cases = [(dt, fl, c) for dt in DTYPES for fl in flags for c in configs]
    else:
        cases = [(DTYPES[i % len(DTYPES)], fl, configs[i % len(configs)]) for i, fl in enumerate(flags)]
    jobs = []
    for dt, (per_channel, dropout), cfg in cases:
        jobs.append(_job(
            "gated_linear_fwd", dict(X=dt, H=dt, W=dt, G="fp32", OUT=dt, Y=dt, SEED="i64"),
            dict(PER_CHANNEL=per_channel, DROPOUT=dropout, UPCAST=False, **cfg.kwargs),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, unit_strides=("stride_xn", "stride_hk", "stride_wk"),
        ))
        jobs.append(_job(
            "gated_linear_bwd", dict(DOUT=dt, Y=dt, G="fp32", SEED="i64", DZ=dt, PARTIAL="fp32"),
            dict(PER_CHANNEL=per_channel, DROPOUT=dropout,
                 BLOCK_M=gl.BWD_BLOCK_M, BLOCK_N=gl.BWD_BLOCK_N),
            unit_strides=("stride_don",),
        ))
    # Under bf16 autocast the residual stream stays fp32 while the product runs in bf16.
    cfg = configs[0]
    jobs.append(_job(
        "gated_linear_fwd", dict(X="fp32", H="bf16", W="bf16", G="fp32", OUT="fp32", Y="bf16", SEED="i64"),
        dict(PER_CHANNEL=False, DROPOUT=True, UPCAST=False, **cfg.kwargs),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, unit_strides=("stride_xn", "stride_hk", "stride_wk"),
    ))
    jobs.append(_job(
        "gated_linear_bwd", dict(DOUT="fp32", Y="bf16", G="fp32", SEED="i64", DZ="bf16", PARTIAL="fp32"),
        dict(PER_CHANNEL=False, DROPOUT=True, BLOCK_M=gl.BWD_BLOCK_M, BLOCK_N=gl.BWD_BLOCK_N),
        unit_strides=("stride_don",),
    ))
    jobs.append(_job("gated_linear_mask", dict(SEED="i64", MASK="i8"),
                     dict(BLOCK_M=gl.BWD_BLOCK_M, BLOCK_N=gl.BWD_BLOCK_N)))
    return jobs


def jobs(full: bool = False):
    """Every compile job of the covering set (or the full product)."""
    return _attention_jobs(full) + _gated_linear_jobs(full)


def compile_one(job) -> tuple[str, float, str | None]:
    """Compile one job for sm_90. Returns (description, seconds, error text or None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, pointers, constexprs, options = job
    fn = _registry()[kernel]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in ("sm_scale", "dropout_p"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    flags = {k: v for k, v in constexprs.items() if not k.startswith("stride_")}
    desc = f"{kernel} {','.join(f'{v}' for v in pointers.values())[:40]} {flags} {options}"
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", TARGET_ARCH, 32), options=options
        )
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
    except Exception:  # report every failure, keep compiling the rest
        return desc, time.perf_counter() - start, traceback.format_exc(limit=3)
    return desc, time.perf_counter() - start, None


def main(argv: list[str] | None = None) -> int:
    """Compile the job list for sm_90, print one line per kernel; 0 if all compiled, else 1."""
    parser = argparse.ArgumentParser(prog="python -m deepmlf_kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="compile the whole cross product")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: unset TRITON_INTERPRET; the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2

    todo = jobs(args.full)
    start = time.perf_counter()
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for desc, seconds, error in pool.map(compile_one, todo):
            print(f"{'FAIL' if error else 'ok  '} {seconds:5.2f}s {desc}", flush=True)
            if error:
                failed += 1
                print(error, file=sys.stderr)
    print(f"aot: {len(todo) - failed}/{len(todo)} kernels compiled for sm_{TARGET_ARCH} "
          f"in {time.perf_counter() - start:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
