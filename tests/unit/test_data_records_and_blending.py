"""Records, task templates and blended batches.

- records: JSONL and Parquet read back; a malformed line and a record without a positive are
  errors naming file:line; `skip_bad_records` skips and counts them; writes are atomic;
- templates: Table 6/7 definitions, the "Instruct: ...\\nQuery: " template, close-name hints;
- blending: proportions within 4 standard errors of the weights over 300 batches; identical
  global batches at DP sizes 1, 2 and 4 (rank slices concatenate to the DP=1 batch); exact resume
  from a state_dict; hard negatives drawn without replacement, fewer when fewer exist.

Run alone: pytest tests/unit/test_data_records_and_blending.py
"""

import json
import math

import pytest

from megatron_nvembed.data.blending import BlendedSampler
from megatron_nvembed.data.records import ReadStats, iter_records, write_jsonl_atomic
from megatron_nvembed.data.templates import (
    format_query_instruction,
    get_task_definition,
    query_instruction,
)

GOOD = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "task": "MSMARCO", "id": 7}


def test_jsonl_and_parquet_round_trip(tmp_path):
    path = tmp_path / "a.jsonl"
    assert write_jsonl_atomic(path, [GOOD, dict(GOOD, query="q2")]) == 2
    recs = list(iter_records(path))
    assert [r.query for r in recs] == ["q", "q2"] and recs[0].extra == {"id": 7}
    assert recs[0].to_json() == GOOD
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD]), tmp_path / "a.parquet")
    assert list(iter_records(tmp_path / "a.parquet"))[0].neg == ["n1", "n2"]


def test_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n" + json.dumps(dict(GOOD, pos=[])) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed"):
        list(iter_records(path))
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(dict(GOOD, pos=[])) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: record has no positive"):
        list(iter_records(path))
    path.write_text(json.dumps(GOOD) + "\n{oops\n" + json.dumps(dict(GOOD, pos=[])) + "\n")
    stats = ReadStats()
    assert len(list(iter_records(path, skip_bad_records=True, stats=stats))) == 1
    assert (stats.read, stats.skipped) == (1, 2)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def rows():
        yield GOOD
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(tmp_path / "out.jsonl", rows())
    assert list(tmp_path.iterdir()) == []


def test_templates():
    assert get_task_definition("ArguAna") == "Given a claim, find documents that refute the claim"
    assert get_task_definition("trec-covid", "eval") == (
        "Given a query, retrieve documents that answer the query"
    )
    assert get_task_definition("STS17", "eval") == "Retrieve semantically similar text."
    assert format_query_instruction("X") == "Instruct: X\nQuery: "
    assert query_instruction("SQuAD") == (
        "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
    )
    assert query_instruction("anything", "Do Y") == "Instruct: Do Y\nQuery: "
    with pytest.raises(ValueError, match="did you mean.*HotpotQA"):
        get_task_definition("HotpotQ")


def _sampler(dp_rank=0, dp_size=1, G=24, weights=(0.5, 0.3, 0.2), seed=3):
    sizes = [50, 30, 7]
    negs = [lambda i: (1, 10), lambda i: (2, 3), lambda i: (1, 0)]
    return BlendedSampler(
        sizes,
        list(weights),
        negs,
        G,
        2,
        num_negatives=7,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
    )


def test_blending_proportions_within_sampling_error():
    s, counts, n = _sampler(), [0, 0, 0], 300
    for _ in range(n):
        for slot in s.global_batch():
            counts[slot.dataset] += 1
    total = n * 24
    for k, w in enumerate((0.5, 0.3, 0.2)):
        se = math.sqrt(w * (1 - w) / total)
        assert abs(counts[k] / total - w) <= 4 * se, (k, counts)


def test_same_batches_whatever_the_number_of_ranks():
    ref = _sampler()
    ref_batches = [ref.global_batch() for _ in range(5)]
    for dp in (2, 4):
        ranks = [_sampler(r, dp) for r in range(dp)]
        for t in range(5):
            joined = [slot for r in ranks for mb in r.next_micro_batches() for slot in mb]
            assert joined == ref_batches[t]


def test_exact_resume():
    straight = _sampler()
    batches = [straight.global_batch() for _ in range(12)]
    first = _sampler()
    for _ in range(5):
        first.global_batch()
    resumed = _sampler()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.global_batch() for _ in range(7)] == batches[5:]


def test_negatives_and_positives_are_sampled_within_bounds():
    s = _sampler()
    for _ in range(20):
        for slot in s.global_batch():
            n_pos, n_neg = [(1, 10), (2, 3), (1, 0)][slot.dataset]
            assert len(slot.negatives) == min(7, n_neg)
            assert len(set(slot.negatives)) == len(slot.negatives)
            assert all(0 <= i < n_neg for i in slot.negatives) and 0 <= slot.positive < n_pos


def test_batch_size_errors_name_the_flag():
    with pytest.raises(ValueError, match="--global-batch-size"):
        BlendedSampler([5], [1.0], [lambda i: (1, 1)], 10, 4, dp_size=2)
