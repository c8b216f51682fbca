"""A JSONL corpus read by row range, without holding its texts.

`JsonlCorpus` scans the file once: every non-blank line is parsed and checked (errors name
file:line before anything is encoded; bytes that are not UTF-8 and text UTF-8 cannot encode, a
lone surrogate such as JSON's "\\ud800", are refused as training records are:
`data.utf8.check_encodable`) and only its byte range is kept (16 bytes a row). Rows are
then read back by range (`rows(lo, hi)`, one seek) or one at a time (`row(i)`), so encoding and
mining hold one shard of texts at a time, never the corpus. With `unique_ids` a duplicated id is
refused, naming the first two lines holding it (the scan keeps an 8-byte hash a row, not the ids;
rows whose hashes collide are read back and compared).

A `parse(obj, where)` function turns a line's object into a `CorpusRow`; the three formats the
tools read are here: `mining_row` (`{"text", "id"?}`), `beir_row` (`{"_id", "title"?, "text"}`)
and `embed_row` (`{"text", "instruction"?}`).
"""

from __future__ import annotations

import json
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_nvembed.data.utf8 import check_encodable, utf8_error


@dataclass(frozen=True)
class CorpusRow:
    text: str
    id: str | None = None
    instruction: str = ""
    """The complete query prefix ("Instruct: ...\\nQuery: "); "" for documents."""


def mining_row(obj: dict, where: str) -> CorpusRow:
    """`{"text": str, "id"?: str | int}` (mining corpora)."""
    if not isinstance(obj.get("text"), str):
        raise ValueError(f'{where}: expected an object with a string "text"')
    i = obj.get("id")
    if i is not None and not isinstance(i, str | int):
        raise ValueError(f'{where}: "id" must be a string or an integer')
    return CorpusRow(obj["text"], None if i is None else str(i))


def beir_row(obj: dict, where: str) -> CorpusRow:
    """BEIR `corpus.jsonl` / `queries.jsonl`: `{"_id", "title"?, "text"}`; the title, when
    present, is prepended to the text with one space (as BEIR and MTEB join them)."""
    if "_id" not in obj or not isinstance(obj.get("text"), str):
        raise ValueError(f'{where}: expected "_id" and a string "text"')
    title = obj.get("title") or ""
    if not isinstance(title, str):
        raise ValueError(f'{where}: "title" must be a string')
    text = f"{title} {obj['text']}".strip() if title else obj["text"]
    return CorpusRow(text, str(obj["_id"]))


def embed_row(obj: dict, where: str, template: str | None = None) -> CorpusRow:
    """`tools/embed.py` input: `{"text", "instruction"?}`; the instruction is a task definition
    put into the model's query template (`template`; None: NV-Embed's "Instruct: {definition}\\n
    Query: "), or a complete "Instruct:" prefix, kept."""
    from megatron_nvembed.core.config import DEFAULT_QUERY_TEMPLATE
    from megatron_nvembed.data.templates import query_instruction

    if "text" not in obj:
        raise ValueError(f'{where}: missing key "text"')
    if not isinstance(obj["text"], str):
        raise ValueError(f'{where}: "text" must be a string')
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise ValueError(f'{where}: "instruction" must be a string')
    i = obj.get("id")
    return CorpusRow(
        obj["text"],
        None if i is None else str(i),
        query_instruction("", instruction, template=template or DEFAULT_QUERY_TEMPLATE)
        if instruction
        else "",
    )


class JsonlCorpus:
    """Byte ranges of a JSONL file's rows, each checked once by `parse` (see the module doc).

    Attributes:
        path: the file.
        num_with_id: rows whose `CorpusRow.id` is set (all, none or some).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        parse: Callable[[dict, str], CorpusRow],
        *,
        on_row: Callable[[int, CorpusRow], None] | None = None,
        unique_ids: bool = False,
    ):
        """Scans `path`.

        Args:
            parse: `(object, "file:line") -> CorpusRow`; raises ValueError naming `where`.
            on_row: called with (row index, row) for every row during the scan (e.g. to check
                ids against qrels without keeping them).
            unique_ids: refuse an id (`CorpusRow.id`, rows without one aside) held by two rows.

        Raises:
            FileNotFoundError: naming the file.
            ValueError: naming file:line of a malformed line (see the module doc); with
                `unique_ids`, `{path}: id 'd1' on lines 2 and 7 (ids must be unique)`.
        """
        self.path = Path(path)
        self.parse = parse
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        start = time.perf_counter()
        # 8 bytes a row each while scanning (a list of Python ints would take 36)
        starts, ends = array("q"), array("q")
        hashes = array("q") if unique_ids else None
        self.num_with_id = 0
        pos = 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    where = f"{self.path}:{lineno}"
                    try:  # decoded strictly (json.loads would let encoded surrogates pass)
                        obj = json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError as err:
                        raise ValueError(utf8_error(where, err)) from err
                    except ValueError as err:
                        raise ValueError(f"{where}: malformed JSON ({err})") from err
                    if not isinstance(obj, dict):
                        raise ValueError(f"{where}: expected a JSON object")
                    row = parse(obj, where)
                    check_encodable(obj, where)
                    if row.id is not None:
                        self.num_with_id += 1
                    if on_row is not None:
                        on_row(len(starts), row)
                    if hashes is not None:
                        hashes.append(hash(row.id))
                    starts.append(pos)
                    ends.append(pos + len(line))
                pos += len(line)
        self._start = np.frombuffer(starts, dtype=np.int64)
        self._end = np.frombuffer(ends, dtype=np.int64)
        stat = self.path.stat()
        self.size, self.mtime_ns = stat.st_size, stat.st_mtime_ns
        self._fd: int | None = None  # opened on the first read, reused (pread: no seek state)
        if hashes is not None:
            self._refuse_duplicated_ids(np.frombuffer(hashes, dtype=np.int64))
        self.scan_seconds = time.perf_counter() - start

    def _refuse_duplicated_ids(self, hashes: np.ndarray) -> None:
        """Raises ValueError naming the id whose second row comes first in the file and its first
        two lines, when two rows hold one id (rows with equal hashes are read back, compared)."""
        order = np.argsort(hashes, kind="stable")  # equal hashes: rows in file order
        sorted_hashes = hashes[order]
        same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
        if len(same) == 0:
            return
        groups: dict[int, list[int]] = {}
        for j in same:
            groups.setdefault(int(sorted_hashes[j]), []).extend((int(order[j]), int(order[j + 1])))
        best: tuple[int, int, str] | None = None  # (second row, first row, id)
        for rows in sorted((sorted(set(g)) for g in groups.values()), key=lambda g: g[1]):
            if best is not None and rows[1] >= best[0]:
                break  # no later group can hold an earlier second row
            first: dict[str, int] = {}
            for r in rows:
                i = self.row(r).id
                if i is None:
                    continue
                if i in first:
                    if best is None or r < best[0]:
                        best = (r, first[i], i)
                    break
                first[i] = r
        if best is None:
            return  # hash collisions only
        second, first_row, i = best
        a, b = self._line_numbers([first_row, second])
        raise ValueError(f"{self.path}: id {i!r} on lines {a} and {b} (ids must be unique)")

    def _line_numbers(self, rows: list[int]) -> list[int]:
        """1-based line numbers of `rows` (ascending), counting the newlines before each."""
        out, count, pos = [], 0, 0
        with open(self.path, "rb") as f:
            for r in rows:
                target = int(self._start[r])
                while pos < target:
                    chunk = f.read(min(1 << 20, target - pos))
                    count += chunk.count(b"\n")
                    pos += len(chunk)
                out.append(count + 1)
        return out

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self._start)

    @property
    def all_have_ids(self) -> bool:
        return len(self) > 0 and self.num_with_id == len(self)

    def fingerprint(self) -> dict:
        """What identifies this file's content for caches (path, size, mtime, rows)."""
        return {
            "path": str(self.path.resolve()),
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "rows": len(self),
        }

    def _check_unchanged(self) -> None:
        stat = self.path.stat()
        if (stat.st_size, stat.st_mtime_ns) != (self.size, self.mtime_ns):
            raise RuntimeError(f"{self.path}: changed while it was being read")

    def rows(self, lo: int, hi: int) -> list[CorpusRow]:
        """Rows `lo`..`hi - 1` (one read of their byte range)."""
        hi = min(hi, len(self))
        if lo >= hi:
            return []
        self._check_unchanged()
        base = int(self._start[lo])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        blob = os.pread(self._fd, int(self._end[hi - 1]) - base, base)
        out = []
        for i in range(lo, hi):
            line = blob[int(self._start[i]) - base : int(self._end[i]) - base]
            out.append(self.parse(json.loads(line), f"{self.path} row {i}"))
        return out

    def row(self, i: int) -> CorpusRow:
        return self.rows(i, i + 1)[0]
