"""The files of one embedding shard, and the record that proves their bytes.

Shard `s` of an `encode_corpus` folder is `emb_{s:05d}.npy` (float32 [rows, dim]), with
`ids_{s:05d}.npy` when the corpus has ids, and its record `emb_{s:05d}.json`, written last: a
manifest (`utils.checksums`) of the shard's files (size and XXH3-128 of the bytes written, hashed
from memory as they are written, not read back), the fingerprint of the model that made it
(`evaluation.encoder.model_fingerprint`) and the digest of the `meta.json` it was made for. A
shard is finished exactly when its record exists: a kill before the record loses the shard, and
a rerun recomputes it.

`check_record` and `check_bytes` verify a shard against its record, naming the file that differs
(`ShardError`): the record is checked against the folder's `meta.json` (another model's or
another run's shard is a `ForeignShard`, naming both model fingerprints), then the files' sizes
and bytes. `ShardedEmbeddings` reads a finished folder's shards (memory-mapped), each file's bytes
verified before its first use.

Imports nothing of the package but `utils`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from megatron_nvembed.utils.checksums import (
    ManifestError,
    buffers_checksum,
    bytes_checksum,
    check_file,
    manifest_from,
    read_manifest,
)
from megatron_nvembed.utils.diskspace import npy_size, reserve_space
from megatron_nvembed.utils.fileio import write_atomic, write_with

META = "meta.json"


class ShardError(ManifestError):
    """A shard disagrees with its record (the message names the file): damaged or truncated."""


class ForeignShard(ShardError):
    """A shard's record says another model or another `meta.json` made it: the folder mixes two
    runs (e.g. its `meta.json` was replaced by another run's)."""


def emb_file(folder: Path, s: int) -> Path:
    return folder / f"emb_{s:05d}.npy"


def ids_file(folder: Path, s: int) -> Path:
    return folder / f"ids_{s:05d}.npy"


def record_file(folder: Path, s: int) -> Path:
    return folder / f"emb_{s:05d}.json"


def meta_digest(meta: dict) -> str:
    """The digest of a `meta.json` dict (key order aside) that each shard's record keeps."""
    return bytes_checksum(json.dumps(meta, sort_keys=True).encode("utf-8"))["xxh3_128"]


def model_of(meta: dict) -> str:
    """The model fingerprint a `meta.json` dict records ("" for models without one)."""
    model = meta.get("model")
    return str(model.get("fingerprint", "")) if isinstance(model, dict) else ""


def save_npy_blocks(path, shape: tuple, dtype, blocks: Iterable[np.ndarray]) -> dict:
    """Writes a `.npy` file (format 1.0, no pickle) of `shape` and `dtype` from `blocks` of
    consecutive rows, atomically, its bytes reserved first (`utils.diskspace.reserve_space`: a
    full disk raises `DiskFullError` before the first block); returns the size and checksum of the bytes written, hashed from
    memory as they are written (memory: one block)."""
    head = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
    np.lib.format.write_array_header_1_0(head, {**header, "shape": tuple(shape)})
    record: dict = {}
    size = npy_size(tuple(shape), dtype)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            reserve_space(f, size, path)  # a full disk fails here, never as a SIGBUS later

            def written() -> Iterator:
                f.write(head.getvalue())
                yield head.getvalue()
                for block in blocks:
                    block = np.ascontiguousarray(block, dtype=dtype)
                    block.tofile(f)  # as np.save writes (faster than f.write of its buffer)
                    yield block.reshape(-1).view(np.uint8)

            record.update(buffers_checksum(written()))
            f.truncate()  # exactly the array, whatever was reserved

    write_with(path, write, size)
    return record


def save_npy(path: Path, array: np.ndarray) -> dict:
    """`save_npy_blocks` of one array."""
    return save_npy_blocks(path, array.shape, array.dtype, [array])


def write_shard(folder: Path, s: int, emb: np.ndarray, ids: np.ndarray | None, meta: dict) -> None:
    """Writes shard `s`: ids, embeddings, then the record that marks it finished."""
    entries = {}
    if ids is not None:
        entries[ids_file(folder, s).name] = save_npy(ids_file(folder, s), ids)
    entries[emb_file(folder, s).name] = save_npy(emb_file(folder, s), emb)
    record = manifest_from(entries)
    record.update(model_fingerprint=model_of(meta), meta=meta_digest(meta))
    write_atomic(record_file(folder, s), json.dumps(record, indent=1, sort_keys=True))


def check_record(folder: Path, s: int, meta: dict) -> dict:
    """Shard `s`'s record, read and checked against the folder's `meta.json` and the sizes of its
    files (a stat each; no bytes read).

    Raises:
        ShardError: naming the file: the record is unreadable, was made by another model (both
            fingerprints named) or for another `meta.json`, or a file is missing or of another
            size.
    """
    path = record_file(folder, s)
    try:
        record = read_manifest(path)
    except ManifestError as err:
        raise ShardError(str(err)) from None
    made_by, says = str(record.get("model_fingerprint", "")), model_of(meta)
    if made_by != says:
        raise ForeignShard(
            f"{path}: shard {s} was made by model {made_by or '(none)'}, but {folder / 'meta.json'} "
            f"says model {says or '(none)'}; the folder mixes two models' embeddings"
        )
    if record.get("meta") != meta_digest(meta):
        raise ForeignShard(
            f"{path}: shard {s} was made for another {folder / 'meta.json'} (other corpus or "
            "settings); the folder mixes two runs' embeddings"
        )
    wanted = {emb_file(folder, s).name} | ({ids_file(folder, s).name} if meta["has_ids"] else set())
    if set(record["files"]) != wanted:
        raise ShardError(f"{path}: lists {sorted(record['files'])}, expected {sorted(wanted)}")
    for rel, entry in record["files"].items():
        size = (folder / rel).stat().st_size if (folder / rel).is_file() else None
        if size != entry["size"]:
            raise ShardError(
                f"{folder / rel}: {'missing' if size is None else f'{size} bytes'}, its record "
                f"{path.name} says {entry['size']} bytes"
            )
    return record


def check_bytes(folder: Path, record: dict, rel: str) -> None:
    """Hashes one file of a shard against its record.

    Raises:
        ShardError: naming the file, when its bytes differ.
    """
    try:
        check_file(folder, rel, record["files"][rel])
    except ManifestError as err:
        raise ShardError(str(err)) from None


def check_shard(folder: Path, s: int, meta: dict) -> None:
    """Shard `s` checked whole: its record (`check_record`), then every byte of its files."""
    record = check_record(folder, s, meta)
    for rel in record["files"]:
        check_bytes(folder, record, rel)


def remove_shard(folder: Path, s: int) -> None:
    """Removes shard `s`'s files, record first (so it is never half there as a finished one)."""
    for path in (record_file(folder, s), emb_file(folder, s), ids_file(folder, s)):
        path.unlink(missing_ok=True)


def finished(folder: Path, s: int) -> bool:
    """Shard `s` has its record (it was finished; `check_shard` says whether it is intact)."""
    return os.path.isfile(record_file(folder, s))


class ShardedEmbeddings:
    """The shards of a finished `encode_corpus` folder. Opening it checks every shard's record
    against `meta.json` and its files' sizes; each file's bytes are verified before its first
    use (`ShardError`, a ValueError naming the file, for a damaged one).

    Attributes:
        rows, dim, shard_size, num_shards, meta (the `meta.json` dict).
    """

    def __init__(self, folder: str | os.PathLike, *, verified=()):
        """
        Args:
            verified: shards whose bytes the caller has just verified or written (not hashed
                again).

        Raises:
            FileNotFoundError: no `meta.json`, or shards missing.
            ShardError: a shard's record disagrees with `meta.json` or a file's size.
        """
        self.folder = Path(folder)
        meta_file = self.folder / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: missing (not a corpus embedding folder)")
        self.meta = json.loads(meta_file.read_text())
        self.rows, self.dim = int(self.meta["rows"]), int(self.meta["dim"])
        self.shard_size = int(self.meta["shard_size"])
        self.num_shards = -(-self.rows // self.shard_size) if self.rows else 0
        self.has_ids = bool(self.meta["has_ids"])
        missing = [s for s in range(self.num_shards) if not finished(self.folder, s)]
        if missing:
            raise FileNotFoundError(
                f"{self.folder}: {len(missing)} of {self.num_shards} shards missing "
                f"(first: {emb_file(self.folder, missing[0]).name}); rerun the encoding to "
                "finish them"
            )
        self._records = [check_record(self.folder, s, self.meta) for s in range(self.num_shards)]
        self._verified = {
            path.name
            for s in verified
            for path in (emb_file(self.folder, s), ids_file(self.folder, s))
        }

    def _checked(self, path: Path, s: int) -> Path:
        """`path` (a file of shard `s`), its bytes verified against the record once."""
        if path.name not in self._verified:
            check_bytes(self.folder, self._records[s], path.name)
            self._verified.add(path.name)
        return path

    def bounds(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min((s + 1) * self.shard_size, self.rows)

    def embeddings(self, s: int) -> np.ndarray:
        """Shard `s`, float32 [rows, dim], memory-mapped (read-only)."""
        path = self._checked(emb_file(self.folder, s), s)
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
        lo, hi = self.bounds(s)
        if emb.shape != (hi - lo, self.dim):
            raise ValueError(f"{path}: shape {emb.shape}, expected {(hi - lo, self.dim)}")
        return emb

    def ids(self, s: int) -> np.ndarray | None:
        """Ids of shard `s` (unicode array) or None when the corpus has none."""
        if not self.has_ids:
            return None
        return np.load(self._checked(ids_file(self.folder, s), s), allow_pickle=False)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, embeddings) of each shard, in order."""
        for s in range(self.num_shards):
            yield self.bounds(s)[0], self.embeddings(s)

    def id_of(self, rows: np.ndarray) -> np.ndarray:
        """Ids of global `rows` (any shape), read shard by shard."""
        if not self.has_ids:
            raise ValueError(f"{self.folder}: the corpus has no ids")
        flat = np.asarray(rows).reshape(-1)
        out = np.empty(flat.shape, dtype=object)
        for s in np.unique(flat // self.shard_size):
            sel = flat // self.shard_size == s
            out[sel] = self.ids(int(s))[flat[sel] - s * self.shard_size]
        return out.reshape(np.shape(rows))

    def rows_of_ids(self, wanted: set[str]) -> dict[str, int]:
        """Global row of each id in `wanted` found in the corpus (first occurrence)."""
        found: dict[str, int] = {}
        for s in range(self.num_shards):
            lo, _ = self.bounds(s)
            for j, i in enumerate(self.ids(s).tolist()):
                if i in wanted and i not in found:
                    found[i] = lo + j
        return found

    def vectors(self, rows) -> np.ndarray:
        """Embeddings of global `rows` (1-D), float32 [len(rows), dim]."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for s in np.unique(rows // self.shard_size):
            sel = rows // self.shard_size == s
            out[sel] = self.embeddings(int(s))[rows[sel] - s * self.shard_size]
        return out

    def sum(self) -> np.ndarray:
        """Sum of all embeddings (float64 [dim]), shard by shard."""
        total = np.zeros(self.dim, dtype=np.float64)
        for _, emb in self:
            total += emb.sum(axis=0, dtype=np.float64)
        return total
