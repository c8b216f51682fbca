#!/usr/bin/env python3
"""Positive-aware hard-negative mining (NV-Embed paper: keep candidates scoring below
0.95 x the positive's teacher score).

  mine_hard_negatives.py --input Q.jsonl --corpus C.jsonl --model MODEL --output OUT.jsonl
        [--num-negatives 7] [--margin 0.95] [--candidates 50] [--shard-size 100000]
        [--chunk-size 1024] [--instruction TEXT | --no-instruction]

MODEL: a sentence-transformers model (path or name) or an NV-Embed-format export of ours.
Input: training records (JSONL or Parquet; "neg" may be empty). Queries get --instruction, else
the record's "instruction", else its "task"'s template; so a record needs "task" or
"instruction" unless --instruction or --no-instruction is given.
Corpus lines: {"text": ...}. Output: the input records with "neg" filled. Rerunning with the same
arguments resumes an interrupted run.
"""

import argparse
import json
import sys
from dataclasses import asdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="training records (JSONL or Parquet)")
    p.add_argument("--corpus", required=True, help='JSONL, {"text": ...} per line')
    p.add_argument(
        "--model", required=True, help="teacher: sentence-transformers model or NV-Embed export"
    )
    p.add_argument("--output", required=True, help='records with "neg" filled (JSONL)')
    p.add_argument("--num-negatives", type=int, default=7, help="hard negatives per query")
    p.add_argument(
        "--margin",
        type=float,
        default=0.95,
        help="keep candidates scoring below this fraction of the positive's teacher score",
    )
    p.add_argument(
        "--candidates", type=int, default=50, help="retrieved per query before filtering"
    )
    p.add_argument("--shard-size", type=int, default=100_000, help="corpus texts per FAISS shard")
    p.add_argument("--chunk-size", type=int, default=1024, help="queries per resumable chunk")
    p.add_argument("--batch-size", type=int, default=64, help="texts per teacher forward call")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--instruction",
        help="one query instruction for all records (default: each record's own, else its "
        "task's; records then need no task)",
    )
    g.add_argument(
        "--no-instruction",
        action="store_true",
        help="encode queries without instruction (a teacher that takes none)",
    )
    p.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip (and count) malformed input lines instead of stopping",
    )
    p.add_argument("--stop-after-chunks", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from megatron_nvembed.logging_utils import setup_logging

    setup_logging()
    from megatron_nvembed.curation.mining import load_encoder, mine_hard_negatives

    try:
        summary = mine_hard_negatives(
            args.input,
            args.corpus,
            load_encoder(args.model, args.batch_size),
            args.output,
            num_negatives=args.num_negatives,
            margin=args.margin,
            candidates=args.candidates,
            shard_size=args.shard_size,
            chunk_size=args.chunk_size,
            instruction=args.instruction,
            use_instruction=not args.no_instruction,
            stop_after_chunks=args.stop_after_chunks,
            skip_bad_records=args.skip_bad_records,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    s = asdict(summary)
    s["queries_per_second"] = round(summary.queries / max(summary.seconds, 1e-9), 2)
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
