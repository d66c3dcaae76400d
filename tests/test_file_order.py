"""The longest test files go out first under `--dist loadfile` (`tests/file_order.py`), and the
recorded table names only test files that exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from file_order import TABLE, load_seconds, longest_first

REPO = Path(__file__).resolve().parents[1]

_TEST = """
import os, time
def test_{i}():
    with open(os.environ["ORDER_LOG"], "a") as f:
        f.write("{name} " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")
    time.sleep(0.3)
"""


def test_longest_first_puts_unlisted_files_first_in_their_order_then_the_listed_ones():
    queue = OrderedDict((name, {}) for name in ("a.py", "b.py", "c.py", "d.py", "e.py"))
    order = list(longest_first(queue, {"d.py": 5.0, "b.py": 9.0, "e.py": 0.0}))
    assert order == ["a.py", "c.py", "b.py", "d.py", "e.py"]


def test_the_table_lists_existing_test_files():
    seconds = load_seconds(TABLE)
    assert len(seconds) > 20
    missing = [name for name in seconds if not (REPO / name).is_file()]
    assert not missing, f"{TABLE.name} lists files that do not exist (re-record it): {missing}"


def test_xdist_hands_out_the_longest_recorded_files_first_and_records_seconds(tmp_path):
    pytest.importorskip("xdist")
    # xdist alone would start with many.py (3 tests) and some.py (2): the most tests first.
    counts = {"many.py": 3, "some.py": 2, "long.py": 1, "longer.py": 1}
    for name, n in counts.items():
        (tmp_path / f"test_{name}").write_text("".join(_TEST.format(i=i, name=name) for i in range(n)))
    table = tmp_path / "seconds.json"
    table.write_text(json.dumps({"seconds": {"test_longer.py": 50.0, "test_long.py": 20.0, "test_some.py": 2.0,
                                             "test_many.py": 1.0}}))
    log, out = tmp_path / "order.log", tmp_path / "recorded.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # also when run under xdist
    env.update(ORDER_LOG=str(log), PYTHONPATH=str(REPO / "tests"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "file_order", "-p", "no:cacheprovider", "-q", "-n", "2",
         "--dist", "loadfile", "--file-seconds-table", str(table), "--file-seconds-out", str(out), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    started = [line.split() for line in log.read_text().splitlines()]
    first_per_worker = {worker: name for name, worker in reversed(started)}
    assert sorted(first_per_worker.values()) == ["long.py", "longer.py"], started
    recorded = json.loads(out.read_text())["seconds"]
    assert set(recorded) == {f"test_{name}" for name in counts}
    assert all(recorded[f"test_{name}"] >= 0.3 * n for name, n in counts.items()), recorded


def test_recording_without_xdist_is_refused(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "file_order", "-p", "no:cacheprovider", "-q",
                           "--file-seconds-out", str(tmp_path / "out.json"), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--file-seconds-out: expected a pytest-xdist run (-n N)" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.json").exists()
