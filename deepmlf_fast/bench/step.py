"""The short whole-step comparison of `deepmlf bench`: one DeepMLF training step (forward, loss,
backward, AdamW) of a recipe, run by each attention backend on the same model and batch.

The batch has the recipe's batch size, transcripts of the fixed length draw
(`bench.shapes.text_lengths`) made of random token ids, and random AV features at the dataset's
unaligned lengths; nothing is read from disk but the backbone. Before timing, each backend's
loss on the untouched weights is compared with the reference's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from deepmlf_fast.bench.shapes import text_lengths
from deepmlf_fast.config import RunConfig
from deepmlf_fast.data.loader import Batch
from deepmlf_fast.data.packing import pack_padded
from deepmlf_fast.data.specs import dataset_spec
from deepmlf_fast.hardware import DTYPES
from deepmlf_fast.model.build import build_deepmlf
from deepmlf_fast.model.losses import deepmlf_loss
from deepmlf_fast.train.optim import adamw
from deepmlf_fast.train.step import StepContext, forward_step

LOSS_TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}
"""Largest relative difference of a backend's first loss from the reference's."""


@dataclass
class StepRow:
    """One backend's steps: median and spread of the per-step wall time (synchronised)."""

    backend: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    first_loss: float | None
    """Loss of the untouched model on the batch (None when the backend failed)."""
    note: str = ""


def make_batch(cfg: RunConfig, batch: int, vocab: int, seed: int = 0) -> Batch:
    """A packed batch of `batch` samples shaped like `cfg`'s dataset (see the module docstring)."""
    m, spec = cfg.model, dataset_spec(cfg.data.dataset)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([min(n, m.text.max_tokens) for n in text_lengths(batch)])
    ids = torch.randint(0, vocab, (batch, int(lengths.max())), generator=g)
    text_ids, layout = pack_padded(ids, lengths, m.fusion.n_tokens, m.text.max_tokens)
    return Batch(
        text_ids=text_ids, layout=layout,
        audio=torch.randn(batch, spec.audio_len_unaligned, m.av.audio_dim, generator=g),
        vision=torch.randn(batch, spec.vision_len_unaligned, m.av.vision_dim, generator=g),
        audio_lengths=None, vision_lengths=None,
        labels=torch.empty(batch).uniform_(spec.label_min, spec.label_max, generator=g), index=torch.arange(batch),
    )


def compare_steps(cfg: RunConfig, device: torch.device, backends: tuple[str, ...], precision: str, steps: int,
                  warmup: int = 3) -> list[StepRow]:
    """Time `steps` training steps of `cfg` per backend (after `warmup` untimed ones) on one
    model and batch; a backend whose first loss differs from the last backend's (the reference)
    by more than `LOSS_TOLERANCE` is reported WRONG, one that raises is reported failed: neither
    is timed."""
    torch.manual_seed(0)
    model, backbone = build_deepmlf(cfg.model, dtype=DTYPES[precision], device=device)
    batch = make_batch(cfg, min(cfg.optim.batch_size, 32), backbone.lm.config.vocab_size)
    ctx = StepContext(device, precision == "bf16", lambda out, y: deepmlf_loss(out, y, cfg.model.loss))
    model.eval()  # the comparison of first losses needs dropout off; timing runs in train mode
    first, failed = {}, {}
    with torch.no_grad():
        for backend in backends:
            model.set_backend(backend)
            try:
                first[backend] = float(forward_step(model, batch, ctx).loss)
            except Exception as exc:  # noqa: BLE001 - a backend that fails is reported, the others still run
                failed[backend] = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    model.train()
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    ref_loss = first.get(backends[-1])
    for backend in backends:
        if backend in failed:
            rows.append(StepRow(backend, None, None, None, None, failed[backend]))
            continue
        diff = 0.0 if ref_loss is None else abs(first[backend] - ref_loss) / max(abs(ref_loss), 1e-12)
        if diff > LOSS_TOLERANCE[precision]:
            rows.append(StepRow(backend, None, None, None, first[backend],
                                f"WRONG: first loss differs from the reference's by {diff:.1e} (relative); not timed"))
            continue
        model.set_backend(backend)
        times = []
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            forward_step(model, batch, ctx).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        q = lambda f: times[round(f * (len(times) - 1))]  # noqa: E731
        rows.append(StepRow(backend, q(0.5), q(0.2), q(0.8), first[backend]))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
