"""Corpus embeddings in shards: written atomically, resumable, split over data-parallel ranks.

`encode_corpus(embedder, corpus, folder, shard_size=...)` cuts the corpus into shards of
`shard_size` consecutive rows. Shard `s` is `emb_{s:05d}.npy` (float32 [rows, dim]) and, when
every row has an id, `ids_{s:05d}.npy` (fixed-width unicode, no pickle), written ids first and
embeddings last, each through a temporary file and a rename: a shard exists exactly when its
embeddings file does, so a kill at any moment loses at most the shards being computed, and a rerun
computes only the missing ones. `meta.json` (written before the first shard) records what the
shards are embeddings of (model, corpus file, instruction, normalisation, shard size); a folder
made for anything else is refused (or, for a private cache, cleared).

Under torchrun the missing shards are dealt round robin to the data-parallel ranks; each encodes
its shards alone (no gather: memory is one shard per rank) and the first tensor-parallel rank of
each group writes them. Rank 0 logs passages/s and the ETA of the whole corpus after each shard.

`ShardedEmbeddings(folder)` reads them back (memory-mapped) for search.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_nvembed.core.logging_utils import SPEAKER, get_logger
from megatron_nvembed.utils.fileio import remove_stale_temporaries, save_npy_atomic, write_atomic

logger = get_logger(__name__)

META = "meta.json"
FORMAT_VERSION = 1


def _emb_file(folder: Path, s: int) -> Path:
    return folder / f"emb_{s:05d}.npy"


def _ids_file(folder: Path, s: int) -> Path:
    return folder / f"ids_{s:05d}.npy"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _broadcast(obj):
    """`obj` of rank 0, on every rank (the identity without a process group)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class EncodeSummary:
    rows: int
    shards: int
    computed_shards: int
    """Shards this call computed (all ranks); the others were found finished."""
    computed_rows: int
    seconds: float

    @property
    def passages_per_second(self) -> float:
        return self.computed_rows / max(self.seconds, 1e-9)


class ShardedEmbeddings:
    """The shards of a finished `encode_corpus` folder.

    Attributes:
        rows, dim, shard_size, num_shards, meta (the `meta.json` dict).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_file = self.folder / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: missing (not a corpus embedding folder)")
        self.meta = json.loads(meta_file.read_text())
        self.rows, self.dim = int(self.meta["rows"]), int(self.meta["dim"])
        self.shard_size = int(self.meta["shard_size"])
        self.num_shards = -(-self.rows // self.shard_size) if self.rows else 0
        self.has_ids = bool(self.meta["has_ids"])
        missing = [s for s in range(self.num_shards) if not _emb_file(self.folder, s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.folder}: {len(missing)} of {self.num_shards} shards missing "
                f"(first: {_emb_file(self.folder, missing[0]).name}); rerun the encoding to "
                "finish them"
            )

    def bounds(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min((s + 1) * self.shard_size, self.rows)

    def embeddings(self, s: int) -> np.ndarray:
        """Shard `s`, float32 [rows, dim], memory-mapped (read-only)."""
        emb = np.load(_emb_file(self.folder, s), mmap_mode="r", allow_pickle=False)
        lo, hi = self.bounds(s)
        if emb.shape != (hi - lo, self.dim):
            raise ValueError(
                f"{_emb_file(self.folder, s)}: shape {emb.shape}, expected {(hi - lo, self.dim)}"
            )
        return emb

    def ids(self, s: int) -> np.ndarray | None:
        """Ids of shard `s` (unicode array) or None when the corpus has none."""
        if not self.has_ids:
            return None
        return np.load(_ids_file(self.folder, s), allow_pickle=False)

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


def _check_meta(folder: Path, meta: dict, on_mismatch: str) -> None:
    """Writes `meta.json` into an empty / new folder; checks it against an existing one."""
    meta_file = folder / META
    if folder.is_dir():
        remove_stale_temporaries(folder)  # e.g. a meta.json half-written by a killed run
    if meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            old = None
        if old == meta:
            return
        if on_mismatch == "clear":
            shutil.rmtree(folder)
        else:
            diff = (
                sorted(k for k in set(meta) | set(old) if meta.get(k) != old.get(k))
                if isinstance(old, dict)
                else ["meta.json unreadable"]
            )
            raise ValueError(
                f"{folder}: holds embeddings of something else (differs in {', '.join(diff)}); "
                "delete it or choose another folder"
            )
    elif folder.is_dir() and any(folder.iterdir()):
        raise ValueError(
            f"{folder}: exists and is not a corpus embedding folder (no {META}); "
            "choose an empty or new folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(meta_file, json.dumps(meta, indent=1, sort_keys=True))


@dataclass
class _ShardPlan:
    """Where and how a corpus is cut: `rows` rows in `num_shards` shards of `shard_size` under
    `folder`; `meta` is what `meta.json` records."""

    folder: Path
    rows: int
    shard_size: int
    meta: dict

    @property
    def num_shards(self) -> int:
        return -(-self.rows // self.shard_size)

    def size(self, s: int) -> int:
        return min(self.shard_size, self.rows - s * self.shard_size)


def _plan_shards(embedder, corpus, folder, shard_size, instruction, normalize) -> _ShardPlan:
    """The shards of `corpus` and the `meta.json` that says what they are embeddings of."""
    meta = {
        "format": FORMAT_VERSION,
        "model": embedder.identity(),
        "corpus": corpus.fingerprint(),
        "instruction": instruction,
        "normalize": normalize,
        "rows": len(corpus),
        "dim": int(embedder.dim),
        "shard_size": shard_size,
        "has_ids": corpus.all_have_ids,
    }
    return _ShardPlan(Path(folder), len(corpus), shard_size, meta)


def _missing_shards(embedder, plan: _ShardPlan, on_mismatch: str) -> list[int]:
    """The resume check: rank 0 claims the folder (`_check_meta`, stale temporaries removed)
    and lists the shards without an embeddings file; every rank gets its list (or its error).

    Raises:
        ValueError: the folder holds other embeddings or other files.
    """
    err = None
    if embedder.is_main:
        try:
            _check_meta(plan.folder, plan.meta, on_mismatch)
            remove_stale_temporaries(plan.folder)
        except ValueError as e:
            err = str(e)
    err = _broadcast(err)
    if err:
        raise ValueError(err)
    todo = None
    if embedder.is_main:
        todo = [s for s in range(plan.num_shards) if not _emb_file(plan.folder, s).is_file()]
    return _broadcast(todo)


def _encode_shard(embedder, corpus, plan: _ShardPlan, s: int, instruction, normalize) -> None:
    """Embeds shard `s` on this data-parallel rank; its writer saves the ids, then the
    embeddings (each atomically: the embeddings file marks the shard finished)."""
    lo, hi = s * plan.shard_size, min((s + 1) * plan.shard_size, plan.rows)
    rows = corpus.rows(lo, hi)
    texts = [r.text for r in rows]
    prefixes = [r.instruction if instruction is None else instruction for r in rows]
    emb = embedder.embed_local(texts, prefixes, label=f"shard {s + 1}/{plan.num_shards}")
    if normalize:  # in place: one copy of the shard in memory
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if embedder.is_writer:
        if plan.meta["has_ids"]:
            ids = np.asarray([r.id for r in rows], dtype=str)
            save_npy_atomic(_ids_file(plan.folder, s), ids)
        save_npy_atomic(_emb_file(plan.folder, s), emb)


def _log_start(embedder, corpus, plan: _ShardPlan, todo: list[int]) -> None:
    if embedder.is_main and plan.num_shards:
        logger.info(
            "encoding %s: %d passages in %d shards of %d (%d finished, %d to compute on %d "
            "data-parallel ranks) into %s",
            corpus.path,
            plan.rows,
            plan.num_shards,
            plan.shard_size,
            plan.num_shards - len(todo),
            len(todo),
            embedder.dp_size,
            plan.folder,
            extra=SPEAKER,
        )


def _log_progress(plan: _ShardPlan, todo: list[int], start: float) -> None:
    """Shards finished by all ranks (their files), passages/s since `start` and the ETA."""
    sizes = {t: plan.size(t) for t in todo}
    finished = [t for t in todo if _emb_file(plan.folder, t).is_file()]
    elapsed = time.perf_counter() - start
    rate = sum(sizes[t] for t in finished) / max(elapsed, 1e-9)  # all ranks
    left = (sum(sizes.values()) - sum(sizes[t] for t in finished)) / max(rate, 1e-9)
    logger.info(
        "corpus shards %d/%d | %.0f passages/s | ETA %s",
        plan.num_shards - len(todo) + len(finished),
        plan.num_shards,
        rate,
        _fmt_seconds(left),
        extra=SPEAKER,
    )


def _finish(embedder, plan: _ShardPlan, todo: list[int], start: float) -> ShardedEmbeddings:
    """After every rank's shards: `embedder.last_encode`, the throughput line, the shards."""
    _barrier()
    seconds = time.perf_counter() - start
    computed_rows = sum(plan.size(t) for t in todo)
    embedder.last_encode = EncodeSummary(
        plan.rows, plan.num_shards, len(todo), computed_rows, seconds
    )
    if embedder.is_main and todo:
        logger.info(
            "encoded %d passages (%d shards) in %.1fs: %.0f passages/s over %d data-parallel ranks",
            computed_rows,
            len(todo),
            seconds,
            embedder.last_encode.passages_per_second,
            embedder.dp_size,
            extra=SPEAKER,
        )
    return ShardedEmbeddings(plan.folder)


def encode_corpus(
    embedder,
    corpus,
    folder: str | os.PathLike,
    *,
    shard_size: int = 100_000,
    instruction: str | None = "",
    normalize: bool = False,
    on_mismatch: str = "error",
    stop_after_shards: int | None = None,
) -> ShardedEmbeddings | None:
    """Embeds every row of `corpus` into shards under `folder` (see the module docstring).

    Args:
        embedder: an `evaluation.embedder.Embedder` (its `embed_local`, `identity`, ranks).
        corpus: a `JsonlCorpus`.
        instruction: prefix for every row; None takes each row's own (`CorpusRow.instruction`).
        normalize: store L2-normalised embeddings.
        on_mismatch: "error" (a user's folder made for other inputs is refused) or "clear"
            (a private cache: removed and rebuilt).
        stop_after_shards: return after this many shards computed by this rank (tests and
            users interrupting on purpose); a later call resumes.

    Returns:
        The finished shards (None when stopped early).

    Raises:
        ValueError: `folder` holds other embeddings or other files; bad `shard_size`.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if on_mismatch not in ("error", "clear"):
        raise ValueError(f"on_mismatch must be 'error' or 'clear', got {on_mismatch!r}")
    plan = _plan_shards(embedder, corpus, folder, shard_size, instruction, normalize)
    todo = _missing_shards(embedder, plan, on_mismatch)
    _log_start(embedder, corpus, plan, todo)
    start = time.perf_counter()
    for computed, s in enumerate(todo[embedder.dp_rank :: embedder.dp_size], 1):
        _encode_shard(embedder, corpus, plan, s, instruction, normalize)
        if embedder.is_main:
            _log_progress(plan, todo, start)
        if stop_after_shards is not None and computed >= stop_after_shards:
            return None
    return _finish(embedder, plan, todo, start)


def single_array_size(rows: int, dim: int) -> int:
    """Bytes of the `.npy` file `write_single_array` writes for `rows` x `dim` embeddings."""
    from megatron_nvembed.utils.diskspace import npy_size

    return npy_size((rows, dim), np.float32)


def write_single_array(shards: ShardedEmbeddings, path: str | os.PathLike) -> None:
    """All shards as one float32 `.npy` [rows, dim], appended shard by shard to a temporary
    file whose bytes are reserved first (a full disk fails there, before the first shard, with
    `DiskFullError`; never a SIGBUS of a memory map), then renamed (memory: one shard)."""
    from megatron_nvembed.utils.diskspace import reserve_space
    from megatron_nvembed.utils.fileio import write_with

    size = single_array_size(shards.rows, shards.dim)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            reserve_space(f, size, path)
            header = {"descr": "<f4", "fortran_order": False, "shape": (shards.rows, shards.dim)}
            np.lib.format.write_array_header_1_0(f, header)
            for _, emb in shards:
                f.write(np.ascontiguousarray(emb, dtype="<f4").data)  # no copy of a whole shard

    write_with(path, write, size)
