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
    task: str | None
    """None when the record has none: allowed with an `instruction`, or without
    `needs_instruction` (see `record_from_dict`)."""
    instruction: str | None = None
    extra: dict = field(default_factory=dict)
    """Other keys of the input line (e.g. "id", "in_batch_negatives"), preserved on write."""

    def to_json(self) -> dict:
        out = {"query": self.query, "pos": self.pos, "neg": self.neg}
        if self.task is not None:
            out["task"] = self.task
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


class MissingInstructionError(ValueError):
    """A record has neither `task` nor `instruction` where its query needs an instruction."""


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _string_list(value, key: str, where: str) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: key {key!r} must be a list of strings, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(
                f"{where}: key {key!r} must be a list of strings, item {i} is {_type_name(item)}"
            )
    return list(value)


def record_from_dict(
    obj, where: str, require_positive: bool = True, needs_instruction: bool = True
) -> Record:
    """Validates one decoded record.

    Args:
        obj: the decoded JSON line or table row.
        where: names the record in errors: `file:line`, or `file: row N` for tables.
        require_positive: a record without a positive is an error.
        needs_instruction: the query will get an instruction, so the record needs `task` or its
            own `instruction` (training always; mining unless the instruction is given or none is
            used). Without it a record may lack both; `task` is then None.

    Raises:
        ValueError: `{where}: missing key 'query'` for an absent key, `{where}: key 'query' must
            be a string, got int` for a wrong type (null counts as a type for `query`, as absent
            for `neg`, `task` and `instruction`), and `{where}: record has no positive (...)`.
        MissingInstructionError: (a ValueError) `needs_instruction` and neither `task` nor
            `instruction` is present.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    if "query" not in obj:
        raise ValueError(f"{where}: missing key 'query'")
    for key in ("query", "task", "instruction"):
        value = obj.get(key)
        if (key == "query" or value is not None) and not isinstance(value, str):
            raise ValueError(f"{where}: key {key!r} must be a string, got {_type_name(value)}")
    task, instruction = obj.get("task"), obj.get("instruction")
    if needs_instruction and task is None and not instruction:
        what = "missing key 'task'" if "task" not in obj else "key 'task' is null"
        raise MissingInstructionError(
            f'{where}: {what}; the query needs an instruction: add "task" (a task name, see '
            'docs/data.md) or "instruction" (a task definition) to the record'
        )
    if "pos" not in obj:
        pos, absent = [], "missing key 'pos'"
    elif obj["pos"] is None:
        pos, absent = [], "'pos' is null"
    else:
        pos, absent = _string_list(obj["pos"], "pos", where), "'pos' is empty"
    # a null "neg" (Parquet / pandas write missing lists as null) means no hard negatives yet
    neg = [] if obj.get("neg") is None else _string_list(obj["neg"], "neg", where)
    if require_positive and not pos:
        raise ValueError(f"{where}: record has no positive ({absent})")
    extra = {k: v for k, v in obj.items() if k not in RECORD_KEYS}
    return Record(obj["query"], pos, neg, task, instruction, extra)


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
    needs_instruction: bool = True,
    stats: ReadStats | None = None,
) -> Iterator[Record]:
    """Records of a JSONL (`.jsonl`, `.json`) or Parquet (`.parquet`) file.

    Args:
        require_positive, needs_instruction: as `record_from_dict`.

    Raises:
        ValueError: naming the file and 1-based line (`file: row N` for Parquet) of a malformed
            record (see `record_from_dict`) or one without a positive, unless `skip_bad_records`
            (then counted in `stats`).
    """
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    if path.suffix == ".parquet":
        rows = ((f"{path}: row {n}", obj) for n, obj in _iter_parquet(path))
    else:
        rows = ((f"{path}:{n}", obj) for n, obj in iter_jsonl_lines(path, skip_bad_records, stats))
    for where, obj in rows:
        try:
            rec = record_from_dict(obj, where, require_positive, needs_instruction)
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
