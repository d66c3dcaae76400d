"""What `backend='auto'` runs at each attention site of a CUDA device, as measured there by
`deepmlf bench`.

At the recipes' lengths (tens of tokens) attention is latency-bound, and PyTorch's SDPA can beat
a FlashAttention-style kernel (flash-attention#591: below ~150-200 tokens). So the choice between
our Triton kernels and the PyTorch reference path (SDPA off the CPU, `attention.sdpa_core`) is
not assumed: `deepmlf bench` times both at each site on the user's device and records, per
device, driver, package versions and kernel sources (the self-check's `device_key`), which one
was faster over the recipes' shapes. `auto` then follows that record; without one it runs the
kernels (once their first-contact self-check passed). An explicit `--backend triton` or
`reference` always wins over the record.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deepmlf_fast.fileio import KeyedRecords
from deepmlf_fast.ops.selfcheck import device_key

SITES = ("self_attention", "cross_attention")
"""Where the attention ops run: the LM's self-attention over transcripts + fusion tokens
(`varlen_attention`), and the MM blocks' gated cross-attention (`gated_cross_attention`)."""

_RECORDS = KeyedRecords("autochoice")
_choices: dict[str, dict[str, str] | None] = {}  # str(device) -> {site: backend}, or None without a record


def measured_choice(site: str, device: torch.device) -> str | None:
    """'triton' or 'reference' as recorded by `deepmlf bench` for `site` on `device`, or None
    when no bench ran there with this driver and these versions (read from disk once per process)."""
    if str(device) not in _choices:
        record = _RECORDS.read(device_key(device))
        found = record.get("choices") if record else None
        _choices[str(device)] = found if isinstance(found, dict) else None
    found = _choices[str(device)]
    return None if found is None else found.get(site)


def record_choices(device: torch.device, choices: dict[str, str], evidence: dict[str, str]) -> Path:
    """Store `{site: 'triton' | 'reference'}` for `device` (this process follows it at once);
    `evidence` is a line per site saying what was measured. Returns the file."""
    for site, backend in choices.items():
        if site not in SITES or backend not in ("triton", "reference"):
            raise ValueError(f"choices: expected {{site in {SITES}: 'triton' | 'reference'}}, found {site!r}: "
                             f"{backend!r}")
    path = _RECORDS.write(device_key(device), choices=choices, evidence=evidence)
    _choices[str(device)] = dict(choices)
    return path


def last_record() -> dict | None:
    """The most recent stored choice (`{"device", "time", "choices", "evidence"}`), or None."""
    return _RECORDS.latest()
