"""Optimisation engines: what happens between `loss` and the next optimiser step.

`Engine` is the interface the training loop (`loop.fit`, both stages) uses; `make_engine` is
the one factory. `PlainEngine` runs in one process; `deepmlf_fast.train.deepspeed_engine.DeepSpeedEngine`
offers the same interface on top of a DeepSpeed engine (stage 2 with `train.deepspeed`).
The loop only calls `backward`, `maybe_step`, `end_epoch`, `lr`, `state_dict`/`load_state_dict`,
`wrap` (the module to run forward passes through) and `model_state`/`load_model_state` (the
trained weights, which DeepSpeed may hold partitioned). How many optimiser steps an epoch makes
(`steps_per_epoch`) sizes the stage-2 LR schedule when the engine is made.

Accumulation and clipping follow the parity flags:
* corrected: the loss of each micro-batch is divided by the accumulation count (the
  gradient is a mean); a trailing partial accumulation at the end of an epoch is rescaled
  to the mean of the micro-batches it saw and stepped; clipping is by global L2 norm over
  every trained parameter, once per optimiser step;
* official: gradients of micro-batches are summed; a trailing partial accumulation is
  discarded; clipping is element-wise by value on the MM-side parameters only, once per
  step (stage 2), or on all parameters after every micro-batch (stage 1, `clip_every_micro`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal, Protocol

import torch

from deepmlf_fast.config import ParityFlags, RunConfig
from deepmlf_fast.errors import CheckpointError, TrainingError

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Stops training at the first optimiser step whose loss or gradient is not finite, naming
    the step, the loss term and the first parameter whose gradient is not finite; or skips up
    to `budget` such steps (`--skip-nonfinite N`), logged. Costs one device-to-host read per
    optimiser step (micro-batches only accumulate a device flag)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], budget: int):
        self.named_params = named_params
        self.budget = budget
        self.skipped = 0
        self._bad: dict[str, torch.Tensor] = {}

    def observe(self, parts: dict[str, torch.Tensor]) -> None:
        """Record one micro-batch's loss terms (device tensors; nothing is read back here)."""
        for name, value in parts.items():
            bad = ~torch.isfinite(value.detach())
            self._bad[name] = self._bad[name] | bad if name in self._bad else bad

    def reset(self) -> None:
        """Forget the micro-batches of a dropped accumulation."""
        self._bad = {}

    def check(self, step: int, check_grads: bool = True) -> bool:
        """True when the accumulated losses (and gradients) are finite; False when the step is
        to be skipped; raises TrainingError when the budget is spent."""
        terms, self._bad = self._bad, {}
        flags = list(terms.values())
        grads = [p.grad for _, p in self.named_params if p.grad is not None] if check_grads else []
        if grads:
            flags.append(~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if not flags or not bool(torch.stack(flags).any()):  # the one read per optimiser step
            return True
        bad_terms = [name for name, flag in terms.items() if bool(flag)]
        bad_param = next((n for n, p in self.named_params
                          if p.grad is not None and not bool(torch.isfinite(p.grad).all())), None)
        what = (f"loss term(s) {bad_terms}" if bad_terms else "no loss term") + (
            f"; first parameter with a non-finite gradient: {bad_param}" if bad_param else "")
        if self.skipped < self.budget:
            self.skipped += 1
            log.warning("optimiser step %d skipped (%d of --skip-nonfinite %d): non-finite %s", step + 1,
                        self.skipped, self.budget, what)
            return False
        raise TrainingError(
            f"non-finite values at optimiser step {step + 1}: {what}; expected finite losses and gradients "
            f"(lower the learning rate, check the data, or pass --skip-nonfinite N to skip up to N such steps)"
        )


class Engine(Protocol):
    """What the training loop needs from an optimisation engine."""

    def backward(self, loss: torch.Tensor, parts: dict[str, torch.Tensor] | None = None) -> None: ...
    def maybe_step(self) -> bool: ...
    def end_epoch(self) -> bool: ...
    @property
    def lr(self) -> float: ...
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def model_state(self, model) -> dict[str, torch.Tensor]: ...
    def load_model_state(self, model, state: dict[str, torch.Tensor]) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def steps_per_epoch(n_batches: int, accum: int, flags: ParityFlags) -> int:
    """Optimiser steps an epoch of `n_batches` micro-batches makes: the trailing partial
    accumulation is stepped (corrected) or dropped (official)."""
    accum = max(1, accum)
    return math.ceil(n_batches / accum) if flags.grad_accum == "mean" else n_batches // accum


def make_engine(stage: Literal["av", "deepmlf"], model: torch.nn.Module, cfg: RunConfig, n_batches: int,
                checkpoint_dir: str | Path | None = None) -> Engine:
    """The engine of a stage.

    * "av" (stage 1, the AV encoder alone): AdamW (the official trainer's default weight decay
      in parity 'official'), accumulation and value clipping after every micro-batch per the
      parity flags; no per-step schedule (stage 1 steps a ReduceLROnPlateau on `engine.optimizer`).
    * "deepmlf" (stage 2): AdamW over the four parameter groups with the warmup + cosine
      schedule; a `DeepSpeedEngine` (checkpoints in `checkpoint_dir`) when `train.deepspeed`
      is set, else a `PlainEngine` with accumulation and clipping per the parity flags.
    """
    from deepmlf_fast.train.optim import av_pretrain_optimizer, build_optimizer, mm_side_parameters, schedule_for

    flags = cfg.model.flags
    params = [p for p in model.parameters() if p.requires_grad]
    # DeepSpeed cannot skip a step it has reduced, so a non-finite step always stops it.
    budget = 0 if stage == "deepmlf" and cfg.train.deepspeed else cfg.train.skip_nonfinite
    guard = NonFiniteGuard([(n, p) for n, p in model.named_parameters() if p.requires_grad], budget)
    if stage == "av":
        pre = cfg.pretrain
        return PlainEngine(params, av_pretrain_optimizer(model, cfg), None, accum=pre.grad_accum,
                           clip=pre.grad_clip, flags=flags, clip_every_micro=True, guard=guard)
    if cfg.train.deepspeed:
        from deepmlf_fast.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, n_batches, Path(checkpoint_dir or cfg.train.output_dir), guard)
    optimizer = build_optimizer(model, cfg.optim, flags)
    scheduler = schedule_for(optimizer, cfg.optim, max(steps_per_epoch(n_batches, cfg.optim.grad_accum, flags), 1))
    return PlainEngine(params, optimizer, scheduler, accum=cfg.optim.grad_accum, clip=cfg.optim.grad_clip,
                       flags=flags, value_clip_params=mm_side_parameters(model), guard=guard)


class PlainEngine:
    """Single-process engine around a torch optimizer and LR scheduler."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler,
        *,
        accum: int,
        clip: float,
        flags: ParityFlags,
        value_clip_params: list[torch.nn.Parameter] | None = None,
        clip_every_micro: bool = False,
        guard: NonFiniteGuard | None = None,
    ):
        self.params = params
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.flags = flags
        self.accum = max(1, accum)
        self.clip = clip
        self.mean = flags.grad_accum == "mean"
        self.by_norm = flags.grad_clip == "norm_all"
        self.value_clip_params = value_clip_params if value_clip_params is not None else params
        self.clip_every_micro = clip_every_micro and not self.by_norm
        self.guard = guard
        self.micro = 0
        self.steps = 0

    def steps_per_epoch(self, n_batches: int) -> int:
        """Optimiser steps one epoch of `n_batches` micro-batches makes."""
        return steps_per_epoch(n_batches, self.accum, self.flags)

    def backward(self, loss: torch.Tensor, parts: dict[str, torch.Tensor] | None = None) -> None:
        """Accumulate the gradient of one micro-batch's loss (`parts`: its terms, watched by the guard)."""
        if self.guard is not None:
            self.guard.observe(dict(parts or {}, total=loss))
        (loss / self.accum if self.mean else loss).backward()
        self.micro += 1
        if self.clip_every_micro and self.clip > 0:
            torch.nn.utils.clip_grad_value_(self.value_clip_params, self.clip)

    def maybe_step(self) -> bool:
        """Step when `accum` micro-batches have accumulated; True if a step happened."""
        if self.micro < self.accum:
            return False
        self._step()
        return True

    def end_epoch(self) -> bool:
        """Handle a trailing partial accumulation (step on its mean, or drop it)."""
        if self.micro == 0:
            return False
        if not self.mean:
            self.optimizer.zero_grad(set_to_none=True)
            self.micro = 0
            if self.guard is not None:
                self.guard.reset()
            return False
        scale = self.accum / self.micro
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        self._step()
        return True

    def _step(self) -> None:
        if self.guard is not None and not self.guard.check(self.steps):
            self.optimizer.zero_grad(set_to_none=True)
            self.micro = 0
            return
        if self.clip > 0 and not self.clip_every_micro:
            if self.by_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            else:
                torch.nn.utils.clip_grad_value_(self.value_clip_params, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro = 0
        self.steps += 1

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loops call for forward passes: the model itself."""
        return model

    def model_state(self, model) -> dict[str, torch.Tensor]:
        """The model's trained weights (`DeepMLF.trained_state_dict`)."""
        return model.trained_state_dict()

    def load_model_state(self, model, state: dict[str, torch.Tensor]) -> None:
        model.load_trained_state_dict(state)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state:
            raise CheckpointError(
                "resume point: expected a single-process optimizer state, found a DeepSpeed checkpoint tag; "
                "resume with the run's --deepspeed config or start over with --overwrite"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]
