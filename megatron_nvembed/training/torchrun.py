"""torchrun, as `examples/pretrain_nvembed.sh` starts it, with two outcomes reported plainly.

    python3 -m megatron_nvembed.training.torchrun [torchrun flags] pretrain_nvembed.py [flags]

- Bad input or a failed save found once training has started (a malformed record, a checkpoint
  that does not fit, a full disk) makes `pretrain_nvembed.py` exit with a code of
  `training/cli.py` (2 bad input, 3 save failed), its message in the worker's torchrun error
  file. torchrun would then stop the other workers, print a ChildFailedError traceback with a
  failure table, and exit 1. Here, when the first worker to fail exited with such a code, its
  message is printed as one "error: ..." line and that code is the exit code. Any other failure
  is reported by torchrun as usual.
- Preemption: SIGTERM (or SIGINT, SIGHUP) to torchrun is forwarded to every worker's process
  group; each worker saves a checkpoint at the end of its iteration and exits 0. torchrun itself
  would then re-raise the signal as a traceback and exit 1. Here, when every worker exited 0,
  the exit code is 0 and one line says so; otherwise it is 128 + the signal number. torchrun
  waits `--shutdown-timeout` seconds (default: `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, 30) before it
  kills the workers: the save must fit in that time (`pretrain_nvembed.sh` sets 240 s).
  With `NVEMBED_SIGNAL_EXIT` set (`examples/slurm_train.sh` sets 75), that code replaces the 0,
  so a batch script can tell "stopped on a signal, saved: run again to resume" from "finished".
  A signal that lands before any worker started (this process still starting) ends it with
  that code too: nothing ran, nothing is lost.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

BAD_INPUT = 2
"""The exit code of `pretrain_nvembed.py` for bad input (its message in the worker's error file)."""
SAVE_FAILED = 3
"""The exit code of `pretrain_nvembed.py` for a checkpoint save that failed (message likewise)."""
NAMED_FAILURES = (BAD_INPUT, SAVE_FAILED)


class _NamedFailureChatter(logging.Filter):
    """Drops torchrun's line for a worker that exited with a named failure and its shutdown lines
    for the others (a real failure's report lists them anyway)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("failed (exitcode: %s)"):
            return not (record.args and record.args[0] in NAMED_FAILURES)
        return not msg.startswith("Sending process %s closing signal")


def _record_worker_exits(codes: list[int | None]):
    """Wraps torchrun's worker shutdown so the workers' exit codes are known after a signal."""
    from torch.distributed.elastic.multiprocessing import api

    close = api.SubprocessContext._close

    def recording_close(self, *args, **kwargs):
        try:
            return close(self, *args, **kwargs)
        finally:
            codes[:] = [h.proc.poll() for h in self.subprocess_handlers.values()]

    api.SubprocessContext._close = recording_close


def signal_exit_code() -> int:
    """The exit code after a signal stopped training with nothing lost (`NVEMBED_SIGNAL_EXIT`,
    default 0).

    Raises:
        ValueError: when `NVEMBED_SIGNAL_EXIT` is not an integer in 0..255.
    """
    value = os.environ.get("NVEMBED_SIGNAL_EXIT", "0")
    if not value.isdigit() or int(value) > 255:
        raise ValueError(f"NVEMBED_SIGNAL_EXIT must be an exit code 0..255, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    """Runs torchrun with `argv` (its command line); returns the exit code."""
    stopped_code = signal_exit_code()
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        _NamedFailureChatter()
    )
    args = parse_args(sys.argv[1:] if argv is None else argv)
    exits: list[int | None] = []
    _record_worker_exits(exits)
    if early:  # torchrun installs its own handlers when it starts the workers
        print(
            f"{signal.Signals(early[0]).name} before any worker started: nothing to save",
            file=sys.stderr,
        )
        return stopped_code
    try:
        run(args)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode not in NAMED_FAILURES:
            raise
        if first.error_file_data.get("message"):  # written by training/cli.py's `_error`
            print(f"error: {first.message}", file=sys.stderr)
        return first.exitcode
    except SignalException as err:
        if not exits:
            print(f"{err.sigval.name} before any worker started: nothing to save", file=sys.stderr)
            return stopped_code
        if all(code == 0 for code in exits):
            print(
                f"{err.sigval.name}: all {len(exits)} worker(s) of this node exited 0 "
                "(with --save, after saving a checkpoint)",
                file=sys.stderr,
            )
            return stopped_code
        print(
            f"{err.sigval.name}: worker exit codes {exits} (a negative code is the signal that "
            "ended it)",
            file=sys.stderr,
        )
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
