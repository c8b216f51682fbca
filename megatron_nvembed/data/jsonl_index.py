"""The index of a JSONL training file: built once, shared by the ranks, memory-mapped.

Opening a JSONL dataset needs, per record, where it is (byte offset, and its line for messages)
and its number of positives and negatives; finding them means parsing and validating every line
(about 60,000 records/s on one core: `bench/data_index.py`). The index keeps them in one file per data file, so a
restart, a resume and every other rank map it instead of reading the data again:

- where: beside the data file as named, `<file>.nvembed-index`; or, with `--data-cache-path DIR`,
  `DIR/<file name>.<16 hex digits of its resolved path>.nvembed-index`. When the data file's folder
  is not writable and holds no fresh index, under the system's temporary folder
  (`<tmp>/megatron_nvembed-data-index-<uid>/`, node-local), with one warning line naming it.
- format: rows of `ROW` (byte offset int64, line int64, positives int32, negatives int32: 24
  bytes per kept record), then a JSON footer (the key, the read's counts and first five skipped
  messages, the records with teacher scores, the file's first `in_batch_negatives` value and its
  line, a build id), the footer's length (uint64) and `MAGIC`. Written to a temporary file beside
  it and renamed into place (`utils.fileio.atomic_path`): a reader sees a whole index or none.
- key: the format, the data file's resolved path, size, mtime_ns, blake2b of its first and last
  MiB, `--skip-bad-records`, and the record rules (`records.RULES_VERSION`, raised when a rule
  changes, and the task table, `task_definitions.json`: task names decide which records are
  valid). An index whose key differs (stale) or that is no index of this format (too short, no
  end marker, an unreadable footer, a size that does not fit its record count: damaged) is
  rebuilt, with one log line naming the index file and why; a fresh one is mapped and reused
  (one log line too).
- who builds: under torch.distributed, global rank 0 first, then each node's local rank 0 (for an
  index it cannot see: a node-local folder), then the other ranks, which map what is there; so
  every rank of the default group must open the same datasets in the same order (the trainer
  does). A build that fails (a bad record) fails every rank with its message.

Validation runs when the index is built (`records.record_from_dict` through
`sources.RecordValidator`): a bad record stops the build with its file:line message and no index
is written; with `--skip-bad-records` the skipped count and the first five messages go into the
footer, so a reused index reports the same counts. The rows are not checksummed (only their
length and the ends are checked when mapped): a record read at a wrong offset fails to parse and
names its file and line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import struct
import sys
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np

from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.data.records import (
    RULES_VERSION,
    ReadStats,
    json_line_error,
    parse_json_line,
)
from megatron_nvembed.data.sources import JsonlSource, RecordValidator, progress_bar
from megatron_nvembed.utils.fileio import atomic_path, remove_stale_temporaries

logger = get_logger(__name__)

INDEX_FORMAT = 1
SUFFIX = ".nvembed-index"
MAGIC = b"NVEIDX01"
ROW = np.dtype(
    [("offset", "<i8"), ("line", "<i8"), ("num_positives", "<i4"), ("num_negatives", "<i4")]
)
HASH_SPAN = 1 << 20
"""Bytes hashed at each end of a data file for its key."""
_END = struct.Struct("<Q8s")  # footer length, MAGIC
_CHUNK = 1 << 16  # rows held in memory while building, then written
_STALE_TEMPORARY_S = 3600.0  # a killed build's temporary, unmodified this long, is removed


class FileIndex:
    """One data file's mapped index: `rows` ([n] `ROW`, a read-only map of the index file) and
    `footer` (its JSON footer: the key, counts, flag)."""

    def __init__(self, path: Path, rows: np.ndarray, footer: dict):
        self.path, self.rows, self.footer = path, rows, footer

    def __len__(self) -> int:
        return len(self.rows)

    def __reduce__(self):  # a pickled source maps the file again instead of copying its rows
        return (_remap, (str(self.path), self.footer["build"]))


class _Unusable(Exception):
    """An index file that cannot be used; the message says why (for the rebuild's log line)."""


def _remap(path: str, build: str) -> FileIndex:
    try:
        ix = _read(Path(path))
    except _Unusable as err:
        raise ValueError(f"data index {path}: {err}; open the dataset again") from None
    if ix.footer["build"] != build:
        raise ValueError(f"data index {path}: rebuilt since it was opened; open the dataset again")
    return ix


@functools.cache
def _rules() -> str:
    """A hash of the record rules' version and the task table (which records are valid depends
    on both: its task names)."""
    from megatron_nvembed.data.templates import TASK_DEFINITIONS_FILE

    h = hashlib.blake2b(TASK_DEFINITIONS_FILE.read_bytes(), digest_size=8)
    if RULES_VERSION > 1:  # version 1 hashed the task table alone
        h.update(f"record rules {RULES_VERSION}".encode())
    return h.hexdigest()


def file_key(data_file: Path, skip_bad_records: bool) -> dict:
    """What an index of `data_file` was built from (see the module docstring, "key")."""
    st = data_file.stat()
    with open(data_file, "rb") as fh:
        head = hashlib.blake2b(fh.read(HASH_SPAN), digest_size=16).hexdigest()
        fh.seek(max(st.st_size - HASH_SPAN, 0))
        tail = hashlib.blake2b(fh.read(HASH_SPAN), digest_size=16).hexdigest()
    return {
        "path": str(data_file.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "head": head,
        "tail": tail,
        "skip_bad_records": bool(skip_bad_records),
        "rules": _rules(),
    }


def _difference(built: dict, now: dict) -> str | None:
    """Why an index keyed `built` is stale for a data file keyed `now`, or None."""
    if built["path"] != now["path"]:
        return f"built for {built['path']}"
    if built["size"] != now["size"]:
        return f"the data file changed size ({built['size']} -> {now['size']} bytes)"
    if (built["head"], built["tail"]) != (now["head"], now["tail"]):
        return "the data file's content changed (its first or last MiB)"
    if built["mtime_ns"] != now["mtime_ns"]:
        return "the data file was modified since (mtime)"
    if built["skip_bad_records"] != now["skip_bad_records"]:
        was, now_on = (
            ("on" if x else "off") for x in (built["skip_bad_records"], now["skip_bad_records"])
        )
        return f"built with --skip-bad-records {was}, this run has it {now_on}"
    if built["rules"] != now["rules"]:
        return "the record rules or the task table (task_definitions.json) changed since"
    return None


_FOOTER_TYPES = {
    "records": int,
    "build": str,
    "key": dict,
    "read": int,
    "skipped": int,
    "errors": list,
    "scored_records": int,
    "in_batch_line": int,
}
_KEY_FIELDS = ("path", "size", "mtime_ns", "head", "tail", "skip_bad_records", "rules")


def _read(path: Path) -> FileIndex:
    """Maps the index file `path`, checking its end marker, footer and size (not its key).

    Raises:
        _Unusable: saying why (none yet, damaged, another format).
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 (one file for the checks and the map)
    except (FileNotFoundError, NotADirectoryError):
        raise _Unusable("none yet") from None
    except OSError as err:
        raise _Unusable(f"unreadable ({err})") from None
    with fh:
        footer, size, length = _footer(fh)
        n = footer["records"]
        if n < 0 or n * ROW.itemsize + length + _END.size != size:
            need = n * ROW.itemsize + length + _END.size
            raise _Unusable(f"damaged: {size} bytes, where {n} records need {need}")
        rows = np.memmap(fh, ROW, mode="r", shape=(n,)) if n else np.zeros(0, ROW)
    return FileIndex(path, rows, footer)


def _footer(fh) -> tuple[dict, int, int]:
    """(footer, file size, footer length) of an open index file.

    Raises:
        _Unusable: as `_read`.
    """
    size = os.fstat(fh.fileno()).st_size
    if size < _END.size:
        raise _Unusable(f"damaged: {size} bytes, too short for an index")
    fh.seek(size - _END.size)
    length, magic = _END.unpack(fh.read(_END.size))
    if magic != MAGIC:
        raise _Unusable("damaged: no end marker (truncated, or not an index file)")
    if length > size - _END.size:
        raise _Unusable(f"damaged: a footer of {length} bytes in a file of {size}")
    fh.seek(size - _END.size - length)
    raw = fh.read(length)
    try:
        footer = json.loads(raw)
        fmt = footer["format"]
    except (ValueError, TypeError, KeyError) as err:
        raise _Unusable(f"damaged: unreadable footer ({type(err).__name__}: {err})") from None
    if fmt != INDEX_FORMAT:
        raise _Unusable(f"written in index format {fmt!r}, this version reads {INDEX_FORMAT}")
    wrong = [k for k, t in _FOOTER_TYPES.items() if not isinstance(footer.get(k), t)]
    key = footer["key"] if isinstance(footer.get("key"), dict) else {}
    wrong += [f"key.{k}" for k in _KEY_FIELDS if k not in key]
    if wrong or footer.get("in_batch_negatives") not in (None, True, False):
        raise _Unusable(
            f"damaged: footer fields {wrong or ['in_batch_negatives']} missing or wrong"
        )
    return footer, size, length


def _misfit(ix: FileIndex, key: dict) -> str | None:
    """Why the rows of a fresh-keyed index cannot be right (reads only the first and last row)."""
    if not len(ix):
        return None
    first, last = ix.rows[0], ix.rows[-1]
    if first["line"] < 1 or not 0 <= first["offset"] <= last["offset"] < key["size"]:
        return "damaged: its rows do not fit the data file"
    return None


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _fallback_folder() -> Path:
    """Where indexes go when a data file's folder is not writable (node-local, per user)."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"megatron_nvembed-data-index-{user}"


def _cache_name(data_file: Path) -> str:
    tag = hashlib.blake2b(str(data_file.resolve()).encode(), digest_size=8).hexdigest()
    return f"{data_file.name}.{tag}{SUFFIX}"


def index_places(data_file: Path, cache_dir: str | os.PathLike | None) -> list[Path]:
    """Where the index of `data_file` may be, in the order looked at; a missing or stale one is
    (re)built at the last (module docstring, "where")."""
    if cache_dir is not None:
        return [Path(cache_dir) / _cache_name(data_file)]
    beside = data_file.with_name(data_file.name + SUFFIX)
    if _writable(data_file.parent):
        return [beside]
    return [beside, _fallback_folder() / _cache_name(data_file)]


def open_file_index(
    data_file: Path, fv: RecordValidator, cache_dir: str | os.PathLike | None = None
) -> FileIndex:
    """The index of one JSONL file: a fresh one mapped, else one built (every record validated
    through `fv`, which then holds this file's counts), written and mapped.

    Raises:
        ValueError: a bad record (file:line), as `RecordValidator.add`.
        OSError: the index cannot be written, naming it and `--data-cache-path`.
    """
    key = file_key(data_file, fv.skip)
    places = index_places(data_file, cache_dir)
    why = ""
    for place in places:
        try:
            ix = _read(place)
            why = _difference(ix.footer["key"], key) or _misfit(ix, key)
        except _Unusable as err:
            why = str(err)
        if why is None:
            logger.info(f"data index {place}: reused ({len(ix)} records of {data_file})")
            return ix
    target = places[-1]
    if len(places) > 1:
        logger.warning(
            f"data index: {data_file.parent} is not writable; the index of {data_file} goes to "
            f"{target.parent} (--data-cache-path DIR chooses the folder)"
        )
    logger.info(f"data index {target}: building ({why})")
    try:
        return _build(data_file, target, key, fv)
    except OSError as err:
        raise OSError(
            f"data index {target}: could not build it from {data_file} ({err}); "
            "--data-cache-path DIR puts the training data's indexes in another folder"
        ) from err


def _build(data_file: Path, target: Path, key: dict, fv: RecordValidator) -> FileIndex:
    start = time.perf_counter()
    if target.parent.is_dir():  # a killed build's temporary (not one being written right now)
        remove_stale_temporaries(target.parent, target.name, min_age_s=_STALE_TEMPORARY_S)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            n, flag, line = _scan(data_file, fv, out)
            took = time.perf_counter() - start
            footer = {
                "format": INDEX_FORMAT,
                "key": key,
                "records": n,
                "build": secrets.token_hex(8),
                "read": fv.stats.read,
                "skipped": fv.stats.skipped,
                "errors": fv.stats.errors[:5],
                "scored_records": fv.scored,
                "in_batch_negatives": flag,
                "in_batch_line": line,
                "build_seconds": round(took, 3),
            }
            raw = json.dumps(footer).encode()
            out.write(raw)
            out.write(_END.pack(len(raw), MAGIC))
        ix = _read(tmp)  # mapped before the rename: the same file, whoever renames next
    ix.path = target
    logger.info(
        f"data index {target}: {n} records ({fv.stats.skipped} skipped) indexed in {took:.1f} s "
        f"({n / max(took, 1e-9):.0f} records/s)"
    )
    return ix


def _scan(data_file: Path, fv: RecordValidator, out) -> tuple[int, bool | None, int]:
    """Reads and validates every line of `data_file`, writing a `ROW` per kept record to `out`
    (in chunks: memory independent of the file's length).

    Returns:
        (rows written, the file's first `in_batch_negatives` value or None, its line or 0).
    """
    columns = (array("q"), array("q"), array("i"), array("i"))
    offsets, lines, n_pos, n_neg = columns
    written, flag, flag_line = 0, None, 0
    name = str(data_file)
    size = data_file.stat().st_size
    with open(data_file, "rb") as fh, progress_bar(size, f"indexing {fv.dataset} bytes") as bar:
        offset = lineno = shown = 0
        for raw in fh:
            lineno += 1
            here, offset = offset, offset + len(raw)
            if offset - shown >= 1 << 20:  # per MiB: a bar update per line costs more
                bar.update(offset - shown)
                shown = offset
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                obj = parse_json_line(raw)  # refuses a key that appears twice
            except ValueError as err:
                msg = json_line_error(where, err)
                if not fv.skip:
                    raise ValueError(msg) from err
                fv.count_skipped(msg)
                continue
            rec = fv.add(obj, where)
            if rec is None:
                continue
            offsets.append(here)
            lines.append(lineno)
            n_pos.append(len(rec.pos))
            n_neg.append(len(rec.neg))
            if flag is None and rec.extra and rec.extra.get("in_batch_negatives") is not None:
                flag, flag_line = rec.extra["in_batch_negatives"], lineno
            if len(offsets) == _CHUNK:
                written += _flush(out, columns)
        bar.update(offset - shown)
    written += _flush(out, columns)
    return written, flag, flag_line


def _flush(out, columns: tuple[array, ...]) -> int:
    """Writes the rows held in `columns` to `out` and empties them; returns how many."""
    n = len(columns[0])
    if n:
        rows = np.empty(n, ROW)
        for name, col in zip(ROW.names, columns):
            rows[name] = np.frombuffer(col, dtype=np.int64 if col.typecode == "q" else np.intc)
        out.write(rows.tobytes())
        for col in columns:
            del col[:]
    return n


def _merge(v: RecordValidator, ix: FileIndex, data_file: Path) -> None:
    """Adds one file's counts and flag to its dataset's validator `v`.

    Raises:
        ValueError: the file's first `in_batch_negatives` value disagrees with an earlier file's.
    """
    f = ix.footer
    v.stats.read += f["read"]
    v.stats.skipped += f["skipped"]
    v.stats.errors.extend(f["errors"][: max(5 - len(v.stats.errors), 0)])
    v.scored += f["scored_records"]
    flag = f["in_batch_negatives"]
    if flag is not None:
        where = f"{data_file}:{f['in_batch_line']}"
        if v.flag is None:
            v.flag, v.flag_where = flag, where
        elif flag != v.flag:
            raise ValueError(v.conflict(flag, where))


def jsonl_source(
    files: list[Path], v: RecordValidator, cache_dir: str | os.PathLike | None = None
) -> JsonlSource:
    """The records of JSONL `files` (one dataset, in order) through their indexes; `v` gets the
    dataset's counts and flag, as if every record had been read through it.

    Raises:
        ValueError: a bad record (file:line), records or files that disagree on
            `in_batch_negatives`; on every rank when the building rank found it.
        OSError: as `open_file_index`.
    """

    def open_all() -> list[FileIndex]:
        indexes = []
        for path in files:
            fv = RecordValidator(v.dataset, v.skip, ReadStats(), keep_counts=False)
            # a record that disagrees with an earlier file's stops the build where it stands
            fv.flag, fv.flag_where = v.flag, v.flag_where
            ix = open_file_index(path, fv, cache_dir)
            _merge(v, ix, path)
            indexes.append(ix)
        return indexes

    dist = sys.modules.get("torch.distributed")  # no process group without it: no torch import
    if dist is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return JsonlSource(files, open_all())
    from megatron_nvembed.core.parallel import in_rank_stages

    return JsonlSource(files, in_rank_stages(open_all))
