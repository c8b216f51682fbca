"""Datasets from `--train-data`: local JSONL / Parquet files, folders of them, `datasets` folders
saved with `save_to_disk` (a `Dataset`, or a `DatasetDict`: its `train` split, or another as
`folder:split`), or `datasets` names (`owner/name`, `owner/name:split`); weights as in Megatron's
`--data-path`.

Every record is validated once when a dataset is opened, by `records.record_from_dict` (types,
duplicate keys, task names resolved against Table 6; the first bad record is a ValueError naming
file:line, the key and the cause), so a bad record stops a run before its first step, and
only what the sampler needs is kept in memory: per record its number of positives and negatives
and where to find it (a byte offset for JSONL, a row for Arrow-backed data). Records are read
again on demand, so a rank holds a few bytes per record, not the texts.

A dataset's `in_batch_negatives` flag comes from, in order: the `in_batch_negatives` argument
(a training config), the sidecar file `<path>.meta.json` (`{"in_batch_negatives": false}`), the
records' own `in_batch_negatives` key (all records of a dataset must agree), else True. A sidecar
that contradicts the records is an error.

Over 400 lines: every input kind (JSONL, Parquet, folders, `datasets`) behind one validated
record source with file-and-line errors.
"""

from __future__ import annotations

import json
import os
import re
import time
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
from megatron_nvembed.logging_utils import get_logger

logger = get_logger(__name__)

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_KEYS = ("in_batch_negatives", "name")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"
_SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")  # what `datasets` accepts as a split name
DATASET_DICT_FILE = "dataset_dict.json"  # what `DatasetDict.save_to_disk` writes beside its splits


def split_spec(spec: str) -> tuple[str, str | None]:
    """Splits a `--train-data` item `path:split` (or `owner/name:split`) at its last ":".

    Returns:
        (path, split); (spec, None) when there is no ":", when `spec` exists as given (a path
        wins, whatever it holds), or when the text after the last ":" is no split name (a
        Windows drive `C:\\data\\a.jsonl`, a URL `s3://...`).
    """
    if ":" not in spec or os.path.exists(spec):
        return spec, None
    base, _, split = spec.rpartition(":")
    if not base or not _SPLIT_NAME.match(split):
        return spec, None
    return base, split


def parse_data_paths(args: list[str]) -> list[tuple[float, str]]:
    """`["a.jsonl", "b.jsonl"]` (equal weights) or `["0.3", "a.jsonl", "0.7", "b.jsonl"]`.

    Returns:
        (weight, path) pairs; weights as given (the sampler normalises them).

    Raises:
        ValueError: naming `--train-data` on an empty list, an odd weight/path list, a bad or
            negative weight, or weights that sum to zero.
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
            raise ValueError(
                f"--train-data: {args} mixes weights and paths; give either paths only or "
                "weight/path pairs"
            )
        return [(1.0, a) for a in args]
    if len(args) % 2:
        raise ValueError(f"--train-data: expected weight/path pairs, got {len(args)} items")
    pairs = []
    for w, p in zip(args[::2], args[1::2]):
        if not is_number(w) or not float(w) >= 0 or float(w) == float("inf"):
            raise ValueError(f"--train-data: bad weight {w!r} for {p!r} (need a number >= 0)")
        pairs.append((float(w), p))
    if sum(w for w, _ in pairs) <= 0:
        raise ValueError("--train-data: the weights sum to zero")
    return pairs


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


class _JsonlSource(RecordSource):
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


class _RowsSource(RecordSource):
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


class _Validator:
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


def _index_jsonl(files: list[Path], v: _Validator) -> _JsonlSource:
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
    return _JsonlSource(files, all_offsets, all_lines)


def _index_rows(get_row, batches, n_rows: int, where: str, v: _Validator) -> _RowsSource:
    """`batches` yields lists of row dicts in order; rows are validated and the good ones kept."""
    keep, row = [], 0
    with _progress(n_rows, f"indexing {v.dataset}") as bar:
        for batch in batches:
            for obj in batch:
                if v.add(obj, f"{where}: row {row + 1}"):
                    keep.append(row)
                row += 1
            bar.update(len(batch))
    return _RowsSource(get_row, np.asarray(keep, dtype=np.int64), where)


def _parquet_source(files: list[Path], v: _Validator) -> _RowsSource:
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
    return _index_rows(
        lambda r: table.slice(r, 1).to_pylist()[0], batches, table.num_rows, where, v
    )


def _datasets_source(ds, where: str, v: _Validator) -> _RowsSource:
    def batches():
        for start in range(0, len(ds), 4096):
            cols = ds[start : start + 4096]
            keys = list(cols)
            yield [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]

    return _index_rows(lambda r: dict(ds[r]), batches(), len(ds), where, v)


def _dataset_dict_split(path: Path, split: str | None):
    """(`datasets.Dataset` of one split, the split's name) of a `DatasetDict.save_to_disk` folder:
    `split`, or "train" when None.

    Raises:
        ValueError: naming `--train-data`, the folder and its splits, for an unknown split or, with
            no split chosen, a folder without a "train" split.
    """
    index = path / DATASET_DICT_FILE
    try:
        splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
        if not isinstance(splits, list):
            raise TypeError(f"'splits' is a {type(splits).__name__}")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a `datasets` DatasetDict index ({err})") from err
    listed = ", ".join(map(str, splits))
    if split is None:
        if "train" not in splits:
            raise ValueError(
                f"--train-data: {path} is a `datasets` DatasetDict without a 'train' split; "
                f"choose one as {path}:SPLIT (splits: {listed})"
            )
        split = "train"
    elif split not in splits:
        raise ValueError(f"--train-data: {path} has no split {split!r} (splits: {listed})")
    import datasets  # lazily: only `save_to_disk` folders and names need it

    # each split is its own `Dataset.save_to_disk` folder; the others stay unopened
    return datasets.load_from_disk(str(path / split)), split


def _read_sidecar(path: Path) -> dict:
    side = Path(str(path).rstrip("/\\") + SIDECAR_SUFFIX)
    if not side.exists():
        return {}
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{side}: malformed JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{side}: expected a JSON object")
    for key, value in meta.items():
        if key not in SIDECAR_KEYS:
            raise ValueError(f"{side}: unknown key {key!r} (known: {', '.join(SIDECAR_KEYS)})")
        want = bool if key == "in_batch_negatives" else str
        if not isinstance(value, want):
            raise ValueError(f"{side}: key {key!r} must be a {want.__name__}")
    meta["_file"] = str(side)
    return meta


def local_spec_missing(spec: str) -> bool:
    """True when the `--train-data` item `spec` is a path that does not exist and nothing a
    `datasets` name could be (a file suffix, or not `name` / `owner/name`): `load_dataset_spec`
    refuses it without asking the hub, and `pretrain_nvembed.py --check-args` before starting."""
    base, _ = split_spec(spec)
    path = Path(base)
    # a file path, or nothing a `datasets` name could be: do not ask the hub
    return not path.exists() and (path.suffix in RECORD_SUFFIXES or not _DATASET_NAME.match(base))


def load_dataset_spec(
    spec: str,
    *,
    skip_bad_records: bool = False,
    in_batch_negatives: bool | None = None,
    split: str | None = None,
) -> RecordSource:
    """Opens one `--train-data` dataset and validates every record.

    Args:
        spec: a `.jsonl`/`.json`/`.parquet` file; a folder of such files (all of one kind, read in
            name order); a folder saved by `datasets.Dataset.save_to_disk`; a folder saved by
            `datasets.DatasetDict.save_to_disk` (its "train" split, or `folder:split`); or, when
            no such path exists and `spec` looks like `name` or `owner/name` (optionally
            `:split`), a `datasets` name for `datasets.load_dataset(name, split=split)` (needs the
            hub or its cache). A spec that exists as given is always a path (see `split_spec`).
        skip_bad_records: skip (and count in `.stats`) malformed records and records without a
            positive instead of raising.
        in_batch_negatives: overrides the sidecar's and the records' flag.
        split: the split of a DatasetDict folder or a `datasets` name, as `spec:split` does
            (default "train").

    Returns:
        A `RecordSource` (a Sequence of `Record`).

    Raises:
        FileNotFoundError: naming `--train-data` and the spec when nothing can be found.
        ValueError: naming file:line (or row) of a bad record, a sidecar's bad key, records that
            disagree on `in_batch_negatives`, or a dataset with no records; naming the folder and
            its splits for an unknown split or a DatasetDict without "train" and no split chosen;
            a split given for a source that has none.
        ImportError: `datasets` / `pyarrow` missing for a source that needs them.
    """
    start = time.perf_counter()
    base, spec_split = split_spec(spec)
    if spec_split is not None and split is not None and spec_split != split:
        raise ValueError(f"--train-data: {spec} names split {spec_split!r} but {split!r} was asked")
    split = spec_split or split
    path = Path(base)
    meta = _read_sidecar(path) if path.exists() else {}
    name = meta.get("name", spec)
    stats = ReadStats()
    v = _Validator(name, skip_bad_records, stats)
    if path.is_dir() and (path / DATASET_DICT_FILE).is_file():
        ds, split = _dataset_dict_split(path, split)
        if "name" not in meta:
            name = v.dataset = f"{base}:{split}"
        source = _datasets_source(ds, f"{path}:{split}", v)
    elif split is not None and path.exists():
        raise ValueError(
            f"--train-data: {spec}: {base} is no `datasets` DatasetDict folder (no "
            f"{DATASET_DICT_FILE}), so it has no split {split!r}; a path holding ':' is read as "
            "given only when it exists"
        )
    elif path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json")):
        import datasets  # lazily: only `save_to_disk` folders and names need it

        source = _datasets_source(datasets.load_from_disk(str(path)), str(path), v)
    elif path.exists():
        files = (
            sorted(p for p in path.iterdir() if p.is_file() and p.suffix in RECORD_SUFFIXES)
            if path.is_dir()
            else [path]
        )
        if not files:
            raise FileNotFoundError(f"--train-data: no .jsonl or .parquet files in {spec}")
        kinds = {f.suffix == ".parquet" for f in files}
        if len(kinds) > 1:
            raise ValueError(f"--train-data: {spec} mixes Parquet and JSONL files; split them")
        source = _parquet_source(files, v) if kinds.pop() else _index_jsonl(files, v)
    elif local_spec_missing(spec):
        raise FileNotFoundError(f"--train-data: {spec} does not exist")
    else:
        split = split or "train"
        try:
            import datasets
        except ImportError as err:
            raise FileNotFoundError(
                f"--train-data: {spec} does not exist (and `datasets` is not installed to load "
                "it as a dataset name)"
            ) from err
        try:
            ds = datasets.load_dataset(base, split=split)
        except Exception as err:  # the hub client raises many kinds; keep the cause attached
            raise FileNotFoundError(
                f"--train-data: {spec} is no local path and `datasets.load_dataset({base!r}, "
                f"split={split!r})` failed: {type(err).__name__}: {err}"
            ) from err
        source = _datasets_source(ds, f"{base}:{split}", v)
    if len(v.n_pos) == 0:
        raise ValueError(f"--train-data: {spec} holds no usable records ({stats.skipped} skipped)")
    source.name = name
    source.stats = stats
    source.num_positives = np.asarray(v.n_pos, dtype=np.int32)
    source.num_negatives = np.asarray(v.n_neg, dtype=np.int32)
    source.scored_records = v.scored
    flag = v.flag
    if "in_batch_negatives" in meta:
        if flag is not None and flag != meta["in_batch_negatives"]:
            raise ValueError(
                f"{meta['_file']}: in_batch_negatives={meta['in_batch_negatives']} contradicts "
                f"the records ({v.flag_where} has {flag})"
            )
        flag = meta["in_batch_negatives"]
    if in_batch_negatives is not None:
        if flag is not None and flag != in_batch_negatives:
            logger.info(
                f"{name}: in_batch_negatives={in_batch_negatives} set by the config "
                f"overrides the data's {flag}"
            )
        flag = in_batch_negatives
    source.in_batch_negatives = True if flag is None else flag
    took = time.perf_counter() - start
    logger.info(
        f"{name}: {stats.read} records ({stats.skipped} skipped), "
        f"in_batch_negatives={source.in_batch_negatives}, indexed in {took:.1f} s "
        f"({stats.read / max(took, 1e-9):.0f} records/s)"
    )
    for msg in stats.errors:
        logger.warning(f"skipped: {msg}")
    return source


def load_records(
    spec: str, *, skip_bad_records: bool = False, stats: ReadStats | None = None
) -> list[Record]:
    """All records of a dataset spec (see `load_dataset_spec`) as a list, for small data and
    tools; training uses `load_dataset_spec`, which keeps the texts on disk.

    Raises:
        As `load_dataset_spec`.
    """
    source = load_dataset_spec(spec, skip_bad_records=skip_bad_records)
    if stats is not None:
        stats.read += source.stats.read
        stats.skipped += source.stats.skipped
        stats.errors.extend(source.stats.errors)
    return list(source)


def in_batch_flag(records: Sequence[Record]) -> bool:
    """A list of records' `in_batch_negatives` flag: their common field value, default True.

    Raises:
        ValueError: when the records disagree.
    """
    flags = {
        bool(r.extra["in_batch_negatives"]) for r in records if "in_batch_negatives" in r.extra
    }
    if len(flags) > 1:
        raise ValueError("records of one dataset disagree on in_batch_negatives")
    return flags.pop() if flags else True
