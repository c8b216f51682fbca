"""Datasets from `--train-data`: local JSONL / Parquet files, folders of them, or `datasets`
folders saved with `save_to_disk`; weights as in Megatron's `--data-path`."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_nvembed.data.records import ReadStats, Record, iter_records, record_from_dict


def parse_data_paths(args: list[str]) -> list[tuple[float, str]]:
    """`["a.jsonl", "b.jsonl"]` (equal weights) or `["0.3", "a.jsonl", "0.7", "b.jsonl"]`.

    Raises:
        ValueError: naming `--train-data` on an odd weight/path list or a bad weight.
    """
    if not args:
        raise ValueError("--train-data: no dataset given")

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if not is_number(args[0]):
        if any(is_number(a) and not os.path.exists(a) for a in args):
            raise ValueError("--train-data: mix of weights and paths; give weight/path pairs")
        return [(1.0, a) for a in args]
    if len(args) % 2:
        raise ValueError(f"--train-data: expected weight/path pairs, got {len(args)} items")
    pairs = []
    for w, p in zip(args[::2], args[1::2]):
        if not is_number(w) or float(w) < 0:
            raise ValueError(f"--train-data: bad weight {w!r} for {p!r}")
        pairs.append((float(w), p))
    return pairs


def load_records(
    spec: str, *, skip_bad_records: bool = False, stats: ReadStats | None = None
) -> list[Record]:
    """All records of a file, a folder of `.jsonl`/`.parquet` files, or a `datasets` folder.

    Raises:
        FileNotFoundError: naming the path; ValueError: naming file:line of a bad record.
    """
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--train-data: {spec} does not exist")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        import datasets  # lazily: only for `save_to_disk` folders

        ds = datasets.load_from_disk(str(path))
        return [
            record_from_dict(dict(row), f"{path}: row {i + 1}", True) for i, row in enumerate(ds)
        ]
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise FileNotFoundError(f"--train-data: no .jsonl or .parquet files in {spec}")
    out: list[Record] = []
    for f in files:
        out.extend(iter_records(f, skip_bad_records=skip_bad_records, stats=stats))
    if not out:
        raise ValueError(f"--train-data: {spec} holds no records")
    return out


def in_batch_flag(records: list[Record]) -> bool:
    """A dataset's `in_batch_negatives` flag: from its records' field (default True).

    Raises:
        ValueError: when records of one dataset disagree.
    """
    flags = {bool(r.extra.get("in_batch_negatives", True)) for r in records}
    if len(flags) > 1:
        raise ValueError("records of one dataset disagree on in_batch_negatives")
    return flags.pop()
