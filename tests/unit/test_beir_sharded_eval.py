"""BEIR evaluation at corpus scale (`evaluation.retrieval_eval.evaluate_beir_sharded`) with a toy embedder.

The embedder is an `embedder.Embedder` whose "model" sums a fixed random vector per word (the
instruction's words at half weight): deterministic per text, whatever the batch, so sharded and
dense scoring see the very same embeddings. A BEIR folder of 40 passages (titles on some) and
10 judged queries (graded qrels, one query with none relevant) plus an unjudged one.

- Sharded (6 shards of 7 passages) equals dense scoring with the same embedder:
  `retrieval_metrics` / `score_margins` of the [queries x corpus] matrix of L2-normalised
  embeddings (metrics 1e-6, margins 1e-5); so does a FAISS index factory string ("Flat", its
  index saved beside the shards).
- Resume: an encoding stopped after 2 shards (`stop_after_shards`) and rerun equals an
  uninterrupted run (metrics equal exactly); the rerun embeds only the 26 passages of the 4
  missing shards (plus the queries) and leaves the 2 finished shard files untouched; a third
  run embeds only the queries.
- 2 gloo ranks: the shards split between the ranks (each encodes some, together all 40 passages
  once), the queries' search split; both ranks get the one-process metrics (1e-6) and count
  every corpus text in `embedder.stats`.

Run alone: pytest tests/unit/test_beir_sharded_eval.py   (about 10 s on 2 cores)
"""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_nvembed.evaluation.beir import load_beir
from megatron_nvembed.evaluation.embedder import Embedder
from megatron_nvembed.evaluation.metrics import retrieval_metrics, score_margins
from megatron_nvembed.evaluation.retrieval_eval import evaluate_beir_sharded

pytest.importorskip("faiss")

INSTRUCTION = "Instruct: find the passage\nQuery: "
KS = (1, 3, 10, 100)
N_DOCS, N_QUERIES, SHARD = 40, 10, 7
WORDS = (
    "light water plant sun moon earth city river bread cat dog rain cloud tree leaf stone "
    "iron gold sea ship road car train bird fish snow fire wind"
).split()


def _word_vector(word: str, dim: int) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim)


class ToyEmbedder(Embedder):
    """Sum of per-word random vectors (instruction words at half weight); counts its texts."""

    kind = "toy"

    def __init__(self, dim: int = 12):
        super().__init__(batch_size=5, max_tokens=None, show_progress=False)
        self.dim, self.device, self.source = dim, torch.device("cpu"), "toy-words"
        self.texts_seen = 0

    def _lengths(self, texts, instructions):
        return [len(f"{i} {t}".split()) for t, i in zip(texts, instructions)]

    def _embed_batch(self, texts, instructions):
        self.texts_seen += len(texts)
        rows = []
        for text, instruction in zip(texts, instructions):
            v = sum((_word_vector(w, self.dim) for w in text.split()), np.zeros(self.dim))
            v = v + 0.5 * sum((_word_vector(w, self.dim) for w in instruction.split()), 0.0)
            rows.append(v)
        return torch.from_numpy(np.asarray(rows, dtype=np.float32))


def _write_beir(folder: Path) -> Path:
    rng = np.random.default_rng(7)
    docs = [list(rng.choice(WORDS, size=rng.integers(4, 9))) for _ in range(N_DOCS)]
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i, words in enumerate(docs):
            title = words[0].capitalize() if i % 3 == 0 else ""
            f.write(json.dumps({"_id": f"doc{i}", "title": title, "text": " ".join(words)}) + "\n")
    lines, queries = [], []
    for qi in range(N_QUERIES):
        target = int(rng.integers(N_DOCS))
        queries.append({"_id": f"q{qi}", "text": " ".join(docs[target][:3])})
        lines.append(f"q{qi}\tdoc{target}\t{0 if qi == 0 else 2}")
        for other in rng.choice(N_DOCS, size=qi % 3, replace=False):
            if other != target:
                lines.append(f"q{qi}\tdoc{other}\t1")
    queries.append({"_id": "unjudged", "text": "snow fire"})
    with open(folder / "queries.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines))
    return folder


def _dense(folder: Path) -> dict[str, float]:
    emb = ToyEmbedder()
    data = load_beir(folder)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    q = unit(emb.embed(data.queries, INSTRUCTION))
    d = unit(emb.embed(data.corpus, ""))
    scores = q @ d.T
    out = retrieval_metrics(scores, data.query_ids, data.corpus_ids, data.qrels, KS)
    out.update(score_margins(scores, data.query_ids, data.corpus_ids, data.qrels))
    return out


def _assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        tol = 1e-5 if key.startswith("score_margin") else 1e-6
        assert abs(got[key] - value) <= tol, (key, got[key], value)


def _run(folder, work, embedder=None, **kw):
    return evaluate_beir_sharded(
        embedder or ToyEmbedder(),
        folder,
        work,
        instruction=INSTRUCTION,
        ks=KS,
        shard_size=SHARD,
        **kw,
    )


def test_sharded_evaluation_equals_dense_scoring(tmp_path):
    folder = _write_beir(tmp_path / "toy")
    want = _dense(folder)
    # non-trivial values to compare (nDCG@10 0.64 and margin 0.31 here; float noise ~1e-6)
    assert 0.0 < want["ndcg_at_10"] < 1.0 and abs(want["score_margin_mean"]) > 0.05
    got = _run(folder, tmp_path / "work")
    assert len(list((tmp_path / "work").glob("emb_*.npy"))) == -(-N_DOCS // SHARD) == 6
    _assert_close(got, want)
    flat = _run(folder, tmp_path / "work", index="Flat")
    _assert_close(flat, want)
    assert len(list((tmp_path / "work").glob("index_*.faiss"))) == 1


def test_resume_after_an_interrupted_encoding(tmp_path):
    folder = _write_beir(tmp_path / "toy")
    whole = _run(folder, tmp_path / "whole")
    work = tmp_path / "work"
    first = ToyEmbedder()
    assert _run(folder, work, first, stop_after_shards=2) is None
    done = sorted(work.glob("emb_*.npy"))
    assert [p.name for p in done] == ["emb_00000.npy", "emb_00001.npy"]
    assert first.texts_seen == 2 * SHARD
    stamps = {p: p.stat().st_mtime_ns for p in done}
    again = ToyEmbedder()
    resumed = _run(folder, work, again)
    assert resumed == whole  # same embeddings, same search: equal, not merely close
    assert again.texts_seen == N_DOCS - 2 * SHARD + N_QUERIES  # the missing shards + queries
    assert again.stats.texts == again.texts_seen
    assert again.last_encode.computed_shards == 4 and again.last_encode.shards == 6
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    third = ToyEmbedder()
    assert _run(folder, work, third) == whole
    assert third.texts_seen == N_QUERIES


def _two_rank_worker(rank, world, folder, out):
    emb = ToyEmbedder()
    emb.dp_rank, emb.dp_size, emb.is_main = rank, world, rank == 0
    exact = _run(Path(folder), Path(out) / "work", emb)
    seen = {
        "texts_seen": emb.texts_seen,
        "stats_texts": emb.stats.texts,
        "computed_shards": emb.last_encode.computed_shards,
    }
    flat = _run(Path(folder), Path(out) / "work", emb, index="Flat")  # shards kept: queries only
    seen["flat_texts_seen"] = emb.texts_seen - seen["texts_seen"]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"exact": exact, "flat": flat, **seen}))


@pytest.mark.distributed
def test_two_ranks_split_the_shards_and_agree(tmp_path):
    from megatron_nvembed.testing import run_distributed

    folder = _write_beir(tmp_path / "toy")
    one = _run(folder, tmp_path / "one")
    run_distributed(_two_rank_worker, 2, str(folder), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        _assert_close(r["exact"], one)
        _assert_close(r["flat"], one)
        assert r["stats_texts"] == N_DOCS + N_QUERIES  # every rank's corpus texts counted
        assert r["computed_shards"] == 6
    seen = [r["texts_seen"] for r in ranks]  # each rank's shards and share of the queries
    assert sum(seen) == N_DOCS + N_QUERIES
    queries = [r["flat_texts_seen"] for r in ranks]  # the second run: the queries alone
    assert sum(queries) == N_QUERIES
    assert min(s - q for s, q in zip(seen, queries)) >= SHARD  # each rank encoded shards
