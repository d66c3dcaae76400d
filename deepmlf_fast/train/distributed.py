"""Process-group helpers for multi-process (DeepSpeed) training.

A run is distributed when `TrainConfig.deepspeed` is set. Then every rank trains on its
shard of the training split, evaluation gathers the ranks' predictions so metrics cover
the whole split (and are identical on every rank), and only rank 0 writes files. Without
a process group every helper here sees rank 0 of 1 and does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from deepmlf_fast.errors import ConfigError

# Stage 1 (AV-encoder pretraining) runs on rank 0 while the other ranks wait in a barrier;
# the default 30-minute collective timeout would cut a long stage 1 short.
TIMEOUT = timedelta(hours=3)


def init_process_group() -> None:
    """Join the process group DeepSpeed uses (idempotent).

    The launcher (`deepspeed`, `torchrun`) sets RANK, LOCAL_RANK, WORLD_SIZE and
    MASTER_ADDR/PORT; without them (a plain `python train.py --deepspeed ...`) this
    process becomes rank 0 of 1. The backend is DeepSpeed's accelerator's: NCCL on CUDA,
    gloo on CPU.
    """
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "LOCAL_RANK" not in os.environ:
        raise ConfigError(
            f"LOCAL_RANK: expected the launcher (deepspeed, torchrun) to set it next to WORLD_SIZE="
            f"{os.environ['WORLD_SIZE']}, found it unset; launch through one of them or pass --local_rank"
        )
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(timeout=TIMEOUT, verbose=False)
    if rank() > 0:  # one copy of the log is enough
        logging.getLogger("deepmlf_fast").setLevel(logging.WARNING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that writes files and logs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """End a distributed process cleanly: wait for every rank, then leave the group.
    (Exiting without it occasionally aborts gloo workers at interpreter exit.)"""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def from_main(value):
    """Rank 0's `value` on every rank: decisions that read the shared file system while
    rank 0 may be writing to it are taken once, by rank 0."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (building caches: tiny backbones, synthetic data),
    then the other ranks run it and find the cache complete."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def local_device(requested: str) -> torch.device:
    """This rank's device under DeepSpeed: its accelerator at LOCAL_RANK. `requested`
    (`TrainConfig.device`) must be 'auto' or name that device type."""
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    if requested not in ("auto", device.type, str(device)):
        raise ConfigError(
            f"train.device: DeepSpeed places rank {rank()} on {device}; expected 'auto' or {device.type!r}, "
            f"found {requested!r} (choose the accelerator with DS_ACCELERATOR=cpu|cuda)"
        )
    return device


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    Each rank updates its running statistics from its own shard; averaging them at the
    end of every epoch makes every rank evaluate and save the same model."""
    if world_size() == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world_size())


def average_values(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over ranks (every rank passes the same keys)."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def gather_predictions(p: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Merge every rank's `evaluate.predict` output into the whole split's.

    Rows are deduplicated (the sharded sampler pads ranks to equal length by repeating
    samples) and put in sample order, which is the order of an unsharded, unshuffled
    loader; `batch_l1` is recomputed over consecutive `batch_size` chunks of that order,
    so every metric equals the single-process value and is the same on all ranks.
    """
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, {k: v for k, v in p.items() if k != "batch_l1"})
    merged = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    _, first = np.unique(merged["index"], return_index=True)  # sorted by sample index
    merged = {k: v[first] for k, v in merged.items()}
    err = np.abs(merged["pred"] - merged["labels"])
    merged["batch_l1"] = np.array([err[i:i + batch_size].mean() for i in range(0, len(err), batch_size)])
    return merged
