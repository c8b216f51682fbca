"""Hard-negative mining (`curation.mining.mine_hard_negatives`, exact search) against a brute-force
top-k computed here from the documented rule.

The rule (module docstring of `megatron_nvembed/curation/mining.py` and docs/curation.md,
"--candidates"; the paper's positive-aware mining as quoted in nvembed-format.md: a candidate is
kept only if its teacher score is below margin x the positive's score):
  rank the whole corpus by inner product of L2-normalised embeddings (score descending, equal
  scores by corpus row ascending: `retrieval.search` module docstring), keep the first
  `candidates`; drop the record's positives (exact text) and every candidate with
  score >= margin x pos_score, where pos_score is the LOWEST score among the record's positives;
  the first `num_negatives` that remain are the negatives, in that order, with their corpus ids.
`reference_negatives` below implements exactly that with NumPy, over the full score matrix.

The teacher is a fake `Embedder` that looks texts up in a table of vectors whose entries are all
+-1/4 in 16 dimensions: every vector has norm exactly 1 and every score is a multiple of 1/8,
exact in float32 and float64 alike. So the test can demand exact equality of ids and order
(tolerance: none), put a corpus document exactly at the threshold (margin 0.75 x 1.0 and
0.75 x 0.5 are representable), and has many tied scores that the tie rule must order.

Cases (each query is mined in every parametrisation):
- q0: its positive is in the corpus and scores 1.0 (the top hit: must go as a positive, not as a
  negative); a document scores exactly at the threshold (dropped: the rule is >=); two
  documents tie just below it;
- q1: two positives, one in the corpus at 0.875 and one outside it at 0.5: the threshold uses
  the lower one (a document at 0.5 is dropped though below 0.75 x 0.875; one at 0.375 sits
  exactly on the threshold);
- q2: its positive (corpus row 14) scores -0.5, below its own threshold 0.75 x -0.5, so only
  the exact-text match keeps it out of the negatives; only documents <= -0.5 are eligible:
  fewer than `num_negatives` (the output is short, and `queries_short` counts it);
- q3: an ordinary query;
and `num_negatives` = the corpus size (every eligible document, in order), a `candidates` pool
smaller than the corpus, the paper's margin 0.95, several corpus shards (ties across shards) and
several query chunks and teacher blocks. The input records carry teacher scores
(`pos_scores` / `neg_scores`), which the output must not: they scored the negatives mining
replaces.

Run alone: pytest -q -p no:cacheprovider tests/unit/test_mining_exact.py
"""

import json

import numpy as np
import pytest
import torch

from megatron_nvembed.evaluation.embedder import Embedder

DIM = 16
N_DOCS = 40


def _signs(rng) -> np.ndarray:
    return rng.choice([-0.25, 0.25], size=DIM)


def _flip(v: np.ndarray, idx) -> np.ndarray:
    """`v` with the signs at `idx` flipped: score with v = 1 - len(idx) / 8."""
    out = v.copy()
    out[list(idx)] *= -1
    return out


def _build():
    """(corpus texts, corpus vectors [n, d], queries: list of (text, vector, positives), table)."""
    rng = np.random.default_rng(0)
    docs = np.stack([_signs(rng) for _ in range(N_DOCS)])
    qv = [_signs(rng) for _ in range(4)]
    # q0: positive = itself (1.0) at row 5; exactly at 0.75 x 1.0 at row 3; a tie at 0.625
    docs[5] = qv[0]
    docs[3] = _flip(qv[0], [0, 1])
    docs[30], docs[12] = _flip(qv[0], [2, 3, 4]), _flip(qv[0], [5, 6, 7])
    # q1: positives row 20 (0.875) and an outside text (0.5): threshold 0.375
    docs[20] = _flip(qv[1], [0])
    docs[8] = _flip(qv[1], [1, 2, 3, 4])  # 0.5: dropped only by the lower positive
    docs[33] = _flip(qv[1], [1, 2, 3, 4, 5])  # 0.375: exactly on the threshold
    docs[17] = _flip(qv[1], range(6))  # 0.25: eligible
    pos1_out = _flip(qv[1], [8, 9, 10, 11])
    # q2: positive row 14 at -0.5, below its own threshold -0.375; a few eligible documents
    docs[14] = _flip(qv[2], range(12))
    docs[25] = _flip(qv[2], range(13))  # -0.625
    docs[9] = _flip(qv[2], range(3, 15))  # -0.5
    # q3: an ordinary query, its positive in the corpus (0.875)
    docs[38] = _flip(qv[3], [15])
    texts = [f"doc {i:02d}" for i in range(N_DOCS)]
    queries = [
        ("query zero", qv[0], [texts[5]]),
        ("query one", qv[1], [texts[20], "positive one outside"]),
        ("query two", qv[2], [texts[14]]),
        ("query three", qv[3], [texts[38]]),
    ]
    table = dict(zip(texts, docs))
    table.update({q: v for q, v, _ in queries})
    table["positive one outside"] = pos1_out
    return texts, docs, queries, table


class TableEmbedder(Embedder):
    """A teacher whose "model" is a lookup table (no instruction ever reaches it here)."""

    kind = "table"
    source = "test_mining_exact"
    dim = DIM
    device = torch.device("cpu")

    def __init__(self, table: dict[str, np.ndarray], batch_size: int):
        super().__init__(batch_size=batch_size, show_progress=False)
        self.table = table

    def _lengths(self, texts, instructions):
        return [3] * len(texts)

    def _embed_batch(self, texts, instructions):
        assert not any(instructions), "use_instruction=False: no instruction expected"
        return torch.from_numpy(np.stack([self.table[t] for t in texts]).astype(np.float32))


def reference_negatives(texts, docs, query_vec, positives, table, *, margin, k, candidates):
    """The documented rule, brute force: (negative rows, dropped as positives, dropped by the
    margin), the counts over the candidates examined until k negatives were found."""
    scores = docs @ query_vec  # [n], exact (multiples of 1/8)
    pos_score = min(float(table[p] @ query_vec) for p in positives)
    order = sorted(range(len(docs)), key=lambda r: (-scores[r], r))[:candidates]
    rows, d_pos, d_margin = [], 0, 0
    for r in order:
        if len(rows) == k:
            break
        if texts[r] in positives:
            d_pos += 1
        elif scores[r] >= margin * pos_score:
            d_margin += 1
        else:
            rows.append(r)
    return rows, d_pos, d_margin, scores, pos_score


@pytest.mark.parametrize(
    "num_negatives,candidates,shard_size,margin",
    [
        (5, N_DOCS, 16, 0.75),
        (N_DOCS, N_DOCS, 7, 0.75),  # every eligible document, in order
        (5, 8, N_DOCS, 0.75),  # a candidate pool smaller than the corpus
        (5, N_DOCS, 16, 0.95),  # the paper's margin
    ],
    ids=["k5", "k=all", "pool8", "margin0.95"],
)
def test_mining_equals_brute_force(tmp_path, num_negatives, candidates, shard_size, margin):
    from megatron_nvembed.curation.mining import MiningOptions, mine_hard_negatives

    texts, docs, queries, table = _build()
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i:02d}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    (tmp_path / "q.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "query": q,
                    "pos": pos,
                    "neg": [],
                    "pos_scores": [1.0] * len(pos),
                    "neg_scores": [],
                }
            )
            + "\n"
            for q, _, pos in queries
        )  # fmt: skip
    )
    summary = mine_hard_negatives(
        tmp_path / "q.jsonl",
        tmp_path / "corpus.jsonl",
        TableEmbedder(table, batch_size=2),
        tmp_path / "out.jsonl",
        MiningOptions(
            num_negatives=num_negatives,
            margin=margin,
            candidates=candidates,
            shard_size=shard_size,
            chunk_size=3,
            use_instruction=False,
            index="exact",
            progress=False,
        ),
    )
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["query"] for r in out] == [q for q, _, _ in queries]

    short = d_pos_total = d_margin_total = 0
    ties = at_threshold = 0
    for rec, (q, qv, pos) in zip(out, queries):
        rows, d_pos, d_margin, scores, pos_score = reference_negatives(
            texts, docs, qv, pos, table, margin=margin, k=num_negatives, candidates=candidates
        )
        assert rec["neg_ids"] == [f"d{r:02d}" for r in rows], q
        assert rec["neg"] == [texts[r] for r in rows], q
        # teacher scores belonged to the replaced negatives: not written back
        assert "pos_scores" not in rec and "neg_scores" not in rec, q
        short += len(rows) < num_negatives
        d_pos_total += d_pos
        d_margin_total += d_margin
        ties += sum(scores[a] == scores[b] for a, b in zip(rows, rows[1:]))
        at_threshold += int((scores == margin * pos_score).sum())
    assert summary.queries == len(queries)
    assert summary.queries_short == short
    assert summary.dropped_positives == d_pos_total
    assert summary.dropped_by_margin == d_margin_total

    # the fixture exercises what it claims
    assert ties > 0, "no tied scores among the chosen negatives"
    assert short >= 1, "no query short of negatives"
    if margin == 0.75:
        assert at_threshold >= 2, "no document exactly at the threshold"
