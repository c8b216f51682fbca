"""Corpus embeddings in shards: written atomically, resumable, split over data-parallel ranks.

`encode_corpus(embedder, corpus, folder, shard_size=...)` cuts the corpus into shards of
`shard_size` consecutive rows. Shard `s` is `emb_{s:05d}.npy` (float32 [rows, dim]) and, when
every row has an id, `ids_{s:05d}.npy` (fixed-width unicode, no pickle), then its record
`emb_{s:05d}.json` (sizes and checksums of those files, the model's fingerprint:
`retrieval.shard_files`), each through a temporary file and a rename: a shard exists exactly when
its record does, so a kill at any moment loses at most the shards being computed, and a rerun
computes only the missing ones. `meta.json` (written before the first shard) records what the
shards are embeddings of (model and its weights' fingerprint, corpus file, instruction,
normalisation, shard size); a folder made for anything else is refused (or, for a private cache,
cleared).

A rerun first verifies every finished shard's bytes: a damaged one (truncated, bits flipped) is
named in the log and recomputed; a shard made by another model than `meta.json` says (its
`meta.json` replaced by another run's) is refused naming both fingerprints (a private cache is
cleared). `ShardedEmbeddings` verifies each shard's bytes before its first use and refuses a
damaged one, naming the file.

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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_nvembed.core.logging_utils import SPEAKER, get_logger
from megatron_nvembed.retrieval.shard_files import (
    META,
    ForeignShard,
    ShardedEmbeddings,
    ShardError,
    check_shard,
    finished,
    model_of,
    remove_shard,
    save_npy_blocks,
    write_shard,
)
from megatron_nvembed.utils.checksums import manifest_from
from megatron_nvembed.utils.fileio import remove_stale_temporaries, write_atomic
from megatron_nvembed.utils.locking import output_lock

logger = get_logger(__name__)

FORMAT_VERSION = 2
"""2: each shard has its record (`shard_files`); folders of format 1 are another format."""


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
            models = ""
            if isinstance(old, dict) and model_of(old) != model_of(meta):
                models = f"; made by model {model_of(old)}, this run's is {model_of(meta)}"
            raise ValueError(
                f"{folder}: holds embeddings of something else (differs in {', '.join(diff)}"
                f"{models}); delete it or choose another folder"
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


def _verify_finished(plan: _ShardPlan) -> list[int]:
    """Rank 0: every finished shard verified whole (`check_shard`); a damaged one is named in
    the log and removed. Returns the shards to compute.

    Raises:
        ForeignShard: a shard made by another model or run than `meta.json` says.
    """
    todo = []
    for s in range(plan.num_shards):
        if finished(plan.folder, s):
            try:
                check_shard(plan.folder, s, plan.meta)
                continue
            except ForeignShard:
                raise
            except ShardError as err:
                logger.warning("recomputing a damaged shard: %s", err, extra=SPEAKER)
                remove_shard(plan.folder, s)
        todo.append(s)
    return todo


def _claim(plan: _ShardPlan, on_mismatch: str) -> list[int]:
    """Rank 0: `_check_meta`, stale temporaries removed, the finished shards verified; a folder
    mixing two runs is refused or, for a private cache, cleared. Returns the shards to compute."""
    _check_meta(plan.folder, plan.meta, on_mismatch)
    remove_stale_temporaries(plan.folder)
    try:
        return _verify_finished(plan)
    except ForeignShard as err:
        if on_mismatch != "clear":
            raise ValueError(f"{err}; delete the folder or choose another") from None
        logger.warning("clearing the embedding cache %s: %s", plan.folder, err, extra=SPEAKER)
        shutil.rmtree(plan.folder)
        _check_meta(plan.folder, plan.meta, on_mismatch)
        return list(range(plan.num_shards))


def _missing_shards(embedder, plan: _ShardPlan, on_mismatch: str, held: ExitStack) -> list[int]:
    """The resume check: rank 0 takes the folder's lock (`utils.locking`, kept in `held`), then
    claims the folder (`_claim`: stale temporaries are removed by the lock's holder only) and lists
    the shards to compute (missing or damaged); every rank gets its list (or its error).

    Raises:
        ValueError: the folder holds other embeddings or other files; another job writes it.
    """
    out: list[int] | str | None = None
    if embedder.is_main:
        try:
            held.enter_context(output_lock(plan.folder, "embeddings folder"))
            out = _claim(plan, on_mismatch)
        except ValueError as e:
            out = str(e)
    out = _broadcast(out)
    if isinstance(out, str):
        raise ValueError(out)
    return out


def _encode_shard(embedder, corpus, plan: _ShardPlan, s: int, instruction, normalize) -> None:
    """Embeds shard `s` on this data-parallel rank; its writer saves the ids, the embeddings,
    then their record (each atomically: the record marks the shard finished)."""
    lo, hi = s * plan.shard_size, min((s + 1) * plan.shard_size, plan.rows)
    rows = corpus.rows(lo, hi)
    texts = [r.text for r in rows]
    prefixes = [r.instruction if instruction is None else instruction for r in rows]
    emb = embedder.embed_local(texts, prefixes, label=f"shard {s + 1}/{plan.num_shards}")
    if normalize:  # in place: one copy of the shard in memory
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if embedder.is_writer:
        ids = np.asarray([r.id for r in rows], dtype=str) if plan.meta["has_ids"] else None
        write_shard(plan.folder, s, emb, ids, plan.meta)


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
    done = [t for t in todo if finished(plan.folder, t)]
    elapsed = time.perf_counter() - start
    rate = sum(sizes[t] for t in done) / max(elapsed, 1e-9)  # all ranks
    left = (sum(sizes.values()) - sum(sizes[t] for t in done)) / max(rate, 1e-9)
    logger.info(
        "corpus shards %d/%d | %.0f passages/s | ETA %s",
        plan.num_shards - len(todo) + len(done),
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
    # every shard was verified by `_missing_shards` or written by this call
    return ShardedEmbeddings(plan.folder, verified=range(plan.num_shards))


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
    with ExitStack() as held:  # rank 0: the folder's lock, until the shards are written
        todo = _missing_shards(embedder, plan, on_mismatch, held)
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


def write_single_array(shards: ShardedEmbeddings, path: str | os.PathLike) -> Path:
    """All shards as one float32 `.npy` [rows, dim] (each shard verified as it is read), written
    shard by shard into a temporary file, then renamed (memory: one shard); then its record
    `PATH.json` (size, XXH3-128 checksum, the model's fingerprint, the shards' `meta.json`).
    Returns the record's path."""
    path = Path(path)
    entry = save_npy_blocks(path, (shards.rows, shards.dim), np.float32, (e for _, e in shards))
    record = manifest_from({path.name: entry})
    record.update(model_fingerprint=model_of(shards.meta), meta=shards.meta)
    out = path.with_name(path.name + ".json")
    write_atomic(out, json.dumps(record, indent=1, sort_keys=True))
    return out
