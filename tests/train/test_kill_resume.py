"""A run killed at any moment loses nothing: `deepmlf train` as a subprocess, SIGKILLed in stage 1,
mid-epoch in stage 2 and inside a checkpoint write (between the two renames that replace a resume
point), then the same command again, ends with the same `results.json` bytes and best weights as an
uninterrupted run. Two uninterrupted runs are byte-identical too (reproducibility).

The killed runs are `kill_worker.py`'s: the same run as `deepmlf train`, which writes a marker file
when it reaches the named point and waits there to be killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepmlf_fast.data import make_synthetic

pytestmark = pytest.mark.slow
DEEPMLF = str(Path(sys.executable).parent / "deepmlf")
KILL_WORKER = str(Path(__file__).with_name("kill_worker.py"))


def _train_args(data: Path, out: Path) -> list[str]:
    return ["--data", str(data), "--dataset", "mosi", "--backbone", "tiny-gpt2", "--epochs", "3",
            "--pretrain-epochs", "2", "--seeds", "7", "--batch-size", "8", "--grad-accum", "1", "--set",
            "pretrain.batch_size=8", "--output-dir", str(out)]


def _run(data: Path, out: Path) -> str:
    # --no-report: the report is written after results.json and the weights these tests compare
    proc = subprocess.run([DEEPMLF, "train", *_train_args(data, out), "--no-report"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _kill_at(data: Path, out: Path, point: str, tmp: Path) -> None:
    marker = tmp / f"paused-{point.replace('/', '_')}"
    proc = subprocess.Popen([sys.executable, KILL_WORKER, point, str(marker), *_train_args(data, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before reaching {point}: {proc.stderr.read()[-2000:]}")
        assert time.time() < deadline, f"{point} not reached in 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    data = make_synthetic(tmp / "mosi.pkl", "mosi", 32, 16, 16, seed=2)
    _run(data, tmp / "straight")
    return data, tmp


def _artifacts(out: Path) -> tuple[bytes, bytes]:
    return (out / "results.json").read_bytes(), (out / "seed_7" / "best.safetensors").read_bytes()


def test_the_same_command_twice_gives_identical_results(runs):
    data, tmp = runs
    _run(data, tmp / "again")
    assert _artifacts(tmp / "again") == _artifacts(tmp / "straight")


@pytest.mark.parametrize("point, resumed", [
    ("stage1-epoch2-batch2", "resuming stage 1 from"),
    ("stage2-epoch2-batch3", "resuming stage 2 from"),
    ("replace-seed_7/last", "restored last from .last.old"),
])
def test_killed_run_resumes_to_the_same_result(runs, point, resumed):
    data, tmp = runs
    out = tmp / f"killed-{point.replace('/', '_')}"
    _kill_at(data, out, point, tmp)
    assert not (out / "results.json").exists()
    log = _run(data, out)
    assert resumed in log, log[-3000:]
    assert "seed 7" in log and "stage 1 done" in (out / "train.log").read_text()
    assert _artifacts(out) == _artifacts(tmp / "straight")
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(".*.old"))  # nothing left behind
