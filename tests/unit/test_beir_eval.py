"""Local BEIR-format evaluation, the pure parts.

- Loader: `open_beir` keeps queries and qrels, the corpus stays on disk (read back by row);
  `load_beir` reads it all; errors name the file and line (a malformed corpus line:
  corpus.jsonl:line; every qrels error: test.tsv:line, its header included); a duplicated id in
  corpus.jsonl / queries.jsonl and a duplicated qrels pair are refused naming both lines; qrels
  naming missing queries or documents give one warning with the counts and are scored as MTEB
  scores them (nDCG / recall by hand, and through pytrec_eval, 1e-9).
- Metrics: nDCG / recall / MRR equal hand-computed values (1e-12) on a small graded example;
  `ranking_metrics` of the ranked ids that an exact top-k search returns equals
  `retrieval_metrics` of the dense score matrix and a brute-force reference written here (1e-12),
  the ranked lists themselves equal a stable argsort exactly (integer embeddings: many exact
  ties, also across shards).
- Margins: `search_margins` (through `evaluate_embeddings`, in memory and over shards) equals
  `score_margins` of the dense matrix within 1e-5 (float32 scores), queries with many relevant
  documents and with none included.

Run alone: pytest tests/unit/test_beir_eval.py
"""

import json
import logging
import math

import numpy as np
import pytest

from megatron_nvembed.evaluation.beir import load_beir, open_beir
from megatron_nvembed.evaluation.metrics import ranking_metrics, retrieval_metrics, score_margins
from megatron_nvembed.evaluation.retrieval_eval import evaluate_beir, evaluate_embeddings
from megatron_nvembed.retrieval.corpus import JsonlCorpus, beir_row
from megatron_nvembed.retrieval.search import search

KS = (1, 3, 10, 50)


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
    (tmp_path / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")


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
    opened = open_beir(tmp_path)
    assert opened.query_ids == ["q1", "q2"] and opened.queries == ["query one", "query two"]
    assert len(opened.corpus) == 3 and opened.corpus.row(2).id == "d3"
    assert opened.corpus.row(0).text == "T doc 1"

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
    # q1: relevant d1 (1.0), d3 (0.6), the only negative d2 (0.0); q2: d2 (1.0) vs 0.0 and 0.0
    assert m["score_margin_hardest"] == pytest.approx(((0.8 - 0.0) + 1.0) / 2, abs=1e-6)
    assert m["score_margin_mean"] == pytest.approx(((0.8 - 0.0) + 1.0) / 2, abs=1e-6)


def test_loader_errors(tmp_path):
    _write(tmp_path)
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        load_beir(tmp_path, split="dev")
    with open(tmp_path / "corpus.jsonl", "a") as f:
        f.write("\n{not json\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl:5: malformed JSON"):
        open_beir(tmp_path)


def _jsonl(path, ids):
    """One `{"_id", "text"}` line per id; None: a blank line (it counts in the line numbers)."""
    path.write_text(
        "".join("\n" if i is None else json.dumps({"_id": i, "text": i}) + "\n" for i in ids)
    )


@pytest.mark.faults
def test_duplicated_ids_refused_naming_the_first_two_lines(tmp_path):
    """Fault: A BEIR folder whose corpus or queries repeat an id.
    Happens: Refused before encoding, naming the file, the id and its first two lines.
    Do: Remove or rename the duplicates."""
    _write(tmp_path)
    # d2 on lines 2, 5 and 6: the first two are named
    _jsonl(tmp_path / "corpus.jsonl", ["d1", "d2", None, "d3", "d2", "d2"])
    with pytest.raises(ValueError) as err:
        open_beir(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'corpus.jsonl'}: id 'd2' on lines 2 and 5 (ids must be unique)"
    )
    # two duplicated ids: the one whose second line comes first (d3: 3 and 4; d1: 1 and 5);
    # an integer _id is the string MTEB reads ("7" and 7 are one id)
    _jsonl(tmp_path / "corpus.jsonl", ["d1", "d2", "d3", "d3", "d1"])
    with pytest.raises(ValueError, match=r"corpus.jsonl: id 'd3' on lines 3 and 4 \("):
        open_beir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "7", "text": "a"}\n{"_id": 7, "text": "b"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl: id '7' on lines 1 and 2 \("):
        open_beir(tmp_path)
    _write(tmp_path)
    _jsonl(tmp_path / "queries.jsonl", ["q1", "q2", "q1"])
    with pytest.raises(ValueError, match=r"queries.jsonl: id 'q1' on lines 1 and 3 \("):
        open_beir(tmp_path)


QRELS_HEAD = "query-id\tcorpus-id\tscore\n"


@pytest.mark.parametrize(
    "body, message",
    [
        (
            QRELS_HEAD + "q1\td1\t2\nq2\td2\t1\nq1\td1\t1\n",
            r"test.tsv: query-id 'q1' and corpus-id 'd1' on lines 2 and 4 \(a pair is judged once\)",
        ),
        (
            QRELS_HEAD + "q1\td1\t1\nq2\td2\xff\t1\n",
            r"test.tsv:3: not UTF-8 text \(byte ff at byte 5",
        ),
        (
            QRELS_HEAD + "q1\td1\t1\nq2\td2\n",
            r"test.tsv:3: expected 3 tab-separated fields .* found 2",
        ),
        (QRELS_HEAD + "q1\td1\t1\t0\n", r"test.tsv:2: expected 3 tab-separated fields .* found 4"),
        (QRELS_HEAD + "q1\td1\t1\nq2\td2\thigh\n", r"test.tsv:3: score 'high' is not an integer"),
        (QRELS_HEAD + "q1\td1\t1.5\n", r"test.tsv:2: score '1.5' is not an integer"),
        (QRELS_HEAD + "q1\t\t1\n", r"test.tsv:2: empty corpus-id"),
        (
            "q1\td1\t1\n",
            r"test.tsv:1: expected the header 'query-id\\tcorpus-id\\tscore'.*found 'q1",
        ),
        ("qid\tdid\tscore\nq1\td1\t1\n", r"test.tsv:1: expected the header .*found 'qid"),
        (
            "\xff\n",
            r"test.tsv:1: not UTF-8 text \(byte ff at byte 0",
        ),
        ("", r"test.tsv:1: empty \(expected the header"),
    ],
    ids=[
        "duplicated pair",
        "not utf-8",
        "2 fields",
        "4 fields",
        "word score",
        "float score",
        "empty id",
        "no header",
        "other header",
        "not utf-8 header",
        "empty file",
    ],
)
@pytest.mark.faults
def test_qrels_errors_name_file_and_line(tmp_path, body, message):
    """Fault: A malformed qrels file (not UTF-8, wrong field count, a word or float score, an empty
        id, a missing or other header, a duplicated pair).
    Happens: One error naming the qrels file and line.
    Do: Fix that line."""
    _write(tmp_path)
    (tmp_path / "qrels" / "test.tsv").write_bytes(body.encode("latin-1"))
    with pytest.raises(ValueError, match=message):
        open_beir(tmp_path)


def test_qrels_with_bom_crlf_and_blank_lines_read(tmp_path):
    qrels = "\ufeffquery-id\tcorpus-id\tscore\r\nq1\td1\t2\r\n\nq2\td2\t1\r\n"
    _write(tmp_path, qrels=qrels)
    assert open_beir(tmp_path).qrels == {"q1": {"d1": 2}, "q2": {"d2": 1}}


@pytest.mark.faults
def test_qrels_naming_missing_queries_and_documents_warned_once(tmp_path, caplog):
    """Fault: qrels naming queries or documents the folder lacks.
    Happens: One warning counting them (with the first of each and its line); they are scored as
        MTEB scores them.
    Do: Check the folder is complete when the counts are not expected."""
    qrels = QRELS_HEAD + "q1\td1\t2\nq1\td9\t1\nq9\td1\t1\nq9\td2\t1\nq8\td9\t1\nq2\td2\t1\n"
    _write(tmp_path, qrels=qrels)
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed"):
        data = open_beir(tmp_path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert msg.startswith(f"{tmp_path / 'qrels' / 'test.tsv'}: ")
    # q9 (lines 4, 5) and q8 (line 6): 3 lines, 2 queries; d9 (lines 3, 6): 2 lines, 1 document
    assert "3 line(s) name 2 query-id(s) not in queries.jsonl (first 'q9', line 4)" in msg
    assert "2 line(s) name 1 corpus-id(s) not in corpus.jsonl (first 'd9', line 3)" in msg
    assert "\n" not in msg
    # missing queries are not scored; the missing document stays judged
    assert data.query_ids == ["q1", "q2"]
    assert data.qrels == {"q1": {"d1": 2, "d9": 1}, "q2": {"d2": 1}}
    caplog.clear()
    _write(tmp_path)
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed"):
        open_beir(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.faults
def test_missing_query_and_document_scored_as_mteb_scores_them(tmp_path):
    """Fault: A judged query missing from queries.jsonl, a judged document missing from the corpus.
    Happens: The query is left out of the average, the document counts in its query's ideal DCG and
        recall, as MTEB and pytrec_eval score them (1e-9).
    Do: Nothing: the scores compare with MTEB's."""
    # MTEB searches only the queries it has (those with judgements) and pytrec_eval scores only
    # queries present in both the run and the qrels: a judged query missing from queries.jsonl is
    # left out of the average; a judged document missing from the corpus counts in its query's
    # ideal DCG and recall denominator, never retrieved. Expected values by hand (1e-9).
    qrels = QRELS_HEAD + "q1\td1\t2\nq1\td3\t1\nq1\td9\t1\nq9\td1\t1\nq2\td2\t1\n"
    _write(tmp_path, qrels=qrels)
    table = {
        "query one": [1, 0, 0],
        "query two": [0, 1, 0],
        "T doc 1": [1, 0, 0],
        "doc 2": [0, 1, 0],
        "doc 3": [0.6, 0, 0.8],
    }
    m = evaluate_beir(lambda texts, _: np.array([table[t] for t in texts]), tmp_path, ks=(1, 10))
    # q1 ranks d1 (gain 2), d3 (1), d2 (0); its ideal is d1, d3, d9 (2, 1, 1). q2: d2 first.
    # q9 (not in queries.jsonl) is not scored: the mean is over q1 and q2.
    dcg = 2 / math.log2(2) + 1 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert abs(m["ndcg_at_10"] - (dcg / idcg + 1.0) / 2) <= 1e-9
    assert abs(m["ndcg_at_1"] - (1.0 + 1.0) / 2) <= 1e-9
    assert abs(m["recall_at_10"] - (2 / 3 + 1.0) / 2) <= 1e-9
    assert abs(m["recall_at_1"] - (1 / 3 + 1.0) / 2) <= 1e-9
    try:  # the same through pytrec_eval, as MTEB calls it: all qrels, the run of searched queries
        import pytrec_eval
    except ImportError:
        return
    full = {"q1": {"d1": 2, "d3": 1, "d9": 1}, "q9": {"d1": 1}, "q2": {"d2": 1}}
    run = {"q1": {"d1": 1.0, "d3": 0.6, "d2": 0.0}, "q2": {"d2": 1.0, "d1": 0.0, "d3": 0.0}}
    per_query = pytrec_eval.RelevanceEvaluator(full, {"ndcg_cut.10"}).evaluate(run)
    assert sorted(per_query) == ["q1", "q2"]
    expected = float(np.mean([v["ndcg_cut_10"] for v in per_query.values()]))
    assert abs(m["ndcg_at_10"] - expected) <= 1e-9


def _reference_metrics(scores, query_ids, corpus_ids, qrels, ks):
    """trec_eval's definitions, brute force: every document sorted by (-score, column)."""
    out = {}
    for k in ks:
        sums = {"ndcg": 0.0, "recall": 0.0, "mrr": 0.0}
        for i, qid in enumerate(query_ids):
            judged = qrels.get(qid, {})
            order = sorted(range(len(corpus_ids)), key=lambda j: (-scores[i, j], j))[:k]
            gains = [judged.get(corpus_ids[j], 0) for j in order]
            dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
            ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
            idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
            n_rel = sum(g > 0 for g in judged.values())
            sums["ndcg"] += dcg / idcg if idcg else 0.0
            sums["recall"] += sum(g > 0 for g in gains) / n_rel if n_rel else 0.0
            hits = [r for r, g in enumerate(gains) if g > 0]
            sums["mrr"] += 1 / (hits[0] + 1) if hits else 0.0
        for name, total in sums.items():
            out[f"{name}_at_{k}"] = total / len(query_ids)
    return out


def _random_set(seed, n_q=24, n_d=120, dim=8, integer=False):
    rng = np.random.default_rng(seed)
    if integer:  # small integers: every dot product exact in float32, many exact ties
        q = rng.integers(-2, 3, (n_q, dim)).astype(np.float32)
        d = rng.integers(-2, 3, (n_d, dim)).astype(np.float32)
    else:
        q = rng.standard_normal((n_q, dim)).astype(np.float32)
        d = rng.standard_normal((n_d, dim)).astype(np.float32)
    query_ids = [f"q{i}" for i in range(n_q)]
    corpus_ids = [f"d{j}" for j in range(n_d)]
    qrels = {}
    for i in range(n_q):
        n_judged = [0, 1, 3, 30][i % 4]  # none, one, a few, many (deeper than max(KS)?)
        picked = rng.choice(n_d, size=n_judged, replace=False)
        qrels[f"q{i}"] = {f"d{j}": int(rng.integers(0, 4)) for j in picked}
    qrels["q0"] = {"d5": 0}  # judged, nothing relevant
    return q, d, query_ids, corpus_ids, qrels


class _Shards:
    """Corpus embeddings cut into shards, read like `ShardedEmbeddings` by `search`."""

    def __init__(self, emb, size):
        self.emb, self.rows, self.dim = emb, len(emb), emb.shape[1]
        self.size = size

    def __iter__(self):
        for lo in range(0, self.rows, self.size):
            yield lo, self.emb[lo : lo + self.size]


@pytest.mark.parametrize("integer", [True, False], ids=["tied-integers", "gaussian"])
def test_ranking_metrics_from_search_equal_the_matrix_version(integer):
    q, d, query_ids, corpus_ids, qrels = _random_set(1, integer=integer)
    scores = q @ d.T
    if integer:
        assert (np.diff(np.sort(scores, axis=1), axis=1) == 0).sum() > 100  # ties do occur
        # ties inside the top k and across shards (each shard searched whole: FAISS does not
        # promise which row of a tie it keeps at the k-th place of one shard)
        layouts = [(d, len(d)), (_Shards(d, 17), 50)]
    else:
        layouts = [(d, 50), (_Shards(d, 17), 50), (_Shards(d, 64), 50)]
    for corpus, k in layouts:
        want_order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        _, rows = search(q, corpus, k)
        assert np.array_equal(rows, want_order)  # exact ranked lists, ties: lower row first
        ks = tuple(x for x in KS if x <= k)
        ranked = [[corpus_ids[j] for j in r] for r in rows]
        got = ranking_metrics(ranked, query_ids, qrels, ks)
        dense = retrieval_metrics(scores, query_ids, corpus_ids, qrels, ks)
        ref = _reference_metrics(scores, query_ids, corpus_ids, qrels, ks)
        assert set(got) == set(dense) == set(ref) and len(got) == 3 * len(ks)
        for key in got:
            assert abs(got[key] - dense[key]) <= 1e-12, key
            assert abs(got[key] - ref[key]) <= 1e-12, key
    if not integer:  # the whole path: top-k search at the needed depth, ids, metrics
        m = evaluate_embeddings(q, d, query_ids, qrels, corpus_ids=corpus_ids, ks=KS)
        for key, v in retrieval_metrics(scores, query_ids, corpus_ids, qrels, KS).items():
            assert abs(m[key] - v) <= 1e-12, key
    # an id listed twice (or a missing hit) counts once, at its better rank
    once = ranking_metrics([["d1", "d1", None, "d2"]], ["q"], {"q": {"d2": 1}}, (2,))
    assert once["recall_at_2"] == 1.0 and once["mrr_at_2"] == 0.5


def test_margins_from_search_equal_score_margins():
    q, d, query_ids, corpus_ids, qrels = _random_set(2, n_d=90, dim=16)
    # q3's relevant documents are its 25 best: the hardest negative is hit 26, deeper than
    # max(ks), so the search must reach |relevant| + 1
    best = np.argsort(-(q[3] @ d.T), kind="stable")[:25]
    qrels["q3"] = {corpus_ids[j]: 1 for j in best}
    want = score_margins(q @ d.T, query_ids, corpus_ids, qrels)
    # margins of the order of the scores (-8.0 and 0.84 here), so the comparison below is of
    # non-trivial values (float noise is ~1e-6)
    assert abs(want["score_margin_hardest"]) > 0.1 and abs(want["score_margin_mean"]) > 0.1
    got = evaluate_embeddings(q, d, query_ids, qrels, corpus_ids=corpus_ids, ks=(1, 10))
    for key in want:
        assert abs(got[key] - want[key]) <= 1e-5, key
    # a query with every document relevant has no negative: left out by both
    qrels_all = {**qrels, "q1": {c: 1 for c in corpus_ids}}
    want = score_margins(q @ d.T, query_ids, corpus_ids, qrels_all)
    got = evaluate_embeddings(q, d, query_ids, qrels_all, corpus_ids=corpus_ids, ks=(1,))
    for key in want:
        assert abs(got[key] - want[key]) <= 1e-5, key


def test_ranking_metrics_equal_pytrec_eval():
    """nDCG@k (graded relevance), recall@k and MRR@k against pytrec_eval (trec_eval's C code,
    what mteb's retrieval evaluation runs) on random rankings and qrels; MRR@k is trec_eval's
    reciprocal rank of the run cut at k. Tolerance 1e-12."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(60)]
    query_ids = [f"q{i}" for i in range(40)]
    qrels, ranked, run = {}, [], {}
    for qid in query_ids:
        judged = rng.choice(len(docs), size=int(rng.integers(1, 8)), replace=False)
        qrels[qid] = {docs[j]: int(rng.integers(1, 4)) for j in judged}
        if rng.random() < 0.3:  # a judged-but-irrelevant document
            unjudged = [d for d in docs if d not in qrels[qid]]
            qrels[qid][unjudged[int(rng.integers(len(unjudged)))]] = 0
        order = [docs[j] for j in rng.permutation(len(docs))[:50]]
        ranked.append(order)
        run[qid] = {d: float(len(order) - r) for r, d in enumerate(order)}  # distinct scores
    ks = (1, 10, 30)
    ours = ranking_metrics(ranked, query_ids, qrels, ks)
    measures = {f"ndcg_cut.{','.join(map(str, ks))}", f"recall.{','.join(map(str, ks))}"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    scored = [q for q in query_ids if any(r > 0 for r in qrels[q].values())]
    assert len(scored) == len(query_ids)  # every query has a relevant document: same averages
    for k in ks:
        for mine, theirs in ((f"ndcg_at_{k}", f"ndcg_cut_{k}"), (f"recall_at_{k}", f"recall_{k}")):
            expected = float(np.mean([per_query[q][theirs] for q in scored]))
            assert ours[mine] == pytest.approx(expected, abs=1e-12), (mine, k)
        cut = {q: dict(list(run[q].items())[:k]) for q in query_ids}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        expected = float(np.mean([rr[q]["recip_rank"] if q in rr else 0.0 for q in scored]))
        assert ours[f"mrr_at_{k}"] == pytest.approx(expected, abs=1e-12), k


def test_equal_id_hashes_of_different_ids_are_not_duplicates(tmp_path):
    """The scan keeps one hash a row; rows whose hashes are equal are read back and compared, so
    a hash collision alone refuses nothing (forced here by handing the check equal hashes)."""
    path = tmp_path / "c.jsonl"
    _jsonl(path, ["a", "b", None, "c", "b"])
    corpus = JsonlCorpus(path, beir_row)
    corpus._refuse_duplicated_ids(np.array([7, 3, 7, 9], dtype=np.int64))  # a, c collide
    with pytest.raises(ValueError, match=r"c.jsonl: id 'b' on lines 2 and 5 \("):
        corpus._refuse_duplicated_ids(np.array([7, 3, 7, 3], dtype=np.int64))
