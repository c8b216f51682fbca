#!/usr/bin/env python3
"""Merge two or more checkpoints of one model into a new checkpoint.

  merge_checkpoints.py --load A B [C ...] --save OUT [--method linear] [--weights wA wB ...]
  merge_checkpoints.py --load A B --save OUT --method slerp [--slerp-t T] [--overwrite]

linear (default): OUT = sum_i w_i * theta_i per parameter tensor, the --weights (one per --load,
in the same order, each finite and >= 0; default equal) divided by their sum.
slerp: exactly two checkpoints; per parameter tensor, flattened, with Omega the angle between
A and B: OUT = sin((1-T) Omega)/sin Omega * A + sin(T Omega)/sin Omega * B, T in [0, 1]
(default 0.5; T = 0 gives A); linear interpolation (1-T) A + T B where A and B are colinear
(sin Omega < 1e-6) or either is all zeros.

The inputs may be saved at any TP/PP layout (each is loaded at TP = PP = 1 in this one process)
and must have the same model config apart from that layout, and the same LoRA adapters setting
(rank, alpha) if they hold any; LoRA adapters are merged factor by factor and kept (merge-lora
each input first to average full weights). OUT is a plain checkpoint: iteration 0, no optimizer
state, the first input's model config and tokenizer files; load it at any TP/PP or export it
with `tools/convert_checkpoint.py export-hf`.

OUT must be new or empty unless --overwrite (then replaced whole, swapped in once written); an
OUT that is an input, lies inside one or holds one is always refused. Every check runs before
any weight is read; a refusal is one `error:` line naming the flag or path, exit code 2.
See docs/conversion.md, "Merging checkpoints".
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--load",
        required=True,
        nargs="+",
        help="two or more checkpoint folders of the same model (any saved TP/PP layout)",
    )
    parser.add_argument(
        "--save",
        required=True,
        help="checkpoint folder to write: new or empty unless --overwrite; never a --load, "
        "inside one or around one",
    )
    parser.add_argument(
        "--method",
        default="linear",
        choices=["linear", "slerp"],
        help="linear: weighted average (default); slerp: spherical interpolation of 2 inputs",
    )
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        help="linear only: one weight per --load (finite, >= 0), divided by their sum; "
        "default equal",
    )
    parser.add_argument(
        "--slerp-t",
        type=float,
        default=None,
        help="slerp only: position t in [0, 1] between the first --load (t = 0) and the "
        "second (t = 1); default 0.5",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing non-empty --save whole (swapped in once the merge has "
        "succeeded); never allows writing over or inside an input",
    )
    return parser


def run_merge(args: argparse.Namespace) -> str:
    """Checks the merge before megatron-core is set up or any weight is read (the library
    repeats it), then merges in this process at TP = PP = 1; returns the summary line."""
    from megatron_nvembed.conversion.merge import check_merge, merge_checkpoints
    from megatron_nvembed.core.parallel import initialize_model_parallel

    options = dict(
        method=args.method,
        weights=args.weights,
        slerp_t=args.slerp_t,
        overwrite=args.overwrite,
    )
    check_merge(args.load, args.save, **options)
    initialize_model_parallel(1, 1)
    plan = merge_checkpoints(args.load, args.save, **options)
    how = (
        f"slerp, t={plan.slerp_t:g}"
        if plan.method == "slerp"
        else "linear, weights " + " ".join(f"{w:.6g}" for w in plan.weights)
    )
    return f"wrote {args.save} ({len(plan.loads)} checkpoints merged, {how})"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_nvembed.core.logging_utils import setup_logging

    setup_logging(note_kernels=True)
    from megatron_nvembed.utils.diskspace import DISK_FULL_EXIT, DiskFullError

    try:
        print(run_merge(args))
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DiskFullError as err:
        print(f"error: {err}", file=sys.stderr)
        return DISK_FULL_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
