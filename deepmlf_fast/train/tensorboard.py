"""TensorBoard scalars of a training run, when the optional `tensorboard` package is installed.

`tensorboard_recorder(log_dir)` returns a `train.loop.Recorder` writing under `log_dir`
(`RUN_DIR/tb/seed_<s>/` in a run), or None without tensorboard — then nothing is imported
and no folder is created. Tags:

    step/<term>             running mean of each loss term (task, fusion, av, text, [clm], total)
    step/lr                 learning rate                              x axis: micro-batch step
    step/seconds_per_step, step/samples_per_s
    epoch/train/<term>      epoch mean of each loss term
    epoch/valid/<metric>    validation metrics (MMSA names, Loss, MAE_text/av/fusion)
    epoch/lr                learning rate at the end of the epoch      x axis: epoch (1-based)
    epoch/gates/block_<i>/attn, epoch/gates/block_<i>/ffn   gate values of MM block i
    epoch/seconds           the epoch's wall time
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path


class TensorBoardRecorder:
    """A `Recorder` writing TensorBoard event files; `close()` flushes them."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def step(self, step: int, losses: dict[str, float], lr: float, seconds_per_step: float,
             samples_per_s: float) -> None:
        """Running losses every `log_every` micro-batches (`train.loop.Recorder.step`)."""
        for name, value in {**losses, "lr": lr, "seconds_per_step": seconds_per_step,
                            "samples_per_s": samples_per_s}.items():
            self.writer.add_scalar(f"step/{name}", value, step)

    def epoch(self, entry: dict) -> None:
        """One epoch's history entry (`train.loop.fit`)."""
        e = entry["epoch"]
        for name, value in entry["train"].items():
            self.writer.add_scalar(f"epoch/train/{name}", value, e)
        for name, value in entry["valid"].items():
            if value is not None and math.isfinite(value):  # undefined metrics (NaN) are skipped
                self.writer.add_scalar(f"epoch/valid/{name}", value, e)
        for block, gates in entry["gates"].items():
            for half, value in gates.items():
                self.writer.add_scalar(f"epoch/gates/block_{block}/{half}", value, e)
        self.writer.add_scalar("epoch/lr", entry["lr"], e)
        self.writer.add_scalar("epoch/seconds", entry["seconds"], e)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    """True when the `tensorboard` package (which torch's SummaryWriter needs) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_recorder(log_dir: str | Path) -> TensorBoardRecorder | None:
    """A recorder writing under `log_dir`, or None when tensorboard is not installed."""
    return TensorBoardRecorder(log_dir) if tensorboard_available() else None
