"""What this host is and how this process allocates: the CPU's model and flags, the key under
which a measurement made on it (`hardware.bf16_probe`, `ops.weight_only.cpu_block_elements`) is
stored, so that every run on the same machine, libraries, ISA caps and thread count takes the
same measured decision, and glibc's freed-memory policy (`keep_freed_memory`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_flags() -> set[str] | None:
    """The CPU's flags from /proc/cpuinfo (`avx2`, `avx512_bf16`, `amx_bf16`, ...); None off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_key() -> str:
    """What a CPU measurement depends on: the CPU, its vector flags, torch, PyTorch's ISA caps
    (`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`) and the thread count."""
    flags = cpu_flags() or set()
    caps = [f"{v}={os.environ.get(v, '')}" for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")]
    return "|".join([cpu_name(), ",".join(sorted(f for f in flags if f.startswith(("avx", "amx")))),
                     f"torch {torch.__version__}", *caps, f"threads {torch.get_num_threads()}"])


MALLOC_KEEP_BYTES = 1 << 30
"""Largest block glibc serves from (and keeps in) its heap once `keep_freed_memory` ran."""
_freed_memory_kept = False


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the kernel; -> whether
    it applied (glibc only; a no-op elsewhere). Process-wide, like TF32.

    PyTorch's CPU tensors come straight from malloc, and glibc serves every block above its
    mmap threshold (128 KiB to 32 MiB) with fresh pages and unmaps it on free, so a training
    step's large activations and the CLM term's `(rows, vocab)` blocks fault in every page
    again each step: 60-80 thousand page faults and 0.15-0.4 s of kernel time per GPT-2 step
    on a 2-core EPYC VM. Serving blocks up to `MALLOC_KEEP_BYTES` from the heap and trimming
    it only past 2 GiB free (mallopt takes a C int) removes them; the resident size then stays
    at the run's peak, which it reaches on the first step anyway."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    int_max = 2**31 - 1
    global _freed_memory_kept
    _freed_memory_kept = all(libc.mallopt(opt, value) == 1 for opt, value in (
        (m_mmap_threshold, MALLOC_KEEP_BYTES), (m_trim_threshold, int_max), (m_top_pad, 64 << 20)))
    return _freed_memory_kept


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` applied in this process (what a large transient costs depends
    on it: fresh pages, or the heap's)."""
    return _freed_memory_kept
