"""`pretrain_nvembed.py` main: parse flags, train, exit (0 done or preempted-and-saved, 2 bad
input, 3 a checkpoint save failed (disk full...; the previous checkpoint is intact), 1 aborted).

One rank speaks: messages come from global rank 0 (`setup_logging`); an error is said once
(`_error`). `--help` and `--check-args` import neither torch nor megatron-core
(`examples/pretrain_nvembed.sh` runs `--check-args` before torchrun, so a bad flag or a missing
input path is one message and exit code 2, never a launcher traceback).
"""

from __future__ import annotations

import os
import sys


def check_inputs(cfg) -> None:
    """The cheap part of the input checks, before any process group: every `--train-data` item
    and `--eval-data` folder, `--pretrained-checkpoint` and `--tokenizer` exist, the packages
    of the requested log sinks are installed, `--save` is a folder (or new), and `--load` exists
    unless it is `--save` (a job that resumes from its own `--save` starts at iteration 0 when
    nothing is saved yet, as in Megatron-LM; any other `--load` that does not exist is a typo).

    Raises:
        ValueError / FileNotFoundError naming the flag.
    """
    from megatron_nvembed.data.loading import local_spec_missing, parse_data_paths
    from megatron_nvembed.training.sinks import require_sink_packages

    require_sink_packages(cfg.logging)
    for _, spec in parse_data_paths(cfg.data.train_data):
        if local_spec_missing(spec):
            raise FileNotFoundError(f"--train-data: {spec} does not exist")
    ck = cfg.checkpoint
    for flag, paths in (
        ("--eval-data", cfg.evaluation.eval_data),
        ("--pretrained-checkpoint", [ck.pretrained_checkpoint] if ck.pretrained_checkpoint else []),
        ("--tokenizer", [cfg.data.tokenizer] if cfg.data.tokenizer else []),
    ):
        for path in paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{flag}: {path} does not exist")
    if ck.save and os.path.exists(ck.save) and not os.path.isdir(ck.save):
        raise ValueError(f"--save: {ck.save} is an existing file, not a checkpoint folder")
    if ck.load:
        same = ck.save and os.path.realpath(ck.load) == os.path.realpath(ck.save)
        if not same and not os.path.exists(ck.load):
            raise FileNotFoundError(
                f"--load: {ck.load} does not exist (only a --load equal to --save may be new: "
                "the run then starts at iteration 0)"
            )
        if os.path.exists(ck.load) and not os.path.isdir(ck.load):
            raise ValueError(f"--load: {ck.load} is a file, not a checkpoint folder")


def save_lock(cfg):
    """The lock of `--save` (`utils.locking.output_lock`), held by global rank 0 for the whole
    run and taken before the process group: a second job writing the same folder is refused
    in one line naming the holder before anything is built (under torchrun rank 0's error ends
    the others). Other ranks and a run without `--save` take nothing."""
    import contextlib

    from megatron_nvembed.utils.locking import rank0_output_lock

    if not cfg.checkpoint.save:
        return contextlib.nullcontext()
    return rank0_output_lock(cfg.checkpoint.save, "--save")


def _error(err: Exception, code: int = 2) -> int:
    """Bad input (exit code 2) or a failed save (3): the code and the message once. Under torchrun each worker writes it to its
    error file instead (`TORCHELASTIC_ERROR_FILE`), and `training/torchrun.py` prints the first
    failed worker's: whichever rank found the problem, and before torchrun stops the others."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json
        import time

        with open(error_file, "w") as f:
            json.dump({"message": str(err), "timestamp": int(time.time())}, f)
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {err}", file=sys.stderr)
    return code


class EarlyTerm:
    """The SIGTERM handler while a worker starts (imports, model build, checkpoint load): records
    the signal instead of dying; the training loop's handler (`guards.SigtermFlag`) takes it over,
    so the run saves and exits after its first iteration as on any SIGTERM."""

    def __init__(self):
        self.raised = False

    def __call__(self, signum, frame) -> None:
        self.raised = True


def main(argv=None) -> int:
    from megatron_nvembed.training.arguments import config_from_args, parser_for

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser_for(argv).parse_args(argv)
        cfg = config_from_args(args)
        if args.check_args:
            check_inputs(cfg)
            if cfg.checkpoint.save:
                from megatron_nvembed.utils.locking import check_unlocked

                check_unlocked(cfg.checkpoint.save, "--save")
            return 0
    except (ValueError, FileNotFoundError) as err:
        return _error(err)

    import signal

    signal.signal(signal.SIGTERM, EarlyTerm())
    from megatron_nvembed.core.logging_utils import setup_logging

    setup_logging(note_kernels=True)
    # Tokenizers' own thread pool would fight the training processes for cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from megatron_nvembed.checkpoint.store import CheckpointSaveError
    from megatron_nvembed.core.logging_utils import is_rank0
    from megatron_nvembed.training.trainer import train

    try:
        check_inputs(cfg)
        with save_lock(cfg):
            result = train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        return _error(err)
    except CheckpointSaveError as err:
        return _error(err, 3)
    finally:
        # Training is over (saved, or failed): a SIGTERM now (a time limit's signal just after
        # the last save) must not kill the exit, which it would once the interpreter resets its
        # handlers; torchrun then sees exit codes, not a worker killed by the signal.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        from megatron_nvembed.core.parallel import destroy_parallel

        destroy_parallel()
    if is_rank0():
        print(f"training finished at iteration {result.iteration} ({result.exit_reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
