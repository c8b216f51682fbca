"""Training records: `{"query", "pos": [...], "neg": [...], "task", "instruction"?}` in JSONL or
Parquet, read with errors that name the file and line, and written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

RECORD_KEYS = ("query", "pos", "neg", "task", "instruction")


@dataclass
class Record:
    """One training example: a query, its positives, its hard negatives and its task."""

    query: str
    pos: list[str]
    neg: list[str]
    task: str
    instruction: str | None = None
    extra: dict = field(default_factory=dict)
    """Other keys of the input line (e.g. "id", "in_batch_negatives"), preserved on write."""

    def to_json(self) -> dict:
        out = {"query": self.query, "pos": self.pos, "neg": self.neg, "task": self.task}
        if self.instruction is not None:
            out["instruction"] = self.instruction
        out.update(self.extra)
        return out


@dataclass
class ReadStats:
    """Counts of a read."""

    read: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    """The first few skipped lines' messages."""


def record_from_dict(obj, where: str, require_positive: bool = True) -> Record:
    """Validates one decoded record; errors name `where` (file:line) and the key."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key in ("query", "task"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"{where}: key {key!r} must be a string")
    # a null "neg" (Parquet / pandas write missing lists as null) means no hard negatives yet
    pos, neg = obj.get("pos", []), obj.get("neg") or []
    for key, value in (("pos", pos), ("neg", neg)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: key {key!r} must be a list of strings")
    if require_positive and not pos:
        raise ValueError(f"{where}: record has no positive ('pos' is empty or missing)")
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise ValueError(f"{where}: key 'instruction' must be a string")
    extra = {k: v for k, v in obj.items() if k not in RECORD_KEYS}
    return Record(obj["query"], list(pos), list(neg), obj["task"], instruction, extra)


def iter_jsonl_lines(
    path: str | os.PathLike, skip_bad_records: bool = False, stats: ReadStats | None = None
) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) of each non-blank line; errors as `iter_jsonl`."""
    stats = stats if stats is not None else ReadStats()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as err:
                msg = f"{path}:{lineno}: malformed record ({err})"
                if not skip_bad_records:
                    raise ValueError(msg) from err
                stats.skipped += 1
                if len(stats.errors) < 5:
                    stats.errors.append(msg)
                continue
            yield lineno, obj


def iter_jsonl(
    path: str | os.PathLike, *, skip_bad_records: bool = False, stats: ReadStats | None = None
) -> Iterator[dict]:
    """JSON objects of a JSONL file; a malformed line is a ValueError naming file and line
    (or, with `skip_bad_records`, skipped and counted in `stats`). Blank lines are ignored."""
    stats = stats if stats is not None else ReadStats()
    for _, obj in iter_jsonl_lines(path, skip_bad_records, stats):
        stats.read += 1
        yield obj


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from err
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


def iter_records(
    path: str | os.PathLike,
    *,
    skip_bad_records: bool = False,
    require_positive: bool = True,
    stats: ReadStats | None = None,
) -> Iterator[Record]:
    """Records of a JSONL (`.jsonl`, `.json`) or Parquet (`.parquet`) file.

    Raises:
        ValueError: naming the file and 1-based line (row for Parquet) of a malformed record or
            one without a positive, unless `skip_bad_records` (then counted in `stats`).
    """
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    if path.suffix == ".parquet":
        rows = _iter_parquet(path)
    else:
        rows = iter_jsonl_lines(path, skip_bad_records, stats)
    for n, obj in rows:
        try:
            rec = record_from_dict(obj, f"{path}:{n}", require_positive)
        except ValueError as err:
            if not skip_bad_records:
                raise
            stats.skipped += 1
            if len(stats.errors) < 5:
                stats.errors.append(str(err))
            continue
        stats.read += 1
        yield rec


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Writes `rows` as JSONL to a temporary file beside `path`, then renames it into place.

    Returns:
        The number of rows written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n
