"""Fixtures shared by every test folder.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on
before any kernel module is imported; doing it here, first, makes that independent of the
order in which test folders are collected.
"""

from __future__ import annotations

import os

import pytest
import torch

from file_order import (  # noqa: F401  (hooks: longest test file first under xdist)
    pytest_addoption,
    pytest_configure,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_xdist_make_scheduler,
)

TORCH_THREADS = torch.get_num_threads()  # torch's own choice, what a `deepmlf` command runs with

# Under pytest-xdist the workers share the machine's cores: each, and every process it starts
# (OMP_NUM_THREADS is inherited), takes its share instead of all of them, which would
# oversubscribe the cores and stall OpenMP's spinning threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = max(1, TORCH_THREADS // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(share)
    torch.set_num_threads(share)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def torch_threads() -> int:
    """The thread count torch picks for a `deepmlf` command on this machine (pytest-xdist
    workers run with their share of it)."""
    return TORCH_THREADS


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def backbone(request) -> str:
    """Both backbone families (GPT-2 and Llama with grouped-query attention)."""
    return request.param
