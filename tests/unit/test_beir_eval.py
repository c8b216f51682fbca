"""Local BEIR-format evaluation: loader errors name the file and line; nDCG / recall / MRR equal
hand-computed values (1e-12) on a small graded example.

Run alone: pytest tests/unit/test_beir_eval.py
"""

import json
import math

import numpy as np
import pytest

from megatron_nvembed.evaluation.beir import evaluate_beir, load_beir, retrieval_metrics


def _write(tmp_path, qrels="query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq2\td2\t1\n"):
    (tmp_path / "qrels").mkdir(exist_ok=True)
    docs = [{"_id": f"d{i}", "title": "T" if i == 1 else "", "text": f"doc {i}"} for i in (1, 2, 3)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    qs = [
        {"_id": "q1", "text": "query one"},
        {"_id": "q2", "text": "query two"},
        {"_id": "q3", "text": "unjudged"},
    ]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (tmp_path / "qrels" / "test.tsv").write_text(qrels)


def test_metrics_hand_computed():
    # q1 ranks d2, d1, d3 (relevances 0, 2, 1); q2 ranks d2 first (relevance 1).
    scores = np.array([[0.2, 0.9, 0.1], [0.1, 0.8, 0.3]])
    m = retrieval_metrics(
        scores,
        ["q1", "q2"],
        ["d1", "d2", "d3"],
        {"q1": {"d1": 2, "d3": 1}, "q2": {"d2": 1}},
        ks=(1, 10),
    )
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert abs(m["ndcg_at_10"] - (dcg / idcg + 1.0) / 2) <= 1e-12
    assert abs(m["ndcg_at_1"] - (0.0 + 1.0) / 2) <= 1e-12
    assert m["recall_at_1"] == 0.5 and m["recall_at_10"] == 1.0
    assert abs(m["mrr_at_10"] - (0.5 + 1.0) / 2) <= 1e-12


def test_loader_and_end_to_end(tmp_path):
    _write(tmp_path)
    data = load_beir(tmp_path)
    assert data.query_ids == ["q1", "q2"] and data.corpus[0] == "T doc 1"

    def encode(texts, instruction):
        # a "model" that puts query one next to doc 1 and query two next to doc 2
        table = {
            "query one": [1, 0, 0],
            "query two": [0, 1, 0],
            "T doc 1": [1, 0, 0],
            "doc 2": [0, 1, 0],
            "doc 3": [0.6, 0, 0.8],
        }
        return np.array([table[t] for t in texts], dtype=float)

    m = evaluate_beir(encode, tmp_path, ks=(10,))
    # q1: d1 (2), d3 (1), d2 -> ideal order; q2: d2 first
    assert abs(m["ndcg_at_10"] - 1.0) <= 1e-12


def test_loader_errors(tmp_path):
    _write(tmp_path, qrels="query-id\tcorpus-id\tscore\nq1\td9\t1\n")
    with pytest.raises(ValueError, match=r"test.tsv:2: corpus-id 'd9'"):
        load_beir(tmp_path)
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        load_beir(tmp_path, split="dev")
