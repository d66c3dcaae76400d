"""AdamW parameter groups and the warmup + cosine schedule (reference §2.5-2.6), and stage 1's
optimizer (§2.8).

Groups: {MM side, AV side} x {decay, no decay}. The MM side holds everything trained
outside the AV encoder (MM blocks, fusion tokens, heads, AV LayerNorm). Which parameters
skip weight decay is a parity flag: the corrected default exempts biases, norm weights
(LayerNorm / RMSNorm / BatchNorm), gates and fusion tokens; the official code exempts only
parameters whose name contains "bias".
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from deepmlf_fast.config import OptimConfig, ParityFlags, RunConfig
from deepmlf_fast.layers import FusionTokens, Gate

NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d)
NO_DECAY_TYPES = NORM_TYPES + (Gate, FusionTokens)
"""Modules whose own parameters the corrected rule exempts from weight decay."""
AV_PREFIX = "av_encoder."


def mm_side_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trained parameters outside the AV encoder: the side the official code value-clips."""
    return [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(AV_PREFIX)]


def no_decay_names(model: nn.Module, flags: ParityFlags) -> set[str]:
    """Names of trainable parameters that get no weight decay under `flags`."""
    if flags.weight_decay == "exempt_biases_only":
        return {n for n, p in model.named_parameters() if p.requires_grad and "bias" in n}
    names = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    for mod_name, module in model.named_modules():
        if isinstance(module, NO_DECAY_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            names |= {prefix + n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    return names


def param_groups(model: nn.Module, cfg: OptimConfig, flags: ParityFlags) -> list[dict]:
    """The four AdamW groups; each carries a `name` ('mm_decay', 'mm_no_decay', 'av_decay', 'av_no_decay')."""
    exempt = no_decay_names(model, flags)
    groups = {k: [] for k in ("mm_decay", "mm_no_decay", "av_decay", "av_no_decay")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        side = "av" if name.startswith(AV_PREFIX) else "mm"
        groups[f"{side}_{'no_decay' if name in exempt else 'decay'}"].append(p)
    spec = {
        "mm_decay": (cfg.lr_mm, cfg.weight_decay_mm), "mm_no_decay": (cfg.lr_mm, 0.0),
        "av_decay": (cfg.lr_av, cfg.weight_decay_av), "av_no_decay": (cfg.lr_av, 0.0),
    }
    return [
        {"name": k, "params": v, "lr": spec[k][0], "weight_decay": spec[k][1]}
        for k, v in groups.items() if v
    ]


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **kwargs)` with the fused kernel wherever torch has one (CPU
    and CUDA floating-point parameters): one pass over all parameters instead of a dozen
    element-wise ops per tensor (measured: 29 ms against 170 ms per step for GPT-2's 42M trained
    parameters on a 2-core EPYC). Same update rule, same state layout; roundings may differ
    from the for-each kernel in the last bit."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def build_optimizer(model: nn.Module, cfg: OptimConfig, flags: ParityFlags) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the recipe's betas and eps."""
    return adamw(param_groups(model, cfg, flags), betas=tuple(cfg.betas), eps=cfg.eps)


def av_pretrain_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """Stage 1's AdamW: the configured weight decay with the corrected exemptions, or (parity
    'official') AdamW's default 0.01 on everything, which the official stage-1 trainer uses
    because it never passes its configured weight decay."""
    flags, pre = cfg.model.flags, cfg.pretrain
    if flags.weight_decay == "exempt_biases_only":
        return adamw(model.parameters(), lr=pre.lr, betas=tuple(cfg.optim.betas))
    exempt = no_decay_names(model, flags)
    params = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in params if n not in exempt], "weight_decay": pre.weight_decay},
        {"params": [p for n, p in params if n in exempt], "weight_decay": 0.0},
    ]
    return adamw([g for g in groups if g["params"]], lr=pre.lr, betas=tuple(cfg.optim.betas))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, period: int, eta_min: float):
    """LambdaLR reproducing the official SequentialLR(LinearWarmup, CosineAnnealingWarmRestarts):
    step s < W: lr = base * s / W (the first step uses lr 0); afterwards cosine from base to
    `eta_min` over `period` steps, restarting every period."""
    period = max(period, 1)

    def factor(base: float):
        floor = min(eta_min / base, 1.0) if base > 0 else 0.0

        def f(step: int) -> float:
            if step < warmup_steps:
                return step / warmup_steps
            t = (step - warmup_steps) % period
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t / period))

        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])


def schedule_for(optimizer, cfg: OptimConfig, steps_per_epoch: int):
    """The stage-2 schedule: warmup for `warmup_epochs`, then cosine with the official period
    `(cosine_epochs + 1) * steps_per_epoch - warmup_steps`."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    period = (cfg.cosine_epochs + 1) * steps_per_epoch - warmup
    return warmup_cosine(optimizer, warmup, period, cfg.eta_min)
