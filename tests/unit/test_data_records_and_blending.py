"""Records, task templates and blended batches.

- records: JSONL and Parquet read back; a malformed line and a record without a positive are
  errors naming file:line; `skip_bad_records` skips and counts them; writes are atomic;
- record validation: a missing key ("file:line: missing key 'query'", Parquet "file: row N: ...")
  is told apart from a wrong type ("key 'query' must be a string, got int", list items by index);
  a record needs "task" or "instruction" when its query needs an instruction, and neither when
  it does not (`needs_instruction=False`: task None, written back without "task");
- templates: Table 6/7 definitions, the "Instruct: ...\\nQuery: " template, close-name hints;
- blending: proportions within 4 standard errors of the weights over 300 batches (both
  compositions); with "systematic", every batch gives dataset k floor or ceil of w_k * G slots;
  a zero weight is never drawn; identical global batches at DP sizes 1, 2 and 4 (rank slices
  concatenate to the DP=1 batch); each pass over a dataset reads every record once, reshuffled
  per pass; exact resume from a state_dict, also at another DP size; a state from other settings
  is refused naming the setting; hard negatives drawn without replacement, fewer when fewer exist;
  "homogeneous" (batching by task): one dataset per global batch, drawn by weight (within 4
  standard errors over 600 batches), the same at DP sizes 1 and 2, resumable.

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


def test_missing_key_is_told_apart_from_wrong_type(tmp_path):
    path = tmp_path / "r.jsonl"
    no_query = {k: v for k, v in GOOD.items() if k != "query"}
    cases = [
        (no_query, r"r.jsonl:2: missing key 'query'$"),
        (dict(GOOD, query=3), r"r.jsonl:2: key 'query' must be a string, got int$"),
        (dict(GOOD, query=None), r"r.jsonl:2: key 'query' must be a string, got null$"),
        (dict(GOOD, task=["MSMARCO"]), r"r.jsonl:2: key 'task' must be a string, got list$"),
        (dict(GOOD, instruction=1.5), r"key 'instruction' must be a string, got float$"),
        (dict(GOOD, pos="p"), r"r.jsonl:2: key 'pos' must be a list of strings, got str$"),
        (dict(GOOD, neg=["a", 2]), r"key 'neg' must be a list of strings, item 1 is int$"),
        (
            {k: v for k, v in GOOD.items() if k != "pos"},
            r"r.jsonl:2: record has no positive \(missing key 'pos'\)$",
        ),
        (dict(GOOD, pos=[]), r"r.jsonl:2: record has no positive \('pos' is empty\)$"),
        (
            {k: v for k, v in GOOD.items() if k != "task"},
            r"r.jsonl:2: missing key 'task'; .*add \"task\" .* or \"instruction\"",
        ),
    ]
    for row, msg in cases:
        path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=msg):
            list(iter_records(path))
    # no task but an instruction: the query still gets one, so the record is complete
    own = dict(GOOD, instruction="Given a question, retrieve answers")
    del own["task"]
    path.write_text(json.dumps(own) + "\n")
    (rec,) = iter_records(path)
    assert rec.task is None and rec.to_json() == own
    # neither, where no instruction is needed (e.g. mining with one instruction for all)
    bare = {k: v for k, v in GOOD.items() if k != "task"}
    path.write_text(json.dumps(bare) + "\n")
    (rec,) = iter_records(path, needs_instruction=False)
    assert rec.task is None and rec.to_json() == bare

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([no_query, no_query]), tmp_path / "nq.parquet")
    with pytest.raises(ValueError, match=r"nq.parquet: row 1: missing key 'query'$"):
        list(iter_records(tmp_path / "nq.parquet"))
    pq.write_table(pa.Table.from_pylist([GOOD, dict(GOOD, query=None)]), tmp_path / "n.parquet")
    with pytest.raises(
        ValueError, match=r"n.parquet: row 2: key 'query' must be a string, got null$"
    ):
        list(iter_records(tmp_path / "n.parquet"))
    pq.write_table(pa.Table.from_pylist([dict(GOOD, pos=[1])]), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet: row 1: key 'pos' must be a list of strings"):
        list(iter_records(tmp_path / "t.parquet"))


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
    # the tables' own spellings and MTEB names reach the same rows
    nq = "Given a question, retrieve Wikipedia passages that answer the question"
    for name in ("Natural Question", "NQ", "NaturalQuestions"):
        assert get_task_definition(name) == nq and get_task_definition(name, "eval") == nq
    assert get_task_definition("SQUAD") == get_task_definition("SQuAD")
    assert get_task_definition("SICK-R", "eval") == "Retrieve semantically similar text."
    with pytest.raises(ValueError, match="split"):
        get_task_definition("SQuAD", "test")


def test_task_tables_transcribed_in_full():
    # Table 6 lists 30 task rows once "PAQ, MSMARCO" and "STS12, STS22, STSBenchmark" are split
    # and NLI has its two instructions (26 printed rows); Table 7 has 46 rows (STS* once).
    from megatron_nvembed.data.templates import task_names

    assert len(task_names("train")) == 30 and len(task_names("eval")) == 46
    assert get_task_definition("TwitterURLCorpus", "eval") == (
        "Retrieve tweets that are semantically similar to the given tweet"
    )
    assert get_task_definition("EmotionClassification").endswith("sadness, and surprise")


def _sampler(
    dp_rank=0, dp_size=1, G=24, weights=(0.5, 0.3, 0.2), seed=3, composition="systematic", mbs=2
):
    sizes = [50, 30, 7]
    negs = [lambda i: (1, 10), lambda i: (2, 3), lambda i: (1, 0)]
    return BlendedSampler(
        sizes,
        list(weights),
        negs,
        G,
        mbs,
        num_negatives=7,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        composition=composition,
    )


@pytest.mark.parametrize("composition", ["systematic", "multinomial"])
def test_blending_proportions_within_sampling_error(composition):
    # multinomial: count_k ~ Binomial(n G, w_k), so 4 standard errors bound a false failure at
    # ~6e-5; systematic sampling has less variance than that, so the same bound holds.
    s, counts, n = _sampler(composition=composition), [0, 0, 0], 300
    for _ in range(n):
        per_batch = [0, 0, 0]
        for slot in s.global_batch():
            counts[slot.dataset] += 1
            per_batch[slot.dataset] += 1
        if composition == "systematic":  # every single batch is within one slot of its quota
            for k, w in enumerate((0.5, 0.3, 0.2)):
                assert math.floor(w * 24) <= per_batch[k] <= math.ceil(w * 24), per_batch
    total = n * 24
    for k, w in enumerate((0.5, 0.3, 0.2)):
        se = math.sqrt(w * (1 - w) / total)
        assert abs(counts[k] / total - w) <= 4 * se, (k, counts)


def test_zero_weight_is_never_drawn_and_seeds_differ():
    for composition in ("systematic", "multinomial"):
        s = _sampler(weights=(0.6, 0.0, 0.4), composition=composition)
        assert all(slot.dataset != 1 for _ in range(50) for slot in s.global_batch())
    assert _sampler(seed=1).global_batch() != _sampler(seed=2).global_batch()


def test_each_pass_reads_every_record_once_reshuffled():
    s = _sampler(weights=(0.0, 0.0, 1.0), G=7, mbs=7)  # dataset 2 has 7 records: one pass per batch
    passes = [[slot.index for slot in s.global_batch()] for _ in range(4)]
    for p in passes:
        assert sorted(p) == list(range(7))
    assert len({tuple(p) for p in passes}) > 1  # reshuffled per pass (4 equal orders: 1/5040^3)


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
    assert resumed.position == 5
    assert [resumed.global_batch() for _ in range(7)] == batches[5:]
    # a checkpoint of a DP=1 run resumes on 2 ranks with another micro-batch size
    ranks = [_sampler(r, 2, mbs=3) for r in range(2)]
    for r in ranks:
        r.load_state_dict(first.state_dict())
    for t in range(5, 12):
        joined = [slot for r in ranks for mb in r.next_micro_batches() for slot in mb]
        assert joined == batches[t]


def test_resume_refuses_other_settings():
    state = _sampler().state_dict()
    for kwargs, flag in [
        (dict(G=48), "--global-batch-size"),
        (dict(seed=4), "data seed"),
        (dict(weights=(0.4, 0.4, 0.2)), "--train-data weights"),
        (dict(composition="multinomial"), "--batch-composition"),
        (dict(composition="homogeneous"), "--batch-composition"),
    ]:
        with pytest.raises(ValueError, match=flag):
            _sampler(**kwargs).load_state_dict(state)


def test_homogeneous_batches_come_from_one_dataset_by_weight():
    """Batching by task: every global batch (so every rank's slice) from one dataset; the share
    of batches per dataset within 4 standard errors of its weight over 600 batches; identical
    at DP sizes 1 and 2; resumable; a zero weight is never drawn."""
    s, n = _sampler(composition="homogeneous", G=4, mbs=1), 600
    counts = [0, 0, 0]
    for _ in range(n):
        datasets = {slot.dataset for slot in s.global_batch()}
        assert len(datasets) == 1
        counts[datasets.pop()] += 1
    for k, w in enumerate((0.5, 0.3, 0.2)):
        assert abs(counts[k] / n - w) <= 4 * math.sqrt(w * (1 - w) / n), counts
    ref = _sampler(composition="homogeneous")
    batches = [ref.global_batch() for _ in range(6)]
    ranks = [_sampler(r, 2, composition="homogeneous") for r in range(2)]
    for t in range(3):
        joined = [slot for r in ranks for mb in r.next_micro_batches() for slot in mb]
        assert joined == batches[t]
    resumed = _sampler(composition="homogeneous")
    resumed.load_state_dict(ranks[0].state_dict())
    assert [resumed.global_batch() for _ in range(3)] == batches[3:]
    zero = _sampler(weights=(0.6, 0.0, 0.4), composition="homogeneous")
    assert all(slot.dataset != 1 for _ in range(50) for slot in zero.global_batch())


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
    with pytest.raises(ValueError, match="--train-data: need one weight per dataset"):
        BlendedSampler([5, 5], [1.0], [lambda i: (1, 1)] * 2, 8, 4)
    with pytest.raises(ValueError, match="--train-data: weights"):
        BlendedSampler([5], [0.0], [lambda i: (1, 1)], 8, 4)
    with pytest.raises(ValueError, match="data-parallel rank 2"):
        BlendedSampler([5], [1.0], [lambda i: (1, 1)], 8, 4, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="composition"):
        BlendedSampler([5], [1.0], [lambda i: (1, 1)], 8, 4, composition="quota")
