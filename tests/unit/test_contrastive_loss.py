"""The contrastive loss on one process: hand-computed values, masking rules, GradCache equivalence.

- in-batch off: loss = hand-computed mean over queries of -log softmax over own candidates only;
- mixed datasets in one batch: each query honours its own in-batch switch (hand-computed);
- identical-positive masking, the false-negative margin and ragged negatives exclude exactly the
  candidates they name: the loss equals a plain-Python loop implementation of the documented
  visibility rule (float64, |diff| <= 1e-12) and the per-query candidate counts match;
- everything masked but the positive: loss 0, finite gradients; bf16 inputs are scored in float32;
- GradCache over 4 micro-batches with dropout equals the direct computation that keeps every
  activation: loss and every parameter gradient within 1e-10 (float64; observed ~1e-16), the
  forward replays exactly, the generator ends where the direct path leaves it, and `no_sync` is
  entered for every micro-batch but the last; randomness outside the captured generators is
  detected by the replay check;
- config validation names the field; missing inputs raise ValueError;
- `LossInputs`, the per-batch inputs: micro-batches' inputs concatenate (`cat`) to the whole
  batch's, field by field, exactly; `to` moves every field; a field given for some parts only,
  and a field of the wrong shape, are refused naming it.

Run alone: pytest tests/unit/test_contrastive_loss.py
"""

import contextlib
import math
from dataclasses import replace
from functools import partial

import pytest
import torch

from megatron_nvembed.loss import (
    ContrastiveLoss,
    ContrastiveLossConfig,
    ContrastiveStats,
    LossInputs,
    contrastive_loss,
    grad_cache_step,
    run_in_order,
    sequence_hash,
    surrogate_loss,
)
from megatron_nvembed.loss._toy import ToyEncoder, encode, loss_inputs, slice_batch, toy_batch

T = 0.05


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1
    )


def _nll(pos, others, t=T):
    """-log softmax of the positive among [pos] + others (plain python)."""
    z = [pos / t] + [o / t for o in others]
    top = max(z)
    return -(z[0] - top - math.log(sum(math.exp(v - top) for v in z)))


def _loop_reference(q, c, mask, in_batch, ids, margin=None, identical=True, t=T):
    """The documented visibility rule, one candidate at a time, in Python floats."""
    b, n, _ = c.shape
    losses, counts = [], []
    for i in range(b):
        pos = float(q[i] @ c[i, 0])
        negs = []
        for k in range(b):
            for j in range(n):
                if (k, j) == (i, 0) or not mask[k, j]:
                    continue
                if k != i and not (in_batch[i] and in_batch[k]):
                    continue
                if identical and ids[k, j] == ids[i, 0]:  # own or in-batch
                    continue
                s = float(q[i] @ c[k, j])
                if margin is not None and s > margin * pos:
                    continue
                negs.append(s)
        losses.append(_nll(pos, negs, t))
        counts.append(1 + len(negs))
    return sum(losses) / b, counts


def test_in_batch_off_equals_hand_computed_softmax():
    q, c = _unit(3, 4), _unit(3, 3, 4, seed=1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    settings = ContrastiveLossConfig(temperature=T, in_batch_negatives=False)
    loss, stats = contrastive_loss(q, c, LossInputs(mask), settings)
    want = []
    for i in range(3):
        s = [float(q[i] @ c[i, j]) for j in range(3) if mask[i, j]]
        want.append(_nll(s[0], s[1:]))
    assert abs(loss.item() - sum(want) / 3) <= 1e-12
    assert (stats.candidates_per_query_min, stats.candidates_per_query_max) == (1, 3)
    assert stats.pool_queries == 0 and "in-batch negatives off" in stats.summary(3)


def test_mixed_datasets_honour_their_own_switch():
    q, c = _unit(3, 4), _unit(3, 2, 4, seed=2)
    mask = torch.ones(3, 2, dtype=torch.bool)
    in_batch = torch.tensor([True, False, True])
    settings = ContrastiveLossConfig(temperature=T, mask_identical_positives=False)
    loss, stats = contrastive_loss(q, c, LossInputs(mask, in_batch=in_batch), settings)
    want = []
    for i in range(3):
        own = [float(q[i] @ c[i, j]) for j in range(2)]
        others = []
        if in_batch[i]:
            others = [
                float(q[i] @ c[k, j]) for k in range(3) if k != i and in_batch[k] for j in range(2)
            ]
        want.append(_nll(own[0], own[1:] + others))
    assert abs(loss.item() - sum(want) / 3) <= 1e-12
    # queries 0 and 2: 2 own + 2 of the other in-batch query; query 1: its own 2 only
    assert (stats.candidates_per_query_min, stats.candidates_per_query_max) == (2, 4)


def test_identical_positive_is_masked_in_batch():
    q, c = _unit(2, 4), _unit(2, 2, 4, seed=3)
    mask = torch.ones(2, 2, dtype=torch.bool)
    ids = torch.tensor([[7, 8], [7, 9]])  # both positives are the same text
    inputs = LossInputs(mask, candidate_ids=ids)
    loss, with_rule = contrastive_loss(q, c, inputs, ContrastiveLossConfig(temperature=T))
    loose = ContrastiveLossConfig(temperature=T, mask_identical_positives=False)
    _, without = contrastive_loss(q, c, inputs, loose)
    assert without.candidates_per_query_min == 4
    assert with_rule.candidates_per_query_max == 3  # the other query's positive is dropped
    want = [
        _nll(float(q[0] @ c[0, 0]), [float(q[0] @ c[0, 1]), float(q[0] @ c[1, 1])]),
        _nll(float(q[1] @ c[1, 0]), [float(q[1] @ c[1, 1]), float(q[1] @ c[0, 1])]),
    ]
    assert abs(loss.item() - sum(want) / 2) <= 1e-12


def test_false_negative_margin_drops_high_scoring_negatives():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[[0.8, 0.6], [0.9, 0.436], [0.1, 0.995]]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    settings = ContrastiveLossConfig(
        temperature=T, in_batch_negatives=False, false_negative_margin=0.95
    )
    loss, stats = contrastive_loss(q, c, LossInputs(mask), settings)
    # 0.9 > 0.95 * 0.8 = 0.76 is dropped; 0.1 is kept
    assert stats.candidates_per_query_max == 2
    assert abs(loss.item() - _nll(0.8, [0.1])) <= 1e-12


@pytest.mark.parametrize("margin", [None, 0.3])
def test_all_rules_together_equal_loop_reference(margin):
    batch = toy_batch(8, 3, seed=5)
    torch.manual_seed(1)  # weights under which the shared positive scores > 0 for both queries
    q, c = encode(ToyEncoder(), batch)
    inputs = LossInputs(
        batch["candidate_mask"], in_batch=batch["in_batch"], candidate_ids=batch["candidate_ids"]
    )
    settings = ContrastiveLossConfig(temperature=T, false_negative_margin=margin)
    loss, stats = contrastive_loss(q, c, inputs, settings)
    args = (q.detach(), c.detach(), batch["candidate_mask"], batch["in_batch"])
    want, counts = _loop_reference(*args, batch["candidate_ids"], margin=margin)
    assert abs(loss.item() - want) <= 1e-12
    assert stats.candidates_per_query_min == min(counts)
    assert stats.candidates_per_query_max == max(counts)
    assert abs(stats.candidates_per_query_mean - sum(counts) / len(counts)) <= 1e-9
    # the identical-positive rule removed query 1's and query 7's shared positive from each
    # other's candidates (with the margin on, the margin already drops that copy)
    _, no_rule = _loop_reference(*args, batch["candidate_ids"], margin=margin, identical=False)
    extra = [a - b for a, b in zip(no_rule, counts)]
    assert extra == ([0, 1, 0, 0, 0, 0, 0, 1] if margin is None else [0] * 8)
    if margin is not None:  # the margin itself excluded candidates
        _, unfiltered = _loop_reference(*args, batch["candidate_ids"])
        assert sum(counts) < sum(unfiltered)


def test_gradients_are_finite_when_everything_is_masked():
    q, c = _unit(2, 4), _unit(2, 3, 4, seed=4)
    q.requires_grad_(True)
    mask = torch.tensor([[1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    in_batch = torch.tensor([False, False])
    inputs = LossInputs(mask, in_batch=in_batch, candidate_ids=torch.zeros(2, 3))
    loss, stats = contrastive_loss(q, c, inputs)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(q.grad).all()
    assert stats.candidates_per_query_max == 1


def test_low_precision_embeddings_are_scored_in_float32():
    q, c = _unit(4, 16), _unit(4, 3, 16, seed=6)
    qb, cb = q.bfloat16().requires_grad_(True), c.bfloat16()
    mask = torch.ones(4, 3, dtype=torch.bool)
    settings = ContrastiveLossConfig(temperature=0.02, mask_identical_positives=False)
    loss, _ = contrastive_loss(qb, cb, LossInputs(mask), settings)
    assert loss.dtype == torch.float32
    # float64 on the same bf16-rounded values; float32 accumulation over d=16 -> ~1e-6 relative
    ref, _ = contrastive_loss(qb.double(), cb.double(), LossInputs(mask), settings)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    loss.backward()
    assert qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all()


def _rows(q, c):  # [b, d], [b, n, d] -> [b + b * n, d], the layout grad_cache_step splits
    return torch.cat([q, c.flatten(0, 1)])


def _direct_or_cached(cached, micro, loss_fn, no_sync=None):
    torch.manual_seed(0)
    model = ToyEncoder(dropout=0.3)
    torch.manual_seed(123)
    result = None
    if cached:
        result = grad_cache_step(
            lambda i, mb: _rows(*encode(model, mb)),
            micro,
            loss_fn,
            loss_inputs,
            drive=partial(run_in_order, no_sync=no_sync),
        )
        loss = result.loss
    else:
        parts = [encode(model, mb) for mb in micro]  # keeps every activation
        all_q, all_c = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        loss = loss_fn(all_q, all_c, LossInputs.cat([loss_inputs(mb) for mb in micro]))
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.item(), grads, torch.rand(1), result


def test_grad_cache_equals_direct_computation():
    batch = toy_batch(8, 4, seed=0)
    loss_mod = ContrastiveLoss(ContrastiveLossConfig(temperature=T))
    micro = [slice_batch(batch, i, i + 2) for i in range(0, 8, 2)]
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(len(entered))
        yield

    direct_loss, direct_grads, direct_next, _ = _direct_or_cached(False, micro, loss_mod)
    cached_loss, cached_grads, cached_next, result = _direct_or_cached(
        True, micro, loss_mod, no_sync
    )
    assert abs(direct_loss - cached_loss) <= 1e-10
    for name in direct_grads:
        diff = (direct_grads[name] - cached_grads[name]).abs().max().item()
        assert diff <= 1e-10, f"{name}: {diff}"
    assert all(g.abs().sum() > 0 for g in cached_grads.values())
    assert torch.equal(direct_next, cached_next)  # generator left where the direct path leaves it
    assert result.replay_max_diff == 0.0 and result.micro_batches == 4
    assert entered == [0, 1, 2]  # gradients synchronise only with the last micro-batch
    # the pool spans all 8 queries of the 4 micro-batches
    assert loss_mod.pop_stats().pool_queries == 8


def test_grad_cache_detects_randomness_it_cannot_replay():
    batch = toy_batch(4, 2, seed=0)
    model = ToyEncoder()
    side = torch.Generator().manual_seed(0)  # not a generator GradCache captures

    def encode_noisy(i, mb):
        q, c = encode(model, mb)
        return _rows(q + 1e-3 * torch.rand(q.shape, generator=side, dtype=q.dtype), c)

    def loss_fn(q, c, inputs):
        loose = ContrastiveLossConfig(mask_identical_positives=False)
        return contrastive_loss(q, c, LossInputs(inputs.candidate_mask), loose)[0]

    micro = [slice_batch(batch, 0, 2), slice_batch(batch, 2, 4)]
    assert grad_cache_step(encode_noisy, micro, loss_fn, loss_inputs).replay_max_diff > 1e-5


def test_surrogate_loss_delivers_the_given_gradients():
    out = [_unit(3, 4).requires_grad_(True), _unit(2, 5, 4, seed=1).requires_grad_(True)]
    grads = [_unit(3, 4, seed=2), _unit(2, 5, 4, seed=3)]
    surrogate_loss(out, grads, scale=4.0).backward()
    for o, g in zip(out, grads):
        assert torch.equal(o.grad, 4.0 * g)
    with pytest.raises(ValueError, match="differ"):
        surrogate_loss([out[0]], [grads[1]])


def test_stats_merge_and_span_message():
    q, c = _unit(4, 8), _unit(4, 2, 8, seed=1)
    mask = torch.ones(4, 2, dtype=torch.bool)
    loss_mod = ContrastiveLoss(
        ContrastiveLossConfig(mask_identical_positives=False), global_batch_size=8
    )
    loss_mod(q[:2], c[:2], LossInputs(mask[:2]))  # one micro-batch of 2 ...
    loss_mod(q[2:], c[2:], LossInputs(mask[2:]))  # ... and the next
    merged = loss_mod.pop_stats()
    assert merged.calls == 2 and merged.local_queries == 4 and merged.pool_queries == 2
    assert merged.candidates_per_query_mean == 4.0  # 2 own + 2 of the other query
    assert "not the whole global batch of 8 (GradCache off)" in merged.summary(8)
    assert loss_mod.pop_stats() is None
    whole = ContrastiveStats.merge([loss_mod(q, c, LossInputs(mask)) and loss_mod.last_stats])
    assert "= the whole global batch of 4" in whole.summary(4)


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLossConfig(temperature=0).validate()
    with pytest.raises(ValueError, match="--false-negative-margin must be <= 1"):
        ContrastiveLossConfig(false_negative_margin=1.5).validate()
    with pytest.raises(ValueError, match="--false-negative-margin must be > 0"):
        ContrastiveLossConfig(false_negative_margin=0.0).validate()
    with pytest.raises(ValueError, match="--in-batch-negatives must be true or false"):
        ContrastiveLossConfig(in_batch_negatives="yes").validate()
    cfg = ContrastiveLossConfig()
    assert cfg.validate() is cfg and cfg.temperature == 0.02


def test_bad_inputs_raise_value_errors():
    q, c = _unit(2, 4), _unit(2, 3, 4, seed=1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    stage2 = ContrastiveLossConfig(in_batch_negatives=False)
    with pytest.raises(ValueError, match="candidate_ids"):  # rule on, ids missing: never silent
        ContrastiveLoss(ContrastiveLossConfig())(q, c, LossInputs(mask))
    with pytest.raises(ValueError, match="candidate_mask"):
        contrastive_loss(q, c, LossInputs(mask[:, :2]), stage2)
    with pytest.raises(ValueError, match=r"in_batch must be \[b\]"):
        contrastive_loss(q, c, LossInputs(mask, in_batch=torch.ones(3, dtype=torch.bool)), stage2)
    # checked on the device (no host read in the step): on the CPU it raises at once
    with pytest.raises(RuntimeError, match="positive"):
        contrastive_loss(q, c, LossInputs(torch.zeros(2, 3, dtype=torch.bool)), stage2)
    with pytest.raises(ValueError, match="query"):
        contrastive_loss(q[:1], c, LossInputs(mask), stage2)
    # stage 2 (in-batch off) needs no ids
    ContrastiveLoss(stage2)(q, c, LossInputs(mask))


def test_loss_inputs_concatenate_and_move_whole():
    batch = toy_batch(8, 3, seed=0, document_ids=True)
    whole = loss_inputs(batch)
    parts = [loss_inputs(slice_batch(batch, i, min(i + 3, 8))) for i in (0, 3, 6)]  # 3 + 3 + 2
    joined = LossInputs.cat(parts)
    assert joined.shape == whole.shape == (8, 3)
    for name, value in whole.tensors().items():  # exactly equal (NaN where the teacher has none)
        torch.testing.assert_close(getattr(joined, name), value, rtol=0, atol=0, equal_nan=True)
    moved = whole.to("meta")
    assert {v.device.type for v in moved.tensors().values()} == {"meta"}
    with pytest.raises(ValueError, match="teacher_scores is given for some parts only"):
        LossInputs.cat([parts[0], replace(parts[1], teacher_scores=None)])
    with pytest.raises(ValueError, match="at least one"):
        LossInputs.cat([])
    whole.check(8, 3)
    with pytest.raises(ValueError, match=r"query_ids must be \[b\] = \(8,\), got \(2,\)"):
        replace(whole, query_ids=whole.query_ids[:2]).check(8, 3)


def test_sequence_hash_is_deterministic_and_ignores_padding():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 9], [5, 6, 8, 0], [6, 5, 7, 0], [9, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1]])
    h = sequence_hash(ids, mask)
    assert h.dtype == torch.int64
    assert h[0] == h[1] == h[4]  # padding ignored, left or right
    assert len({h[0].item(), h[2].item(), h[3].item()}) == 3  # token and order changes differ
    assert torch.equal(h, sequence_hash(ids.clone(), mask.clone()))
    with pytest.raises(ValueError):
        sequence_hash(ids, mask[:, :2])
