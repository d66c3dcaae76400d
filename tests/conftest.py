"""Fixtures shared by every test folder.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on
before any kernel module is imported; doing it here, first, makes that independent of the
order in which test folders are collected.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def backbone(request) -> str:
    """Both backbone families (GPT-2 and Llama with grouped-query attention)."""
    return request.param
