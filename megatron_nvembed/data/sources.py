"""Random access to one dataset's validated records, per input kind: JSONL files (found again
by byte offset, `index_jsonl`), Parquet files (`parquet_source`) and `datasets` datasets
(`datasets_source`), the last two as Arrow-backed rows. Opening a source reads every record once
through a `RecordValidator` (`records.record_from_dict`: the first bad record is a ValueError
naming file:line or row, the key and the cause); only what the sampler needs stays in memory.
`loading.load_dataset_spec` chooses the kind from a `--train-data` item.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from megatron_nvembed.data.records import (
    ReadStats,
    Record,
    json_line_error,
    parse_json_line,
    record_from_dict,
)

SIDECAR_SUFFIX = ".meta.json"


class RecordSource(Sequence):
    """Random access to one dataset's validated records.

    Attributes:
        name: a display name (the sidecar's `name`, else the path).
        num_positives, num_negatives: [n] int32, per record.
        in_batch_negatives: the dataset's flag (see the module docstring).
        stats: counts of the validating read (read, skipped).
        scored_records: records carrying teacher scores (`pos_scores` / `neg_scores`).
    """

    name: str
    num_positives: np.ndarray
    num_negatives: np.ndarray
    in_batch_negatives: bool
    stats: ReadStats
    scored_records: int = 0

    def __len__(self) -> int:
        return len(self.num_positives)

    def counts(self, index: int) -> tuple[int, int]:
        """(number of positives, number of negatives) of record `index`, without reading it."""
        return int(self.num_positives[index]), int(self.num_negatives[index])

    def _get(self, index: int) -> Record:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: record {index} of {len(self)}")
        return self._get(index % len(self))

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))


class JsonlSource(RecordSource):
    """Records of JSONL files, found again by byte offset."""

    def __init__(self, files: list[Path], offsets: list[np.ndarray], lines: list[np.ndarray]):
        self.files = files
        self.offsets = offsets  # per file [n_f] int64 byte offsets
        self.lines = lines  # per file [n_f] int64 1-based line numbers (for error messages)
        self.ends = np.cumsum([len(o) for o in offsets])  # [n_files]
        self._handles: dict[int, object] = {}

    def _get(self, index: int) -> Record:
        f = int(np.searchsorted(self.ends, index, side="right"))
        local = index - (int(self.ends[f - 1]) if f else 0)
        fh = self._handles.get(f)
        if fh is None:
            fh = self._handles[f] = open(self.files[f], "rb")  # noqa: SIM115 (kept open)
        fh.seek(int(self.offsets[f][local]))
        where = f"{self.files[f]}:{int(self.lines[f][local])}"
        try:
            obj = parse_json_line(fh.readline())
        except ValueError as err:  # the file changed after it was indexed
            raise ValueError(f"{json_line_error(where, err)} on re-read") from err
        return record_from_dict(obj, where, require_positive=True)

    def __getstate__(self) -> dict:  # open files do not travel to worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_handles"} | {"_handles": {}}

    def __del__(self):
        for fh in getattr(self, "_handles", {}).values():
            fh.close()


class RowsSource(RecordSource):
    """Records of Arrow-backed rows (Parquet via pyarrow, or a `datasets.Dataset`)."""

    def __init__(self, get_row, rows: np.ndarray, where: str):
        self._get_row = get_row  # row number -> dict
        self.rows = rows  # [n] int64: the valid rows
        self.where = where

    def _get(self, index: int) -> Record:
        row = int(self.rows[index])
        return record_from_dict(self._get_row(row), f"{self.where}: row {row + 1}", True)


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in CI logs (the summary line still comes).
    return tqdm(
        total=total,
        desc=desc,
        unit="B" if desc.endswith("bytes") else "rec",
        unit_scale=True,
        disable=None,
        leave=False,
    )


class RecordValidator:
    """Collects counts and the in-batch flags while records are validated."""

    def __init__(self, dataset: str, skip_bad_records: bool, stats: ReadStats):
        self.dataset, self.skip, self.stats = dataset, skip_bad_records, stats
        self.n_pos: list[int] = []
        self.n_neg: list[int] = []
        self.scored = 0
        self.flag: bool | None = None
        self.flag_where = ""

    def add(self, obj, where: str) -> bool:
        try:
            rec = record_from_dict(obj, where, require_positive=True)
            flag = rec.extra.get("in_batch_negatives")
            if flag is not None and not isinstance(flag, bool):
                raise ValueError(f"{where}: key 'in_batch_negatives' must be true or false")
        except ValueError as err:
            if not self.skip:
                raise
            self.stats.skipped += 1
            if len(self.stats.errors) < 5:
                self.stats.errors.append(str(err))
            return False
        if flag is not None:
            if self.flag is None:
                self.flag, self.flag_where = flag, where
            elif flag != self.flag:
                raise ValueError(
                    f"{where}: in_batch_negatives={flag} but {self.flag_where} has {self.flag}; "
                    f"all records of dataset {self.dataset} must agree (or use a sidecar "
                    f"{SIDECAR_SUFFIX})"
                )
        self.stats.read += 1
        self.n_pos.append(len(rec.pos))
        self.n_neg.append(len(rec.neg))
        self.scored += rec.pos_scores is not None
        return True


def index_jsonl(files: list[Path], v: RecordValidator) -> JsonlSource:
    all_offsets, all_lines = [], []
    total = sum(f.stat().st_size for f in files)
    with _progress(total, f"indexing {v.dataset} bytes") as bar:
        for path in files:
            offsets, lines = [], []
            with open(path, "rb") as fh:
                offset, lineno = 0, 0
                shown = 0
                for raw in fh:
                    lineno += 1
                    here, offset = offset, offset + len(raw)
                    if offset - shown >= 1 << 20:  # per MiB: a bar update per line costs more
                        bar.update(offset - shown)
                        shown = offset
                    if not raw.strip():
                        continue
                    try:
                        obj = parse_json_line(raw)  # refuses a key that appears twice
                    except ValueError as err:
                        obj = err
                    where = f"{path}:{lineno}"
                    if isinstance(obj, ValueError):
                        msg = json_line_error(where, obj)
                        if not v.skip:
                            raise ValueError(msg) from obj
                        v.stats.skipped += 1
                        if len(v.stats.errors) < 5:
                            v.stats.errors.append(msg)
                        continue
                    if v.add(obj, where):
                        offsets.append(here)
                        lines.append(lineno)
                bar.update(offset - shown)
            all_offsets.append(np.asarray(offsets, dtype=np.int64))
            all_lines.append(np.asarray(lines, dtype=np.int64))
    return JsonlSource(files, all_offsets, all_lines)


def index_rows(get_row, batches, n_rows: int, where: str, v: RecordValidator) -> RowsSource:
    """`batches` yields lists of row dicts in order; rows are validated and the good ones kept."""
    keep, row = [], 0
    with _progress(n_rows, f"indexing {v.dataset}") as bar:
        for batch in batches:
            for obj in batch:
                if v.add(obj, f"{where}: row {row + 1}"):
                    keep.append(row)
                row += 1
            bar.update(len(batch))
    return RowsSource(get_row, np.asarray(keep, dtype=np.int64), where)


def parquet_source(files: list[Path], v: RecordValidator) -> RowsSource:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            f"{files[0]}: reading Parquet needs pyarrow (pip install pyarrow)"
        ) from err
    # memory-mapped: rows are materialised one at a time when the sampler asks for them
    table = pa.concat_tables([pq.read_table(f, memory_map=True) for f in files])
    where = str(files[0]) if len(files) == 1 else f"{files[0].parent} (Parquet files)"
    batches = (b.to_pylist() for b in table.to_batches(max_chunksize=4096))
    return index_rows(lambda r: table.slice(r, 1).to_pylist()[0], batches, table.num_rows, where, v)


def datasets_source(ds, where: str, v: RecordValidator) -> RowsSource:
    def batches():
        for start in range(0, len(ds), 4096):
            cols = ds[start : start + 4096]
            keys = list(cols)
            yield [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]

    return index_rows(lambda r: dict(ds[r]), batches(), len(ds), where, v)


__all__ = [
    "JsonlSource",
    "RecordSource",
    "RecordValidator",
    "RowsSource",
    "datasets_source",
    "index_jsonl",
    "parquet_source",
]
