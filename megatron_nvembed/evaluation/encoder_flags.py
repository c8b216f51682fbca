"""The encoder's command-line flags, defined once for every tool that embeds
(`tools/embed.py`, `tools/evaluate_mteb.py`, `tools/mine_hard_negatives.py`), and `FlagError`,
which the library's runs of those tools raise for a flag they cannot use.

Imports nothing heavy, so `--help` and flag errors stay instant.
"""

from __future__ import annotations

import argparse


class FlagError(Exception):
    """A flag (or a file it names) a tool's run cannot use; the message names the flag."""


def add_encoder_flags(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    """--batch-size (rows per call at most; its default is the tool's), --max-length,
    --max-tokens, --truncate-dim, --tensor-model-parallel-size."""
    p.add_argument(
        "--batch-size", type=int, default=batch_size, help="texts per forward call, at most"
    )
    p.add_argument("--max-length", type=int, default=512, help="tokens per text (BOS, EOS incl.)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="padded tokens per forward call (default: 1024 on CPU, 16384 on GPUs; "
        "0: no budget, --batch-size rows)",
    )
    p.add_argument(
        "--truncate-dim",
        type=int,
        default=None,
        help="keep the first N coordinates of each embedding, L2-normalised again (a width the "
        "model was trained at with --matryoshka-dims; default: all)",
    )
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP of a checkpoint model (resharded on load); the other formats run "
        "data-parallel only",
    )


def encoder_flag_error(args: argparse.Namespace) -> str | None:
    """The first bad encoder flag, as a message naming it; None when all are usable."""
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.max_length < 2:
        return f"--max-length must be >= 2 (BOS and EOS), got {args.max_length}"
    if args.max_tokens is not None and args.max_tokens < 0:
        return f"--max-tokens must be >= 0, got {args.max_tokens}"
    if args.truncate_dim is not None and args.truncate_dim < 1:
        return f"--truncate-dim must be >= 1, got {args.truncate_dim}"
    if args.tensor_model_parallel_size < 1:
        return f"--tensor-model-parallel-size must be >= 1, got {args.tensor_model_parallel_size}"
    return None


def check_encoder_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`p.error` (exit 2) naming the flag (`encoder_flag_error`), before anything is loaded."""
    problem = encoder_flag_error(args)
    if problem:
        p.error(problem)


def embedder_kwargs(args: argparse.Namespace) -> dict:
    """The flags as `evaluation.encoder.load_embedder` keywords."""
    return {
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "max_tokens": args.max_tokens,
        "truncate_dim": args.truncate_dim,
    }
