"""`fileio`: processes that ask for the same cache folder at once build it once (`build_once`), a
build killed half-way blocks nothing and leaves nothing behind, and a file write that fails
half-way leaves the earlier file whole."""

from __future__ import annotations

import csv
import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepmlf_fast import fileio

BUILDER = """
import logging, os, sys, time
from pathlib import Path
from deepmlf_fast.fileio import build_once
logging.basicConfig(level=logging.INFO)
target, log, hold = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
with build_once(target, "done") as tmp:
    if tmp is not None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        (tmp / "part").write_text("half")
        time.sleep(hold)
        (tmp / "done").write_text("built")
print((target / "done").read_text())
"""


def _builder(target: Path, log: Path, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(target), str(log), str(hold)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _builds(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def test_processes_asking_at_once_build_the_folder_once(tmp_path):
    target, log = tmp_path / "cache" / "entry", tmp_path / "builds"
    procs = [_builder(target, log, 3.0) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["built"] * 3
    assert _builds(log) == 1
    assert sum("waiting for another process that is building" in err for _, err in outs) >= 1  # they overlapped
    assert sorted(p.name for p in target.parent.iterdir()) == [".entry.lock", "entry"]


def test_a_killed_build_blocks_nothing_and_the_next_one_clears_what_it_left(tmp_path):
    target, log = tmp_path / "cache" / "entry", tmp_path / "builds"
    killed = _builder(target, log, 600.0)
    deadline = time.time() + 60
    while _builds(log) == 0 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    _, err = killed.communicate(timeout=60)
    assert _builds(log) == 1, f"the build did not start: {err[-2000:]}"
    assert [p.name for p in target.parent.glob(".entry.*.tmp")]  # its half-built folder
    out, err = _builder(target, log, 0.0).communicate(timeout=120)
    assert out.strip() == "built", err[-2000:]
    assert _builds(log) == 2
    assert sorted(p.name for p in target.parent.iterdir()) == [".entry.lock", "entry"]
    assert sorted(p.name for p in target.iterdir()) == ["done", "part"]


def test_without_flock_the_folder_is_built_unlocked_and_it_says_so(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "flock", no_flock)
    (tmp_path / ".entry.other.tmp").mkdir()  # another build's folder, perhaps in progress
    with caplog.at_level("WARNING", logger="deepmlf_fast"), fileio.build_once(tmp_path / "entry", "done") as tmp:
        (tmp / "done").write_text("built")
    assert (tmp_path / "entry" / "done").read_text() == "built"
    assert (tmp_path / ".entry.other.tmp").is_dir()  # unlocked, nothing tells it is not in progress
    assert "no file lock on this file system (No locks available)" in caplog.text


def _half_then_fail(write_half):
    """A writer's stand-in that writes half a file where it was told to (`write_half(*args)`),
    then fails as a full disk or a kill would: only a temporary file may hold the half."""
    def writer(*args, **kwargs):
        write_half(*args)
        raise OSError(errno.ENOSPC, "No space left on device")
    return writer


@pytest.mark.parametrize("what", ["npz", "png", "bench csv"])
def test_a_write_that_fails_half_way_leaves_the_earlier_file_whole(tmp_path, monkeypatch, what):
    """The report's arrays and figures and `deepmlf bench`'s CSV replace the earlier file only
    once the new one is complete: a failure half-way leaves the old bytes and no temporary."""
    import numpy as np

    from deepmlf_fast.bench import command

    path = tmp_path / f"out.{what.split()[-1]}"
    path.write_bytes(b"the earlier, complete file")
    if what == "npz":
        monkeypatch.setattr(np, "savez", _half_then_fail(lambda file: file.write(b"PK half")))
        write = lambda: fileio.write_npz(path, a=np.zeros(3))  # noqa: E731
    elif what == "png":
        Figure = pytest.importorskip("matplotlib.figure").Figure  # the optional [report] extra
        from deepmlf_fast.report import plots

        monkeypatch.setattr(Figure, "savefig", _half_then_fail(lambda fig, name: Path(name).write_bytes(b"PNG half")))
        write = lambda: plots.save_png(Figure(), path)  # noqa: E731
    else:
        monkeypatch.setattr(csv.DictWriter, "writeheader", _half_then_fail(lambda w: w.writer.writerow(["half"])))
        write = lambda: command.write_csv(path, {}, 0.0, [])  # noqa: E731
    with pytest.raises(OSError, match="No space left"):
        write()
    assert path.read_bytes() == b"the earlier, complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_an_output_behind_a_folder_it_may_not_enter_is_refused_in_one_line(tmp_path, monkeypatch):
    """Path.exists raises on EACCES (a folder without search permission, as a non-root user
    meets it): the refusal names the field instead of leaking the OSError."""
    class Refused(Exception):
        pass

    def exists(self):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "exists", exists)
    with pytest.raises(Refused, match=r"--out: expected a writable location, found '.*x.csv' not accessible "
                                      r"\(Permission denied\)"):
        fileio.check_output(tmp_path / "locked" / "x.csv", "--out", Refused, directory=False)
