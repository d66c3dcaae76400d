"""Backend choice shared by every op: Triton on CUDA, the PyTorch reference elsewhere."""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `config` reads BACKENDS: importing this module must not import torch (`deepmlf --help`)
    import torch

BACKENDS = ("auto", "triton", "reference")


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
"""Triton is an optional dependency; a constant (not a cached call) keeps torch.compile quiet."""


def triton_available() -> bool:
    """True when the `triton` package is installed."""
    return TRITON_INSTALLED


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through `TRITON_INTERPRET=1`."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_dtype(t: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype a Triton op runs its products in for an input on `t`'s device: autocast's when
    it is on there (custom ops are not autocast, so they cast themselves), else `default`."""
    import torch

    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else default


def resolve_backend(backend: str, where: torch.Tensor | torch.device | str, families: tuple[str, ...] = (),
                    site: str | None = None) -> str:
    """Map 'auto' | 'triton' | 'reference' to the backend that will run for tensors on `where`
    (a tensor, or a device: what a run records before it has tensors).

    'auto' picks Triton for CUDA tensors when Triton is installed, else the reference; at an
    attention `site` (`autochoice.SITES`) where `deepmlf bench` measured the reference (SDPA)
    faster on this device, the reference there.
    'triton' on CPU tensors is only valid under `TRITON_INTERPRET=1` (tests).
    `families`: the kernel families (`selfcheck.FAMILIES`) the op would launch; Triton then
    also needs each one's first-contact self-check on the device to pass (`selfcheck.gate`:
    'auto' falls back to the reference with a warning, 'triton' raises).
    """
    import torch

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, found {backend!r}")
    if backend == "reference":
        return "reference"
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if backend == "auto":
        if device.type != "cuda" or not triton_available():
            return "reference"
        if site is not None:
            from deepmlf_fast.ops.autochoice import measured_choice

            if measured_choice(site, device) == "reference":
                return "reference"
        return _checked(backend, device, families)
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package (pip install deepmlf-fast[triton])")
    if device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before deepmlf_kernels "
            "is imported; use backend='reference' or 'auto' on CPU"
        )
    return _checked(backend, device, families)


def _checked(backend: str, device: torch.device, families: tuple[str, ...]) -> str:
    """'triton', once every kernel family in `families` passed its self-check on `device`."""
    if not families:
        return "triton"
    from deepmlf_fast.ops.selfcheck import gate

    return gate(backend, families, device)
