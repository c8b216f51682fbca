"""`pretrain_nvembed.py` main: parse flags, train, exit (0 done or preempted-and-saved, 2 bad
input, 1 aborted)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from megatron_nvembed.logging_utils import setup_logging
    from megatron_nvembed.training.arguments import parse_args

    setup_logging()
    import os

    # Tokenizers' own thread pool would fight the training processes for cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    # megatron-core logs every parameter name at INFO when it builds the DDP buffers.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    try:
        cfg = parse_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from megatron_nvembed.training.trainer import train

    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    print(f"training finished at iteration {result.iteration} ({result.exit_reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
