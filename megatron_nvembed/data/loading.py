"""Datasets from `--train-data`: local JSONL / Parquet files, folders of them, `datasets` folders
saved with `save_to_disk` (a `Dataset`, or a `DatasetDict`: its `train` split, or another as
`folder:split`), or `datasets` names (`owner/name`, `owner/name:split`); weights as in Megatron's
`--data-path`.

Every record is validated by `records.record_from_dict` (types, duplicate keys, task names
resolved against Table 6; the first bad record is a ValueError naming file:line, the key and the
cause), so a bad record stops a run before its first step: for JSONL once, when the file's index
is built (`jsonl_index`: built by one rank, written beside the data or under `--data-cache-path`,
mapped by every rank and reused by later starts until the file changes), for Arrow-backed data
each time it is opened. Only what the sampler needs is kept: per record its number of positives
and negatives and where to find it (a byte offset for JSONL, mapped from the index, not loaded; a
row for Arrow-backed data). Records are read again on demand, so a rank holds no texts.

A dataset's `in_batch_negatives` flag comes from, in order: the `in_batch_negatives` argument
(a training config), the sidecar file `<path>.meta.json` (`{"in_batch_negatives": false}`), the
records' own `in_batch_negatives` key (all records of a dataset must agree), else True. A sidecar
that contradicts the records is an error.

Here: the `--train-data` items (`parse_data_paths`, `split_spec`), the choice of the input kind
(`open_source`) and the flag; the record sources of each kind are `data.sources`, the JSONL
files' indexes `data.jsonl_index`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.data.jsonl_index import jsonl_source
from megatron_nvembed.data.records import ReadStats, Record
from megatron_nvembed.data.sources import (
    SIDECAR_SUFFIX,
    RecordSource,
    RecordValidator,
    datasets_source,
    parquet_source,
)

logger = get_logger(__name__)

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
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
    data_cache_path: str | os.PathLike | None = None,
) -> RecordSource:
    """Opens one `--train-data` dataset; every record is validated (JSONL: when its index is
    built, see `jsonl_index`).

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
        data_cache_path: the folder of the JSONL files' indexes (`--data-cache-path`); None:
            beside each file (`jsonl_index.index_places`).

    Returns:
        A `RecordSource` (a Sequence of `Record`).

    Raises:
        FileNotFoundError: naming `--train-data` and the spec when nothing can be found.
        ValueError: naming file:line (or row) of a bad record, a sidecar's bad key, records that
            disagree on `in_batch_negatives`, or a dataset with no records; naming the folder and
            its splits for an unknown split or a DatasetDict without "train" and no split chosen;
            a split given for a source that has none.
        ImportError: `datasets` / `pyarrow` missing for a source that needs them.
        OSError: a JSONL index that cannot be written (naming it and `--data-cache-path`).
    """
    start = time.perf_counter()
    base, split = _resolve_split(spec, split)
    path = Path(base)
    meta = _read_sidecar(path) if path.exists() else {}
    stats = ReadStats()
    v = RecordValidator(meta.get("name", spec), skip_bad_records, stats)
    source = open_source(
        spec, base, split, v, named="name" in meta, data_cache_path=data_cache_path
    )
    if len(source) == 0:
        raise ValueError(f"--train-data: {spec} holds no usable records ({stats.skipped} skipped)")
    source.name = v.dataset
    source.stats = stats
    source.scored_records = v.scored
    source.in_batch_negatives = _in_batch_negatives(v, meta, in_batch_negatives)
    took = time.perf_counter() - start
    logger.info(
        f"{source.name}: {stats.read} records ({stats.skipped} skipped), "
        f"in_batch_negatives={source.in_batch_negatives}, opened in {took:.1f} s "
        f"({stats.read / max(took, 1e-9):.0f} records/s)"
    )
    for msg in stats.errors:
        logger.warning(f"skipped: {msg}")
    return source


def _resolve_split(spec: str, split: str | None) -> tuple[str, str | None]:
    """(path or name, split) of a `--train-data` item and a split asked for it.

    Raises:
        ValueError: the item names another split than the one asked.
    """
    base, spec_split = split_spec(spec)
    if spec_split is not None and split is not None and spec_split != split:
        raise ValueError(f"--train-data: {spec} names split {spec_split!r} but {split!r} was asked")
    return base, spec_split or split


def open_source(
    spec: str,
    base: str,
    split: str | None,
    v: RecordValidator,
    *,
    named: bool = False,
    data_cache_path: str | os.PathLike | None = None,
) -> RecordSource:
    """The record source of one `--train-data` item (`base`, `split`: `_resolve_split`), every
    record read through `v` (JSONL: when its index is built, under `data_cache_path` or beside
    the file; a reused index gives `v` the counts it recorded). A DatasetDict split's display
    name (`v.dataset`) becomes `folder:split` unless the sidecar names the dataset (`named`).

    Raises:
        As `load_dataset_spec`.
    """
    path = Path(base)
    if path.is_dir() and (path / DATASET_DICT_FILE).is_file():
        ds, split = _dataset_dict_split(path, split)
        if not named:
            v.dataset = f"{base}:{split}"
        return datasets_source(ds, f"{path}:{split}", v)
    if split is not None and path.exists():
        raise ValueError(
            f"--train-data: {spec}: {base} is no `datasets` DatasetDict folder (no "
            f"{DATASET_DICT_FILE}), so it has no split {split!r}; a path holding ':' is read as "
            "given only when it exists"
        )
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json")):
        import datasets  # lazily: only `save_to_disk` folders and names need it

        return datasets_source(datasets.load_from_disk(str(path)), str(path), v)
    if path.exists():
        return _files_source(spec, path, v, data_cache_path)
    if local_spec_missing(spec):
        raise FileNotFoundError(f"--train-data: {spec} does not exist")
    return _hub_source(spec, base, split or "train", v)


def _files_source(
    spec: str, path: Path, v: RecordValidator, data_cache_path: str | os.PathLike | None
) -> RecordSource:
    """A JSONL or Parquet file, or a folder of them (all of one kind, in name order)."""
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
    if kinds.pop():
        return parquet_source(files, v)
    return jsonl_source(files, v, data_cache_path)


def _hub_source(spec: str, base: str, split: str, v: RecordValidator) -> RecordSource:
    """A `datasets` name, loaded with `datasets.load_dataset(base, split=split)`.

    Raises:
        FileNotFoundError: naming `--train-data` and what was tried.
    """
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
    return datasets_source(ds, f"{base}:{split}", v)


def _in_batch_negatives(v: RecordValidator, meta: dict, override: bool | None) -> bool:
    """The dataset's flag: `override`, else the sidecar's, else the records', else True.

    Raises:
        ValueError: a sidecar that contradicts the records.
    """
    flag = v.flag
    if "in_batch_negatives" in meta:
        if flag is not None and flag != meta["in_batch_negatives"]:
            raise ValueError(
                f"{meta['_file']}: in_batch_negatives={meta['in_batch_negatives']} contradicts "
                f"the records ({v.flag_where} has {flag})"
            )
        flag = meta["in_batch_negatives"]
    if override is not None:
        if flag is not None and flag != override:
            logger.info(
                f"{v.dataset}: in_batch_negatives={override} set by the config "
                f"overrides the data's {flag}"
            )
        flag = override
    return True if flag is None else flag


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
