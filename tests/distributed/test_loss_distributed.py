"""Cross-rank in-batch negatives equal single-process training on the whole global batch.

- DP=2 vs DP=1 (2 gloo processes): each rank holds half of the global batch; its loss plus a
  DDP-style average of parameter gradients equals the one-process loss and gradients on the
  whole batch (relative difference <= 1e-5; float64 gives ~1e-15). The same with GradCache
  (2 micro-batches per rank).
- TP=2 x DP=2 (4 processes; TP peers hold the same data): gathering over the DP group matches the
  one-process reference; gathering over the world group duplicates candidates and does not.

Run alone: pytest tests/distributed/test_loss_distributed.py
"""

import pytest
import torch
import torch.distributed as dist

from megatron_nvembed.testing import run_distributed

T = 0.05
GLOBAL_B = 8


def _setup(seed=0):
    from megatron_nvembed.loss._toy import ToyEncoder, toy_batch

    torch.manual_seed(seed)
    model = ToyEncoder()
    return model, toy_batch(GLOBAL_B, 3, seed=1)


def _loss(q, c, batch, group):
    from megatron_nvembed.loss import contrastive_loss

    return contrastive_loss(
        q,
        c,
        batch["candidate_mask"],
        temperature=T,
        in_batch=batch["in_batch"],
        mask_identical_positives=False,
        group=group,
    )[0]


def _reference(batch):
    from megatron_nvembed.loss._toy import encode

    model, _ = _setup()
    q, c = encode(model, batch)
    loss = _loss(q, c, batch, None)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _ddp_average(model, group):
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
        p.grad /= dist.get_world_size(group)


def _mean_over(value, group):
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def _close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1e-12)


def _run_dp(model, batch, rank, size, group, cached):
    from megatron_nvembed.loss import grad_cache_step
    from megatron_nvembed.loss._toy import encode, slice_batch

    per = GLOBAL_B // size
    local = slice_batch(batch, rank * per, (rank + 1) * per)
    if cached:
        micro = [slice_batch(local, i, i + per // 2) for i in (0, per // 2)]
        loss = grad_cache_step(
            lambda mb: encode(model, mb), micro, lambda q, c: _loss(q, c, local, group)
        )
    else:
        q, c = encode(model, local)
        loss = _loss(q, c, local, group)
        loss.backward()
    _ddp_average(model, group)
    return _mean_over(loss.item(), group)


def _check_dp2(rank, world_size):
    _, batch = _setup()
    ref_loss, ref_grads = _reference(batch)
    for cached in (False, True):
        model, _ = _setup()
        loss = _run_dp(model, batch, rank, 2, dist.group.WORLD, cached)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (cached, loss, ref_loss)
        for n, p in model.named_parameters():
            assert _close(p.grad, ref_grads[n]), f"grad of {n} differs (GradCache={cached})"


def _check_tp2_dp2(rank, world_size):
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp_group = dp_groups[rank % 2]
    dp_rank = rank // 2  # TP peers (0,1) and (2,3) hold the same half of the batch
    _, batch = _setup()
    ref_loss, ref_grads = _reference(batch)

    model, _ = _setup()
    loss = _run_dp(model, batch, dp_rank, 2, dp_group, cached=False)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for n, p in model.named_parameters():
        assert _close(p.grad, ref_grads[n]), f"DP group: grad of {n} differs"

    # The same with the world group: the gather sees each half twice, a different (wrong) loss.
    from megatron_nvembed.loss._toy import encode, slice_batch

    model, _ = _setup()
    local = slice_batch(batch, dp_rank * 4, dp_rank * 4 + 4)
    q, c = encode(model, local)
    wrong = _mean_over(_loss(q, c, local, dist.group.WORLD).item(), dist.group.WORLD)
    assert abs(wrong - ref_loss) > 1e-3, "world-group gather unexpectedly matched"
    del tp_groups


@pytest.mark.distributed
def test_dp2_equals_dp1_with_and_without_grad_cache():
    run_distributed(_check_dp2, 2)


@pytest.mark.distributed
def test_tp2_dp2_gathers_over_the_dp_group_only():
    run_distributed(_check_tp2_dp2, 4)
