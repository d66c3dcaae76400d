"""Compile the Triton kernels ahead of time for every GPU architecture users have and check their
resources, no GPU needed.

    python -m deepmlf_kernels.aot                        # sm_90: 186 kernels, ~100 CPU-seconds
    python -m deepmlf_kernels.aot --arch all --subset    # sm_80/86/89/90/100/120, a representative subset (CI: all but sm_90, whose whole set CI compiles)
    python -m deepmlf_kernels.aot --arch all --exclusions  # every architecture, all 186; prints arch_exclusions
    python -m deepmlf_kernels.aot --full     # every specialisation, ~4,000 kernels (a many-core box)

Architectures (`--arch`): A100 (sm_80), A10/RTX 30 (sm_86), L4/L40/RTX 40 (sm_89), H100/H200
(sm_90), B200 (sm_100), RTX 50 (sm_120), each with its own per-block shared-memory limit
(`common.ARCH_MAX_SHARED`). The tables are made for sm_90, where every entry must compile
clean. Elsewhere a config may be unfit (ptxas spills, or Triton gives it more shared memory
than the launchers' estimate): `arch_exclusions.EXCLUDED` lists those per architecture and
the launchers skip them there; the check fails on an unfit config that is not listed, a
listed one that is fit (stale), and a table entry (kernel x dot class x BLOCK_D) left with
no config on some architecture. Every 16-bit kernel with a matrix product must show a
tensor-core instruction in its PTX (mma.sync, wgmma or tcgen05).

The interpreter accepts code the GPU compiler rejects (a `tl.dot` with a dimension < 16,
say) and says nothing of registers or shared memory, so CPU tests alone do not prove the
kernels build or run well. This compiles them through `triton.compile(...,
target=GPUTarget("cuda", 90, 32))` down to PTX and cubin as the launchers specialise them
(unit last-dim strides as constants, 16-byte aligned pointers, strides divisible by 16
where the head dim is, each config's warps, stages and `maxnreg`), and checks every one:

* shared memory: `compiled.metadata.shared` <= 232448 bytes (227 KB, the per-block
  opt-in limit of H100/H200); for the autotuned kernels also <= the launchers' estimate
  (`shared_memory_estimate`, which drops configs on devices with less), and that
  estimate <= 232448, so the launchers keep every table entry on sm_90;
* registers: ptxas -v (Triton's own ptxas, for `sm_90a`, on `compiled.asm["ptx"]`) must
  report 0 bytes of spill stores and spill loads.

What the default mode compiles
* every config of every table entry of the autotuned kernels (`attention_configs`,
  `gemm_configs`), i.e. everything the device may autotune over: bf16 at one head dim
  per BLOCK_D (30, 64, 128, 256), fp16 at 256, and fp32 under both PyTorch TF32 settings
  (dot precision "tf32" / "tf32x3", or "ieee" at wide heads, see
  `attention.kernel_precision`), with causal, dropout and seqused_k on and GQA; the GEMM
  in bf16, fp16, fp32 (both precisions) and bf16 with an fp32 residual (autocast);
* the other flag combinations, multi-head attention (group == 1, a constant to Triton)
  and unaligned GEMM widths, rotating through dtypes, head dims (16 and 80 first) and
  configs, so that every value of every axis compiles at least once;
* the kernels without autotuning (backward preprocess, gated-linear backward, dropout masks).

`--full` compiles the whole cross product instead: every dtype x precision x head dim
(16, 30, 64, 80, 128, 256) x flag combination x GQA/MHA x config, and every GEMM config x
flags x aligned/unaligned. A table (kernel, dtype, head dim, config, flags, registers,
spill bytes, shared bytes, seconds) is printed, and the exit status is 1 if any kernel
fails to compile, spills or exceeds shared memory, so CI can run it. It must run
without TRITON_INTERPRET=1: the interpreter replaces `@triton.jit` functions by objects
`triton.compile` cannot take.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

TARGET_ARCH = 90
HEAD_DIMS = (16, 30, 64, 80, 128, 256)
RESOURCE_HEAD_DIMS = (30, 64, 128, 256)  # one per BLOCK_D (16 and 80 share 30's and 128's configs)
FP16_HEAD_DIMS = (256,)  # fp16 shares bf16's configs; the full mode checks every head dim
DOT_VARIANTS = (("bf16", None), ("fp16", None), ("fp32", "tf32"), ("fp32", "tf32x3"))  # (dtype, fp32 precision)
ATTN_FLAGS = tuple(itertools.product((True, False), repeat=3))  # (causal, dropout, seqused)
GEMM_FLAGS = tuple(itertools.product((True, False), repeat=2))  # (per-channel gate, dropout)
ATTN_KERNELS = ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv")
DOT_KERNELS = (*ATTN_KERNELS, "gated_linear_fwd")
ARCHS = (80, 86, 89, 90, 100, 120)
TENSOR_CORE_PTX = re.compile(r"\b(mma\.sync|wgmma\.mma_async|tcgen05\.mma)\b")
"""A tensor-core matrix product in PTX: mma.sync (sm_80-89, sm_120), wgmma (sm_90), tcgen05 (sm_100)."""


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


def _job(kernel, pointers, constexprs, *, num_warps=4, num_stages=1, maxnreg=None, unit_strides=(), divisible=(),
         dtype="", head_dim="", precision=None, config="", flags="", estimate=None, key=None, worst=True):
    """One compile: pointer element types by argument name, constexpr values, options, and
    the labels of its table row. Integer arguments are i32 and float arguments fp32, as
    the launchers pass them; like Triton's launcher, which specialises an integer argument
    equal to 1 as a constant and one divisible by 16 as such, `unit_strides` become
    constexpr 1 and `divisible` get `tt.divisibility = 16`. `estimate`: the launcher's
    shared-memory estimate, if any; `key`: the config's `arch_exclusions` key (tuned kernels);
    `worst`: every flag that costs registers is on (an exclusion is judged on such a job)."""
    if not config:  # an untuned kernel: its fixed tile
        config = ",".join(f"{k}={v}" for k, v in constexprs.items() if k in ("BLOCK_M", "BLOCK_N"))
    constexprs = dict(constexprs, **{name: 1 for name in unit_strides})
    return dict(kernel=kernel, pointers=pointers, constexprs=constexprs, divisible=tuple(divisible),
                options={"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg},
                dtype=dtype if precision is None else f"{dtype}/{precision}", head_dim=head_dim, config=config,
                flags=flags, estimate=estimate, key=key, worst=worst,
                tensor_cores=kernel in DOT_KERNELS and any(p in ("bf16", "fp16") for p in pointers.values()))


def _flag_text(names, values):
    return "+".join(n for n, v in zip(names, values) if v) or "-"


def attention_job(kernel, dtype, precision, head_dim, config, causal, dropout, seqused, mha=False):
    """The compile job of one attention kernel specialisation. Packed contiguous q/k/v
    have row and head strides that are multiples of the head dim, so divisible by 16
    when it is; `mha`: one query head per kv head (group == 1, a constant to Triton)."""
    attn, _ = _kernels()
    from deepmlf_kernels.common import describe, dot_class

    common = dict(Q=dtype, K=dtype, V=dtype, LSE="fp32", CU_Q="i32", CU_K="i32", SEQUSED_K="i32", SEED="i64")
    unit = ("stride_qd", "stride_kd", "stride_vd")
    strides = ["stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh"]
    if kernel == "attn_fwd":
        pointers = dict(common, O=dtype)
        strides += ["stride_on", "stride_oh"]
    else:
        unit += ("stride_dod",)
        grads = dict(DQ=dtype) if kernel == "attn_bwd_dq" else dict(DK=dtype, DV=dtype)
        pointers = dict(common, DO=dtype, DELTA="fp32", **grads)
        strides += ["stride_don", "stride_doh"] + (["stride_dqn", "stride_dqh"] if kernel == "attn_bwd_dq"
                                                   else ["stride_dkn", "stride_dkh"])
    bd = attn.block_d(head_dim)
    cx = dict(HEAD_DIM=head_dim, BLOCK_D=bd, CAUSAL=causal, HAS_SEQUSED=seqused, DROPOUT=dropout,
              DOT_PRECISION=precision, UPCAST=False, **config.kwargs)
    if mha:
        cx["group"] = 1
    return _job(kernel, pointers, cx, num_warps=config.num_warps, num_stages=config.num_stages,
                maxnreg=config.maxnreg, unit_strides=unit,
                divisible=strides if head_dim % 16 == 0 else (), dtype=dtype, head_dim=head_dim,
                precision=precision, config=describe(config),
                flags=_flag_text(("causal", "dropout", "seqused", "mha"), (causal, dropout, seqused, mha)),
                estimate=attn.shared_memory_estimate(kernel, config, bd, dot_class(precision)),
                key=(kernel, dot_class(precision), bd, describe(config)), worst=causal and dropout and seqused)


def gemm_job(x_dtype, dtype, precision, config, per_channel, dropout, aligned=True):
    """The compile job of one forward-GEMM specialisation (x/out in `x_dtype`, h/w/y in
    `dtype`). `aligned`: N, K and the row strides are multiples of 16 (model widths are;
    the absorbed cross-attention's K = H * 30 need not be). M, the row count, varies by
    batch and is left unspecialised."""
    _, gl = _kernels()
    from deepmlf_kernels.common import describe, dot_class

    pointers = dict(X=x_dtype, H=dtype, W=dtype, G="fp32", OUT=x_dtype, Y=dtype, SEED="i64")
    cx = dict(PER_CHANNEL=per_channel, DROPOUT=dropout, DOT_PRECISION=precision, UPCAST=False, **config.kwargs)
    label = dtype if x_dtype == dtype else f"{dtype}+{x_dtype}res"
    divisible = ("N", "K", "stride_xm", "stride_hm", "stride_wn", "stride_om") if aligned else ()
    return _job("gated_linear_fwd", pointers, cx, num_warps=config.num_warps, num_stages=config.num_stages,
                maxnreg=config.maxnreg, unit_strides=("stride_xn", "stride_hk", "stride_wk"), divisible=divisible, dtype=label,
                precision=precision, config=describe(config),
                flags=_flag_text(("channel", "dropout", "unaligned"), (per_channel, dropout, not aligned)),
                estimate=gl.shared_memory_estimate(config, dot_class(precision)),
                key=("gated_linear_fwd", dot_class(precision), 0, describe(config)), worst=per_channel and dropout)


def _attention_variants(head_dims):
    """(dtype, kernel precision, head dim) the attention launchers produce, once each: fp32
    asks for "tf32" or "tf32x3", which become "ieee" at wide heads (`kernel_precision`)."""
    attn, _ = _kernels()
    seen = {}
    for (dt, requested), d in itertools.product(DOT_VARIANTS, head_dims):
        seen[dt, attn.kernel_precision(requested, attn.block_d(d)), d] = None
    return list(seen)


def _attention_configs(kernel, precision, head_dim):
    attn, _ = _kernels()
    from deepmlf_kernels.common import dot_class

    return attn.attention_configs(kernel, dot_class(precision), attn.block_d(head_dim))


def _attention_jobs(full: bool):
    jobs = []
    if full:
        for (dt, prec, d), flags, kernel in itertools.product(_attention_variants(HEAD_DIMS), ATTN_FLAGS,
                                                               ATTN_KERNELS):
            for cfg in _attention_configs(kernel, prec, d):
                for mha in (False, True):
                    jobs.append(attention_job(kernel, dt, prec, d, cfg, *flags, mha=mha))
        return jobs
    # Every config of every table entry, at one head dim per BLOCK_D, with causal, dropout
    # and seqused_k on (together the most registers) and GQA.
    worst = ATTN_FLAGS[0]
    for (dt, prec, d), kernel in itertools.product(_attention_variants(RESOURCE_HEAD_DIMS), ATTN_KERNELS):
        if dt == "fp16" and d not in FP16_HEAD_DIMS:
            continue
        for cfg in _attention_configs(kernel, prec, d):
            jobs.append(attention_job(kernel, dt, prec, d, cfg, *worst))
    # The other flag combinations and multi-head attention (group == 1), rotating through
    # dtypes, the remaining head dims and configs.
    cases = _attention_variants(HEAD_DIMS)
    cases = [c for c in cases if c[2] not in RESOURCE_HEAD_DIMS] + cases
    for i, flags in enumerate(ATTN_FLAGS[1:]):
        for j, kernel in enumerate(ATTN_KERNELS):
            dt, prec, d = cases[(3 * i + j) % len(cases)]
            configs = _attention_configs(kernel, prec, d)
            jobs.append(attention_job(kernel, dt, prec, d, configs[(i + j) % len(configs)], *flags, mha=j == i % 3))
    return jobs


def _gemm_jobs(full: bool):
    _, gl = _kernels()
    from deepmlf_kernels.common import dot_class

    jobs = []
    variants = [(dt, dt, prec) for dt, prec in DOT_VARIANTS] + [("fp32", "bf16", None)]  # + bf16 autocast
    for x_dt, dt, prec in variants:
        for flags in GEMM_FLAGS if full else GEMM_FLAGS[:1]:
            for aligned in (True, False) if full else (True,):
                for cfg in gl.gemm_configs(dot_class(prec)):
                    jobs.append(gemm_job(x_dt, dt, prec, cfg, *flags, aligned=aligned))
    if not full:  # the other flag combinations and an unaligned K, rotating
        for i, flags in enumerate(GEMM_FLAGS):
            x_dt, dt, prec = variants[i % len(variants)]
            configs = gl.gemm_configs(dot_class(prec))
            jobs.append(gemm_job(x_dt, dt, prec, configs[i % len(configs)], *flags, aligned=False))
    return jobs


def _untuned_jobs():
    attn, gl = _kernels()
    jobs = []
    for dt, d in [("bf16", d) for d in HEAD_DIMS] + [("fp32", 30), ("fp32", 256), ("fp16", 64)]:
        strides = ("stride_on", "stride_oh", "stride_don", "stride_doh") if d % 16 == 0 else ()
        jobs.append(_job("attn_bwd_preprocess", dict(O=dt, DO=dt, DELTA="fp32"),
                         dict(HEAD_DIM=d, BLOCK_M=attn.PREPROCESS_BLOCK_M, BLOCK_D=attn.block_d(d)),
                         unit_strides=("stride_dod",), divisible=strides, dtype=dt, head_dim=d))
    jobs.append(_job("attn_dropout_mask", dict(SEED="i64", MASK="i8"),
                     dict(BLOCK_M=attn.MASK_BLOCK, BLOCK_N=attn.MASK_BLOCK), num_warps=attn.MASK_WARPS, dtype="i8"))
    for dout_dt, dt in (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("fp32", "bf16")):
        for per_channel, dropout in GEMM_FLAGS:
            jobs.append(_job(
                "gated_linear_bwd", dict(DOUT=dout_dt, Y=dt, G="fp32", SEED="i64", DZ=dt, PARTIAL="fp32"),
                dict(PER_CHANNEL=per_channel, DROPOUT=dropout, UPCAST=False,
                     BLOCK_M=gl.BWD_BLOCK_M, BLOCK_N=gl.BWD_BLOCK_N),
                unit_strides=("stride_don",), divisible=("N", "stride_dom", "stride_ym"),
                dtype=dt if dout_dt == dt else f"{dt}+{dout_dt}res",
                flags=_flag_text(("channel", "dropout"), (per_channel, dropout)),
            ))
    jobs.append(_job("gated_linear_mask", dict(SEED="i64", MASK="i8"),
                     dict(BLOCK_M=gl.BWD_BLOCK_M, BLOCK_N=gl.BWD_BLOCK_N), dtype="i8"))
    return jobs


def jobs(full: bool = False) -> list[dict]:
    """Every compile job of the default set (or of the full product)."""
    return _attention_jobs(full) + _gemm_jobs(full) + _untuned_jobs()


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) that Triton's ptxas reports for `ptx`."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
             "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    usage = _parse_ptxas(proc.stderr)
    if usage is None:
        raise RuntimeError(f"cannot read ptxas -v output:\n{proc.stderr}")
    return usage


def _parse_ptxas(log: str) -> tuple[int, int, int] | None:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        return None
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_one(job: dict, arch: int = TARGET_ARCH) -> dict:
    """Compile one job for compute capability `arch` and measure it. Returns the job's labels
    plus arch, seconds, regs, spill (store + load bytes), shared, `faults` (what would make
    the config unfit there: spills, shared memory over the limit or over the launcher's
    estimate), `status` ("ok", "excluded" by `arch_exclusions`, or "dropped" because the
    launcher's estimate exceeds the limit) and `problems` (failures of the check)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deepmlf_kernels.arch_exclusions import EXCLUDED
    from deepmlf_kernels.common import ARCH_MAX_SHARED

    fn = _registry()[job["kernel"]]
    constexprs, pointers = job["constexprs"], job["pointers"]
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
            if name in job["divisible"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    record = {k: job[k] for k in ("kernel", "dtype", "head_dim", "config", "flags", "key")}
    record.update(arch=arch, regs=None, spill=None, shared=None, faults=[], status="ok", problems=[])
    start = time.perf_counter()
    try:
        # Triton runs ptxas -v itself and prints its report under TRITON_DUMP_PTXAS_LOG;
        # a kernel from Triton's cache comes without one, and ptxas runs again here.
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=job["options"])
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        usage = _parse_ptxas(log.getvalue())
        if usage is None:
            usage = ptxas_usage(compiled.asm["ptx"], compiled.metadata.target.arch)
        regs, spill_stores, spill_loads = usage
    except Exception:  # report every failure, keep compiling the rest
        record["problems"].append("compile failed:\n" + traceback.format_exc(limit=3))
        record["seconds"] = time.perf_counter() - start
        return record
    record["seconds"] = time.perf_counter() - start
    shared, limit, estimate = compiled.metadata.shared, ARCH_MAX_SHARED[arch], job["estimate"]
    record.update(regs=regs, spill=spill_stores + spill_loads, shared=shared)
    faults = record["faults"]
    if spill_stores or spill_loads:
        faults.append(f"spills {spill_stores} B stores, {spill_loads} B loads per thread")
    if shared > limit:
        faults.append(f"shared memory {shared} B > {limit} B")
    if estimate is not None and shared > estimate:
        faults.append(f"shared memory {shared} B > launcher estimate {estimate} B")
    if job["tensor_cores"] and not TENSOR_CORE_PTX.search(compiled.asm["ptx"]):
        record["problems"].append("no tensor-core instruction (mma.sync / wgmma / tcgen05) in the PTX")
    listed = job["key"] is not None and job["key"] in EXCLUDED.get(arch, {})
    if estimate is not None and estimate > limit:
        record["status"] = "dropped"  # the launchers never try it on this architecture
        if arch == TARGET_ARCH:  # the tables are made for sm_90: every entry must run there
            record["problems"] += faults + [f"launcher estimate {estimate} B > {limit} B: never run on sm_{arch}"]
    elif listed:
        record["status"] = "excluded"
        if not faults and job["worst"]:  # milder flags may fit where the worst ones do not
            record["problems"].append(f"listed in arch_exclusions for sm_{arch} but fit: a stale entry")
    else:
        record["problems"] += faults
    return record


def coverage_problems(arch: int) -> list[str]:
    """Every table entry (kernel x dot class x BLOCK_D) must keep a config the launchers try
    on `arch`: within the shared-memory limit by their estimate and not excluded."""
    attn, gl = _kernels()
    from deepmlf_kernels.common import ARCH_MAX_SHARED, excluded

    limit, problems = ARCH_MAX_SHARED[arch], []
    for kernel in ATTN_KERNELS:
        for cls, bd in attn.ATTN_TABLE[kernel]:
            if not any(attn.shared_memory_estimate(kernel, c, bd, cls) <= limit and not excluded(kernel, cls, bd, c, arch)
                       for c in attn.attention_configs(kernel, cls, bd)):
                problems.append(f"sm_{arch}: no config of {kernel} {cls} BLOCK_D={bd} fits")
    for cls in gl.GEMM_TABLE:
        if not any(gl.shared_memory_estimate(c, cls) <= limit and not excluded("gated_linear_fwd", cls, 0, c, arch)
                   for c in gl.gemm_configs(cls)):
            problems.append(f"sm_{arch}: no config of gated_linear_fwd {cls} fits")
    return problems


def subset(todo: list[dict]) -> list[dict]:
    """A representative subset of `todo` for a quick check of every architecture: every
    config of the bf16 attention kernels at head dims 64 and 256 (the widest tiles) and of
    the bf16 and fp32 GEMM, with every flag on, plus every job of an excluded config (so a
    stale exclusion is caught)."""
    from deepmlf_kernels.arch_exclusions import EXCLUDED

    listed = {key for table in EXCLUDED.values() for key in table}
    worst = _flag_text(("causal", "dropout", "seqused", "mha"), ATTN_FLAGS[0] + (False,))
    keep = []
    for job in todo:
        attention = job["kernel"] in ATTN_KERNELS and job["dtype"] == "bf16" and job["head_dim"] in (64, 256) \
            and job["flags"] == worst
        gemm = job["kernel"] == "gated_linear_fwd" and job["flags"] == "channel+dropout" \
            and job["dtype"] in ("bf16", "fp32/tf32")
        if attention or gemm or job["key"] in listed:
            keep.append(job)
    return keep


def _row(r: dict) -> str:
    def num(v):
        return "-" if v is None else str(v)

    status = "FAIL" if r["problems"] else {"ok": "ok", "excluded": "excl", "dropped": "drop"}[r["status"]]
    return (f"{status:4} {r['arch']:>3} {r['kernel']:19} {r['dtype']:13} {num(r['head_dim']):>3} {r['config']:48} {r['flags']:27} "
            f"{num(r['regs']):>4} {num(r['spill']):>5} {num(r['shared']):>6} {r['seconds']:5.1f}s")


def _arch_list(text: str) -> list[int]:
    return list(ARCHS) if text == "all" else [int(a) for a in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    """Compile and check the job list for each architecture, print the table; 0 if all pass, else 1."""
    parser = argparse.ArgumentParser(prog="python -m deepmlf_kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="compile the whole cross product")
    parser.add_argument("--arch", default=str(TARGET_ARCH),
                        help=f"compute capabilities, comma-separated, or 'all' ({', '.join(map(str, ARCHS))}); "
                             f"default {TARGET_ARCH}")
    parser.add_argument("--subset", action="store_true", help="a representative subset of the jobs (`subset`)")
    parser.add_argument("--exclusions", action="store_true",
                        help="print arch_exclusions.EXCLUDED for what this run found unfit (paste it into the file)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: unset TRITON_INTERPRET; the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # inherited by the workers, see compile_one

    from deepmlf_kernels.common import ARCH_MAX_SHARED

    archs = _arch_list(args.arch)
    todo = jobs(args.full)
    if args.subset:
        todo = subset(todo)
    pairs = [(job, arch) for arch in archs for job in todo]
    start = time.perf_counter()
    failed = 0
    print(f"{'':4} {'sm':>3} {'kernel':19} {'dtype':13} {'hd':>3} {'config':48} {'flags':27} {'regs':>4} "
          f"{'spill':>5} {'shared':>6}")
    worst: dict[tuple[int, str], list[int]] = {}  # (arch, kernel) -> [compiled, max regs, max shared]
    unfit: dict[int, dict[tuple, str]] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for record in pool.map(compile_one, *zip(*pairs)):
            print(_row(record), flush=True)
            if record["problems"]:
                failed += 1
                print("     " + "\n     ".join(record["problems"]), flush=True)
            if record["faults"] and record["key"] is not None and record["status"] != "dropped":
                unfit.setdefault(record["arch"], {})[tuple(record["key"])] = "; ".join(record["faults"])
            if record["regs"] is not None:
                w = worst.setdefault((record["arch"], record["kernel"]), [0, 0, 0])
                w[:] = w[0] + 1, max(w[1], record["regs"]), max(w[2], record["shared"])
    coverage = [p for arch in archs for p in coverage_problems(arch)]
    for problem in coverage:
        print(f"aot: {problem}")
    for (arch, kernel), (n, regs, shared) in worst.items():
        print(f"aot: sm_{arch} {kernel:19} {n:5} compiled, at most {regs} registers and {shared} B shared memory")
    for arch in archs:
        n_excluded = len(unfit.get(arch, {}))
        print(f"aot: sm_{arch}: {len(todo)} kernels, shared-memory limit {ARCH_MAX_SHARED[arch]} B, "
              f"{n_excluded} configs unfit there (the launchers skip them)")
    if args.exclusions:
        print("EXCLUDED = " + _literal(unfit))
    print(f"aot: {len(pairs) - failed}/{len(pairs)} kernels compiled for "
          f"{', '.join(f'sm_{a}' for a in archs)} without spills and within shared memory (or skipped by the "
          f"launchers there) in {time.perf_counter() - start:.1f}s")
    return 1 if failed or coverage else 0


def _literal(unfit: dict[int, dict[tuple, str]]) -> str:
    lines = ["{"]
    for arch in sorted(unfit):
        lines.append(f"    {arch}: {{")
        lines += [f"        {key!r}: {reason!r}," for key, reason in sorted(unfit[arch].items())]
        lines.append("    },")
    return "\n".join(lines + ["}"])


if __name__ == "__main__":
    sys.exit(main())
