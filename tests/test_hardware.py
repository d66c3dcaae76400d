"""The per-device precision policy: bf16 only where it is native, one warning when forced,
the choice recorded in config.json, and `deepmlf env`."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from deepmlf_fast import hardware
from deepmlf_fast.cli import main
from deepmlf_fast.hardware import DeviceFacts, cpu_native_bf16, eval_precision, resolve_precision

AVX2_CPU = DeviceFacts("cpu", "AMD EPYC (AVX2)", False, "no avx512_bf16", "AVX2")
BF16_CPU = DeviceFacts("cpu", "AMD EPYC (AVX-512)", True, "CPU has avx512_bf16", "AVX512")
H100 = DeviceFacts("cuda:0", "NVIDIA H100", True, "CUDA compute capability 9.0 >= 8.0", "AVX512")
V100 = DeviceFacts("cuda:0", "Tesla V100", False, "CUDA compute capability 7.0 < 8.0", "AVX2")


def test_cpu_bf16_needs_the_instruction_and_an_uncapped_torch():
    avx2_flags = {"avx", "avx2", "fma", "f16c"}
    assert cpu_native_bf16(avx2_flags, False, "AVX2")[0] is False
    assert cpu_native_bf16(avx2_flags | {"avx512f"}, True, "AVX512")[0] is False  # AVX-512 without BF16
    assert cpu_native_bf16(avx2_flags | {"avx512_bf16"}, True, "AVX512")[0] is True
    assert cpu_native_bf16(avx2_flags | {"amx_bf16"}, True, "AVX512")[0] is True
    # ONEDNN_MAX_CPU_ISA=AVX2 / ATEN_CPU_CAPABILITY=avx2 cap a bf16 CPU to AVX2 speed.
    native, why = cpu_native_bf16(avx2_flags | {"avx512_bf16"}, False, "AVX2")
    assert native is False and "capped" in why


@pytest.mark.parametrize("facts, want", [(AVX2_CPU, "fp32"), (V100, "fp32"), (BF16_CPU, "bf16"), (H100, "bf16")])
def test_auto_uses_bf16_only_where_it_is_native(facts, want):
    p = resolve_precision("auto", "bf16", facts)
    assert p.name == want and p.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[want]
    assert resolve_precision("auto", "fp32", facts).name == "fp32"  # fp32 recipes stay fp32 everywhere


def test_forced_bf16_runs_with_one_warning_where_it_is_slow(caplog):
    with caplog.at_level(logging.WARNING, logger="deepmlf_fast.hardware"):
        p = resolve_precision("bf16", "fp32", AVX2_CPU)
    assert p.name == "bf16" and p.autocast
    assert len(caplog.records) == 1 and "slower" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepmlf_fast.hardware"):
        assert resolve_precision("bf16", "fp32", H100).name == "bf16"
        assert resolve_precision("fp32", "bf16", H100).name == "fp32"
    assert not caplog.records


def test_official_bf16_evaluation_follows_the_same_rule():
    train = resolve_precision("auto", "fp32", AVX2_CPU)
    assert eval_precision(train, official_bf16_eval=True, facts=AVX2_CPU).name == "fp32"
    assert eval_precision(train, official_bf16_eval=True, facts=H100).name == "bf16"
    assert eval_precision(train, official_bf16_eval=False, facts=H100).name == "fp32"


def test_precision_is_recorded_in_config_json(tmp_path, monkeypatch):
    """The demo's recipe asks for bf16; on a CPU that is not native (mocked), auto picks fp32,
    loads the backbone in fp32, and config.json says what was chosen and why."""
    monkeypatch.setattr(hardware, "device_facts", lambda device: AVX2_CPU)
    from deepmlf_fast.data import make_synthetic

    data = make_synthetic(tmp_path / "mosi.pkl", "mosi", 16, 8, 8, seed=1)
    out = tmp_path / "run"
    assert main(["-q", "train", "--data", str(data), "--dataset", "mosi", "--backbone", "tiny-llama", "--epochs", "1",
                 "--no-pretrain", "--batch-size", "8", "--grad-accum", "1", "--output-dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["precision"] == "auto" and config["train"]["recipe_precision"] == "bf16"
    resolved = config["resolved"]
    assert resolved["precision"] == "fp32" and resolved["eval_precision"] == "fp32"
    assert "not native" in resolved["precision_reason"] and resolved["native_bf16"] is False
    assert resolved["device"] == "cpu" and resolved["attention_backend"] == "reference"


def test_env_reports_versions_and_what_auto_picks(capsys):
    assert main(["env", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("torch", "triton", "transformers", "deepspeed", "bitsandbytes", "peft"):
        assert name in report["versions"]
    facts = hardware.device_facts("cpu")
    assert report["device"]["native_bf16"] == facts.native_bf16
    assert report["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["auto_precision"]["recipe_bf16"] == ("bf16" if facts.native_bf16 else "fp32")
    assert report["auto_attention_backend"] == "reference" and report["bitsandbytes_backend"] in ("cpu", "not installed")
    assert main(["env", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "native bf16" in text and "auto precision" in text and "triton usable" in text
