"""Retrieval evaluation on local BEIR-format data, offline, at any corpus size.

A BEIR folder holds `corpus.jsonl` (`{"_id", "title"?, "text"}`), `queries.jsonl`
(`{"_id", "text"}`) and `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header
line). Metrics follow trec_eval's definitions as MTEB reports them: nDCG@k with linear gain
(rel / log2(rank + 1)) over the judged relevances, recall@k (relevant = score > 0), MRR@k.

Scoring never forms the [queries x corpus] score matrix: the corpus embeddings (one in-memory
array, or the shards of `retrieval.shards.encode_corpus`) are searched top-k
(`retrieval.search.search`), and
- `ranking_metrics` computes nDCG / recall / MRR from each query's ranked document ids;
- `search_margins` computes the score margins from the hits, the relevant documents' embeddings
  (looked up by id) and the sum of all corpus embeddings.
`retrieval_metrics` and `score_margins` take a dense score matrix (small sets, tests);
`retrieval_metrics` ranks it and calls `ranking_metrics`.

Reading: `open_beir` keeps queries and qrels in memory and the corpus as a `JsonlCorpus` (byte
ranges only; qrels' corpus ids are checked during its one scan); `load_beir` also reads the
corpus texts (validation sets, tests).

Evaluating: `evaluate_embeddings` (query embeddings against corpus embeddings),
`evaluate_beir` (any embedding function, corpus embeddings in memory) and
`evaluate_beir_sharded` (an `evaluation.encoder.Embedder`; the corpus encoded in resumable
shards split over the data-parallel ranks, the queries split over all ranks for the search).

Over 400 lines: reading BEIR folders, the metrics and the corpus-scale run (sharded encoding,
search) that produces them.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_nvembed.retrieval.corpus import JsonlCorpus, beir_row
from megatron_nvembed.retrieval.search import EXACT

MARGINS = ("score_margin_hardest", "score_margin_mean")
CHUNK = 10_000  # corpus rows read and encoded at once by `evaluate_beir`


@dataclass
class BeirData:
    corpus_ids: list[str]
    corpus: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]


@dataclass
class BeirFolder:
    """A BEIR folder with its corpus left on disk (see `open_beir`)."""

    folder: Path
    split: str
    corpus: JsonlCorpus
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]

    @property
    def qrels_path(self) -> Path:
        return self.folder / "qrels" / f"{self.split}.tsv"


def _read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """The judgements and, per corpus id, the first line naming it."""
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if lineno == 1 and row and not row[-1].lstrip("-").isdigit():
                continue  # header
            if len(row) < 3 or not row[2].lstrip("-").isdigit():
                raise ValueError(f"{path}:{lineno}: expected query-id, corpus-id, score")
            qid, did, score = row[0], row[1], int(row[2])
            first_line.setdefault(did, lineno)
            qrels.setdefault(qid, {})[did] = score
    return qrels, first_line


def open_beir(folder: str | Path, split: str = "test") -> BeirFolder:
    """Reads a BEIR folder's queries and qrels and scans its corpus once (texts stay on disk).

    Only queries with judgements are kept (in file order). Every corpus id of the qrels must be
    in the corpus (checked during the scan, without keeping the corpus ids).

    Raises:
        FileNotFoundError / ValueError: naming the file (and line) at fault.
    """
    folder = Path(folder)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (corpus_path, queries_path, qrels_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: missing (BEIR folders need corpus.jsonl, queries.jsonl, qrels/{split}.tsv)"
            )
    qrels, first_line = _read_qrels(qrels_path)
    found: set[str] = set()

    def check(_, row) -> None:
        if row.id in first_line:
            found.add(row.id)

    corpus = JsonlCorpus(corpus_path, beir_row, on_row=check)
    missing = [d for d in first_line if d not in found]
    if missing:
        d = min(missing, key=first_line.__getitem__)
        raise ValueError(f"{qrels_path}:{first_line[d]}: corpus-id {d!r} not in corpus")
    queries: dict[str, str] = {}

    def keep(_, row) -> None:
        if row.id in qrels:
            queries[row.id] = row.text

    JsonlCorpus(queries_path, beir_row, on_row=keep)
    return BeirFolder(folder, split, corpus, list(queries), list(queries.values()), qrels)


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """`open_beir`, with the corpus texts read into memory (small sets: validation, tests).

    Raises:
        FileNotFoundError / ValueError: naming the file (and line) at fault.
    """
    b = open_beir(folder, split)
    rows = b.corpus.rows(0, len(b.corpus))
    return BeirData([r.id for r in rows], [r.text for r in rows], b.query_ids, b.queries, b.qrels)


def ranking_metrics(
    ranked: Sequence[Sequence[str | None]],
    query_ids: list[str],
    qrels: dict[str, dict[str, int]],
    ks: tuple[int, ...] = (1, 10, 100),
) -> dict[str, float]:
    """nDCG@k, recall@k and MRR@k averaged over queries, from ranked document ids.

    Args:
        ranked: per query of `query_ids`, its retrieved document ids, best first: at least
            max(ks) of them, or the whole corpus. None (a missing hit) is skipped; an id listed
            twice counts once, at its better rank.
    """
    lists = []
    for row in ranked:
        seen: set[str] = set()
        kept = []
        for d in row:
            if d is not None and d not in seen:
                seen.add(d)
                kept.append(d)
        lists.append(kept)
    out: dict[str, float] = {}
    for k in ks:
        ndcg, recall, mrr = [], [], []
        for i, qid in enumerate(query_ids):
            judged = qrels.get(qid, {})
            relevant = {d for d, r in judged.items() if r > 0}
            top = lists[i][:k]
            dcg = sum(judged.get(d, 0) / math.log2(j + 2) for j, d in enumerate(top))
            ideal = sorted((r for r in judged.values() if r > 0), reverse=True)[:k]
            idcg = sum(r / math.log2(j + 2) for j, r in enumerate(ideal))
            ndcg.append(dcg / idcg if idcg > 0 else 0.0)
            recall.append(len(relevant & set(top)) / len(relevant) if relevant else 0.0)
            first = next((j for j, d in enumerate(top) if d in relevant), None)
            mrr.append(1.0 / (first + 1) if first is not None else 0.0)
        out[f"ndcg_at_{k}"] = float(np.mean(ndcg))
        out[f"recall_at_{k}"] = float(np.mean(recall))
        out[f"mrr_at_{k}"] = float(np.mean(mrr))
    return out


def retrieval_metrics(
    scores: np.ndarray,
    query_ids: list[str],
    corpus_ids: list[str],
    qrels: dict[str, dict[str, int]],
    ks: tuple[int, ...] = (1, 10, 100),
) -> dict[str, float]:
    """`ranking_metrics` of a [n_queries, n_docs] score matrix (ranked by score, equal scores
    in column order); for small sets and tests, the evaluations search instead."""
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, : max(ks)]
    ranked = [[corpus_ids[j] for j in row] for row in order]
    return ranking_metrics(ranked, query_ids, qrels, ks)


def score_margins(
    scores: np.ndarray,
    query_ids: list[str],
    corpus_ids: list[str],
    qrels: dict[str, dict[str, int]],
) -> dict[str, float]:
    """How far the relevant documents score above the others, averaged over queries.

    For query q with relevant documents P(q) (qrels score > 0) and negatives N(q) (every other
    corpus document, judged 0 or unjudged), s(q, d) being `scores` (the embeddings' dot product:
    their cosine when the head normalises):

    - `score_margin_hardest` = mean over q of [mean_{d in P(q)} s(q, d) - max_{d in N(q)} s(q, d)]:
      positive when the average relevant document beats the hardest negative;
    - `score_margin_mean` = mean over q of [mean_{d in P(q)} s(q, d) - mean_{d in N(q)} s(q, d)].

    Queries without a relevant document or without a negative are left out (both 0.0 when none
    is left). `search_margins` computes the same from search results.

    Args:
        scores: [n_queries, n_docs], rows in `query_ids` order, columns in `corpus_ids` order.
    """
    column = {d: j for j, d in enumerate(corpus_ids)}
    hardest, mean = [], []
    for row, qid in enumerate(query_ids):
        pos = [column[d] for d, r in qrels.get(qid, {}).items() if r > 0 and d in column]
        if not pos or len(pos) == len(corpus_ids):
            continue
        neg = np.ones(len(corpus_ids), dtype=bool)
        neg[pos] = False
        pos_mean = float(scores[row, pos].mean())
        hardest.append(pos_mean - float(scores[row, neg].max()))
        mean.append(pos_mean - float(scores[row, neg].mean()))
    return _margin_means(hardest, mean)


def _margin_means(hardest: list[float], mean: list[float]) -> dict[str, float]:
    return {
        "score_margin_hardest": float(np.mean(hardest)) if hardest else 0.0,
        "score_margin_mean": float(np.mean(mean)) if mean else 0.0,
    }


def _relevant(qrels: dict[str, dict[str, int]], qid: str) -> list[str]:
    return [d for d, r in qrels.get(qid, {}).items() if r > 0]


def search_depth(ks: tuple[int, ...], query_ids: list[str], qrels: dict) -> int:
    """Hits per query that metrics at `ks` and the margins need: max(ks), and one more than the
    most relevant documents of a query (the hardest negative is among its first |P| + 1)."""
    most = max((len(_relevant(qrels, q)) for q in query_ids), default=0)
    return max(max(ks), most + 1)


def search_margins(
    queries: np.ndarray,
    hit_scores: np.ndarray,
    hit_ids: np.ndarray,
    query_ids: list[str],
    qrels: dict[str, dict[str, int]],
    relevant: dict[str, np.ndarray],
    corpus_sum: np.ndarray,
    num_docs: int,
) -> dict[str, float]:
    """`score_margins` from search results, without the score matrix.

    For query q with relevant documents P(q) (qrels score > 0, those in `relevant`):
    - relevant scores: q . e(d) with e(d) = `relevant[d]`;
    - hardest negative: the best hit not in P(q) (among the first |P(q)| + 1 hits of an exact
      search: see `search_depth`);
    - mean negative: (q . `corpus_sum` - sum of the relevant scores) / (`num_docs` - |P(q)|).
    Queries without a relevant document, without a negative, or (approximate search) without a
    non-relevant hit are left out.

    Args:
        queries: [n_queries, d] embeddings, rows in `query_ids` order.
        hit_scores, hit_ids: [n_queries, k] scores and document ids of the hits, best first
            (None: no hit).
        relevant: embedding of every relevant document (by id).
        corpus_sum: the sum of all corpus embeddings, [d].
    """
    hardest, mean = [], []
    total = np.asarray(corpus_sum, dtype=np.float64)
    for i, qid in enumerate(query_ids):
        pos = [d for d in _relevant(qrels, qid) if d in relevant]
        if not pos or len(pos) >= num_docs:
            continue
        positives = set(pos)
        best_negative = next(
            (
                float(s)
                for s, d in zip(hit_scores[i], hit_ids[i])
                if d is not None and d not in positives
            ),
            None,
        )
        if best_negative is None:
            continue
        q = np.asarray(queries[i], dtype=np.float64)
        pos_scores = np.stack([relevant[d] for d in pos]).astype(np.float64) @ q
        pos_mean = float(pos_scores.mean())
        hardest.append(pos_mean - best_negative)
        neg_mean = (float(q @ total) - float(pos_scores.sum())) / (num_docs - len(pos))
        mean.append(pos_mean - neg_mean)
    return _margin_means(hardest, mean)


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
    wanted = {d for q in query_ids for d in _relevant(qrels, q)}
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


def _require_queries(data: BeirFolder) -> None:
    if not data.query_ids:
        raise ValueError(f"{data.qrels_path}: no judged query is in queries.jsonl")
    if len(data.corpus) == 0:
        raise ValueError(f"{data.corpus.path}: no document")


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
    _require_queries(data)
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
    _require_queries(data)
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
