"""`--length-bucket-size`: `step.bucket_calls` plans length-sorted buckets, each cut to its own
longest row (rounded up to 8), and `step.plan_micro_batch` + `StepRunner.forward`'s restore put
the embeddings back in the batch's order, exactly (a row's embedding does not depend on the
padding after it). Run alone: pytest tests/unit/test_length_buckets.py
"""

import pytest
import torch

from megatron_nvembed.core.loss_inputs import LossInputs
from megatron_nvembed.data.collate import EmbeddingBatch
from megatron_nvembed.training.step import bucket_calls, plan_micro_batch


def _model(input_ids, attention_mask, pool_mask):
    # A padding-invariant "embedding": masked sum of the ids, the length, and the pooled count.
    m = attention_mask.float()
    return torch.stack(
        [(input_ids.float() * m).sum(1), m.sum(1), (pool_mask.float() * m).sum(1)], dim=1
    )


def _batch(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    ids = torch.randint(1, 100, (n, width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    pool = mask.clone()
    pool[:, :2] = 0  # an instruction
    return {"input_ids": ids * mask, "attention_mask": mask, "pool_mask": pool}


def _embed(calls, order):
    out = torch.cat([_model(**call) for call in calls])
    return out if order is None else out[torch.argsort(torch.tensor(order))]


@pytest.mark.parametrize("bucket_size", [1, 3, 4])
def test_buckets_give_the_same_embeddings_in_order_and_compute_less(bucket_size):
    lengths = [30, 5, 17, 64, 9, 41, 12, 3]
    part = _batch(lengths, width=64)
    calls, order = bucket_calls(part, 0)
    want = _embed(calls, order)
    assert sum(c["input_ids"].numel() for c in calls) == 8 * 64
    calls, order = bucket_calls(part, bucket_size)
    torch.testing.assert_close(_embed(calls, order), want, rtol=0, atol=0)
    # Sorted lengths 3 5 9 12 17 30 41 64; each bucket padded to its longest, rounded up to 8.
    rounded = lambda n: -(-n // 8) * 8  # noqa: E731
    ordered = sorted(lengths)
    buckets = [ordered[i : i + bucket_size] for i in range(0, 8, bucket_size)]
    bucketed = sum(c["input_ids"].numel() for c in calls)
    assert bucketed == sum(len(b) * min(rounded(max(b)), 64) for b in buckets)
    assert bucketed < 8 * 64


def test_one_bucket_is_one_call():
    calls, order = bucket_calls(_batch([4, 7], width=16), 4)
    assert [c["input_ids"].shape for c in calls] == [(2, 16)] and order is None


def _micro_batch():
    b, n = 3, 2
    return EmbeddingBatch(
        query=_batch([5, 9, 2], width=9, seed=1),
        candidates=_batch([12, 3, 7, 16, 1, 8], width=16, seed=2),
        loss_inputs=LossInputs(
            candidate_mask=torch.ones(b, n, dtype=torch.bool),
            in_batch=torch.ones(b, dtype=torch.bool),
            candidate_ids=torch.arange(b * n).view(b, n),
        ),
        dataset_index=torch.zeros(b, dtype=torch.long),
        truncated=0,
    )


@pytest.mark.parametrize("bucket_size", [0, 2])
def test_planned_micro_batch_restores_queries_then_candidates(bucket_size):
    mb = _micro_batch()
    planned = plan_micro_batch(
        mb, pack_length=0, bucket_size=bucket_size, pipeline=False, thd=False
    )
    out = torch.cat([_model(**call) for call in planned.calls])
    if planned.restore is not None:
        out = out[planned.restore]
    want = torch.cat([_model(**mb.query), _model(**mb.candidates)])
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert planned.positions == sum(c["input_ids"].numel() for c in planned.calls)
    assert sorted(planned.lengths) == sorted([5, 9, 2, 12, 3, 7, 16, 1, 8])


def test_pipeline_and_packed_layouts_are_one_call():
    mb = _micro_batch()
    stacked = plan_micro_batch(mb, pack_length=0, bucket_size=0, pipeline=True, thd=False)
    assert len(stacked.calls) == 1 and stacked.calls[0]["input_ids"].shape == (9, 16)
    packed = plan_micro_batch(mb, pack_length=16, bucket_size=0, pipeline=True, thd=True)
    assert len(packed.calls) == 1 and "segment_ids" in packed.calls[0]
    assert packed.positions == 5 + 9 + 2 + 12 + 3 + 7 + 16 + 1 + 8  # THD: real tokens only
