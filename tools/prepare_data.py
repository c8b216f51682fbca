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
import csv
import json
import sys
from pathlib import Path


def read_rows(path: str, split: str = "train") -> list[dict]:
    """Rows of a JSONL, CSV or Parquet file, a `datasets` save_to_disk folder, or (when no such
    path exists) a `datasets` name loaded with `load_dataset(name, split=split)` — which needs
    the dataset hub or its local cache."""
    p = Path(path)
    if not p.exists():
        if "/" in path and not path.startswith((".", "/")):
            import datasets

            try:
                return [dict(r) for r in datasets.load_dataset(path, split=split)]
            except Exception as err:  # noqa: BLE001 - report any loader failure with the name
                raise FileNotFoundError(
                    f"--input {path}: no such file, and the datasets loader failed: {err}"
                ) from err
        raise FileNotFoundError(f"--input {path} does not exist")
    if p.is_dir():
        import datasets

        return [dict(r) for r in datasets.load_from_disk(str(p))]
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    from megatron_nvembed.data.records import iter_jsonl

    return list(iter_jsonl(p))


def remove_own_temporaries(path: str | Path) -> int:
    """Removes the temporaries a run killed while writing `path` left beside it (only those of
    `path`: its folder may be shared with runs writing other files); returns how many."""
    from megatron_nvembed.fileio import remove_stale_temporaries

    path = Path(path)
    return remove_stale_temporaries(path.parent, path.name)


def column(rows: list[dict], name: str, path: str, flag: str) -> list:
    missing = next((i for i, r in enumerate(rows, 1) if name not in r), None)
    if missing is not None:
        raise ValueError(f"{path}: row {missing} has no column {name!r} (set {flag})")
    return [r[name] for r in rows]


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    if args.command != "decontaminate" and args.instruction is None:
        from megatron_nvembed.data.templates import get_task_definition

        try:  # a typo here would only surface when training samples the records
            get_task_definition(args.task)
        except ValueError as err:
            p.error(f"--task: {err}; or give --instruction TEXT")
    if getattr(args, "instruction", None) is not None and not args.instruction.strip():
        p.error("--instruction: empty")

    from megatron_nvembed.logging_utils import setup_logging

    setup_logging()
    for target in filter(None, (args.output, args.summary_json)):
        removed = remove_own_temporaries(target)
        if removed:
            print(
                f"removed {removed} temporary file(s) of an interrupted run beside {target}",
                file=sys.stderr,
            )
    from megatron_nvembed.curation import converters as cv
    from megatron_nvembed.data.records import write_jsonl_atomic

    try:
        rows = read_rows(args.input, args.split)
        summary = {"input_rows": len(rows)}
        if args.command == "classification":
            texts = column(rows, args.text_column, args.input, "--text-column")
            labels = column(rows, args.label_column, args.input, "--label-column")
            has_lt = all(args.label_text_column in r for r in rows)
            label_texts = [r[args.label_text_column] for r in rows] if has_lt else None
            out = cv.classification_records(
                texts,
                labels,
                task=args.task,
                label_texts=label_texts,
                positive=args.positive,
                num_negatives=args.num_negatives,
                max_samples=args.max_samples,
                seed=args.seed,
            )
            summary["classes"] = len({str(x) for x in (label_texts or labels)})
        elif args.command == "clustering":
            texts = column(rows, args.text_column, args.input, "--text-column")
            cats = column(rows, args.category_column, args.input, "--category-column")
            out = cv.clustering_records(
                texts,
                cats,
                task=args.task,
                num_negatives=args.num_negatives,
                max_samples=args.max_samples,
                seed=args.seed,
            )
        elif args.command == "sts":
            a = column(rows, args.sentence1_column, args.input, "--sentence1-column")
            b = column(rows, args.sentence2_column, args.input, "--sentence2-column")
            sc = [float(x) for x in column(rows, args.score_column, args.input, "--score-column")]
            out = cv.sts_records(
                list(zip(a, b, sc)),
                task=args.task,
                min_score=args.min_score,
                exclude_above=args.exclude_above,
                num_negatives=args.num_negatives,
            )
        else:
            from megatron_nvembed.data.records import ReadStats, iter_records

            stats = ReadStats()
            records = [
                r.to_json()
                for r in iter_records(
                    args.input, skip_bad_records=args.skip_bad_records, stats=stats
                )
            ]
            summary["skipped_records"] = stats.skipped
            eval_texts = []
            for f in args.eval:
                eval_texts += [
                    str(x) for x in column(read_rows(f), args.eval_column, f, "--eval-column")
                ]
            out, dropped = cv.decontaminate(records, eval_texts, args.threshold)
            summary.update(dropped=len(dropped), eval_texts=len(eval_texts))
        if getattr(args, "instruction", None) is not None:
            out = [{**r, "instruction": args.instruction} for r in out]
        summary["records"] = write_jsonl_atomic(args.output, out)
        summary["short_of_negatives"] = sum(
            len(r["neg"]) < getattr(args, "num_negatives", 0) for r in out
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    if args.summary_json:
        write_jsonl_atomic(args.summary_json, [summary])
    return 0


if __name__ == "__main__":
    sys.exit(main())
