"""File-system helpers: the cache directory, atomic durable writes, and recovery.

Nothing deepmlf-fast writes is ever left half-written: files and directories are written
under a temporary name in the same folder, flushed to disk (fsync), and renamed into place;
the folder is fsynced so the rename itself survives a crash. A directory is replaced in two
renames (`path` -> `.path.old`, then the new one -> `path`); a process killed between them
leaves `.path.old` complete, and `recover_dir` puts it back on the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where built backbones and other reusable artefacts live.

    `$DEEPMLF_CACHE` if set, else `$XDG_CACHE_HOME/deepmlf_fast` or `~/.cache/deepmlf_fast`.
    """
    if os.environ.get("DEEPMLF_CACHE"):
        root = Path(os.environ["DEEPMLF_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepmlf_fast"
    root.mkdir(parents=True, exist_ok=True)
    return root


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a directory entry list, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; fsync it and rename it onto `path` on success.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; fsync its files and move it onto `path`
    on success. An existing `path` is replaced only once the new directory is complete and
    durable (see the module docstring for the two renames and `recover_dir`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        if path.exists():
            shutil.rmtree(_old(path), ignore_errors=True)
            os.replace(path, _old(path))
            fsync_path(path.parent)
            os.replace(tmp, path)
            fsync_path(path.parent)
            shutil.rmtree(_old(path), ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def build_once(path: str | os.PathLike, marker: str) -> Iterator[Path | None]:
    """Build the cache folder `path` once, whatever number of processes ask for it at once
    (parallel tests, a sweep's runs, the ranks of one launch).

    Yields None when `path/marker` exists, else a temporary folder to fill, which `atomic_dir`
    moves onto `path`. The check and the build happen under an exclusive `flock` on
    `.path.lock` beside it: a second process waits, then finds the folder built instead of
    building it again and replacing it under a reader. The kernel drops the lock of a process
    that dies, so a killed build blocks nobody; what it left (`recover_dir`) is cleared by the
    next build, which holds the lock and so knows that no other build is under way. On a file
    system without `flock` (some Lustre and FUSE mounts) it says so and builds unlocked."""
    path = Path(path)
    if (path / marker).exists():
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        locked = _lock(lock, path)
        if (path / marker).exists():
            yield None
            return
        if locked:  # unlocked, a temporary folder may be another build's, in progress
            recover_dir(path)
        with atomic_dir(path) as tmp:
            yield tmp


def _lock(lock, path: Path) -> bool:
    """Take an exclusive `flock` on the open file `lock`, saying when another process holds it;
    -> False where the file system has no `flock`."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("waiting for another process that is building %s", path)
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as e:
        log.warning("%s: no file lock on this file system (%s); building %s without one: processes that "
                    "start at once may each build it", lock.name, e.strerror, path)
        return False
    return True


def recover_dir(path: str | os.PathLike) -> str | None:
    """Repair what a killed `atomic_dir(path)` left: put back `.path.old` when `path` is
    missing, and remove leftover temporaries and old copies. Returns what was done, or None."""
    path = Path(path)
    done = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        done.append(f"removed the unfinished {tmp.name}")
    old = _old(path)
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed the replaced {old.name}")
        else:
            os.replace(old, path)
            fsync_path(path.parent)
            done.append(f"restored {path.name} from {old.name} (a replacement was interrupted)")
    return "; ".join(done) or None


def check_output(path: str | os.PathLike, what: str, error: type[Exception], *, directory: bool) -> Path:
    """Refuse, before any work, an output `path` that cannot be written: a directory output
    that is an existing file, a file output that is an existing directory, or a path under a
    file or under a folder this process may not write. `what` names the field in the one-line
    `error`. -> `Path(path)`."""
    path = Path(path)
    kind = "directory" if directory else "file"
    try:
        if path.exists() and path.is_dir() != directory:
            found = "directory" if path.is_dir() else "file"
            raise error(f"{what}: expected a {kind} path, found an existing {found} {str(path)!r}")
        # the folder a write would create entries in: the path itself (an existing directory) or
        # its nearest existing ancestor
        base = path if path.is_dir() else next(p for p in path.absolute().parents if p.exists())
    except OSError as e:  # a folder on the way that this process may not enter
        raise error(f"{what}: expected a writable location, found {str(path)!r} not accessible "
                    f"({e.strerror})") from None
    if not base.is_dir():
        raise error(f"{what}: expected a {kind} path under a directory, found the file {str(base)!r} on {str(path)!r}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise error(f"{what}: expected a writable location, found {str(base)!r} not writable for {str(path)!r}")
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_npz(path: str | os.PathLike, **arrays) -> None:
    """`np.savez(path, **arrays)` atomically (through a file object: given a name, np.savez
    appends ".npz" to the temporary one)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic JSON write (sorted keys, indented); NaN becomes null so the file stays valid JSON."""
    write_text_atomic(path, json.dumps(_nan_to_none(obj), indent=2, sort_keys=True) + "\n")


def _nan_to_none(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike, what: str, error: type[Exception]):
    """A JSON file's content; `error` (a DeepMLFError subclass) naming `what` and the file when
    it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} {str(path)!r} is damaged (not valid JSON: {e})") from None


@dataclass(frozen=True)
class KeyedRecords:
    """One JSON record per key under `cache_dir()/<name>/`, named by a hash of the key. Each
    record holds the key it was written for (field `device`: the stores are keyed by device,
    driver and versions) and when; a file whose key differs, or that does not parse, reads as
    no record."""

    name: str

    def path(self, key: str) -> Path:
        """The file of `key`'s record (whether or not it exists)."""
        return cache_dir() / self.name / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def read(self, key: str) -> dict | None:
        """The record stored for `key`, or None."""
        try:
            record = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("device") == key else None

    def write(self, key: str, **fields) -> Path:
        """Store `fields` for `key` (atomically, replacing any earlier record); returns the file."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"device": key, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **fields})
        return path

    def latest(self) -> dict | None:
        """The most recently written record that still parses, or None (`deepmlf env` shows it,
        and a bug report must not fail on a damaged cache file)."""
        folder = cache_dir() / self.name
        files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        for path in reversed(files):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                return record
        return None
