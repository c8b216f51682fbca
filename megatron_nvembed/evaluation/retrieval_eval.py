"""Retrieval evaluation of embeddings and of BEIR folders, offline, at any corpus size.

The corpus embeddings (one in-memory array, or the shards of `retrieval.shards.encode_corpus`)
are searched top-k (`retrieval.search.search`), never forming the [queries x corpus] score
matrix, and scored by `evaluation.metrics` (nDCG / recall / MRR and the score margins):
- `evaluate_embeddings`: query embeddings against corpus embeddings;
- `evaluate_beir`: any embedding function, a BEIR folder's corpus embeddings in memory;
- `evaluate_beir_sharded`: an `evaluation.embedder.Embedder`; the corpus encoded in resumable
  shards split over the data-parallel ranks, the queries split over all ranks for the search.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megatron_nvembed.evaluation.beir import BeirFolder, open_beir, require_queries
from megatron_nvembed.evaluation.metrics import (
    ranking_metrics,
    relevant_documents,
    search_depth,
    search_margins,
)
from megatron_nvembed.retrieval.search import EXACT

CHUNK = 10_000  # corpus rows read and encoded at once by `evaluate_beir`


class _ArrayCorpus:
    """An in-memory [n, d] array with its ids, read like `ShardedEmbeddings`."""

    def __init__(self, emb: np.ndarray, ids: list[str]):
        if emb.ndim != 2 or len(ids) != len(emb):
            raise ValueError(f"{len(ids)} corpus ids for corpus embeddings of shape {emb.shape}")
        self.emb, self.rows = emb, len(emb)
        self._ids = np.asarray(ids, dtype=object)

    def id_of(self, rows: np.ndarray) -> np.ndarray:
        return self._ids[rows]

    def rows_of_ids(self, wanted: set[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for j, d in enumerate(self._ids.tolist()):
            if d in wanted and d not in found:
                found[d] = j
        return found

    def vectors(self, rows) -> np.ndarray:
        return np.asarray(self.emb[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    def sum(self) -> np.ndarray:
        return self.emb.sum(axis=0, dtype=np.float64)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _search(queries, corpus, k, *, index, params, device, split_over_ranks):
    """`search`; with `split_over_ranks` under torch.distributed, every rank searches every
    world_size-th query and the hits are gathered on all ranks (an approximate index is built
    by rank 0 first, the others read its saved copy)."""
    from megatron_nvembed.retrieval.search import search

    def run(q):
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return search(q, corpus, k, index=index, params=params, device=device)

    dist = _dist() if split_over_ranks else None
    if dist is None or dist.get_world_size() == 1:
        return run(queries)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = np.arange(rank, len(queries), world)
    if index != EXACT:
        if rank == 0:
            local = run(queries[mine])
        dist.barrier()
        if rank != 0:
            local = run(queries[mine])
    else:
        local = run(queries[mine])
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, *local))
    kk = max(s.shape[1] for _, s, _ in gathered)
    scores = np.full((len(queries), kk), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), kk), -1, dtype=np.int64)
    for idx, s, r in gathered:
        scores[idx, : s.shape[1]], rows[idx, : r.shape[1]] = s, r
    return scores, rows


def evaluate_embeddings(
    queries: np.ndarray,
    corpus,
    query_ids: list[str],
    qrels: dict[str, dict[str, int]],
    *,
    corpus_ids: list[str] | None = None,
    ks: tuple[int, ...] = (1, 10, 100),
    index: str = EXACT,
    params: str = "",
    device: str = "cpu",
    split_over_ranks: bool = False,
) -> dict[str, float]:
    """Retrieval metrics (`ranking_metrics`) and score margins (`search_margins`) of query
    embeddings against corpus embeddings, from a top-k search (`search_depth` hits).

    Args:
        queries: [n_queries, d], rows in `query_ids` order.
        corpus: an in-memory [n, d] array (with `corpus_ids`) or a `ShardedEmbeddings` with ids.
        index, params, device: of `retrieval.search.search` (exact by default).
        split_over_ranks: under torch.distributed, a collective: the ranks split the queries
            (every rank passes all of them and gets the same result).
    """
    if isinstance(corpus, np.ndarray):
        if corpus_ids is None:
            raise ValueError("an in-memory corpus needs its corpus_ids")
        corpus = _ArrayCorpus(corpus, corpus_ids)
        searched = corpus.emb
    else:
        searched = corpus
    if not query_ids:
        raise ValueError("no query to evaluate")
    if corpus.rows == 0:
        raise ValueError("the corpus is empty")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(search_depth(ks, query_ids, qrels), corpus.rows)
    scores, rows = _search(
        queries,
        searched,
        k,
        index=index,
        params=params,
        device=device,
        split_over_ranks=split_over_ranks,
    )
    hit_ids = np.full(rows.shape, None, dtype=object)
    valid = rows >= 0
    if valid.any():
        hit_ids[valid] = corpus.id_of(rows[valid])
    out = ranking_metrics(hit_ids.tolist(), query_ids, qrels, ks)
    wanted = {d for q in query_ids for d in relevant_documents(qrels, q)}
    found = corpus.rows_of_ids(wanted)
    ids = list(found)
    vectors = corpus.vectors([found[d] for d in ids]) if ids else np.zeros((0, queries.shape[1]))
    relevant = dict(zip(ids, vectors))
    out.update(
        search_margins(
            queries, scores, hit_ids, query_ids, qrels, relevant, corpus.sum(), corpus.rows
        )
    )
    return out


def evaluate_beir(
    encode: Callable[[list[str], str], np.ndarray],
    folder: str | Path,
    *,
    instruction: str = "",
    split: str = "test",
    ks: tuple[int, ...] = (1, 10, 100),
    index: str = EXACT,
    params: str = "",
) -> dict[str, float]:
    """Embeds queries (with `instruction`) and the corpus (without, `CHUNK` texts per call,
    embeddings kept in memory) and scores retrieval (`evaluate_embeddings`).

    Args:
        encode: (texts, instruction) -> embeddings [n, d] (L2-normalised for cosine scores).
    """
    data = open_beir(folder, split)
    require_queries(data)
    q = encode(data.queries, instruction)
    ids: list[str] = []
    parts = []
    for lo in range(0, len(data.corpus), CHUNK):
        rows = data.corpus.rows(lo, lo + CHUNK)
        ids.extend(r.id for r in rows)
        parts.append(np.asarray(encode([r.text for r in rows], ""), dtype=np.float32))
    return evaluate_embeddings(
        q,
        np.concatenate(parts),
        data.query_ids,
        data.qrels,
        corpus_ids=ids,
        ks=ks,
        index=index,
        params=params,
    )


def _corpus_counts_over_ranks(embedder, texts: int, truncated: int) -> tuple[int, int]:
    """Corpus texts (and truncated ones) embedded by all data-parallel ranks together."""
    dist = _dist()
    if dist is None or embedder.dp_size == 1:
        return texts, truncated
    gathered: list = [None] * embedder.dp_size
    dist.all_gather_object(gathered, (texts, truncated), group=embedder.dp_group)
    return sum(t for t, _ in gathered), sum(t for _, t in gathered)


def evaluate_beir_sharded(
    embedder,
    folder: str | Path | BeirFolder,
    work_dir: str | Path,
    *,
    instruction: str = "",
    split: str = "test",
    ks: tuple[int, ...] = (1, 10, 100),
    shard_size: int = 100_000,
    normalize: bool = True,
    index: str = EXACT,
    params: str = "",
    device: str | None = None,
    on_mismatch: str = "error",
    stop_after_shards: int | None = None,
) -> dict[str, float] | None:
    """Evaluates a BEIR folder at corpus scale (a collective under torchrun: every rank calls it).

    The corpus is encoded by `retrieval.shards.encode_corpus` into `work_dir` (without
    instruction, L2-normalised with `normalize`; shards split over the data-parallel ranks; a
    rerun computes only the shards missing there), the queries by `embedder.embed` with
    `instruction` (normalised alike), then `evaluate_embeddings` searches (`index`, `params`;
    the queries split over all ranks). Memory: one shard per rank, the queries and their hits.

    `embedder.stats` then counts the corpus texts of all data-parallel ranks (`encode_corpus`
    leaves each rank's own there) and the corpus encoding's wall time.

    Args:
        folder: a BEIR folder, or one already opened with `open_beir`.
        device: where the exact search runs (default: the embedder's device when it is a GPU,
            else "cpu").
        on_mismatch, stop_after_shards: of `encode_corpus` ("clear": `work_dir` is a private
            cache; stopping returns None, a later call resumes).

    Returns:
        `ranking_metrics` at `ks` and the score margins (same on every rank), or None when
        stopped early.
    """
    from megatron_nvembed.retrieval.shards import encode_corpus

    data = folder if isinstance(folder, BeirFolder) else open_beir(folder, split)
    require_queries(data)
    stats = embedder.stats
    before = (stats.texts, stats.truncated, stats.seconds)
    start = time.perf_counter()
    shards = encode_corpus(
        embedder,
        data.corpus,
        work_dir,
        shard_size=shard_size,
        instruction="",
        normalize=normalize,
        on_mismatch=on_mismatch,
        stop_after_shards=stop_after_shards,
    )
    if shards is None:
        return None
    texts, truncated = _corpus_counts_over_ranks(
        embedder, stats.texts - before[0], stats.truncated - before[1]
    )
    stats.texts, stats.truncated = before[0] + texts, before[1] + truncated
    stats.seconds = before[2] + (time.perf_counter() - start if texts else 0.0)
    q = embedder.embed(data.queries, instruction, label=f"{data.folder.name} [{data.split}] query")
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    if device is None:
        dev = getattr(embedder, "device", None)
        device = str(dev) if dev is not None and str(dev).startswith("cuda") else "cpu"
    return evaluate_embeddings(
        q,
        shards,
        data.query_ids,
        data.qrels,
        ks=ks,
        index=index,
        params=params,
        device=device,
        split_over_ranks=True,
    )
