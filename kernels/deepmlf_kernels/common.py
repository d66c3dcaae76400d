"""What the kernels share: launch-time config choice, the fp32 dot precision, and the
interpreter's emulation of the GPU's low-precision arithmetic.

Config choice (`TunedKernel`)
* Each autotuned kernel has a table of configs per (dot class, BLOCK_D), where the dot
  class is "16bit" (bf16/fp16 operands) or the fp32 dot precision ("tf32", "tf32x3",
  "ieee"); `python -m deepmlf_kernels.aot` proves that every table entry compiles for
  sm_90 without register spills and within shared memory. Every config sets
  `maxnreg=255` (`MAX_REGISTERS`). At launch the candidates are the
  table's entries for the call, minus those whose estimated shared memory exceeds the
  device's limit, minus those the AOT check found unfit for the device's architecture
  (`arch_exclusions`), minus those `DEEPMLF_TRITON_CONFIG` excludes. One candidate is launched
  directly, several are autotuned by `triton.autotune` (whose `early_config_prune`
  computes the same candidates), so the table bounds autotuning on the device.
* `DEEPMLF_TRITON_CONFIG` pins configs, read at every launch: `;`-separated entries
  `[kernel:]key=value,...` with keys BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages and
  kernel one of attn_fwd, attn_bwd_dq, attn_bwd_dkdv, gated_linear_fwd; an entry without
  a kernel applies to every kernel, a kernel's own entry replaces it for that kernel.
  A config is kept iff it matches every key it has, e.g.
  `DEEPMLF_TRITON_CONFIG="BLOCK_M=32,BLOCK_N=64"` or
  `"attn_bwd_dkdv:BLOCK_M=16;gated_linear_fwd:BLOCK_M=64,BLOCK_N=64,BLOCK_K=64"`.
  A pin selects among the table's candidates; one that leaves none raises ValueError
  with the candidates listed.
* Under `TRITON_INTERPRET=1` the autotuner cannot run (it needs a GPU to time configs):
  an unpinned launch takes the candidate with the largest tile (fewest programs, the
  interpreter's cost), and tests pin every other config in turn.

fp32 dot precision (`dot_precision`)
* fp32 operands follow PyTorch's cuBLAS setting, read at every launch:
  `torch.backends.cuda.matmul.fp32_precision == "tf32"` (set by `allow_tf32 = True` or
  `torch.set_float32_matmul_precision("high")` as well) selects "tf32", anything else
  "tf32x3" (3xTF32: fp32-accurate, on tensor cores). The attention kernels run "ieee"
  (fp32 FMA, as accurate) instead at head dims where the tensor-core path would spill
  (`attention.kernel_precision`). The precision is a constexpr kernel argument, so each
  value is its own compiled specialisation and part of the autotune key. bf16/fp16 dots
  are not affected.

Interpreter emulation (`UPCAST`, the kernels' constexpr flag for `TRITON_INTERPRET=1`)
* The interpreter computes bf16 dots and bf16 element-wise math wrongly, and its
  fp32 <-> bf16 casts truncate (and mangle subnormals) where the GPU rounds to nearest
  even. The kernels keep their tensors in the dtypes the GPU uses and route the affected
  operations through helpers: `_dot` computes on exact fp32 copies of its operands under
  UPCAST (products of bf16/fp16/tf32 values are exact in fp32 and the tensor cores
  accumulate in fp32) and rounds fp32 operands to tf32 / splits them into tf32 parts as
  "tf32" / "tf32x3" do; `_round` narrows fp32 to bf16 with integer round-to-nearest-even
  (the interpreter's fp16 cast is already right). On the GPU they are a plain `tl.dot`
  and `.to(dtype)`. Every place the GPU path narrows a value (P before P.V, dS before
  dQ/dK, P_drop before dV, every low-precision store) calls `_round`, and `_dot` asserts
  equal operand dtypes as the GPU compiler does, so a missing narrowing fails under the
  interpreter too.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = triton.knobs.runtime.interpret
CONFIG_ENV = "DEEPMLF_TRITON_CONFIG"
SM90_MAX_SHARED = 232448  # H100/H200 per-block shared memory with opt-in (227 KB)
ARCH_MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: SM90_MAX_SHARED, 100: SM90_MAX_SHARED, 120: 101376}
"""Per-block shared memory with opt-in (bytes) by compute capability: A100 (sm_80) 163 KB;
A10/RTX 30 (sm_86), L4/L40/RTX 40 (sm_89) and RTX 50 (sm_120) 99 KB; H100/H200 (sm_90) and
B200 (sm_100) 227 KB. `python -m deepmlf_kernels.aot --arch all` checks the kernels against each."""
# Every autotune config sets ptxas' register limit explicitly: without `.maxnreg`, ptxas
# aims at an occupancy tier (64, 128 or 168 registers per thread) and spills a few bytes
# to reach it; with it, it spills only when 255 registers do not suffice.
MAX_REGISTERS = 255
KERNEL_NAMES = ("attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv", "gated_linear_fwd")
PIN_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def fp32_dot_precision() -> str:
    """The `tl.dot` input precision for fp32 operands under PyTorch's current setting:
    "tf32" when cuBLAS may use TF32, else "tf32x3" (fp32-accurate)."""
    matmul = torch.backends.cuda.matmul
    try:
        # torch >= 2.9; also reflects the legacy allow_tf32 and set_float32_matmul_precision,
        # whereas reading allow_tf32 raises once the new API has been used.
        tf32 = matmul.fp32_precision == "tf32"
    except AttributeError:
        tf32 = matmul.allow_tf32
    return "tf32" if tf32 else "tf32x3"


def dot_precision(dtype: torch.dtype) -> str | None:
    """The kernels' DOT_PRECISION constexpr for operands of `dtype`: the fp32 precision,
    or None for bf16/fp16 (their dots have one precision)."""
    return fp32_dot_precision() if dtype == torch.float32 else None


def dot_class(precision: str | None) -> str:
    """Config-table class of a DOT_PRECISION value: "16bit", "tf32", "tf32x3" or "ieee"."""
    return "16bit" if precision is None else precision


@functools.lru_cache(maxsize=16)  # read at every launch; the result is never modified
def parse_pins(text: str) -> dict[str | None, dict[str, int]]:
    """`DEEPMLF_TRITON_CONFIG` text -> {kernel name or None (all kernels): {key: value}}."""
    pins: dict[str | None, dict[str, int]] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        kernel, _, body = entry.rpartition(":")
        kernel = kernel.strip() or None
        if kernel is not None and kernel not in KERNEL_NAMES:
            raise ValueError(f"{CONFIG_ENV}: unknown kernel {kernel!r} in {entry!r}; expected one of {KERNEL_NAMES}")
        values = {}
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in PIN_KEYS or not value.strip().isdigit():
                raise ValueError(f"{CONFIG_ENV}: cannot read {item!r} in {entry!r}; expected key=integer with key "
                                 f"one of {PIN_KEYS}")
            values[key] = int(value)
        pins[kernel] = values
    return pins


def config_values(config: triton.Config) -> dict[str, int]:
    """The pinnable values of a config: its kwargs plus num_warps and num_stages."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def apply_pin(kernel: str, configs: list[triton.Config], text: str) -> list[triton.Config]:
    """The configs `text` (a `DEEPMLF_TRITON_CONFIG` value) keeps for `kernel`."""
    pins = parse_pins(text)
    pin = pins.get(kernel, pins.get(None))
    if not pin:
        return configs
    kept = [c for c in configs if all(config_values(c).get(k, v) == v for k, v in pin.items())]
    if not kept:
        raise ValueError(f"{CONFIG_ENV}={text!r} leaves no config for {kernel}; its candidates for this call are "
                         + "; ".join(describe(c) for c in configs))
    return kept


def describe(config: triton.Config) -> str:
    """`BLOCK_M=32,BLOCK_N=64,num_warps=4,num_stages=2`: a config in the pin syntax."""
    return ",".join(f"{k}={v}" for k, v in config_values(config).items())


def max_shared_memory(device: torch.device) -> int:
    """Per-block shared memory limit of `device` (H100's under the interpreter, so CPU
    tests prune as an H100 does)."""
    if INTERPRET or device.type != "cuda":
        return SM90_MAX_SHARED
    return _device_max_shared(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)  # a driver query per attribute: once per device, not per launch
def _device_max_shared(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def capability(device: torch.device) -> int:
    """Compute capability of `device` as `major * 10 + minor` (sm_90 under the interpreter)."""
    if INTERPRET or device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def excluded(kernel: str, cls: str, block_d: int, config: triton.Config, arch: int) -> bool:
    """Whether the AOT check found `config` unfit for `kernel` on compute capability `arch`
    (`arch_exclusions.EXCLUDED`: it spills there, or needs more shared memory than the
    launchers' estimate): the launchers never try it on such a device."""
    from deepmlf_kernels.arch_exclusions import EXCLUDED

    return (kernel, cls, block_d, describe(config)) in EXCLUDED.get(arch, {})


class TunedKernel:
    """An autotuned `@triton.jit` kernel whose candidate configs are chosen at each launch.

    `space(named_args)` returns the configs the table allows for a call (dtype, head dim,
    dot precision, shared memory); the pin in `DEEPMLF_TRITON_CONFIG` then filters them.
    `kernel[grid](*args, **kwargs)` launches like a `triton.autotune` object. Each
    candidate is safe to launch repeatedly on the same arguments (autotuning does), which
    every kernel's docstring states. `last_config` is the config of the latest launch.
    """

    def __init__(self, name: str, fn, configs: list[triton.Config], key: list[str], space):
        self.name, self.fn, self.space = name, fn, space
        self.autotuner = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": self._prune})(fn)
        self.last_config: triton.Config | None = None
        self._pin_text: str | None = None

    @property
    def configs(self) -> list[triton.Config]:
        """Every config of every table entry."""
        return self.autotuner.configs

    def candidates(self, named_args: dict) -> list[triton.Config]:
        """The configs a launch with `named_args` (all arguments by name) chooses among."""
        viable = self.space(named_args)
        if not viable:
            raise RuntimeError(f"no config of {self.name} fits this device's shared memory for this call")
        return apply_pin(self.name, viable, os.environ.get(CONFIG_ENV, ""))

    def _prune(self, configs, named_args, **kwargs):
        return self.candidates({**named_args, **kwargs})

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            text = os.environ.get(CONFIG_ENV, "")
            if text != self._pin_text:  # the tuned choices were made among other candidates
                self.autotuner.cache.clear()
                self._pin_text = text
            candidates = self.candidates({**dict(zip(self.fn.arg_names, args)), **kwargs})
            if len(candidates) == 1 or INTERPRET:
                config = candidates[0] if len(candidates) == 1 else max(candidates, key=_tile_size)
                self.last_config = config
                return self.fn[grid](*args, **kwargs, **config.all_kwargs())
            result = self.autotuner[grid](*args, **kwargs)
            self.last_config = self.autotuner.best_config
            return result

        return launch


def _tile_size(config: triton.Config) -> int:
    size = 1
    for name, value in config.kwargs.items():
        if name.startswith("BLOCK_"):
            size *= value
    return size


# --- jit helpers -------------------------------------------------------------------------


@triton.jit
def _round_bits(x, DROP: tl.constexpr, NEAREST_EVEN: tl.constexpr):
    """fp32 `x` with its DROP low mantissa bits rounded off, using integer ops: to
    nearest, ties to even (NEAREST_EVEN) or away from zero. NaN becomes the quiet NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    if NEAREST_EVEN:
        bits = bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)
    else:
        bits = bits + (1 << (DROP - 1))
    rounded = ((bits >> DROP) << DROP).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, float("nan"))


@triton.jit
def _round(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """`x.to(DTYPE)` rounded to nearest even, as the GPU converts. Under the interpreter
    (UPCAST), whose fp32 -> bf16 cast truncates (and mangles subnormals), bf16 is rounded
    and narrowed with integer ops."""
    if UPCAST:
        if DTYPE == tl.bfloat16:
            bits = _round_bits(x.to(tl.float32), 16, True).to(tl.uint32, bitcast=True)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _widen(x):
    """Interpreter only: `x` as exact fp32 (bf16 through its bits, see `_round`)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _tf32(x):
    """fp32 -> nearest tf32 value (10 mantissa bits, ties away from zero as cvt.rna.tf32,
    which Triton's 3xTF32 uses to split operands)."""
    return _round_bits(x, 13, False)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """`a @ b` with fp32 accumulation; operands share a dtype. fp32 operands use
    DOT_PRECISION ("tf32", "tf32x3" or "ieee"), bf16/fp16 operands ignore it. Under the
    interpreter (UPCAST) the product is computed on fp32 copies, with fp32 operands
    rounded to tf32 or split into tf32 parts as Triton's 3xTF32 does (lo*hi + hi*lo,
    then + hi*hi)."""
    tl.static_assert(a.dtype == b.dtype, "tl.dot operands must share a dtype (a missing cast?)")
    if UPCAST:
        if a.dtype == tl.float32:
            if DOT_PRECISION == "tf32":
                return tl.dot(_tf32(a), _tf32(b), input_precision="ieee")
            if DOT_PRECISION == "tf32x3":
                a_hi = _tf32(a)
                b_hi = _tf32(b)
                small = tl.dot(_tf32(a - a_hi), b_hi, input_precision="ieee")
                small += tl.dot(a_hi, _tf32(b - b_hi), input_precision="ieee")
                return tl.dot(a_hi, b_hi, small, input_precision="ieee")
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(_widen(a), _widen(b), input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision=DOT_PRECISION)
    return tl.dot(a, b)
