"""`DeepSpeedEngine`: `PlainEngine`'s interface on top of `deepspeed.initialize`.

What DeepSpeed is given, and why:
* the module is DeepMLF with its frozen LM detached (`DeepMLF.detach_backbone`): ZeRO
  sees, partitions (stage 3) and all-gathers only the trained modules, while the frozen
  backbone, in any dtype including LLM.int8, which ZeRO-3 could not partition anyway, is
  replicated on every rank and never communicated;
* the optimizer is AdamW over the recipe's four parameter groups: torch's AdamW as the
  client optimizer when the config has no `optimizer` section (no JIT op build), or
  DeepSpeed's own (FusedAdam, or CPU Adam for optimizer offload) built by DeepSpeed from
  the same groups when it has one;
* the LR scheduler is the run's warmup + cosine schedule, stepped by the engine.

Gradient accumulation and clipping are DeepSpeed's. The accumulation boundary is set
explicitly before every backward so each epoch ends with a step on the mean of its
trailing partial accumulation, exactly like `PlainEngine` in corrected mode.

Resume points are DeepSpeed checkpoints (`save_checkpoint`/`load_checkpoint`, every rank
taking part) in `seed_dir/deepspeed/<tag>`, which `loop.fit`'s resume point names.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from deepmlf_fast.config import RunConfig
from deepmlf_fast.errors import CheckpointError
from deepmlf_fast.train import distributed
from deepmlf_fast.train.checkpoint import rng_state, set_rng_state
from deepmlf_fast.train.deepspeed_config import deepspeed_config_for, stage_of
from deepmlf_fast.train.optim import adamw, param_groups, schedule_for


class DeepSpeedEngine:
    """Engine around a DeepSpeed engine; `model` must be a DeepMLF and the process group up."""

    def __init__(self, model, cfg: RunConfig, n_batches: int, checkpoint_dir: str | Path, guard=None):
        import deepspeed

        self.guard = guard
        """Checks the loss terms at each accumulation boundary (gradients live in ZeRO's
        partitions, so they are not inspected, and a non-finite step always stops the run)."""
        self.config = deepspeed_config_for(cfg, distributed.world_size())
        self.stage = stage_of(self.config)
        self.accum = cfg.optim.grad_accum
        self.n_batches = n_batches
        self.checkpoint_dir = Path(checkpoint_dir)
        model.detach_backbone()
        if self.stage == 3:
            _mark_functional_reads(model)
        groups = param_groups(model, cfg.optim, cfg.model.flags)
        if "optimizer" in self.config:
            client, model_parameters = None, groups
        else:
            client = adamw(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
            model_parameters = None
        period = max(self.steps_per_epoch(n_batches), 1)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=client, model_parameters=model_parameters,
            lr_scheduler=lambda opt: schedule_for(opt, cfg.optim, period), config=self.config,
        )
        self.module = model
        self.micro = 0
        """Micro-batches seen in the current epoch."""
        self._boundary = False
        self._tags: list[str] = []

    def steps_per_epoch(self, n_batches: int) -> int:
        """Optimiser steps an epoch of `n_batches` micro-batches makes (sizes the LR schedule)."""
        return math.ceil(n_batches / self.accum)

    # -- the loop interface -----------------------------------------------------------------
    def wrap(self, model) -> torch.nn.Module:
        """DeepSpeed's engine: forward passes must go through it (ZeRO's backward hooks)."""
        return self.ds

    def backward(self, loss: torch.Tensor, parts: dict[str, torch.Tensor] | None = None) -> None:
        """Accumulate one micro-batch. Its loss is divided by the size of the accumulation
        group it belongs to (`accum`, or fewer for an epoch's trailing group), and the
        group's last micro-batch is marked as DeepSpeed's accumulation boundary."""
        if self.guard is not None:
            self.guard.observe(dict(parts or {}, total=loss))
        group_start = (self.micro // self.accum) * self.accum
        group_size = min(self.accum, self.n_batches - group_start)
        self._boundary = self.micro - group_start + 1 >= group_size
        self.ds.set_gradient_accumulation_boundary(self._boundary)
        self.ds.backward(loss / group_size, scale_wrt_gas=False)
        self.micro += 1

    def maybe_step(self) -> bool:
        """DeepSpeed's step: reduces, clips and updates at a boundary, else only counts."""
        if self._boundary and self.guard is not None:
            self.guard.check(self.ds.global_steps, check_grads=False)
        self.ds.step()
        return self._boundary

    def end_epoch(self) -> bool:
        """The trailing group was already stepped; make every rank's BatchNorm statistics equal."""
        distributed.average_buffers(self.module)
        self.micro = 0
        return False

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Write a DeepSpeed checkpoint (all ranks) and return what names it. Each rank also
        keeps its own RNG state there (dropout noise differs per rank). The previous tag is
        kept until the next save, so the resume point that names it stays valid until the
        new one is in place."""
        tag = f"step{self.ds.global_steps}"
        self.ds.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False)
        torch.save(rng_state(), self.checkpoint_dir / tag / f"rng_rank{distributed.rank()}.pt")
        distributed.barrier()
        self._tags = [t for t in self._tags if t != tag] + [tag]
        if distributed.is_main():
            for old in self._tags[:-2]:
                shutil.rmtree(self.checkpoint_dir / old, ignore_errors=True)
        self._tags = self._tags[-2:]
        return {"deepspeed_tag": tag, "steps": self.ds.global_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore module, optimizer, scheduler and this rank's RNG from the named checkpoint."""
        tag = state.get("deepspeed_tag")
        if tag is None:
            raise CheckpointError(
                "resume point: expected a DeepSpeed checkpoint tag (the run was started without --deepspeed); "
                "resume it without --deepspeed or start over with --overwrite"
            )
        path, _ = self.ds.load_checkpoint(str(self.checkpoint_dir), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed checkpoint {str(self.checkpoint_dir / tag)!r} could not be loaded")
        rng = self.checkpoint_dir / tag / f"rng_rank{distributed.rank()}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        self._tags = [tag]

    def model_state(self, model) -> dict[str, torch.Tensor]:
        """Trained weights on the CPU (ZeRO-3: gathered one module at a time; all ranks call).
        `model` (the DeepMLF or `wrap(model)`) is the module this engine was built around."""
        if self.stage < 3:
            return {k: v.detach().cpu() for k, v in self.module.trained_state_dict().items()}
        keep = set(self.module.trained_state_dict())
        return {k: v for k, v in _gathered_state(self.module).items() if k in keep}

    def load_model_state(self, model, state: dict[str, torch.Tensor]) -> None:
        """Load trained weights (ZeRO-3: into the partitions, one module at a time; all ranks call)."""
        if self.stage < 3:
            self.module.load_trained_state_dict(state)
            return
        import deepspeed

        self.module.check_trained_keys(state)
        for prefix, module in self.module.named_modules():
            prefix = f"{prefix}." if prefix else ""
            params = dict(module.named_parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
                for name, p in params.items():
                    if prefix + name in state:
                        p.copy_(state[prefix + name])
            for name, buf in module.named_buffers(recurse=False):
                if prefix + name in state:
                    buf.copy_(state[prefix + name])


def _gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of a ZeRO-3 module on the CPU, gathering one module's parameters at a time."""
    import deepspeed

    state = {}
    for prefix, sub in module.named_modules():
        prefix = f"{prefix}." if prefix else ""
        params = dict(sub.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(list(params.values())):
            state.update({prefix + n: p.detach().cpu().clone() for n, p in params.items()})
        state.update({prefix + n: b.detach().cpu().clone() for n, b in sub.named_buffers(recurse=False)})
    return state


def _mark_functional_reads(model) -> None:
    """Tell ZeRO-3 about parameters read outside their own module's forward, as the model
    declares them: ZeRO-3 gathers a module's parameters just before that module's forward,
    so a module that passes its children's weights to a fused function is a leaf (gathered
    and released as one), and a parameter read by another module is registered as that
    module's external parameter. Leaves need tensor outputs and inputs that require grad,
    which holds for the cross-attention layers but not for the heads (dict output)."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, model.zero3_leaf_modules())
    for module, param in model.functional_parameter_reads():
        deepspeed.zero.register_external_parameter(module, param)
