"""Curation converters on tiny hand-made data with hand-checked expectations (bm25s for BM25).

Run alone: pytest tests/unit/test_curation_converters.py
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from megatron_nvembed.curation.converters import (
    classification_records,
    clustering_records,
    decontaminate,
    stratified_indices,
    sts_records,
)

ROOT = Path(__file__).resolve().parents[2]


def test_stratified_subsampling_keeps_shares():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    keep = stratified_indices(labels, 20, seed=1)
    assert len(keep) == 20 and keep == sorted(keep)
    assert Counter(labels[i] for i in keep) == {"a": 12, "b": 6, "c": 2}
    assert stratified_indices(labels, 20, seed=1) == keep  # deterministic


def test_classification_label_and_example_positives():
    texts = ["great film", "awful film", "loved it", "hated it", "so so"]
    labels = [2, 0, 2, 0, 1]
    names = ["positive", "negative", "positive", "negative", "neutral"]
    recs = classification_records(texts, labels, task="Imdb", label_texts=names, num_negatives=7)
    assert [r["pos"] for r in recs] == [[n] for n in names]
    for r, n in zip(recs, names):
        assert sorted(r["neg"]) == sorted({"positive", "negative", "neutral"} - {n})
        assert r["in_batch_negatives"] is False
    ex = classification_records(texts, labels, task="Imdb", positive="example", num_negatives=2)
    # "so so" is alone in its class: no other example to pair with
    assert [r["query"] for r in ex] == ["great film", "awful film", "loved it", "hated it"]
    assert ex[0]["pos"] == ["loved it"] and ex[1]["pos"] == ["hated it"]
    for r in ex:
        own = labels[texts.index(r["query"])]
        assert all(labels[texts.index(t)] != own for t in r["neg"]) and len(r["neg"]) == 2


def test_clustering_category_lists():
    recs = clustering_records(
        ["title a", "title b", "title c"],
        ["cs.LG", ["math.ST", "stat.ML"], "q-bio"],
        task="ArxivClusteringS2S",
        num_negatives=7,
    )
    assert recs[0]["pos"] == ["cs.LG"]
    assert sorted(recs[0]["neg"]) == ["math.ST", "q-bio", "stat.ML"]
    assert recs[1]["pos"][0] in ("math.ST", "stat.ML")
    assert sorted(recs[1]["neg"]) == ["cs.LG", "q-bio"]


def test_sts_rules():
    pairs = [
        ("a cat sits on the mat", "a cat is sitting on a mat", 4.5),
        ("the cat sleeps on the mat", "a dog barks", 0.5),
        ("a cat sits on the mat", "the cat sleeps on the mat", 3.0),
        ("a cat naps on a mat", "dogs run", 1.0),
        ("stock markets fell", "shares dropped", 3.9),
    ]
    recs = sts_records(pairs, task="STS12", num_negatives=7)
    # only the 4.5 pair qualifies (>= 4), in both directions
    assert [(r["query"], r["pos"]) for r in recs] == [
        ("a cat sits on the mat", ["a cat is sitting on a mat"]),
        ("a cat is sitting on a mat", ["a cat sits on the mat"]),
    ]
    first = recs[0]["neg"]
    assert "the cat sleeps on the mat" not in first  # annotated 3.0 > 2.5 with the query
    assert "a cat is sitting on a mat" not in first  # its own positive (4.5)
    assert "a cat naps on a mat" in first  # shares "cat" and "mat"
    assert "stock markets fell" not in first and "dogs run" not in first  # no shared term
    assert "the cat sleeps on the mat" in recs[1]["neg"]  # no annotated score with that query


def test_decontaminate_counts():
    recs = [
        {"query": q, "pos": ["x"], "neg": [], "task": "t"}
        for q in ["happy tweet about joy", "sad tweet about loss", "totally different words"]
    ]
    evals = ["a happy tweet full of joy", "a sad tweet about a loss", "unrelated", "noise", "more"]
    kept, dropped = decontaminate(recs, evals, threshold=0.5)
    assert [r["query"] for r in dropped] == ["happy tweet about joy", "sad tweet about loss"]
    assert [r["query"] for r in kept] == ["totally different words"]


def test_prepare_data_cli(tmp_path):
    src = tmp_path / "cls.jsonl"
    src.write_text(
        "".join(
            json.dumps({"text": t, "label": lab}) + "\n"
            for t, lab in [("good", 1), ("bad", 0), ("fine", 1)]
        )
    )
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "prepare_data.py"),
        "classification",
        "--input",
        str(src),
        "--output",
        str(out),
        "--task",
        "ImdbClassification",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["records"] == 3
    assert [json.loads(line)["pos"] for line in out.read_text().splitlines()] == [
        ["1"],
        ["0"],
        ["1"],
    ]
    bad = subprocess.run(cmd + ["--text-column", "body"], capture_output=True, text=True)
    assert bad.returncode == 2 and "row 1 has no column 'body'" in bad.stderr
    # a task name training would not find is refused before anything is read or written
    typo = subprocess.run(cmd[:-1] + ["ImdbClasification"], capture_output=True, text=True)
    assert typo.returncode == 2 and "--task: unknown task 'ImdbClasification'" in typo.stderr
    assert "did you mean ImdbClassification" in typo.stderr and "--instruction" in typo.stderr
    own = cmd[:-1] + ["MyReviews", "--instruction", "Classify the sentiment of a review"]
    proc = subprocess.run(own, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["task"], r["instruction"]) for r in recs} == {
        ("MyReviews", "Classify the sentiment of a review")
    }
    from megatron_nvembed.data.records import iter_records

    assert len(list(iter_records(out))) == 3  # training reads them


def test_draws_are_valid_on_many_classes_and_deterministic():
    """The O(1) draws (an index into the list with one item left out): every positive is
    another example of the query's class, every negative another class (distinct in label and
    clustering mode), every other example of a class can be drawn, and a seed fixes them."""
    n, k = 3000, 7
    texts = [f"text {i}" for i in range(n)]
    labels = [i % 11 for i in range(n)]
    ex = classification_records(texts, labels, task="Imdb", positive="example", num_negatives=k)
    assert len(ex) == n
    for r in ex:
        q = int(r["query"].split()[1])
        p = int(r["pos"][0].split()[1])
        assert p != q and labels[p] == labels[q]
        assert len(r["neg"]) == k
        assert all(labels[int(t.split()[1])] != labels[q] for t in r["neg"])
    # the edges of "index with one item left out": each of a class's other examples is drawn
    seen = {q: set() for q in range(3)}
    for seed in range(40):
        for r in classification_records(
            ["a", "b", "c", "z"], [0, 0, 0, 1], task="Imdb", positive="example", seed=seed
        ):
            if r["query"] != "z":
                seen["abc".index(r["query"])].add(r["pos"][0])
    assert seen == {0: {"b", "c"}, 1: {"a", "c"}, 2: {"a", "b"}}
    lab = classification_records(texts, labels, task="Imdb", num_negatives=k)
    for r, y in zip(lab, labels):
        assert r["pos"] == [str(y)] and len(set(r["neg"])) == k and str(y) not in r["neg"]
    cats = [[f"c{i % 13}", f"c{(i + 1) % 13}"] for i in range(n)]
    cl = clustering_records(texts, cats, task="x", num_negatives=k)
    for r, cs in zip(cl, cats):
        assert r["pos"][0] in cs and len(set(r["neg"])) == k and not set(r["neg"]) & set(cs)
    few = clustering_records(texts[:3], [["a"], ["b"], ["c"]], task="x", num_negatives=k)
    assert sorted(few[0]["neg"]) == ["b", "c"]  # fewer other categories than asked: all
    again = classification_records(texts, labels, task="Imdb", positive="example", num_negatives=k)
    assert again == ex
