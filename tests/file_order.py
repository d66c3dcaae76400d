"""Longest test file first under `pytest -n 2 --dist loadfile` (pytest hooks; `tests/conftest.py`
imports them, and `-p file_order` loads them where that conftest is not; not both at once).

pytest-xdist hands out whole files in order of their number of tests, so the few-test, long
files (the AOT compiles, the DeepSpeed and two-node launches, kill/resume, the learning check)
came last and one worker ran them while the other sat idle: on the 2-core AVX2-only EPYC the
workers finished 143 s apart. Handing out the longest files first (longest-processing-time
order) lets the short ones fill the gaps at the end. xdist gives each worker a second file at
the start, so the order is longest-first to within one file.

The per-file seconds come from measured runs: `pytest -n 2 --dist loadfile --file-seconds-out
tests/file_seconds.json` merges a run's files into the table. A file missing from it goes out
first (its length is unknown: a long one must not come last); files the table lists follow,
longest first.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from deepmlf_fast.fileio import write_text_atomic

TABLE = Path(__file__).with_name("file_seconds.json")
_SECONDS: dict[str, float] = {}  # file nodeid -> seconds of its tests' setup, call and teardown


def load_seconds(path: Path) -> dict[str, float]:
    """`{file nodeid: seconds}` of a recorded table, `{}` when there is none."""
    try:
        return {k: float(v) for k, v in json.loads(path.read_text())["seconds"].items()}
    except FileNotFoundError:
        return {}


def longest_first(workqueue: "OrderedDict[str, dict]", seconds: dict[str, float]) -> "OrderedDict[str, dict]":
    """`workqueue` (file nodeid -> its tests, in xdist's order) reordered: files missing from
    `seconds` first, in their given order, then the listed ones by recorded seconds, longest first."""
    return OrderedDict(sorted(workqueue.items(), key=lambda item: -seconds.get(item[0], float("inf"))))


def pytest_addoption(parser):
    """`--file-seconds-table` (the order's source) and `--file-seconds-out` (record a run)."""
    group = parser.getgroup("file order", "longest test file first under pytest-xdist --dist loadfile")
    group.addoption("--file-seconds-table", metavar="PATH", default=str(TABLE),
                    help="per-file seconds that order the files (default: tests/file_seconds.json)")
    group.addoption("--file-seconds-out", metavar="PATH", default=None,
                    help="merge each test file's seconds (setup + call + teardown) of this run into PATH; "
                         "needs pytest-xdist (-n), whose controller sees every file's reports")


def pytest_configure(config):
    """Refuse `--file-seconds-out` without xdist: a plain run reports each file's tests only to
    the conftests above it, so files outside `tests/` would be missed."""
    if hasattr(config, "workerinput"):  # a worker of an xdist run
        return
    if config.getoption("--file-seconds-out") and not config.getoption("numprocesses", None):
        raise pytest.UsageError("--file-seconds-out: expected a pytest-xdist run (-n N), got a single process")


def pytest_runtest_logreport(report):
    """Add a test phase's duration to its file's total."""
    path = report.nodeid.split("::")[0]
    _SECONDS[path] = _SECONDS.get(path, 0.0) + report.duration


def pytest_sessionfinish(session):
    """On the xdist controller, merge the run's per-file seconds into `--file-seconds-out`."""
    out = session.config.getoption("--file-seconds-out")
    if out and not hasattr(session.config, "workerinput"):
        seconds = {**load_seconds(Path(out)), **{k: round(v, 1) for k, v in _SECONDS.items()}}
        table = {"command": " ".join(["pytest"] + sys.argv[1:]),
                 "seconds": dict(sorted(seconds.items(), key=lambda kv: -kv[1]))}
        write_text_atomic(out, json.dumps(table, indent=1) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the longest files handed out first; other modes, and
    `--no-loadscope-reorder`, keep xdist's own order."""
    if config.getoption("dist") != "loadfile" or not config.getoption("loadscopereorder"):
        return None
    from xdist.scheduler import LoadFileScheduling

    seconds = load_seconds(Path(config.getoption("--file-seconds-table")))

    class LongestFileFirst(LoadFileScheduling):
        """xdist's file scheduling with its queue reordered once, when it is complete: just
        before the first file goes out (a crashed worker's files are re-queued at the end, as
        in xdist)."""

        def _assign_work_unit(self, node):
            if not getattr(self, "_ordered", False):
                self.workqueue = longest_first(self.workqueue, seconds)
                self._ordered = True
            super()._assign_work_unit(node)

    return LongestFileFirst(config, log)
