"""Longest test file first under `pytest -n 2 --dist loadfile` (pytest hooks; `tests/conftest.py`
imports them, and `-p file_order` loads them elsewhere).

pytest-xdist hands out whole files in order of their number of tests, so the few-test, long
files (the AOT compiles, the DeepSpeed and two-node launches, kill/resume, the learning check)
came last and one worker ran them while the other sat idle: on the 2-core AVX2-only EPYC the
workers finished 143 s apart. Handing out the longest files first (longest-processing-time
order) lets the short ones fill the gaps at the end.

The per-file seconds come from a measured run, recorded by
`pytest -n 2 --dist loadfile --file-seconds-out tests/file_seconds.json`; a file missing from
the table comes after every listed one, in xdist's own order.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

TABLE = Path(__file__).with_name("file_seconds.json")
_SECONDS: dict[str, float] = {}  # file nodeid -> seconds of its tests' setup, call and teardown


def load_seconds(path: Path) -> dict[str, float]:
    """`{file nodeid: seconds}` of a recorded run, `{}` when there is no table."""
    try:
        return {k: float(v) for k, v in json.loads(path.read_text())["seconds"].items()}
    except FileNotFoundError:
        return {}


def longest_first(workqueue: "OrderedDict[str, dict]", seconds: dict[str, float]) -> "OrderedDict[str, dict]":
    """`workqueue` (file nodeid -> its tests, in xdist's order) reordered by recorded seconds,
    longest first; unlisted files after the listed ones, in their given order (sort is stable)."""
    return OrderedDict(sorted(workqueue.items(), key=lambda item: -seconds.get(item[0], -1.0)))


def pytest_addoption(parser):
    group = parser.getgroup("file order", "longest test file first under pytest-xdist --dist loadfile")
    group.addoption("--file-seconds-table", metavar="PATH", default=str(TABLE),
                    help="per-file seconds that order the files (default: tests/file_seconds.json)")
    group.addoption("--file-seconds-out", metavar="PATH", default=None,
                    help="write each test file's seconds (setup + call + teardown) to PATH")


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _SECONDS[path] = _SECONDS.get(path, 0.0) + report.duration


def pytest_sessionfinish(session):
    out = session.config.getoption("--file-seconds-out")
    if out and not hasattr(session.config, "workerinput"):  # not a worker: the controller sees every report
        table = {"command": " ".join(["pytest"] + sys.argv[1:]),
                 "seconds": {k: round(v, 1) for k, v in sorted(_SECONDS.items(), key=lambda kv: -kv[1])}}
        Path(out).write_text(json.dumps(table, indent=1) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the longest files handed out first; other modes: xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    seconds = load_seconds(Path(config.getoption("--file-seconds-table")))

    class LongestFileFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            if not getattr(self, "_ordered", False):  # the queue is complete before the first unit goes out
                self.workqueue = longest_first(self.workqueue, seconds)
                self._ordered = True
            super()._assign_work_unit(node)

    return LongestFileFirst(config, log)
