"""The one place that decides, per device, how a run computes: precision, TF32, attention backend.

Precision means two things decided together: the dtype the frozen backbone's weights are
stored in and the autocast dtype of the forward pass. Both are bf16 or both are fp32.

* `--precision auto` (the default) uses the recipe's precision (`TrainConfig.recipe_precision`:
  bf16 for the SmolLM2 recipes, fp32 for the GPT-2 ones, as released) where the hardware runs
  bf16 natively and fast, and fp32 elsewhere. On CUDA: compute capability >= 8.0. On a CPU the
  flags are only a precondition (AVX512_BF16 or AMX-BF16, and PyTorch not capped below them):
  an AVX512-BF16 CPU without AMX (Cooper Lake, or a capped AMX Xeon) ran a bf16 product slower
  than fp32, so `auto` times one product of the recipes' shape in both dtypes
  (`bf16_probe`, cached per machine and library versions) and takes bf16 only where it is at
  least `BF16_MIN_SPEEDUP` times faster. On an AVX2-only CPU bf16 is emulated (~40x slower).
* `--precision bf16` / `fp32` force a choice; bf16 where it is not native still runs, with
  one warning that says why it will be slow.
* TF32 (`--tf32`, off by default like the official code and PyTorch): fp32 matrix products on
  tensor cores (10-bit mantissa inputs, fp32 accumulation), for cuBLAS and, through the same
  PyTorch setting, the Triton kernels' fp32 dots. It changes nothing on a CPU.

`resolve_precision` is pure (device facts in, decision out) so tests can mock the hardware;
`device_facts` reads the real device. `environment_report` is what `deepmlf env` prints.
"""

from __future__ import annotations

import importlib.util
import importlib.metadata
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from deepmlf_fast.config import PrecisionName, Resolved, RunConfig
from deepmlf_fast.errors import ConfigError, DeepMLFError
from deepmlf_fast.fileio import cache_dir, read_json, write_json
from deepmlf_fast.host import cpu_flags, cpu_key, cpu_name
from deepmlf_fast.ops import autochoice
from deepmlf_fast.ops.dispatch import resolve_backend, triton_available
from deepmlf_fast.ops.selfcheck import last_result

log = logging.getLogger(__name__)

DTYPES: dict[PrecisionName, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Backbone weight dtype and autocast dtype of each precision."""
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 instructions that compute bf16 products natively."""
BF16_PROBE_SHAPE = (512, 576, 1536)
"""(rows, in, out) of the timed product: a demo batch's packed rows through SmolLM2-135M's FFN."""
BF16_MIN_SPEEDUP = 1.25
"""bf16 must beat fp32 by this factor on the probe for `auto` to pick it on a CPU: a marginal
gain does not pay for bf16's rounding."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the precision policy needs to know about a device."""

    device: str
    """"cpu", "cuda:0", ..."""
    name: str
    """CPU model or GPU name."""
    native_bf16: bool
    """bf16 products run natively here and, on a CPU, measurably faster than fp32."""
    why: str
    """One line: why bf16 is (not) native here."""
    cpu_capability: str
    """`torch.backends.cpu.get_cpu_capability()` (what ATen's kernels were dispatched to)."""


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run; `config.json` records it under `resolved`."""

    name: PrecisionName
    reason: str


def cpu_native_bf16(flags: set[str] | None, onednn_bf16: bool, capability: str) -> tuple[bool, str]:
    """Whether bf16 matmuls run natively on this CPU, and why (pure: tests pass fake facts).

    Needs an instruction that multiplies bf16 (`avx512_bf16` or `amx_bf16` among the CPU
    flags), oneDNN allowed to use it (`ONEDNN_MAX_CPU_ISA` may cap it) and ATen's kernels not
    capped below AVX512 (`ATEN_CPU_CAPABILITY`). Without /proc/cpuinfo (not Linux), oneDNN's
    own bf16 check decides.
    """
    if flags is None:
        return onednn_bf16, f"oneDNN reports bf16 {'supported' if onednn_bf16 else 'unsupported'} (no /proc/cpuinfo)"
    have = sorted(f for f in CPU_BF16_FLAGS if f in flags)
    if not have:
        return False, f"CPU has no {' or '.join(CPU_BF16_FLAGS)} (capability {capability}): bf16 matmuls are emulated"
    if not onednn_bf16 or capability in ("DEFAULT", "NO AVX", "AVX2"):
        return False, (f"CPU has {', '.join(have)} but PyTorch is capped to {capability} "
                       f"(ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY): bf16 matmuls are emulated")
    return True, f"CPU has {', '.join(have)} (capability {capability})"


@dataclass(frozen=True)
class ProbeTimes:
    """Milliseconds per `BF16_PROBE_SHAPE` product in each dtype (best of several repeats)."""

    fp32_ms: float
    bf16_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.bf16_ms


def _time_products(repeats: int = 7, calls: int = 4) -> ProbeTimes:
    """Time `BF16_PROBE_SHAPE` products in fp32 and bf16 on the CPU with this process's threads."""
    rows, k, n = BF16_PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, k, generator=g), torch.randn(k, n, generator=g)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = a.to(dtype), b.to(dtype)
        torch.mm(x, w)  # first call: oneDNN picks and builds its kernel
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                torch.mm(x, w)
            times.append((time.perf_counter() - start) / calls)
        best[dtype] = min(times) * 1e3
    return ProbeTimes(best[torch.float32], best[torch.bfloat16])


def bf16_probe() -> ProbeTimes:
    """`ProbeTimes` of this CPU, measured once (a fraction of a second) and cached in
    `<cache>/hardware/bf16_probe.json` under `cpu_key()`, so every run on the same machine
    and library versions takes the same decision."""
    path = cache_dir() / "hardware" / "bf16_probe.json"
    key = cpu_key()
    try:
        cached = read_json(path, "bf16 probe cache", DeepMLFError) if path.is_file() else {}
    except DeepMLFError:
        cached = {}  # a damaged cache is measured again and rewritten
    entry = cached.get(key) if isinstance(cached, dict) else None
    if isinstance(entry, dict) and {"fp32_ms", "bf16_ms"} <= entry.keys():
        return ProbeTimes(float(entry["fp32_ms"]), float(entry["bf16_ms"]))
    times = _time_products()
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = asdict(times)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, cached)
    return times


def cpu_fast_bf16(native: bool, why: str, probe) -> tuple[bool, str]:
    """Whether `auto` may take bf16 on this CPU, and why (pure: tests pass a fake `probe`).

    `native`/`why`: `cpu_native_bf16`'s verdict from the flags. Where the flags allow bf16,
    `probe()` (-> `ProbeTimes`) decides: bf16 only at `BF16_MIN_SPEEDUP` or more.
    """
    if not native:
        return False, why
    t = probe()
    rows, k, n = BF16_PROBE_SHAPE
    measured = (f"a ({rows}x{k})@({k}x{n}) product took {t.bf16_ms:.2f} ms in bf16 against {t.fp32_ms:.2f} ms "
                f"in fp32 ({t.speedup:.2f}x)")
    if t.speedup >= BF16_MIN_SPEEDUP:
        return True, f"{why}; {measured}"
    return False, f"{why}, but {measured}, under the {BF16_MIN_SPEEDUP}x that bf16 needs here"


def device_facts(device: torch.device | str) -> DeviceFacts:
    """Read the facts of `device` (CPU flags, CUDA compute capability)."""
    device = torch.device(device)
    capability = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = (major, minor) >= (8, 0)
        why = f"CUDA compute capability {major}.{minor} {'>=' if native else '<'} 8.0"
        return DeviceFacts(str(device), torch.cuda.get_device_name(device), native, why, capability)
    if device.type == "cpu":
        native, why = cpu_native_bf16(cpu_flags(), torch.ops.mkldnn._is_mkldnn_bf16_supported(), capability)
        native, why = cpu_fast_bf16(native, why, bf16_probe)
        return DeviceFacts("cpu", cpu_name(), native, why, capability)
    return DeviceFacts(str(device), device.type, False, f"no bf16 policy for device type {device.type!r}", capability)


def resolve_precision(requested: str, recipe_precision: str, facts: DeviceFacts) -> Precision:
    """The run's precision from the request ('auto', 'fp32', 'bf16'), the recipe's own choice
    and the device's facts (both already valid: `config.validate_config`). Warns once when
    bf16 is forced where it is not native."""
    if requested == "fp32":
        return Precision("fp32", "requested")
    if requested == "bf16":
        if not facts.native_bf16:
            log.warning("precision bf16 on %s: %s, so this run will be much slower than with --precision fp32 "
                        "(or auto)", facts.name, facts.why)
        return Precision("bf16", "requested" + ("" if facts.native_bf16 else f" ({facts.why})"))
    if recipe_precision == "fp32":
        return Precision("fp32", "the recipe trains in fp32")
    if facts.native_bf16:
        return Precision("bf16", f"the recipe trains in bf16 and bf16 is native: {facts.why}")
    return Precision("fp32", f"the recipe trains in bf16, but bf16 is not native: {facts.why}")


def eval_precision(train: Precision, official_bf16_eval: bool, facts: DeviceFacts) -> Precision:
    """Precision of evaluation: training's, or the official code's bf16 autocast (parity
    'official'), which follows the same rule as `auto`: bf16 only where it is native."""
    if not official_bf16_eval or train.name == "bf16":
        return train
    if facts.native_bf16:
        return Precision("bf16", f"official parity evaluates in bf16: {facts.why}")
    return Precision("fp32", f"official parity evaluates in bf16, but bf16 is not native: {facts.why}")


def set_tf32(enabled: bool) -> None:
    """Let fp32 matrix products use TF32 tensor cores (cuBLAS, cuDNN and the Triton kernels,
    which read the same PyTorch setting), or keep them IEEE fp32."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """'auto' -> the first CUDA device when there is one, else the CPU; an explicit device must
    exist here (ConfigError naming `field` otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{field}: expected auto, cpu, cuda or cuda:N, found {name!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"{field}: expected a device this machine has (CUDA devices: "
                          f"{torch.cuda.device_count()}), found {name!r}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{field}: expected auto, cpu, cuda or cuda:N, found {name!r}")
    return device


def resolve_run(cfg: RunConfig, device: torch.device) -> Resolved:
    """Every hardware-dependent decision of a run on `device`, logged and returned for
    `RunConfig.resolved`; also applies the process-wide TF32 setting (a CPU run's
    `keep_freed_memory` comes once its model is built: `train.run.Session`)."""
    facts = device_facts(device)
    precision = resolve_precision(cfg.train.precision, cfg.train.recipe_precision, facts)
    evaluation = eval_precision(precision, cfg.model.flags.eval_precision == "bf16", facts)
    if cfg.train.tf32 and device.type != "cuda":
        log.info("--tf32 has no effect on %s", device)
    set_tf32(cfg.train.tf32)
    try:
        backend = resolve_backend(cfg.train.backend, device)
    except RuntimeError as exc:  # 'triton' where it cannot run: a user's choice, so one line
        raise ConfigError(f"train.backend: {exc}") from None
    log.info("device %s (%s) | precision %s: %s | evaluation %s | attention %s%s", device, facts.name,
             precision.name, precision.reason, evaluation.name, backend, " | TF32 on" if cfg.train.tf32 else "")
    return Resolved(
        device=str(device), device_name=facts.name, cpu_capability=facts.cpu_capability,
        native_bf16=facts.native_bf16, precision=precision.name, precision_reason=precision.reason,
        eval_precision=evaluation.name, tf32=cfg.train.tf32, attention_backend=backend,
    )


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _bitsandbytes_backend() -> str:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "not installed"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install is a fact to report, not a crash
        return f"import fails: {type(exc).__name__}: {exc}"
    return "cuda" if torch.cuda.is_available() else "cpu"


def environment_report(device: str = "auto", recipe_precision: str = "bf16") -> dict:
    """What a bug report needs and what `auto` will do on this machine (`deepmlf env`)."""
    dev = resolve_device(device, field="--device")
    facts = device_facts(dev)
    auto = resolve_precision("auto", recipe_precision, facts)
    triton_usable = triton_available() and (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in
                     ("deepmlf-fast", "torch", "triton", "transformers", "deepspeed", "bitsandbytes", "peft",
                      "numpy", "safetensors", "tokenizers")},
        "torch_cuda": torch.version.cuda or "none",
        "device": asdict(facts),
        "triton_usable": triton_usable,
        "triton_why": ("CUDA device" if dev.type == "cuda" else "TRITON_INTERPRET=1 (interpreter)" if triton_usable
                       else "no CUDA device: kernels run only on GPUs (or under TRITON_INTERPRET=1 in tests)")
                      if triton_available() else "triton is not installed",
        "bitsandbytes_backend": _bitsandbytes_backend(),
        "auto_precision": {"recipe_bf16": auto.name, "reason": auto.reason, "recipe_fp32": "fp32"},
        "auto_attention_backend": resolve_backend("auto", dev),
        "tf32_default": "off (--tf32 turns it on for CUDA fp32 runs)",
        "kernel_selfcheck": last_result(),
        "bench_choice": autochoice.last_record(),
    }


def format_report(report: dict) -> str:
    """Plain-text rendering of `environment_report`."""
    d = report["device"]
    lines = [f"deepmlf-fast {report['versions']['deepmlf-fast']}  python {report['python']}  {report['platform']}"]
    lines += [f"  {name:13s} {v}" for name, v in report["versions"].items() if name != "deepmlf-fast"]
    lines += [
        f"  torch CUDA    {report['torch_cuda']}",
        f"device          {d['device']} ({d['name']}), CPU capability {d['cpu_capability']}",
        f"native bf16     {'yes' if d['native_bf16'] else 'no'}: {d['why']}",
        f"triton usable   {'yes' if report['triton_usable'] else 'no'}: {report['triton_why']}",
        f"bitsandbytes    {report['bitsandbytes_backend']}",
        f"auto precision  {report['auto_precision']['recipe_bf16']} for bf16 recipes "
        f"({report['auto_precision']['reason']}); fp32 for fp32 recipes",
        f"auto attention  {report['auto_attention_backend']}",
        f"TF32            {report['tf32_default']}",
    ]
    check = report["kernel_selfcheck"]
    if check is None:
        lines.append("kernel check    none yet (the Triton kernels check themselves on a GPU's first use)")
    else:
        verdicts = ", ".join(f"{family} {'ok' if err is None else 'FAILED (' + err + ')'}"
                             for family, err in check["verdicts"].items())
        lines.append(f"kernel check    {check['time']}, {check['device']}: {verdicts}")
    choice = report["bench_choice"]
    if choice is None:
        lines.append("auto per site   no measurement yet (`deepmlf bench` on a GPU times the kernels against SDPA and "
                     "records what auto runs at each attention site)")
    else:
        sites = ", ".join(f"{site} {backend}" for site, backend in choice["choices"].items())
        lines.append(f"auto per site   {sites} (deepmlf bench {choice['time']}, {choice['device']})")
    return "\n".join(lines)
