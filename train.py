"""Training entry point for DeepSpeed and torchrun (and plain single-process runs).

    deepspeed --num_gpus 8 train.py --backbone llama-7b --dataset mosei --data mosei.pkl \
        --load-in-8bit --deepspeed configs/deepspeed/zero2.json
    torchrun --nproc_per_node 8 train.py --backbone llama-7b --dataset mosei --data mosei.pkl \
        --deepspeed configs/deepspeed/zero3.json
    python train.py --dataset mosei --data mosei.pkl          # one process, no DeepSpeed

It takes every `deepmlf train` argument, plus the `--local_rank` the deepspeed launcher
passes (ranks are read from the launcher's environment). See docs/distributed.md.
"""

import os
import sys


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("RANK", "0") != "0":
        os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars from rank 0 only (read at tqdm import)
    from deepmlf_fast.cli import ArgumentParser, _add_train_args, cmd_train, run

    parser = ArgumentParser(description="Train DeepMLF, optionally with DeepSpeed (--deepspeed CONFIG).")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher")
    _add_train_args(parser)
    parser.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
