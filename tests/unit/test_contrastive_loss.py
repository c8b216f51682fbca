"""The contrastive loss on one process: hand-computed values, masking rules, GradCache equivalence.

- in-batch off: loss = hand-computed mean over queries of -log softmax over own candidates;
- mixed datasets in one batch: each query honours its own in-batch switch (hand-computed);
- ragged negatives, identical-positive masking and the false-negative margin exclude exactly the
  candidates they name (checked through the per-query candidate counts and hand values);
- GradCache over 4 micro-batches (with dropout) equals the direct whole-batch computation:
  loss and every parameter gradient within 1e-10 (float64).

Run alone: pytest tests/unit/test_contrastive_loss.py
"""

import math

import pytest
import torch

from megatron_nvembed.loss import (
    ContrastiveLoss,
    ContrastiveLossConfig,
    contrastive_loss,
    grad_cache_step,
    sequence_hash,
)
from megatron_nvembed.loss._toy import ToyEncoder, encode, slice_batch, toy_batch

T = 0.05


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1
    )


def _nll(pos, others):
    """-log softmax of the positive among [pos] + others (plain python)."""
    z = [pos / T] + [o / T for o in others]
    top = max(z)
    return -(z[0] - top - math.log(sum(math.exp(v - top) for v in z)))


def test_in_batch_off_equals_hand_computed_softmax():
    q, c = _unit(3, 4), _unit(3, 3, 4, seed=1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss, stats = contrastive_loss(q, c, mask, temperature=T, use_in_batch=False)
    want = []
    for i in range(3):
        s = [float(q[i] @ c[i, j]) for j in range(3) if mask[i, j]]
        want.append(_nll(s[0], s[1:]))
    assert abs(loss.item() - sum(want) / 3) <= 1e-12
    assert (stats.candidates_per_query_min, stats.candidates_per_query_max) == (1, 3)


def test_mixed_datasets_honour_their_own_switch():
    q, c = _unit(3, 4), _unit(3, 2, 4, seed=2)
    mask = torch.ones(3, 2, dtype=torch.bool)
    in_batch = torch.tensor([True, False, True])
    loss, stats = contrastive_loss(
        q, c, mask, temperature=T, in_batch=in_batch, mask_identical_positives=False
    )
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
    # query 0 and 2: 2 own + 2 from the other in-batch query; query 1: its own 2 only
    assert (stats.candidates_per_query_min, stats.candidates_per_query_max) == (2, 4)


def test_identical_positive_is_masked_in_batch():
    q, c = _unit(2, 4), _unit(2, 2, 4, seed=3)
    mask = torch.ones(2, 2, dtype=torch.bool)
    ids = torch.tensor([[7, 8], [7, 9]])  # both positives are the same text
    _, with_rule = contrastive_loss(q, c, mask, temperature=T, candidate_ids=ids)
    _, without = contrastive_loss(
        q, c, mask, temperature=T, candidate_ids=ids, mask_identical_positives=False
    )
    assert without.candidates_per_query_min == 4
    assert with_rule.candidates_per_query_min == 3  # the other query's positive is dropped


def test_false_negative_margin_drops_high_scoring_negatives():
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[[0.8, 0.6], [0.9, 0.436], [0.1, 0.995]]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = contrastive_loss(
        q, c, mask, temperature=T, use_in_batch=False, false_negative_margin=0.95
    )
    # 0.9 > 0.95 * 0.8 = 0.76 is dropped; 0.1 is kept
    assert stats.candidates_per_query_max == 2
    assert abs(loss.item() - _nll(0.8, [0.1])) <= 1e-12


def test_gradients_are_finite_when_everything_is_masked():
    q, c = _unit(2, 4), _unit(2, 1, 4, seed=4)
    q.requires_grad_(True)
    loss, _ = contrastive_loss(q, c, torch.ones(2, 1, dtype=torch.bool), use_in_batch=False)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(q.grad).all()


def test_grad_cache_equals_direct_computation():
    batch = toy_batch(8, 4, seed=0)
    loss_mod = ContrastiveLoss(ContrastiveLossConfig(temperature=T))

    def loss_fn(all_q, all_c):
        return loss_mod(all_q, all_c, batch["candidate_mask"], batch["in_batch"])

    micro = [slice_batch(batch, i, i + 2) for i in range(0, 8, 2)]

    def run(cached):
        torch.manual_seed(0)
        model = ToyEncoder(dropout=0.3)
        torch.manual_seed(123)
        if cached:
            loss = grad_cache_step(lambda mb: encode(model, mb), micro, loss_fn)
        else:
            parts = [encode(model, mb) for mb in micro]
            loss = loss_fn(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, torch.rand(1)

    direct_loss, direct_grads, direct_next = run(False)
    cached_loss, cached_grads, cached_next = run(True)
    assert abs(direct_loss - cached_loss) <= 1e-10
    for name in direct_grads:
        assert (direct_grads[name] - cached_grads[name]).abs().max().item() <= 1e-10, name
    assert torch.equal(direct_next, cached_next)  # generator left where the direct path leaves it
    assert any(g.abs().sum() > 0 for g in cached_grads.values())


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="--temperature"):
        ContrastiveLossConfig(temperature=0).validate()
    with pytest.raises(ValueError, match="false_negative_margin"):
        ContrastiveLossConfig(false_negative_margin=1.5).validate()


def test_sequence_hash_is_deterministic_and_ignores_padding():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 9], [5, 6, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    h = sequence_hash(ids, mask)
    assert h[0] == h[1] and h[0] != h[2]
    assert torch.equal(h, sequence_hash(ids.clone(), mask.clone()))
