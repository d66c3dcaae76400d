"""`deepmlf train` that stops at a named moment and waits there to be killed, for
tests/train/test_kill_resume.py: `python kill_worker.py POINT MARKER TRAIN_ARGS...` runs the run
`deepmlf train TRAIN_ARGS...` would (same configuration, same logging); when it reaches POINT it
writes its pid to the file MARKER and sleeps. The points, both installed from here:

    stage<S>-epoch<E>-batch<B>  after micro-batch B of epoch E of stage S, through `train_run`'s
                                `on_batch` callbacks
    replace-<parent>/<name>     inside a checkpoint write: between the two renames with which
                                `fileio.atomic_dir` replaces the folder <parent>/<name> (its old
                                copy waits as `.<name>.old`), by wrapping `os.replace`
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path


def wait_to_be_killed(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def pause_at_batch(point: str, marker: Path):
    """An `on_batch` callback that waits at `stage<S>-epoch<E>-batch<B>`."""
    def callback(stage: int, epoch: int, batch: int) -> None:
        if f"stage{stage}-epoch{epoch}-batch{batch}" == point:
            wait_to_be_killed(marker)
    return callback


def pause_between_renames(point: str, marker: Path) -> None:
    """Make this process's `os.replace` wait before it moves a new copy onto `replace-<parent>/<name>`
    while the old copy is set aside (the second rename of `fileio.atomic_dir`)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        dst = Path(dst)
        if f"replace-{dst.parent.name}/{dst.name}" == point and dst.with_name(f".{dst.name}.old").exists():
            wait_to_be_killed(marker)
        return real(src, dst, *args, **kwargs)

    os.replace = replace


def main(point: str, marker: str, train_args: list[str]) -> int:
    from deepmlf_fast.cli import build_parser, run_config_from_args, setup_logging
    from deepmlf_fast.train.run import train_run

    args = build_parser().parse_args(["train", *train_args])
    setup_logging(args.quiet)
    on_batch = []
    if re.fullmatch(r"stage\d+-epoch\d+-batch\d+", point):
        on_batch.append(pause_at_batch(point, Path(marker)))
    elif point.startswith("replace-"):
        pause_between_renames(point, Path(marker))
    else:
        raise SystemExit(f"unknown pause point {point!r}")
    train_run(run_config_from_args(args), resume=args.resume, overwrite=args.overwrite, on_batch=on_batch)
    print(f"the run finished without reaching {point}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
