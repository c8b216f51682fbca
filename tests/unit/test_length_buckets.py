"""`--length-bucket-size`: `trainer.embed_in_buckets` runs length-sorted buckets, each cut to its
own longest row, and returns the embeddings in the batch's order (exactly: a row's embedding does
not depend on the padding after it)."""

import pytest
import torch

from megatron_nvembed.training.trainer import embed_in_buckets


def _model(input_ids, attention_mask, pool_mask):
    # A padding-invariant "embedding": masked sum of the ids, the length, and the pooled count.
    m = attention_mask.float()
    return torch.stack(
        [(input_ids.float() * m).sum(1), m.sum(1), (pool_mask.float() * m).sum(1)], dim=1
    )


def _batch(lengths, width):
    g = torch.Generator().manual_seed(0)
    n = len(lengths)
    ids = torch.randint(1, 100, (n, width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    pool = mask.clone()
    pool[:, :2] = 0  # an instruction
    return {"input_ids": ids * mask, "attention_mask": mask, "pool_mask": pool}


@pytest.mark.parametrize("bucket_size", [1, 3, 4])
def test_buckets_give_the_same_embeddings_in_order_and_compute_less(bucket_size):
    lengths = [30, 5, 17, 64, 9, 41, 12, 3]
    part = _batch(lengths, width=64)
    want, positions = embed_in_buckets(_model, part, 0)
    assert positions == 8 * 64
    got, bucketed = embed_in_buckets(_model, part, bucket_size)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Sorted lengths 3 5 9 12 17 30 41 64; each bucket padded to its longest, rounded up to 8.
    rounded = lambda n: -(-n // 8) * 8  # noqa: E731
    ordered = sorted(lengths)
    buckets = [ordered[i : i + bucket_size] for i in range(0, 8, bucket_size)]
    assert bucketed == sum(len(b) * min(rounded(max(b)), 64) for b in buckets)
    assert bucketed < positions


def test_one_bucket_is_one_call():
    part = _batch([4, 7], width=16)
    calls = []

    def model(**kw):
        calls.append(kw["input_ids"].shape)
        return _model(**kw)

    embed_in_buckets(model, part, 4)
    assert calls == [(2, 16)]
