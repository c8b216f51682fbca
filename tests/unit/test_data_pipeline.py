"""`build_train_data` end to end: `--train-data` files -> blended sampler -> `EmbeddingBatch`es.

- layout: per micro-batch, query tensors [b, s] and candidate tensors [b * (1 + K), s] with s a
  multiple of 8; `loss_inputs.candidate_mask` True exactly for the record's available negatives
  (up to K); `loss_inputs.in_batch` = dataset flag (a sidecar turns one dataset off) AND the stage flag; the positive in
  column 0 is one of the record's positives;
- exact resume: a pipeline restored from a JSON round trip of `state_dict()` yields tensors equal
  to a straight run's;
- rank invariance under gloo: 2 processes, each with its DP rank, produce exactly the DP=1 run's
  micro-batches for their slice (tensor equality), and an all-reduce of their per-dataset query
  counts equals the DP=1 counts;
- truncated texts are counted and reported in `summary()`.

Run alone: pytest tests/unit/test_data_pipeline.py
"""

import json

import pytest
import torch
import torch.distributed as dist

from megatron_nvembed.core.launch import run_distributed
from megatron_nvembed.data.pipeline import build_train_data
from megatron_nvembed.data.toy_tokenizer import build_toy_tokenizer

WORDS = "cat dog fish bird tree river stone cloud rain wind sun moon star road city".split()


def _rows(prefix, n, n_neg, task):
    rows = []
    for i in range(n):
        w = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 5)]
        rows.append(
            {
                "query": f"{prefix} {' '.join(w)}",
                "pos": [f"{prefix} pos {x}" for x in w[:2]],
                "neg": [f"{prefix} neg {j} {w[0]}" for j in range((i + n_neg) % (n_neg + 1))],
                "task": task,
            }
        )
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ret = _rows("r", 40, 9, "MSMARCO")
    cls = _rows("c", 25, 3, "ImdbClassification")
    for name, rows in (("ret.jsonl", ret), ("cls.jsonl", cls)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "cls.jsonl.meta.json").write_text('{"in_batch_negatives": false}')
    corpus = [json.dumps(r) for r in ret + cls] + ["Instruct: Given Query: Classify"]
    build_toy_tokenizer(corpus, vocab_size=300, save_dir=d / "tok")
    return d, ret, cls


def _tok(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d / "tok"))


def _build(d, dp_rank=0, dp_size=1, **kw):
    args = dict(global_batch_size=8, micro_batch_size=2, num_negatives=4, seed=11)
    args.update(kw)
    spec = ["0.6", str(d / "ret.jsonl"), "0.4", str(d / "cls.jsonl")]
    return build_train_data(spec, _tok(d), dp_rank=dp_rank, dp_size=dp_size, **args)


def _flat(batches):
    out = []
    for b in batches:
        out += [b.query["input_ids"], b.query["pool_mask"], b.candidates["input_ids"]]
        inputs = b.loss_inputs
        out += [b.candidates["attention_mask"], inputs.candidate_mask, inputs.candidate_ids]
        out += [inputs.in_batch]
    return out


def test_layout_flags_and_positives(data_dir):
    d, ret, cls = data_dir
    data = _build(d)
    assert data.in_batch == [True, False]
    for _ in range(3):
        batches = data.next_global_batch()
        assert len(batches) == 4  # 8 queries / micro-batch 2
        for b in batches:
            assert b.query["input_ids"].shape[0] == 2 and b.query["input_ids"].shape[1] % 8 == 0
            assert b.candidates["input_ids"].shape[0] == 2 * 5
            for row, k in enumerate(b.dataset_index.tolist()):
                assert b.loss_inputs.in_batch[row].item() == (k == 0)
            ids = b.candidates["input_ids"].view(2, 5, -1)
            mask = b.candidates["attention_mask"].view(2, 5, -1)
            for row in range(2):
                first = data.tokenizer.decode(
                    ids[row, 0][mask[row, 0].bool()], skip_special_tokens=True
                )
                rows = ret if b.dataset_index[row] == 0 else cls
                assert any(first == p for r in rows for p in r["pos"])
    assert data.sampler.position == 3


def test_candidate_mask_matches_available_negatives(data_dir):
    d, ret, cls = data_dir
    data = _build(d)
    for _ in range(5):
        state = data.sampler.state_dict()
        slots = data.sampler.global_batch()
        data.sampler.load_state_dict(state)  # replay the same global batch through the pipeline
        batches = data.next_global_batch()
        masks = torch.cat([b.loss_inputs.candidate_mask for b in batches])  # [G, 1 + K]
        for slot, m in zip(slots, masks):
            rec = (ret, cls)[slot.dataset][slot.index]
            assert m.tolist() == [True] + [j < min(4, len(rec["neg"])) for j in range(4)]


def test_exact_resume_of_the_pipeline(data_dir):
    d, _, _ = data_dir
    straight = _build(d)
    run = [_flat(straight.next_global_batch()) for _ in range(6)]
    first = _build(d)
    for _ in range(2):
        first.next_global_batch()
    resumed = _build(d)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for t in range(2, 6):
        got = _flat(resumed.next_global_batch())
        assert all(torch.equal(a, b) for a, b in zip(got, run[t])) and len(got) == len(run[t])


def test_truncation_is_counted(data_dir):
    d, _, _ = data_dir
    data = _build(d, max_length=6)
    data.next_global_batch()
    assert data.truncated > 0 and data.texts == 8 + 8 * 5
    assert f"texts truncated at max length on this rank: {data.truncated} of 48" in data.summary()
    full = _build(d)
    full.next_global_batch()
    assert full.truncated == 0 and full.texts == 48


def _rank_invariance(rank, world_size, d, reference, ref_counts):
    data = _build(d, dp_rank=rank, dp_size=world_size)
    counts = torch.zeros(2, dtype=torch.long)
    for ref in reference:
        mine = data.next_global_batch()
        per_rank = len(ref) // world_size
        want = ref[rank * per_rank : (rank + 1) * per_rank]
        got_t, want_t = _flat(mine), _flat(want)
        assert len(got_t) == len(want_t) and all(torch.equal(a, b) for a, b in zip(got_t, want_t))
        for b in mine:
            counts += torch.bincount(b.dataset_index, minlength=2)
    dist.all_reduce(counts)
    assert counts.tolist() == ref_counts


def test_same_batches_on_two_gloo_ranks(data_dir):
    d, _, _ = data_dir
    ref = _build(d)
    reference = [ref.next_global_batch() for _ in range(3)]
    counts = torch.zeros(2, dtype=torch.long)
    for batches in reference:
        for b in batches:
            counts += torch.bincount(b.dataset_index, minlength=2)
    run_distributed(_rank_invariance, 2, d, reference, counts.tolist())
