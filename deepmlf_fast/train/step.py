"""The one step function: device transfer, autocast, forward, loss.

Training (both stages), evaluation, `deepmlf predict` and the step benchmark all run a batch
through `forward_step`, so they move, cast and score it the same way. The loss function is
the stage's (`model.losses.deepmlf_loss` or `av_pretrain_loss`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from deepmlf_fast.data.loader import Batch

LossFn = Callable[[dict, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class StepContext:
    """How batches are run: on `device`, under bf16 autocast when `bf16`, scored by `loss`."""

    device: torch.device
    bf16: bool
    loss: LossFn


@dataclass
class StepResult:
    """One batch's forward: the model's outputs, the total loss and its detached parts, and
    the batch as it was moved to the device."""

    out: dict
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    batch: Batch


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the device's type, or a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def forward_step(model: torch.nn.Module, batch: Batch, ctx: StepContext) -> StepResult:
    """Move `batch` to the device (asynchronously from pinned memory), run the forward under the
    context's autocast, and score it. Gradients follow the caller's grad mode; nothing here
    reads a device tensor back."""
    batch = batch.to(ctx.device, non_blocking=True)
    with autocast(ctx.device, ctx.bf16):
        out = model(**batch.model_inputs())
    loss, parts = ctx.loss(out, batch.labels)
    return StepResult(out, loss, parts, batch)
