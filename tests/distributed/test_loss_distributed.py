"""Cross-rank in-batch negatives and GradCache equal single-process training on the whole batch.

All comparisons in float64 with relative tolerance 1e-5 (observed differences are ~1e-15: only
summation order changes); the reference is one process computing the loss of the whole global
batch (8 queries x 3 candidates, ragged negatives, one no-in-batch dataset, one repeated
positive across the rank boundary) directly.

- DP=2 vs DP=1 (2 gloo processes): `all_gather_with_grad` returns each rank exactly the gradient
  sent to its rows (unequal row counts); `sequence_hash` agrees across processes; each rank holds
  part of the global batch (4 + 4, and 3 + 5), parameter gradients averaged as DDP does: loss and
  every parameter gradient equal the reference. GradCache with 2 micro-batches per rank under real
  `DistributedDataParallel` (its `no_sync` for the first micro-batch) equals it too.
- The optional objectives (query-query and document-document negatives, Matryoshka widths, the
  margin, distillation towards teacher scores; duplicate documents by id across the rank
  boundary) at DP=2 with unequal halves, and with GradCache under DDP, equal the one-process
  computation (the queries are gathered with exact gradients too).
- TP=2 x DP=2 (4 processes; TP peers {0,1}, {2,3} hold the same data; DP groups {0,2}, {1,3}):
  gathering over the DP group equals the reference; gathering over the world group duplicates
  every candidate and gives a different loss and different gradients.
- PP=2 (2 processes, the project's `NVEmbedModel` through megatron-core's pipeline schedules):
  GradCache over 4 micro-batches (phase 1 forward-only schedule, phase 2 the 1F1B schedule with
  `surrogate_loss` on the last stage) gives every stage the gradients of the direct computation
  that runs the whole batch as one pipeline micro-batch (float64 model, rtol 1e-5).

Run alone: pytest tests/distributed/test_loss_distributed.py
"""

from functools import partial

import pytest
import torch
import torch.distributed as dist

from megatron_nvembed.testing import run_distributed

T = 0.05
GLOBAL_B = 8
RTOL = 1e-5


def _setup(seed=0):
    from megatron_nvembed.loss._toy import ToyEncoder, toy_batch

    torch.manual_seed(seed)
    model = ToyEncoder()
    return model, toy_batch(GLOBAL_B, 3, seed=1, document_ids=True)


def _loss(q, c, batch, group, **objectives):
    from megatron_nvembed.loss import ContrastiveLossConfig, contrastive_loss
    from megatron_nvembed.loss._toy import loss_inputs

    config = ContrastiveLossConfig(temperature=T, **objectives)
    return contrastive_loss(q, c, loss_inputs(batch), config, group)


def _objectives():
    """Every optional term on: query-query and document-document negatives, Matryoshka widths
    with weights, the false-negative margin, distillation towards teacher scores."""

    return dict(
        query_query=True,
        document_document=True,
        matryoshka_dims=[8, 4, 2],
        matryoshka_weights=[1.0, 0.5, 0.25],
        false_negative_margin=0.8,
        distill_weight=0.5,
        distill_temperature=2.0,
    )


def _reference(batch, **objectives):
    from megatron_nvembed.loss._toy import encode

    model, _ = _setup()
    q, c = encode(model, batch)
    loss, stats = _loss(q, c, batch, None, **objectives)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def _ddp_average(model, group):
    # What DDP does after backward: all-reduce parameter gradients and divide by the group size.
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
        p.grad /= dist.get_world_size(group)


def _mean_over(value, group):
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _assert_matches(loss, grads, ref_loss, ref_grads, what):
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), f"{what}: loss {loss} vs {ref_loss}"
    for n, g in ref_grads.items():
        assert _rel(grads[n], g) <= RTOL, f"{what}: grad of {n} differs by {_rel(grads[n], g)}"


def _check_gather_primitive(rank):
    from megatron_nvembed.loss import all_gather_no_grad, all_gather_with_grad

    rows = [2, 3]  # unequal per-rank sizes
    x = torch.full((rows[rank], 4), float(rank + 1), dtype=torch.float64, requires_grad=True)
    out, offset = all_gather_with_grad(x, dist.group.WORLD)
    assert out.shape == (5, 4) and offset == (0 if rank == 0 else 2)
    assert torch.equal(out[:2], torch.ones(2, 4, dtype=torch.float64))
    assert torch.equal(out[2:], torch.full((3, 4), 2.0, dtype=torch.float64))
    weights = [
        torch.randn(5, 4, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
        for r in range(2)
    ]
    (out * weights[rank]).sum().backward()  # each rank's loss weighs every row differently
    want = (weights[0] + weights[1])[offset : offset + rows[rank]]
    assert torch.allclose(x.grad, want, rtol=0, atol=1e-12), "gradient did not reach its producer"
    flags = all_gather_no_grad(torch.tensor([True, False][: rows[rank] - 1]), dist.group.WORLD)
    assert flags.tolist() == [True, True, False]


def _check_dp2(rank, world_size):
    from megatron_nvembed.loss import (
        ContrastiveLoss,
        ContrastiveLossConfig,
        grad_cache_step,
        run_in_order,
    )
    from megatron_nvembed.loss._toy import encode, loss_inputs, slice_batch, toy_batch

    _check_gather_primitive(rank)

    # the identical-positive rule compares hashes computed on different ranks
    hashes = toy_batch(GLOBAL_B, 3, seed=1)["candidate_ids"]
    both = [torch.empty_like(hashes) for _ in range(2)]
    dist.all_gather(both, hashes)
    assert torch.equal(both[0], both[1])

    _, batch = _setup()
    ref_loss, ref_grads, ref_stats = _reference(batch)
    # the document ids exclude candidates across the halves' boundary (query 6's negative for
    # query 0, queries 3 and 5's positives for each other)
    _, _, no_ids = _reference({**batch, "document_ids": None})
    assert no_ids.counts[0] - ref_stats.counts[0] == 3
    world = dist.group.WORLD
    for split in ((0, 4, 8), (0, 3, 8)):  # equal and unequal local batch sizes
        local = slice_batch(batch, split[rank], split[rank + 1])
        model, _ = _setup()
        q, c = encode(model, local)
        loss, stats = _loss(q, c, local, world)
        loss.backward()
        _ddp_average(model, world)
        grads = {n: p.grad for n, p in model.named_parameters()}
        _assert_matches(_mean_over(loss.item(), world), grads, ref_loss, ref_grads, f"DP=2 {split}")
        assert stats.pool_queries == GLOBAL_B and stats.dp_size == 2
        assert stats.gathered_embeddings == GLOBAL_B * 3 and stats.gather_bytes > 0
        # the same candidates per query as in the one-process reference
        counts = torch.tensor([stats.candidates_per_query_min, stats.candidates_per_query_max])
        lo, hi = counts.clone(), counts.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        assert (lo[0].item(), hi[1].item()) == (
            ref_stats.candidates_per_query_min,
            ref_stats.candidates_per_query_max,
        )

    # The optional objectives gather queries too; DP=2 (unequal halves) equals one process.
    objectives = _objectives()
    obj_loss, obj_grads, _ = _reference(batch, **objectives)
    assert abs(obj_loss - ref_loss) > 1e-3 * abs(ref_loss), "the objectives changed nothing"
    local = slice_batch(batch, (0, 3)[rank], (3, 8)[rank])
    model, _ = _setup()
    q, c = encode(model, local)
    loss, _ = _loss(q, c, local, world, **objectives)
    loss.backward()
    _ddp_average(model, world)
    grads = {n: p.grad for n, p in model.named_parameters()}
    _assert_matches(
        _mean_over(loss.item(), world), grads, obj_loss, obj_grads, "DP=2 with objectives"
    )

    # GradCache, 2 micro-batches per rank, under real DDP (its averaging, its no_sync).
    model, _ = _setup()
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=world)
    local = slice_batch(batch, 4 * rank, 4 * rank + 4)
    loss_mod = ContrastiveLoss(ContrastiveLossConfig(temperature=T), world, GLOBAL_B)
    result = grad_cache_step(
        lambda i, mb: _rows(*encode(ddp, mb)),
        [slice_batch(local, 0, 2), slice_batch(local, 2, 4)],
        loss_mod,
        loss_inputs,
        drive=partial(run_in_order, no_sync=ddp.no_sync),
    )
    grads = {n: p.grad for n, p in model.named_parameters()}
    _assert_matches(_mean_over(result.loss.item(), world), grads, ref_loss, ref_grads, "GradCache")
    assert result.replay_max_diff == 0.0
    assert loss_mod.pop_stats().pool_queries == GLOBAL_B

    # GradCache with every objective on (the trainer's ContrastiveLoss settings).
    model, _ = _setup()
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=world)
    settings = ContrastiveLossConfig(
        temperature=T,
        query_query=True,
        document_document=True,
        matryoshka_dims=objectives["matryoshka_dims"],
        matryoshka_weights=objectives["matryoshka_weights"],
        false_negative_margin=objectives["false_negative_margin"],
        distill_weight=objectives["distill_weight"],
        distill_temperature=objectives["distill_temperature"],
    )
    loss_mod = ContrastiveLoss(settings, world, GLOBAL_B)
    local = slice_batch(batch, 4 * rank, 4 * rank + 4)
    result = grad_cache_step(
        lambda i, mb: _rows(*encode(ddp, mb)),
        [slice_batch(local, 0, 2), slice_batch(local, 2, 4)],
        loss_mod,
        loss_inputs,
        drive=partial(run_in_order, no_sync=ddp.no_sync),
    )
    grads = {n: p.grad for n, p in model.named_parameters()}
    _assert_matches(
        _mean_over(result.loss.item(), world), grads, obj_loss, obj_grads, "GradCache objectives"
    )


def _rows(q, c):  # [b, d], [b, n, d] -> [b + b * n, d], the rows grad_cache_step splits
    return torch.cat([q, c.flatten(0, 1)])


def _check_tp2_dp2(rank, world_size):
    from megatron_nvembed.loss._toy import encode, slice_batch

    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp_group = dp_groups[rank % 2]
    dp_rank = rank // 2  # TP peers (0,1) and (2,3) hold the same half of the batch
    assert dist.get_rank(dp_group) == dp_rank  # the rank *within* the DP group orders the gather
    _, batch = _setup()
    ref_loss, ref_grads, _ = _reference(batch)
    local = slice_batch(batch, 4 * dp_rank, 4 * dp_rank + 4)

    def run(group):
        model, _ = _setup()
        q, c = encode(model, local)
        loss, stats = _loss(q, c, local, group)
        loss.backward()
        _ddp_average(model, dp_group)  # DDP always averages over the DP group
        grads = {n: p.grad for n, p in model.named_parameters()}
        return _mean_over(loss.item(), dp_group), grads, stats

    loss, grads, stats = run(dp_group)
    _assert_matches(loss, grads, ref_loss, ref_grads, "TP=2 x DP=2 over the DP group")
    assert stats.pool_queries == GLOBAL_B

    # The world group sees each half twice (once per TP peer): a different, wrong loss.
    wrong_loss, wrong_grads, wrong_stats = run(dist.group.WORLD)
    assert wrong_stats.pool_queries == 2 * GLOBAL_B
    assert abs(wrong_loss - ref_loss) > 1e-3 * abs(ref_loss), "world-group loss matched"
    assert max(_rel(wrong_grads[n], ref_grads[n]) for n in ref_grads) > 1e-3, "world grads matched"
    del tp_groups


def _pp_rows(n_queries, n_cand, width, seed):
    """Queries then candidates, one row each, padded to one width (a pipeline micro-batch)."""
    from megatron_nvembed.testing import random_padded_batch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (n_queries * (1 + n_cand),), generator=g).tolist()
    return random_padded_batch(lengths, seed=seed, pad_to=width)


def _check_pp2_grad_cache(rank, world_size):
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.loss import (
        ContrastiveLossConfig,
        LossInputs,
        contrastive_loss,
        grad_cache_step,
    )
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.testing import tiny_model_config
    from megatron_nvembed.training.step import ScheduleDriver
    from megatron_nvembed.utils.rng import capture_rng_state

    pg = initialize_model_parallel(1, 2, seed=7)
    last = rank == 1
    cfg = tiny_model_config(pooling="latent", pp=2, num_layers=2)
    model = build_model(cfg, pg, params_dtype=torch.float64)
    drive = ScheduleDriver([model], pp_size=2)  # the trainer's driver
    assert capture_rng_state().tracker is not None, "megatron's RNG tracker is not captured"
    b, n, m = 8, 3, 4  # queries, candidates per query, micro-batches
    per = b // m
    rows = [_pp_rows(per, n, 10, seed=i) for i in range(m)]  # [per + per*n, 10] each
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[::3, -1] = False
    in_batch = torch.tensor([True, True, False, True, True, True, True, True])
    ids = torch.arange(b * n).view(b, n)  # all texts distinct
    inputs = LossInputs(mask, in_batch=in_batch, candidate_ids=ids)
    # each micro-batch: its rows and its share of the loss inputs
    part = [slice(i * per, (i + 1) * per) for i in range(m)]
    micro = [
        {**r, "loss": LossInputs(mask[p], in_batch=in_batch[p], candidate_ids=ids[p])}
        for r, p in zip(rows, part)
    ]

    def loss_fn(q, c, inputs):
        return contrastive_loss(q, c, inputs, ContrastiveLossConfig(temperature=T), None)[0]

    def forward(i, mb):
        return model(mb["input_ids"], mb["attention_mask"])

    # Direct: the whole batch is one pipeline micro-batch, every activation kept.
    whole = {k: torch.cat([r[k][:per] for r in rows] + [r[k][per:] for r in rows]) for k in rows[0]}

    def direct_step(i, mb):
        return forward(i, mb), lambda o: (loss_fn(o[:b], o[b:].view(b, n, -1), inputs), {})

    drive(direct_step, [whole], False)
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # GradCache, the trainer's routine: phase 1 the forward-only schedule, phase 2 the 1F1B
    # schedule with the cached gradients delivered through `surrogate_loss` on the last stage.
    result = grad_cache_step(
        forward, micro, loss_fn, lambda mb: mb["loss"], drive=drive, last_stage=last
    )
    for k, p in model.named_parameters():
        assert _rel(p.grad, ref[k]) <= RTOL, (
            f"stage {rank}: grad of {k} differs ({_rel(p.grad, ref[k])})"
        )
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    if last:
        assert result.replay_max_diff == 0.0 and result.loss is not None


@pytest.mark.distributed
def test_dp2_equals_dp1_with_and_without_grad_cache():
    run_distributed(_check_dp2, 2)


@pytest.mark.distributed
def test_tp2_dp2_gathers_over_the_dp_group_only():
    run_distributed(_check_tp2_dp2, 4)


@pytest.mark.distributed
def test_grad_cache_under_pipeline_parallelism_equals_direct():
    run_distributed(_check_pp2_grad_cache, 2)
