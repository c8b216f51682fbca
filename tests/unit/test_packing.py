"""Sequence packing of tokenized batches (`megatron_nvembed.data.packing`): round trip, order
restoration, row lengths, padding fractions, errors. Pure tensor code, no model.

Run alone: pytest tests/unit/test_packing.py
"""

import random

import pytest
import torch

from megatron_nvembed.data.packing import first_fit_decreasing, pack_batch, unpack_batch
from megatron_nvembed.testing import random_padded_batch


def _mixed(seed=0, n=40, lo=3, hi=30, width=None):
    rng = random.Random(seed)
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    instr = [rng.randint(0, 2) for _ in range(n)]
    return random_padded_batch(lengths, instr, seed=seed, pad_to=width), lengths


def test_round_trip_and_order_restoration():
    batch, lengths = _mixed()
    packed = pack_batch(batch, 64)
    back = unpack_batch(packed)
    width = max(lengths)
    for key in ("attention_mask", "pool_mask"):
        assert torch.equal(back[key], batch[key][:, :width])
    real = batch["attention_mask"][:, :width].bool()
    assert torch.equal(back["input_ids"][real], batch["input_ids"][:, :width][real])
    # `order` / `restore`: packed text j is original text order[j]; [restore] undoes it.
    assert torch.equal(packed.order[packed.restore], torch.arange(len(lengths)))
    seg = packed.segment_ids
    j = 0
    for r in range(seg.shape[0]):
        for k in range(1, int(seg[r].max()) + 1):
            i = int(packed.order[j])
            got = packed.input_ids[r][seg[r] == k]
            assert torch.equal(got, batch["input_ids"][i, : lengths[i]])
            j += 1
    assert j == len(lengths)
    assert torch.equal(packed.lengths, torch.tensor(lengths))


def test_rows_never_exceed_pack_length_and_segments_are_contiguous():
    batch, _ = _mixed(seed=1, n=60, lo=1, hi=50)
    for cap in (50, 64, 100):
        packed = pack_batch(batch, cap, pad_to_multiple_of=None)
        seg = packed.segment_ids
        assert seg.shape[1] <= cap
        assert torch.equal(packed.attention_mask.bool(), seg > 0)
        for row in seg:
            real = row[row > 0]
            assert int((row > 0).sum()) <= cap
            # texts 1..k in order, each contiguous, padding only at the end
            assert torch.equal(real, torch.sort(real).values)
            assert set(real.tolist()) == set(range(1, int(row.max()) + 1))
            assert int((row > 0).sum()) == len(real) and bool((row[len(real) :] == 0).all())
    # the packed width is rounded up to the multiple, capped at pack_length
    assert pack_batch(batch, 64).segment_ids.shape[1] % 8 == 0
    assert pack_batch(batch, 61).segment_ids.shape[1] <= 61


def test_padding_fraction_reported():
    batch, lengths = _mixed(seed=2, width=32)
    packed = pack_batch(batch, 128, pad_to_multiple_of=None)
    total = sum(lengths)
    assert packed.padding_fraction_before == pytest.approx(1 - total / (len(lengths) * 32))
    rows, width = packed.segment_ids.shape
    assert packed.padding_fraction_after == pytest.approx(1 - total / (rows * width))
    assert packed.padding_fraction_after < packed.padding_fraction_before


def test_paper_length_mix_padding_saved():
    """Queries of 20-60 tokens and passages of 80-400 (the paper's 512 cap): a micro-batch of 8
    queries x (1 + 7) candidates, each kind padded to its own longest text, wastes about half of
    its tokens; packed into 512-token rows, under 10 %."""
    rng = random.Random(0)
    q = [rng.randint(20, 60) for _ in range(8)]
    c = [rng.randint(80, 400) for _ in range(64)]
    qb, cb = random_padded_batch(q, pad_to=512), random_padded_batch(c, pad_to=512)
    padded_tokens = len(q) * max(q) + len(c) * max(c)
    before = 1 - (sum(q) + sum(c)) / padded_tokens
    both = {k: torch.cat([qb[k], cb[k]]) for k in qb}
    packed = pack_batch(both, 512, pad_to_multiple_of=None)
    assert before > 0.3
    assert packed.padding_fraction_after < 0.1


def test_first_fit_decreasing():
    bins = first_fit_decreasing([5, 3, 8, 2, 2], 10)
    assert bins == [[2, 3], [0, 1, 4]]
    assert first_fit_decreasing([10, 10], 10) == [[0], [1]]


def test_errors_name_the_problem():
    batch = random_padded_batch([4, 9, 3])
    with pytest.raises(ValueError, match="text 1 has 9 tokens.*pack_length=8"):
        pack_batch(batch, 8)
    left = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch(left, 16)
    empty = {k: v.clone() for k, v in batch.items()}
    empty["attention_mask"][2] = 0
    empty["pool_mask"][2] = 0
    with pytest.raises(ValueError, match="text 2 is empty"):
        pack_batch(empty, 16)
