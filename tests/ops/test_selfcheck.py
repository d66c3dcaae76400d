"""`ops.selfcheck`: the kernels' first-contact self-check and what a failure does to the backend
choice, on CPU through the interpreter, with a wrong kernel and a failing compile injected."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from deepmlf_fast.fileio import KeyedRecords
from deepmlf_fast.ops import dispatch, selfcheck
from deepmlf_fast.ops.attention import varlen_attention


@pytest.fixture
def fresh(monkeypatch, device):
    """No verdict of an earlier test: every check runs again."""
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setattr(selfcheck, "_warned", set())
    return torch.device(device)


def _wrong_attention(real):
    def wrong(q, k, v, *args, **kwargs):
        return real(q, k, v, *args, **kwargs) * 1.01  # 1% off: a subtle miscompile
    return wrong


def test_the_real_kernels_pass_and_the_verdict_is_kept_for_the_process(fresh, monkeypatch):
    assert selfcheck.run_checks(fresh) == {"attention": None, "gated_linear": None}
    calls = []
    monkeypatch.setattr(selfcheck, "run_checks", lambda d: calls.append(d) or {f: None for f in selfcheck.FAMILIES})
    assert dispatch.resolve_backend("triton", fresh, ("attention", "gated_linear")) == "triton"
    assert dispatch.resolve_backend("triton", fresh, ("attention",)) == "triton"
    assert len(calls) == 1  # first contact only
    # every op call asks: after the first, a lookup answers (the key reads package metadata)
    monkeypatch.setattr(selfcheck, "device_key", lambda d: pytest.fail("device_key on the hot path"))
    assert dispatch.resolve_backend("triton", fresh, ("attention", "gated_linear")) == "triton"


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast_bf16"])
def test_first_contact_in_evaluation_or_under_autocast_still_passes(fresh, mode, monkeypatch, tmp_path):
    """The first kernel call of a process is often an evaluation pass: the check must still
    take its gradients in its own dtypes (a verdict is kept for the process, and on disk on CUDA).
    On CPU the autocast case passes either way (the interpreted kernels are not autocast); it
    guards CUDA, where the GPU check runs this file."""
    monkeypatch.setenv("DEEPMLF_CACHE", str(tmp_path))  # no verdict stored by an earlier test (CUDA)
    contexts = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
                "autocast_bf16": torch.autocast(fresh.type, dtype=torch.bfloat16)}
    with contexts[mode]:
        assert dispatch.resolve_backend("triton", fresh, ("attention", "gated_linear")) == "triton"
    assert selfcheck.verdict("attention", fresh) is None and selfcheck.verdict("gated_linear", fresh) is None


def test_a_wrong_kernel_is_caught_and_auto_falls_back_with_one_warning(fresh, monkeypatch, caplog):
    import deepmlf_kernels.attention as attn

    monkeypatch.setattr(attn, "varlen_attention_triton", _wrong_attention(attn.varlen_attention_triton))
    verdicts = selfcheck.run_checks(fresh)
    assert verdicts["gated_linear"] is None
    assert verdicts["attention"].startswith("AssertionError: attention output differs from the float64 reference")
    monkeypatch.setattr(selfcheck, "_verdicts", {str(fresh): verdicts})
    with caplog.at_level(logging.WARNING, logger="deepmlf_fast.ops.selfcheck"):
        for _ in range(3):
            assert selfcheck.gate("auto", ("attention", "gated_linear"), fresh) == "reference"
        assert selfcheck.gate("auto", ("gated_linear",), fresh) == "triton"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "attention kernels failed" in warnings[0] and "relative error" in warnings[0]
    assert "Triton interpreter" in warnings[0]


def test_a_failing_compile_is_an_error_under_backend_triton(fresh, monkeypatch):
    import deepmlf_kernels.gated_linear as gl

    def broken(*args, **kwargs):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_120\nptxas fatal")

    monkeypatch.setattr(gl, "gated_linear", broken)
    with pytest.raises(RuntimeError, match=r"backend='triton': the gated_linear kernels failed their first-contact "
                                           r"self-check on cpu \(the Triton interpreter\): RuntimeError: PTX .version"):
        dispatch.resolve_backend("triton", fresh, ("gated_linear",))
    # The attention family is unaffected and keeps running its kernels.
    q = torch.randn(6, 2, 32)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    out = varlen_attention(q, q, q, cu, cu, 6, 6, backend="triton")
    assert out.shape == q.shape


def test_a_verdict_is_stored_per_device_and_read_back(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPMLF_CACHE", str(tmp_path))
    key = "NVIDIA H200 sm_90 | driver 12080 cuda 12.8 | torch 2.13.0 triton 3.6.0 deepmlf-fast 0.1.0"
    selfcheck._store(key, {"attention": "AssertionError: x", "gated_linear": None})
    assert selfcheck._cached(key) == {"attention": "AssertionError: x", "gated_linear": None}
    assert selfcheck._cached(key.replace("sm_90", "sm_89")) is None  # another device: checked again
    assert selfcheck.last_result()["device"] == key


def test_a_verdict_stored_by_other_kernel_or_check_code_is_not_used(tmp_path):
    """The key names the sources of the kernels and of their launchers and check: a verdict that
    older code stored (a kernel since fixed, or a check that judged sound kernels broken) is not
    read back by newer code with the same package version (an editable install)."""
    import deepmlf_kernels

    key = selfcheck.device_key(torch.device("cpu"))
    assert key.endswith(f"code {selfcheck.code_digest()}")
    real = [Path(deepmlf_kernels.__file__).parent, Path(selfcheck.__file__).parent]
    copies = [shutil.copytree(folder, tmp_path / str(i) / folder.name) for i, folder in enumerate(real)]
    assert selfcheck.sources_digest(copies) == selfcheck.code_digest()  # exactly these sources
    for edited in (copies[0] / "attention.py", copies[1] / "selfcheck.py"):
        original = edited.read_bytes()
        edited.write_bytes(original + b"\n")
        assert selfcheck.sources_digest(copies) != selfcheck.code_digest(), edited
        edited.write_bytes(original)


def test_keyed_records_read_only_their_own_key(monkeypatch, tmp_path):
    """The store both the self-check and `deepmlf bench`'s choice use: a record comes back only
    for the key it was written for (a file renamed onto another key's name, or damaged, reads as
    none), and `latest` is the last one written that still parses."""
    monkeypatch.setenv("DEEPMLF_CACHE", str(tmp_path))
    records = KeyedRecords("selfcheck")
    assert records.read("a") is None and records.latest() is None
    path_a = records.write("a", verdicts={"attention": None})
    assert records.read("a") == {"device": "a", "time": records.read("a")["time"], "verdicts": {"attention": None}}
    path_a.replace(records.path("b"))  # a's record under b's name
    assert records.read("b") is None and records.read("a") is None
    records.write("c", verdicts={})
    os.utime(records.path("b"), (0, 0))
    assert records.latest()["device"] == "c"
    records.path("c").write_text("{not json")
    assert records.read("c") is None
    assert records.latest()["device"] == "a"  # the damaged newest file is passed over


def test_the_driver_is_asked_once_per_process(monkeypatch):
    """Every verdict and `auto` lookup on CUDA builds the device key: the driver query (NVML, or
    an `nvidia-smi` process) must run once, not on every call."""
    import subprocess
    import sys
    from types import SimpleNamespace

    calls = []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: the nvidia-smi path
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or SimpleNamespace(stdout="555.42\n"))
    selfcheck.cuda_driver.cache_clear()
    try:
        assert selfcheck.cuda_driver() == selfcheck.cuda_driver() == "555.42"
        assert len(calls) == 1
    finally:
        selfcheck.cuda_driver.cache_clear()
