"""Retrieval metrics and score margins, as MTEB reports them.

Metrics follow trec_eval's definitions: nDCG@k with linear gain (rel / log2(rank + 1)) over the
judged relevances, recall@k (relevant = score > 0), MRR@k.

Scoring never needs the [queries x corpus] score matrix:
- `ranking_metrics` computes nDCG / recall / MRR from each query's ranked document ids;
- `search_margins` computes the score margins from the hits of a top-k search
  (`search_depth` hits), the relevant documents' embeddings (looked up by id) and the sum of all
  corpus embeddings.
`retrieval_metrics` and `score_margins` take a dense score matrix (small sets, tests);
`retrieval_metrics` ranks it and calls `ranking_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MARGINS = ("score_margin_hardest", "score_margin_mean")


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


def relevant_documents(qrels: dict[str, dict[str, int]], qid: str) -> list[str]:
    """The documents judged relevant to query `qid` (qrels score > 0), in qrels order."""
    return [d for d, r in qrels.get(qid, {}).items() if r > 0]


def search_depth(ks: tuple[int, ...], query_ids: list[str], qrels: dict) -> int:
    """Hits per query that metrics at `ks` and the margins need: max(ks), and one more than the
    most relevant documents of a query (the hardest negative is among its first |P| + 1)."""
    most = max((len(relevant_documents(qrels, q)) for q in query_ids), default=0)
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
        pos = [d for d in relevant_documents(qrels, qid) if d in relevant]
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
