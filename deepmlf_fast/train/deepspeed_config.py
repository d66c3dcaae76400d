"""DeepSpeed JSON configs: fill the run-dependent values, refuse the ones that disagree.

The shipped configs (`configs/deepspeed/`) write "auto" wherever a value must agree with
the run; `resolve_deepspeed_config` fills those from the `RunConfig` and the world size:

    train_micro_batch_size_per_gpu   optim.batch_size (--batch-size is per GPU)
    gradient_accumulation_steps      optim.grad_accum
    train_batch_size                 micro batch x accumulation x world size
    gradient_clipping                optim.grad_clip (DeepSpeed's own default would be 1.0)
    torch_autocast.enabled           the run's resolved precision is bf16 (`deepmlf_fast.hardware`)
    torch_autocast.dtype             "bfloat16"
    optimizer.params lr / betas / eps / weight_decay   optim.lr_mm / betas / eps / weight_decay_mm

An explicit value that differs raises a `ConfigError` naming the key, the config's value
and the run's. A missing key is filled as if it said "auto".

Precision comes from the run's precision policy, so one config per ZeRO stage and offload
setting serves every recipe and device: bf16 means bf16 autocast over float32 trained
weights (the frozen backbone in bf16), in one process and under DeepSpeed alike;
DeepSpeed's name for that is `torch_autocast` (its engine would otherwise switch the
loop's autocast off inside forward). DeepSpeed's `bf16` mode
instead stores the trained weights, BatchNorm statistics and norms in bf16 with a float32
master copy; it is refused (`bf16.enabled` must be false or "auto"), as is `fp16`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from deepmlf_fast.config import RunConfig
from deepmlf_fast.errors import ConfigError
from deepmlf_fast.fileio import read_json

AUTO = "auto"
OPTIMIZER_TYPES = ("adam", "adamw")


def load_deepspeed_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON config, with clear errors for a missing or malformed file."""
    raw = read_json(path, "train.deepspeed: config file", ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"train.deepspeed: {str(path)!r} must hold a JSON object, found {type(raw).__name__}")
    return raw


def deepspeed_config_for(cfg: RunConfig, world_size: int) -> dict:
    """The resolved config of a run with `train.deepspeed` set (checked before anything loads;
    `config.validate_config` has refused parity 'official' with DeepSpeed)."""
    return resolve_deepspeed_config(load_deepspeed_config(cfg.train.deepspeed), cfg, world_size)


def resolve_deepspeed_config(raw: dict, cfg: RunConfig, world_size: int) -> dict:
    """A copy of `raw` with every run-dependent value filled from `cfg` and checked.

    Raises ConfigError for a disagreeing explicit value, fp16 (use bf16), a `scheduler`
    section (the run's warmup + cosine schedule is used), an optimizer other than
    Adam/AdamW, or CPU optimizer offload without an `optimizer` section.
    """
    out = copy.deepcopy(raw)
    o = cfg.optim
    micro, accum = o.batch_size, o.grad_accum
    _fill(out, ("train_micro_batch_size_per_gpu",), micro, "--batch-size, per GPU")
    _fill(out, ("gradient_accumulation_steps",), accum, "--grad-accum")
    _fill(out, ("train_batch_size",), micro * accum * world_size,
          f"micro batch {micro} x accumulation {accum} x world size {world_size}")
    _fill(out, ("gradient_clipping",), float(o.grad_clip), "optim.grad_clip")
    precision = cfg.resolved.precision
    if precision not in ("fp32", "bf16"):
        raise ValueError("resolve_deepspeed_config: the run's precision must be resolved first (hardware.resolve_precision)")
    bf16 = precision == "bf16"
    source = f"the run's precision {precision} ({cfg.resolved.precision_reason})"
    _fill(out, ("torch_autocast", "enabled"), bf16, source)
    if bf16:
        _fill(out, ("torch_autocast", "dtype"), "bfloat16", source)
    elif out["torch_autocast"].get("dtype") == AUTO:
        del out["torch_autocast"]["dtype"]  # autocast is off: no dtype to fill
    for mode in ("bf16", "fp16"):
        if out.get(mode, {}).get("enabled") not in (None, False, AUTO):
            raise ConfigError(
                f"DeepSpeed config {mode}.enabled: expected false or \"auto\", found {out[mode]['enabled']!r}; "
                f"mixed precision is --precision bf16 (autocast over float32 weights, DeepSpeed's torch_autocast, "
                f"filled in automatically), not {mode} weights"
            )
        out.setdefault(mode, {})["enabled"] = False
    if "scheduler" in out:
        raise ConfigError(
            "DeepSpeed config scheduler: expected no scheduler section (the run's warmup + cosine schedule, "
            f"optim.warmup_epochs / optim.cosine_epochs, is stepped by the engine), found {out['scheduler'].get('type')!r}"
        )
    if "optimizer" in out:
        _resolve_optimizer(out["optimizer"], cfg)
    zero = out.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config zero_optimization.stage: expected 0, 1, 2 or 3, found {stage!r}")
    if _offloads(zero, "offload_optimizer") and "optimizer" not in out:
        raise ConfigError(
            "DeepSpeed config optimizer: zero_optimization.offload_optimizer needs DeepSpeed's CPU Adam, expected an "
            '"optimizer": {"type": "AdamW", "params": {"lr": "auto", ...}} section (see configs/deepspeed/zero2_offload.json), '
            "found none"
        )
    return out


def stage_of(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _offloads(zero: dict, key: str) -> bool:
    return zero.get(key, {}).get("device", "none") not in ("none", None)


def _resolve_optimizer(opt: dict, cfg: RunConfig) -> None:
    kind = str(opt.get("type", "")).lower()
    if kind not in OPTIMIZER_TYPES:
        raise ConfigError(
            f"DeepSpeed config optimizer.type: expected Adam or AdamW (the recipe trains with AdamW), found {opt.get('type')!r}"
        )
    if kind == "adam" and opt.get("params", {}).get("adam_w_mode") is False:
        raise ConfigError("DeepSpeed config optimizer.params.adam_w_mode: expected true (AdamW), found false")
    o = cfg.optim
    # These are defaults only: each of the four parameter groups carries its own lr and weight decay.
    _fill(opt, ("params", "lr"), o.lr_mm, "optim.lr_mm", where="optimizer.")
    _fill(opt, ("params", "betas"), list(o.betas), "optim.betas", where="optimizer.")
    _fill(opt, ("params", "eps"), o.eps, "optim.eps", where="optimizer.")
    _fill(opt, ("params", "weight_decay"), o.weight_decay_mm, "optim.weight_decay_mm", where="optimizer.")


def _fill(d: dict, path: tuple[str, ...], value: Any, source: str, where: str = "") -> None:
    """Set `d[path]` to `value` when missing or "auto"; raise when it holds another value."""
    node = d
    for key in path[:-1]:
        node = node.setdefault(key, {})
    current = node.get(path[-1], AUTO)
    if current == AUTO:
        node[path[-1]] = value
    elif not _same(current, value):
        name = where + ".".join(path)
        raise ConfigError(
            f"DeepSpeed config {name}: the config says {current!r} but the run has {value!r} ({source}); "
            f'write "auto" there or change the run'
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
