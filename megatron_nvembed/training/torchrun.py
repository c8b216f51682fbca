"""torchrun, as `examples/pretrain_nvembed.sh` starts it, minus its failure report for bad input.

    python3 -m megatron_nvembed.training.torchrun [torchrun flags] pretrain_nvembed.py [flags]

Bad input found once training has started (a malformed record, a checkpoint that does not fit)
makes `pretrain_nvembed.py` exit with code 2, its message in the worker's torchrun error file
(`training/cli.py`). torchrun would then log the exit, stop the other workers, print a
ChildFailedError traceback with a failure table, and exit 1. Here, when the first worker to fail
exited with code 2, its message is printed as one "error: ..." line and the exit code is 2. Any
other failure is reported by torchrun as usual.
"""

from __future__ import annotations

import logging
import sys

BAD_INPUT = 2
"""The exit code of `pretrain_nvembed.py` for bad input (its message in the worker's error file)."""


class _BadInputChatter(logging.Filter):
    """Drops torchrun's line for a worker that exited with `BAD_INPUT` and its shutdown lines for
    the others (a real failure's report lists them anyway)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("failed (exitcode: %s)"):
            return not (record.args and record.args[0] == BAD_INPUT)
        return not msg.startswith("Sending process %s closing signal")


def main(argv: list[str] | None = None) -> int:
    """Runs torchrun with `argv` (its command line); returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_BadInputChatter())
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode != BAD_INPUT:
            raise
        if first.error_file_data.get("message"):  # written by training/cli.py's `_error`
            print(f"error: {first.message}", file=sys.stderr)
        return BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
