"""Training records: `{"query", "pos": [...], "neg": [...], "task", "instruction"?, "pos_scores"?,
"neg_scores"?, "pos_ids"?, "neg_ids"?}` in JSONL or Parquet, read with errors that name the file
and line, and written atomically.

One function checks a record whatever its source, `record_from_dict`; JSONL lines are decoded by
`parse_json_line`, which refuses a key that appears twice in one object and bytes that are not
UTF-8. Text that UTF-8 cannot encode (a lone surrogate such as JSON's "\\ud800") is refused by
`utf8.check_encodable`, shared with the tools' other readers (`retrieval.corpus.JsonlCorpus`).
See docs/data.md, "Validation".
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megatron_nvembed.data.utf8 import check_encodable, utf8_error

RULES_VERSION = 2
"""The version of the record rules; a data index records it (with the task table) in its key, so
an index built under other rules is rebuilt. 2: texts UTF-8 cannot encode are refused."""

RECORD_KEYS = (
    "query",
    "pos",
    "neg",
    "task",
    "instruction",
    "pos_scores",
    "neg_scores",
    "pos_ids",
    "neg_ids",
)


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
    pos_scores: list[float] | None = None
    """A teacher's score of each positive (e.g. a reranker's logit), for distillation; with
    `neg_scores`, or None for neither."""
    neg_scores: list[float] | None = None
    """The teacher's score of each hard negative (same order as `neg`)."""
    pos_ids: list[str] | None = None
    """A document id per positive (e.g. a corpus `_id`), or None: the loss never takes a
    document with the id of a query's positive as its negative, whatever its text."""
    neg_ids: list[str] | None = None
    """A document id per hard negative (same order as `neg`; mining writes them), or None."""

    def to_json(self) -> dict:
        out = {"query": self.query, "pos": self.pos, "neg": self.neg}
        if self.task is not None:
            out["task"] = self.task
        if self.instruction is not None:
            out["instruction"] = self.instruction
        if self.pos_scores is not None:
            out["pos_scores"], out["neg_scores"] = self.pos_scores, self.neg_scores
        if self.pos_ids is not None:
            out["pos_ids"] = self.pos_ids
        if self.neg_ids is not None:
            out["neg_ids"] = self.neg_ids
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


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice (`json.loads` would silently keep the last value)."""


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(f"key {key!r} appears twice")
            seen.add(key)
    return obj


# one decoder for every line: `json.loads(..., object_pairs_hook=...)` would build one per call
_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates)


def parse_json_line(line: bytes | str):
    """The JSON value of one JSONL line (UTF-8 bytes or text; a leading UTF-8 BOM is ignored).

    Raises:
        DuplicateKeyError: (a ValueError) an object of the line names a key twice, e.g.
            `key 'query' appears twice`.
        ValueError: malformed JSON (`json.JSONDecodeError`) or bytes that are not UTF-8
            (`UnicodeDecodeError`, surrogates encoded as UTF-8 included).
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    if line.startswith("\ufeff"):
        line = line[1:]
    return _DECODER.decode(line)


def json_line_error(where: str, err: ValueError) -> str:
    """The message for a line `parse_json_line` refused: `{where}: key 'query' appears twice`,
    `{where}: not UTF-8 text (...)` (see `utf8_error`) or `{where}: malformed record (...)`."""
    if isinstance(err, DuplicateKeyError):
        return f"{where}: {err}"
    if isinstance(err, UnicodeDecodeError):
        return utf8_error(where, err)
    return f"{where}: malformed record ({err})"


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _blank(text: str) -> bool:
    return not text or text.isspace()


def _string_list(value, key: str, where: str, non_blank: bool = False) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: key {key!r} must be a list of strings, got {_type_name(value)}")
    try:  # fast path, in C: str.isspace refuses anything but a str
        if not any(map(str.isspace, value)) and (not non_blank or all(value)):
            return list(value)
    except TypeError:
        pass
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(
                f"{where}: key {key!r} must be a list of strings, item {i} is {_type_name(item)}"
            )
        if non_blank and _blank(item):
            raise ValueError(f"{where}: key {key!r} item {i} is an empty or blank string")
    return list(value)


def _scores(obj: dict, pos: list[str], neg: list[str], where: str):
    """`pos_scores` / `neg_scores` of a record: both or neither, finite numbers, one per text."""
    given = {k: obj.get(k) for k in ("pos_scores", "neg_scores") if obj.get(k) is not None}
    if not given:
        return None, None
    if len(given) == 1:
        (key,) = given
        other = "neg_scores" if key == "pos_scores" else "pos_scores"
        raise ValueError(
            f"{where}: key {key!r} without {other!r}: teacher scores come for the positives and "
            "the hard negatives together (an empty list where there are none)"
        )
    out = []
    for key, texts in (("pos_scores", pos), ("neg_scores", neg)):
        value = given[key]
        if not isinstance(value, list):
            raise ValueError(
                f"{where}: key {key!r} must be a list of numbers, got {_type_name(value)}"
            )
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise ValueError(
                    f"{where}: key {key!r} must be a list of numbers, item {i} is "
                    f"{_type_name(item)}"
                )
            if not math.isfinite(item):
                raise ValueError(f"{where}: key {key!r} item {i} is not finite ({item})")
        text_key = key.split("_")[0]
        if len(value) != len(texts):
            raise ValueError(
                f"{where}: key {key!r} has {len(value)} score(s) for {len(texts)} {text_key!r} "
                "text(s); give one per text, in the same order"
            )
        out.append([float(v) for v in value])
    return out[0], out[1]


def _ids(obj: dict, key: str, texts: list[str], where: str) -> list[str] | None:
    """`pos_ids` / `neg_ids`: absent (or null), or one string or integer id per text."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"{where}: key {key!r} must be a list of ids, got {_type_name(value)}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ValueError(
                f"{where}: key {key!r} must be a list of string or integer ids, item {i} is "
                f"{_type_name(item)}"
            )
    text_key = key.split("_")[0]
    if len(value) != len(texts):
        raise ValueError(
            f"{where}: key {key!r} has {len(value)} id(s) for {len(texts)} {text_key!r} text(s); "
            "give one per text, in the same order"
        )
    return [str(v) for v in value]


@functools.lru_cache(maxsize=4096)
def _unknown_task(task: str) -> str | None:
    """None for a Table 6 task name, else why not (cached: a dataset has few task names)."""
    from megatron_nvembed.data.templates import get_task_definition

    try:
        get_task_definition(task, "train")
    except ValueError as err:
        return str(err)
    return None


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

    Rules (docs/data.md, "Validation"): `query` a non-blank string; `pos` a list of non-blank
    strings, at least one when `require_positive`; `neg` a list of strings, possibly empty;
    `task` and `instruction` strings, `instruction` non-blank; with `needs_instruction` and no
    `instruction`, `task` must name a Table 6 task (resolved here, once per name). With an
    `instruction`, `task` is optional and may be any name. `pos_scores` / `neg_scores` (teacher
    scores for distillation): both or neither, lists of finite numbers (not booleans), one per
    `pos` / `neg` text. `pos_ids` / `neg_ids` (document ids, each optional): lists of strings or
    integers (read as strings), one per `pos` / `neg` text. Null counts as absent for `pos`,
    `neg`, `task`, `instruction`, the scores and the ids (Parquet and pandas write missing values
    as null). Every text of the record, other keys' included, must be encodable as UTF-8 (no lone
    surrogate: `check_encodable`).

    Raises:
        ValueError: one message per record, naming `where`, the key and the cause:
            `{where}: missing key 'query'` (absent key), `{where}: key 'neg' must be a list of
            strings, got str` (wrong type; `..., item 2 is int` for a list item), `{where}: key
            'pos' item 0 is an empty or blank string`, `{where}: key 'task': unknown task ...`
            (with close names), `{where}: record has no positive (...)`, `{where}: key 'pos'
            item 1 cannot be encoded as UTF-8 (lone surrogate U+D800 at character 0)`.
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
    if _blank(obj["query"]):
        raise ValueError(f"{where}: key 'query' is an empty or blank string")
    task, instruction = obj.get("task"), obj.get("instruction")
    if instruction is not None and _blank(instruction):
        raise ValueError(
            f"{where}: key 'instruction' is an empty or blank string (leave it out to use the "
            "task's instruction)"
        )
    if needs_instruction and task is None and instruction is None:
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
        pos, absent = _string_list(obj["pos"], "pos", where, non_blank=True), "'pos' is empty"
    # a null "neg" (Parquet / pandas write missing lists as null) means no hard negatives yet
    neg = [] if obj.get("neg") is None else _string_list(obj["neg"], "neg", where)
    if require_positive and not pos:
        raise ValueError(f"{where}: record has no positive ({absent})")
    if needs_instruction and instruction is None:
        # the query's instruction comes from the task's Table 6 row: resolve it now, not when
        # the record is first sampled
        unknown = _unknown_task(task)
        if unknown is not None:
            raise ValueError(f"{where}: key 'task': {unknown}")
    pos_scores, neg_scores = _scores(obj, pos, neg, where)
    pos_ids, neg_ids = _ids(obj, "pos_ids", pos, where), _ids(obj, "neg_ids", neg, where)
    check_encodable(obj, where)
    extra = {k: v for k, v in obj.items() if k not in RECORD_KEYS}
    return Record(
        obj["query"], pos, neg, task, instruction, extra, pos_scores, neg_scores, pos_ids, neg_ids
    )


def iter_jsonl_lines(
    path: str | os.PathLike, skip_bad_records: bool = False, stats: ReadStats | None = None
) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) of each non-blank line; errors as `iter_jsonl`."""
    stats = stats if stats is not None else ReadStats()
    with open(path, "rb") as f:  # decoded per line: bytes that are not UTF-8 name their line
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = parse_json_line(line)
                if not isinstance(obj, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as err:
                msg = json_line_error(f"{path}:{lineno}", err)
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
    """JSON objects of a JSONL file; a malformed line (bad JSON, a duplicated key, bytes that are
    not UTF-8) is a ValueError naming file and line (or, with `skip_bad_records`, skipped and
    counted in `stats`). Blank lines are ignored."""
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
    """Writes `rows` as JSONL to a temporary file beside `path` (`fileio.atomic_path`: a hidden
    `.NAME.*.tmp`), then renames it into place; on an exception the temporary is removed. A
    process killed mid-write leaves its temporary behind: `remove_stale_temporaries` (or
    `tools/prepare_data.py`'s rerun) clears it.

    Returns:
        The number of rows written.
    """
    from megatron_nvembed.utils.fileio import atomic_path

    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
