"""MTEB runner pieces without mteb or a model: Table 7 instruction resolution and precedence,
query/document instruction routing, normalisation and cosine scoring, length grouping, the
summary's averages (hand-computed, 1e-12) and category mapping, the markdown table, atomic writes,
model format detection errors.

Run alone: pytest tests/unit/test_mteb_eval.py
"""

import json
import math

import numpy as np
import pytest
import torch

from megatron_nvembed.data.buckets import length_grouped_batches
from megatron_nvembed.data.templates import get_task_definition
from megatron_nvembed.evaluation.encoder import detect_model_format
from megatron_nvembed.evaluation.mteb_eval import (
    CATEGORIES,
    MtebEncoder,
    category_of,
    render_markdown,
    resolve_instruction,
    summarize,
    summarize_task,
    table7_instruction,
    write_summary,
)


def test_table7_instructions_and_precedence():
    arguana = "Instruct: Given a claim, find documents that refute the claim\nQuery: "
    assert table7_instruction("ArguAna") == arguana
    sts = f"Instruct: {get_task_definition('STS', 'eval')}\nQuery: "
    assert table7_instruction("STS22.v2") == sts  # mteb's versioned re-upload, shared STS row
    assert table7_instruction("TwentyNewsgroupsClustering.v2") == table7_instruction(
        "TwentyNewsgroupsClustering"
    )
    assert table7_instruction("MockRetrievalTask") is None
    # mteb tasks: Table 7 wins; --instruction covers what the table lacks
    assert resolve_instruction("ArguAna", "my task", prefer_override=False) == arguana
    mine = "Instruct: my task\nQuery: "
    assert resolve_instruction("MockRetrievalTask", "my task", prefer_override=False) == mine
    assert resolve_instruction("MockRetrievalTask", mine, prefer_override=False) == mine
    assert resolve_instruction("MockRetrievalTask", "", prefer_override=False) == ""
    # local BEIR folders: --instruction wins, Table 7 by folder name otherwise
    assert resolve_instruction("arguana", "my task", prefer_override=True) == mine
    assert resolve_instruction("arguana", None, prefer_override=True) == arguana
    with pytest.raises(ValueError, match=r"'my_folder'.*--instruction"):
        resolve_instruction("my_folder", None, prefer_override=True)


class _Recorder:
    """An `Embedder` stand-in: embeds text i as a fixed vector scaled by (i + 1)."""

    def __init__(self):
        self.calls = []

    def embed(self, texts, instructions, label=""):
        self.calls.append((list(texts), instructions, label))
        return np.array([[3.0 * (i + 1), 4.0 * (i + 1)] for i in range(len(texts))], np.float32)


class _Meta:
    name = "x"


def test_encoder_routes_instructions_and_normalises():
    rec = _Recorder()
    asked = []

    def fallback(name):
        asked.append(name)
        return "Instruct: fallback\nQuery: "

    enc = MtebEncoder(rec, _Meta(), {"T": "Instruct: t\nQuery: "}, fallback)
    batches = [{"text": ["a", "b"]}, {"text": ["c"]}]
    kw = dict(task_metadata=_Meta(), hf_split="test", hf_subset="default")
    kw["task_metadata"].name = "T"
    out = enc.encode(batches, prompt_type="query", **kw)
    assert rec.calls[-1][:2] == (["a", "b", "c"], "Instruct: t\nQuery: ")
    np.testing.assert_allclose(out, np.tile([[0.6, 0.8]], (3, 1)), atol=1e-7)
    enc.encode(batches, prompt_type="document", **kw)
    assert rec.calls[-1][1] == ""
    enc.encode(batches, prompt_type=None, **kw)  # symmetric tasks: every text is a query
    assert rec.calls[-1][1] == "Instruct: t\nQuery: "
    kw["task_metadata"].name = "CQADupstackAndroidRetrieval"  # a part of an aggregate task
    enc.encode(batches, prompt_type="query", **kw)
    enc.encode(batches, prompt_type="query", **kw)
    assert rec.calls[-1][1] == "Instruct: fallback\nQuery: " and asked == [
        "CQADupstackAndroidRetrieval"
    ]
    with pytest.raises(ValueError, match="only text"):
        enc.encode([{"image": [1]}], prompt_type=None, **kw)

    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    s = enc.similarity(a, b)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0, -r], [r, r, -1.0]]))
    assert enc.similarity(np.array([1.0, 0.0]), b).shape == (1, 3)
    torch.testing.assert_close(
        enc.similarity_pairwise(a, b[:2]), torch.tensor([1.0, r]), rtol=0, atol=1e-6
    )


def test_length_grouped_batches():
    assert length_grouped_batches([5, 1, 4, 1, 9], 2) == [[1, 3], [2, 0], [4]]
    assert length_grouped_batches([], 3) == []
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches([1], 0)


def _task(category_type, score, **extra):
    scores = {"test": [{"main_score": score, "hf_subset": "default", "languages": ["eng-Latn"]}]}
    scores["test"][0].update(extra)
    return summarize_task(scores, category_type, "m")


def test_summary_averages_categories_and_markdown(tmp_path):
    assert [category_of(t) for t in ("Reranking", "PairClassification", "BitextMining")] == [
        "Rerank",
        "PairClass",
        "Other",
    ]
    # two splits x two subsets average; NaN metrics are left out, all-NaN ones become null
    scores = {
        "dev": [
            {"main_score": 0.2, "ndcg_at_10": 0.2, "nauc": float("nan"), "hf_subset": "a"},
            {"main_score": 0.4, "ndcg_at_10": 0.4, "nauc": float("nan"), "hf_subset": "b"},
        ],
        "test": [{"main_score": 0.9, "ndcg_at_10": 0.9, "nauc": 1.0, "hf_subset": "a"}],
    }
    t = summarize_task(scores, "Retrieval", "ndcg_at_10")
    assert abs(t["main_score"] - 0.5) <= 1e-12 and abs(t["ndcg_at_10"] - 0.5) <= 1e-12
    assert t["nauc"] == 1.0 and t["splits"] == ["dev", "test"] and t["subsets"] == ["a", "b"]
    assert (
        summarize_task({"test": [{"main_score": float("nan")}]}, "STS", "m")["main_score"] is None
    )

    tasks = {
        "R1": _task("Retrieval", 0.5),
        "R2": _task("Retrieval", 0.3),
        "C": _task("Clustering", 0.4),
        "S": _task("STS", 0.8),
        "B": _task("BitextMining", 0.99),  # reported, not averaged
    }
    s = summarize(tasks)
    assert s["categories"]["Retrieval"]["num_tasks"] == 2
    assert abs(s["categories"]["Retrieval"]["average"] - 0.4) <= 1e-12
    assert s["categories"]["Rerank"] == {"num_tasks": 0, "average": None, "tasks": []}
    assert s["categories"]["Other"]["tasks"] == ["B"]
    assert s["average"]["num_tasks"] == 4
    assert abs(s["average"]["score"] - (0.5 + 0.3 + 0.4 + 0.8) / 4) <= 1e-12

    md = render_markdown(s, "tiny")
    head = " | ".join(f"{c} ({n})" for c, n in zip(CATEGORIES, (2, 0, 1, 0, 0, 1, 0), strict=True))
    assert f"| {head} | Average (4) |" in md
    assert "| 40.00 | - | 40.00 | - | - | 80.00 | - | 50.00 |" in md
    assert "## Other (not in the average)" in md and "| B | BitextMining | m | 99.00 |" in md
    assert "## Rerank" not in md  # no empty sections

    write_summary(tmp_path, s, "tiny")
    assert json.loads((tmp_path / "summary.json").read_text())["average"]["num_tasks"] == 4
    assert (tmp_path / "summary.md").read_text() == md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "summary.md"]


def test_model_format_detection(tmp_path):
    with pytest.raises(FileNotFoundError, match="must be a directory"):
        detect_model_format(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"latest_checkpointed_iteration.txt.*config.json"):
        detect_model_format(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert detect_model_format(tmp_path) == "hf"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("0")
    assert detect_model_format(tmp_path) == "megatron"
