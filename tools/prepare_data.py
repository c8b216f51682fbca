#!/usr/bin/env python3
"""Build training records from non-retrieval datasets (NV-Embed paper, section 4.2).

  prepare_data.py classification --input F --output OUT.jsonl --task NAME
        [--text-column text] [--label-column label] [--label-text-column label_text]
        [--positive label|example] [--num-negatives 7] [--max-samples N] [--seed 0]
  prepare_data.py clustering --input F --output OUT.jsonl --task NAME
        [--text-column title|abstract] [--category-column category] ...
  prepare_data.py sts --input F --output OUT.jsonl --task NAME
        [--sentence1-column sentence1] [--sentence2-column sentence2] [--score-column score]
        [--min-score 4] [--exclude-above 2.5]
  prepare_data.py decontaminate --input RECORDS.jsonl --eval F [F ...] --output OUT.jsonl
        [--eval-column text] [--threshold T]

Inputs: local .jsonl / .csv / .parquet files or a `datasets` folder saved with save_to_disk.
Outputs are written atomically (a hidden `.OUT.*.tmp` beside OUT, renamed into place when
complete); a run first removes the temporaries a killed run writing the same OUT left, so a rerun
leaves exactly what an uninterrupted run does. A summary is printed (and written with
--summary-json).
"""

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--input",
        required=True,
        help=".jsonl / .csv / .parquet file, a datasets save_to_disk folder, or a datasets name",
    )
    common.add_argument("--output", required=True, help="training records to write (JSONL)")
    common.add_argument("--summary-json", help="also write the printed summary to this file")
    common.add_argument("--split", default="train", help="split of a datasets name")
    gen = argparse.ArgumentParser(add_help=False)
    gen.add_argument(
        "--task",
        required=True,
        help="the records' task: a Table 6 name (checked), or any name with --instruction",
    )
    gen.add_argument(
        "--instruction",
        help="a task definition written into every record (training uses it instead of the "
        "task's Table 6 row); needed for tasks outside Table 6",
    )
    gen.add_argument("--num-negatives", type=int, default=7, help="negatives per record")
    gen.add_argument("--max-samples", type=int, help="records to write at most (default: all)")
    gen.add_argument("--seed", type=int, default=0, help="seed of sampling and negatives")
    c = sub.add_parser("classification", parents=[common, gen], help="labelled texts -> records")
    c.add_argument("--text-column", default="text", help="column of the texts")
    c.add_argument("--label-column", default="label", help="column of the labels")
    c.add_argument(
        "--label-text-column",
        default="label_text",
        help="column of the labels' names (used when every row has it)",
    )
    c.add_argument(
        "--positive",
        choices=["label", "example"],
        default="label",
        help="positive: the label's text, or another example of the same label",
    )
    k = sub.add_parser("clustering", parents=[common, gen], help="categorised texts -> records")
    k.add_argument("--text-column", default="title", help="column of the texts")
    k.add_argument("--category-column", default="category", help="column of the categories")
    s = sub.add_parser("sts", parents=[common, gen], help="scored sentence pairs -> records")
    s.add_argument("--sentence1-column", default="sentence1", help="column of the first text")
    s.add_argument("--sentence2-column", default="sentence2", help="column of the second text")
    s.add_argument("--score-column", default="score", help="column of the similarity score")
    s.add_argument(
        "--min-score", type=float, default=4.0, help="pairs scoring at least this are positives"
    )
    s.add_argument(
        "--exclude-above",
        type=float,
        default=2.5,
        help="never take as negative a text annotated above this score with the query",
    )
    d = sub.add_parser(
        "decontaminate", parents=[common], help="drop records that overlap evaluation texts"
    )
    d.add_argument("--eval", nargs="+", required=True, help="evaluation data files or folders")
    d.add_argument("--eval-column", default="text", help="column of the evaluation texts")
    d.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip (and count) malformed input records instead of stopping",
    )
    d.add_argument(
        "--threshold",
        type=float,
        default=10.0,
        help="drop records whose query's best BM25 score vs the eval texts is above this",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked (a bad one: usage and exit code 2, before anything is read)."""
    p = _parser()
    args = p.parse_args(argv)
    if args.command != "decontaminate" and args.instruction is None:
        from megatron_nvembed.data.templates import get_task_definition

        try:  # a typo here would only surface when training samples the records
            get_task_definition(args.task)
        except ValueError as err:
            p.error(f"--task: {err}; or give --instruction TEXT")
    if getattr(args, "instruction", None) is not None and not args.instruction.strip():
        p.error("--instruction: empty")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_nvembed.core.logging_utils import setup_logging
    from megatron_nvembed.curation.prepare import prepare_data
    from megatron_nvembed.data.records import write_jsonl_atomic
    from megatron_nvembed.utils.diskspace import DISK_FULL_EXIT, DiskFullError

    setup_logging()
    try:
        summary = prepare_data(args)
        print(json.dumps(summary))
        if args.summary_json:
            write_jsonl_atomic(args.summary_json, [summary])
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DiskFullError as err:
        print(f"error: {err}", file=sys.stderr)
        return DISK_FULL_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
