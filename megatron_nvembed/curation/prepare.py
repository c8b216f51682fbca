"""The subcommands of `tools/prepare_data.py`: rows read from a file, a `datasets` folder or
name (`read_rows`), turned into training records by a converter of `curation.converters` (one
function per subcommand, `CONVERTERS`), written atomically (`prepare_data`).

Each converter takes the rows, the parsed flags of its subcommand (an `argparse.Namespace`: the
flag names of `tools/prepare_data.py`, e.g. `flags.text_column` for `--text-column`) and the
summary to add its counts to, and returns the records. Errors are ValueError /
FileNotFoundError naming the file and the flag to set.
"""

from __future__ import annotations

import csv
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

from megatron_nvembed.curation import converters as cv


def read_rows(path: str, split: str = "train") -> list[dict]:
    """Rows of a JSONL, CSV or Parquet file, a `datasets` save_to_disk folder, or (when no such
    path exists) a `datasets` name loaded with `load_dataset(name, split=split)` — which needs
    the dataset hub or its local cache.

    Raises:
        FileNotFoundError: naming `--input` when nothing can be found or loaded.
    """
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
    from megatron_nvembed.utils.fileio import remove_stale_temporaries

    path = Path(path)
    return remove_stale_temporaries(path.parent, path.name)


def column(rows: list[dict], name: str, path: str, flag: str) -> list:
    """Column `name` of every row.

    Raises:
        ValueError: naming `path`, the first row without it and the `flag` that names it.
    """
    missing = next((i for i, r in enumerate(rows, 1) if name not in r), None)
    if missing is not None:
        raise ValueError(f"{path}: row {missing} has no column {name!r} (set {flag})")
    return [r[name] for r in rows]


def classification(rows: list[dict], flags: Namespace, summary: dict) -> list[dict]:
    """`classification`: labelled texts -> records (`converters.classification_records`);
    counts the classes."""
    texts = column(rows, flags.text_column, flags.input, "--text-column")
    labels = column(rows, flags.label_column, flags.input, "--label-column")
    has_lt = all(flags.label_text_column in r for r in rows)
    label_texts = [r[flags.label_text_column] for r in rows] if has_lt else None
    out = cv.classification_records(
        texts,
        labels,
        task=flags.task,
        label_texts=label_texts,
        positive=flags.positive,
        num_negatives=flags.num_negatives,
        max_samples=flags.max_samples,
        seed=flags.seed,
    )
    summary["classes"] = len({str(x) for x in (label_texts or labels)})
    return out


def clustering(rows: list[dict], flags: Namespace, summary: dict) -> list[dict]:
    """`clustering`: categorised texts -> records (`converters.clustering_records`)."""
    texts = column(rows, flags.text_column, flags.input, "--text-column")
    cats = column(rows, flags.category_column, flags.input, "--category-column")
    return cv.clustering_records(
        texts,
        cats,
        task=flags.task,
        num_negatives=flags.num_negatives,
        max_samples=flags.max_samples,
        seed=flags.seed,
    )


def sts(rows: list[dict], flags: Namespace, summary: dict) -> list[dict]:
    """`sts`: scored sentence pairs -> records (`converters.sts_records`)."""
    a = column(rows, flags.sentence1_column, flags.input, "--sentence1-column")
    b = column(rows, flags.sentence2_column, flags.input, "--sentence2-column")
    sc = [float(x) for x in column(rows, flags.score_column, flags.input, "--score-column")]
    return cv.sts_records(
        list(zip(a, b, sc)),
        task=flags.task,
        min_score=flags.min_score,
        exclude_above=flags.exclude_above,
        num_negatives=flags.num_negatives,
    )


def decontaminate(rows: list[dict], flags: Namespace, summary: dict) -> list[dict]:
    """`decontaminate`: the input's training records less those overlapping the evaluation
    texts (`converters.decontaminate`); counts skipped and dropped records and the eval texts."""
    from megatron_nvembed.data.records import ReadStats, iter_records

    stats = ReadStats()
    records = [
        r.to_json()
        for r in iter_records(flags.input, skip_bad_records=flags.skip_bad_records, stats=stats)
    ]
    summary["skipped_records"] = stats.skipped
    eval_texts = []
    for f in flags.eval:
        eval_texts += [str(x) for x in column(read_rows(f), flags.eval_column, f, "--eval-column")]
    out, dropped = cv.decontaminate(records, eval_texts, flags.threshold)
    summary.update(dropped=len(dropped), eval_texts=len(eval_texts))
    return out


CONVERTERS: dict[str, Callable[[list[dict], Namespace, dict], list[dict]]] = {
    "classification": classification,
    "clustering": clustering,
    "sts": sts,
    "decontaminate": decontaminate,
}


def prepare_data(flags: Namespace) -> dict:
    """Runs the subcommand `flags.command` of `tools/prepare_data.py` on its parsed flags: removes
    what a killed run writing the same outputs left (saying so on stderr), reads `--input`,
    converts, adds `--instruction` to every record, writes `--output` atomically.

    Returns:
        The summary: input rows, records written, records short of `--num-negatives`, and the
        converter's counts.

    Raises:
        FileNotFoundError, ValueError: naming the input and the flag to set.
    """
    from megatron_nvembed.data.records import write_jsonl_atomic

    for target in filter(None, (flags.output, flags.summary_json)):
        removed = remove_own_temporaries(target)
        if removed:
            print(
                f"removed {removed} temporary file(s) of an interrupted run beside {target}",
                file=sys.stderr,
            )
    rows = read_rows(flags.input, flags.split)
    summary = {"input_rows": len(rows)}
    out = CONVERTERS[flags.command](rows, flags, summary)
    if getattr(flags, "instruction", None) is not None:
        out = [{**r, "instruction": flags.instruction} for r in out]
    summary["records"] = write_jsonl_atomic(flags.output, out)
    summary["short_of_negatives"] = sum(
        len(r["neg"]) < getattr(flags, "num_negatives", 0) for r in out
    )
    return summary


__all__ = ["CONVERTERS", "column", "prepare_data", "read_rows", "remove_own_temporaries"]
