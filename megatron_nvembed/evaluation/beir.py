"""Retrieval evaluation on local BEIR-format data, offline.

A BEIR folder holds `corpus.jsonl` (`{"_id", "title"?, "text"}`), `queries.jsonl`
(`{"_id", "text"}`) and `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header
line). Metrics follow trec_eval's definitions as MTEB reports them: nDCG@k with linear gain
(rel / log2(rank + 1)) over the judged relevances, recall@k (relevant = score > 0), MRR@k.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_nvembed.data.records import iter_jsonl_lines


@dataclass
class BeirData:
    corpus_ids: list[str]
    corpus: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Reads a BEIR folder; only queries with judgements are kept.

    Raises:
        FileNotFoundError / ValueError: naming the file (and line) at fault.
    """
    folder = Path(folder)
    paths = {n: folder / n for n in ("corpus.jsonl", "queries.jsonl")}
    paths["qrels"] = folder / "qrels" / f"{split}.tsv"
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: missing (BEIR folders need corpus.jsonl, queries.jsonl, qrels/{split}.tsv)"
            )

    def read(path: Path) -> dict[str, str]:
        out = {}
        for lineno, obj in iter_jsonl_lines(path):
            if "_id" not in obj or not isinstance(obj.get("text"), str):
                raise ValueError(f'{path}:{lineno}: expected "_id" and a string "text"')
            title = obj.get("title") or ""
            out[str(obj["_id"])] = f"{title} {obj['text']}".strip() if title else obj["text"]
        return out

    corpus, queries = read(paths["corpus.jsonl"]), read(paths["queries.jsonl"])
    qrels: dict[str, dict[str, int]] = {}
    with open(paths["qrels"], newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if lineno == 1 and row and not row[-1].lstrip("-").isdigit():
                continue  # header
            if len(row) < 3 or not row[2].lstrip("-").isdigit():
                raise ValueError(f"{paths['qrels']}:{lineno}: expected query-id, corpus-id, score")
            qid, did, score = row[0], row[1], int(row[2])
            if did not in corpus:
                raise ValueError(f"{paths['qrels']}:{lineno}: corpus-id {did!r} not in corpus")
            qrels.setdefault(qid, {})[did] = score
    qids = [q for q in queries if q in qrels]
    return BeirData(list(corpus), list(corpus.values()), qids, [queries[q] for q in qids], qrels)


def retrieval_metrics(
    scores: np.ndarray,
    query_ids: list[str],
    corpus_ids: list[str],
    qrels: dict[str, dict[str, int]],
    ks: tuple[int, ...] = (1, 10, 100),
) -> dict[str, float]:
    """nDCG@k, recall@k and MRR@k averaged over queries, from a [n_queries, n_docs] score matrix."""
    order = np.argsort(-scores, axis=1, kind="stable")
    out: dict[str, float] = {}
    for k in ks:
        ndcg, recall, mrr = [], [], []
        for row, qid in enumerate(query_ids):
            judged = qrels.get(qid, {})
            relevant = {d for d, r in judged.items() if r > 0}
            ranked = [corpus_ids[j] for j in order[row, :k]]
            dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked))
            ideal = sorted((r for r in judged.values() if r > 0), reverse=True)[:k]
            idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
            ndcg.append(dcg / idcg if idcg > 0 else 0.0)
            recall.append(len(relevant & set(ranked)) / len(relevant) if relevant else 0.0)
            first = next((i for i, d in enumerate(ranked) if d in relevant), None)
            mrr.append(1.0 / (first + 1) if first is not None else 0.0)
        out[f"ndcg_at_{k}"] = float(np.mean(ndcg))
        out[f"recall_at_{k}"] = float(np.mean(recall))
        out[f"mrr_at_{k}"] = float(np.mean(mrr))
    return out


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
    is left).

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
    return {
        "score_margin_hardest": float(np.mean(hardest)) if hardest else 0.0,
        "score_margin_mean": float(np.mean(mean)) if mean else 0.0,
    }


def evaluate_beir(
    encode: Callable[[list[str], str], np.ndarray],
    folder: str | Path,
    *,
    instruction: str = "",
    split: str = "test",
    ks: tuple[int, ...] = (1, 10, 100),
) -> dict[str, float]:
    """Embeds queries (with `instruction`) and the corpus (without) and scores retrieval.

    Args:
        encode: (texts, instruction) -> L2-normalised embeddings [n, d].
    """
    data = load_beir(folder, split)
    q = encode(data.queries, instruction)
    d = encode(data.corpus, "")
    return retrieval_metrics(q @ d.T, data.query_ids, data.corpus_ids, data.qrels, ks)
