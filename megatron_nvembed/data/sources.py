"""Random access to one dataset's validated records, per input kind: JSONL files (found again
by byte offset through their mapped per-file indexes, `jsonl_index`), Parquet files
(`parquet_source`) and `datasets` datasets (`datasets_source`), the last two as Arrow-backed rows.
Every record is read once through a `RecordValidator` (`records.record_from_dict`: the first bad
record is a ValueError naming file:line or row, the key and the cause): for JSONL when its index
is built, for rows each time the dataset is opened; only what the sampler needs stays in memory.
`loading.load_dataset_spec` chooses the kind from a `--train-data` item.
"""

from __future__ import annotations

from array import array
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
        num_positives, num_negatives: [n] int32, per record (JSONL: a view of the file's mapped
            index; a copy when the dataset spans several files: use `counts(i)` per record).
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
    """Records of JSONL files, found again by byte offset.

    Args:
        files: the data files, as named (error messages name them so).
        indexes: one `jsonl_index.FileIndex` per file: its rows (byte offset, 1-based line,
            positives, negatives per kept record) memory-mapped, not loaded.
    """

    def __init__(self, files: list[Path], indexes: list):
        self.files = files
        self.indexes = indexes
        self.ends = np.cumsum([len(ix) for ix in indexes], dtype=np.int64)  # [n_files]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _locate(self, index: int) -> tuple[int, int]:
        """(file, row within its index) of record `index` (0 <= index < len)."""
        f = int(np.searchsorted(self.ends, index, side="right"))
        return f, index - (int(self.ends[f - 1]) if f else 0)

    def counts(self, index: int) -> tuple[int, int]:
        f, local = self._locate(index)
        row = self.indexes[f].rows[local]
        return int(row["num_positives"]), int(row["num_negatives"])

    def _column(self, name: str) -> np.ndarray:
        if len(self.indexes) == 1:
            return self.indexes[0].rows[name]  # a view of the map
        return np.concatenate([ix.rows[name] for ix in self.indexes])  # a copy: several files

    @property
    def num_positives(self) -> np.ndarray:  # type: ignore[override]
        return self._column("num_positives")

    @property
    def num_negatives(self) -> np.ndarray:  # type: ignore[override]
        return self._column("num_negatives")

    def _get(self, index: int) -> Record:
        f, local = self._locate(index)
        fh = self._handles.get(f)
        if fh is None:
            fh = self._handles[f] = open(self.files[f], "rb")  # noqa: SIM115 (kept open)
        row = self.indexes[f].rows[local]
        fh.seek(int(row["offset"]))
        where = f"{self.files[f]}:{int(row['line'])}"
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


def progress_bar(total: int | None, desc: str):
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
    """Collects counts and the in-batch flags while records are validated.

    Args:
        dataset: the dataset's display name (messages).
        skip_bad_records: count and skip bad records instead of raising.
        stats: where the counts go.
        keep_counts: keep each record's number of positives and negatives (`n_pos`, `n_neg`:
            4 bytes each per record); the JSONL index writes its own and passes False.
    """

    def __init__(
        self, dataset: str, skip_bad_records: bool, stats: ReadStats, keep_counts: bool = True
    ):
        self.dataset, self.skip, self.stats = dataset, skip_bad_records, stats
        self.n_pos: array | None = array("i") if keep_counts else None
        self.n_neg: array | None = array("i") if keep_counts else None
        self.scored = 0
        self.flag: bool | None = None
        self.flag_where = ""

    def count_skipped(self, msg: str) -> None:
        """Counts a skipped bad record (or line), keeping the first five messages."""
        self.stats.skipped += 1
        if len(self.stats.errors) < 5:
            self.stats.errors.append(msg)

    def conflict(self, flag: bool, where: str) -> str:
        """The message for a record at `where` whose flag disagrees with the dataset's."""
        return (
            f"{where}: in_batch_negatives={flag} but {self.flag_where} has {self.flag}; "
            f"all records of dataset {self.dataset} must agree (or use a sidecar "
            f"{SIDECAR_SUFFIX})"
        )

    def add(self, obj, where: str) -> Record | None:
        """The validated record, or None when it is skipped (bad, with `skip_bad_records`).

        Raises:
            ValueError: a bad record (without `skip_bad_records`), or one whose
                `in_batch_negatives` disagrees with an earlier record's (always).
        """
        try:
            rec = record_from_dict(obj, where, require_positive=True)
            flag = rec.extra.get("in_batch_negatives")
            if flag is not None and not isinstance(flag, bool):
                raise ValueError(f"{where}: key 'in_batch_negatives' must be true or false")
        except ValueError as err:
            if not self.skip:
                raise
            self.count_skipped(str(err))
            return None
        if flag is not None:
            if self.flag is None:
                self.flag, self.flag_where = flag, where
            elif flag != self.flag:
                raise ValueError(self.conflict(flag, where))
        self.stats.read += 1
        if self.n_pos is not None:
            self.n_pos.append(len(rec.pos))
            self.n_neg.append(len(rec.neg))
        self.scored += rec.pos_scores is not None
        return rec


def index_rows(get_row, batches, n_rows: int, where: str, v: RecordValidator) -> RowsSource:
    """`batches` yields lists of row dicts in order; rows are validated and the good ones kept."""
    keep, row = array("q"), 0
    with progress_bar(n_rows, f"indexing {v.dataset}") as bar:
        for batch in batches:
            for obj in batch:
                if v.add(obj, f"{where}: row {row + 1}") is not None:
                    keep.append(row)
                row += 1
            bar.update(len(batch))
    source = RowsSource(get_row, np.asarray(keep, dtype=np.int64), where)
    source.num_positives = np.asarray(v.n_pos, dtype=np.int32)
    source.num_negatives = np.asarray(v.n_neg, dtype=np.int32)
    return source


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
    "index_rows",
    "parquet_source",
    "progress_bar",
]
