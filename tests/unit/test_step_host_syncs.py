"""The training step reads nothing back from the device: torch's profiler (CPU) over
`StepRunner.run` (the trainer's step once `StepRunner.prepare` has laid the micro-batches out on
the host and copied them: forward, loss, backward through megatron-core's schedule and DDP;
on the CPU the host and the "device" are one, so `prepare`'s host work is left out of the
window) records no scalar read
(`aten::_local_scalar_dense`, what `.item()`, `int()`, `float()` and `bool()` of a tensor
dispatch) outside `aten::_assert_async` (a device-side check on a GPU: on the CPU its kernel
reads the flag itself). With GradCache and without; padded and length-bucketed rows on sdpa,
packed rows on local (block-diagonal mask; the packed token layout comes from the host, planned
with the micro-batch). The step's one read is `StepStatistics.reduce`'s, after its all-reduce.

Not covered: packed rows on sdpa's THD path on a CPU. There the attention falls back to one
SDPA call per text, which reads the text bounds back and whose CPU backward reads scalars; on a
GPU (bf16, no attention dropout) THD runs torch's varlen kernel with the host-side bounds.

Run alone: pytest tests/unit/test_step_host_syncs.py
"""

from functools import partial

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_nvembed.core.loss_inputs import LossInputs
from megatron_nvembed.data.collate import EmbeddingBatch
from megatron_nvembed.testing import init_single_process_megatron
from megatron_nvembed.training.start import StartingPoint

READS = {"aten::_local_scalar_dense", "aten::is_nonzero"}


_BUILT: dict = {}


def _parts(backend: str):
    """A tiny model on `backend` with the trainer's DDP / optimizer set-up, and the loss."""
    from megatron_nvembed.loss import ContrastiveLoss, ContrastiveLossConfig
    from megatron_nvembed.training import setup
    from megatron_nvembed.training.optimizer import build_optimizer
    from megatron_nvembed.training.recipes import get_recipe

    if backend not in _BUILT:
        pg = init_single_process_megatron()
        cfg = get_recipe("tiny")
        cfg.model.model.attention_backend = backend
        model = setup.build_model(cfg, cfg.model.validate(), pg, StartingPoint("scratch"))
        ddp, _, _ = build_optimizer(cfg.optimizer, model, cfg.model)
        loss = ContrastiveLoss(ContrastiveLossConfig(), group=pg.dp, global_batch_size=4)
        _BUILT[backend] = (pg, ddp, loss, setup.runs_thd(cfg.model))
    return _BUILT[backend]


def _part(n, width, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(3, 200, (n, width), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "pool_mask": mask.clone()}


def _micro_batch(seed, b=2, n=4):
    inputs = LossInputs(
        candidate_mask=torch.ones(b, n, dtype=torch.bool),
        in_batch=torch.ones(b, dtype=torch.bool),
        candidate_ids=torch.arange(b * n).view(b, n) + 100 * seed,
        document_ids=torch.arange(b * n).view(b, n) % 3 + 1000 * seed,
    )
    return EmbeddingBatch(
        query=_part(b, 12, seed),
        candidates=_part(b * n, 20, seed + 1),
        loss_inputs=inputs,
        dataset_index=torch.zeros(b, dtype=torch.long),
        truncated=0,
    )


def _reads(events) -> list[str]:
    """Scalar reads not made by an `_assert_async` kernel, with their parent op."""
    out = []
    for e in events:
        if e.name not in READS:
            continue
        parent, ancestors = e.cpu_parent, []
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        if "aten::_assert_async" not in ancestors:
            out.append(f"{e.name} under {ancestors[:3]}")
    return out


@pytest.mark.parametrize("grad_cache", [True, False], ids=["grad_cache", "direct"])
@pytest.mark.parametrize("layout", ["padded", "buckets", "packed"])
def test_step_makes_no_device_round_trip(grad_cache, layout):
    from megatron_nvembed.training.step import StepRunner, plan_micro_batch

    pg, ddp, loss, thd = _parts("local" if layout == "packed" else "sdpa")
    plan = partial(
        plan_micro_batch,
        pack_length=32 if layout == "packed" else 0,
        bucket_size=3 if layout == "buckets" else 0,
        pipeline=False,
        thd=thd,
    )
    step = StepRunner(ddp, loss, pg, grad_cache=grad_cache, plan=plan, device=torch.device("cpu"))
    step.run(step.prepare([_micro_batch(1), _micro_batch(2)]))  # warm-up (first-call log)
    ddp.zero_grad_buffer()
    batches = step.prepare([_micro_batch(3), _micro_batch(4)])  # host work, then the copy
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        local = step.run(batches)
    assert _reads(prof.events()) == []
    assert local is not None and local.requires_grad is False and torch.isfinite(local)
    # the profiler does see reads: the same loss read back is one
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        float(local)
    assert len(_reads(prof.events())) == 1


@pytest.mark.parametrize("grad_cache", [True, False], ids=["grad_cache", "direct"])
def test_step_hands_the_loss_inputs_to_the_loss(grad_cache):
    """The micro-batches' loss inputs, as collation built them, reach the loss whole and
    unchanged (GradCache: concatenated in micro-batch order, the direct path: each
    micro-batch's own), with their candidates."""
    from megatron_nvembed.training.step import StepRunner, plan_micro_batch

    pg, ddp, loss, thd = _parts("sdpa")
    seen = []
    real = loss.forward

    def recording(query, candidates, inputs):
        seen.append({k: None if v is None else v.clone() for k, v in inputs.tensors().items()})
        return real(query, candidates, inputs)

    loss.forward = recording
    try:
        plan = partial(plan_micro_batch, pack_length=0, bucket_size=0, pipeline=False, thd=thd)
        step = StepRunner(
            ddp, loss, pg, grad_cache=grad_cache, plan=plan, device=torch.device("cpu")
        )
        step.run(step.prepare([_micro_batch(5), _micro_batch(6)]))
    finally:
        loss.forward = real
    want = [_micro_batch(seed).loss_inputs for seed in (5, 6)]  # built afresh: as collated
    if grad_cache:
        want = [LossInputs.cat(want)]
    assert len(seen) == len(want)
    for got, expected in zip(seen, want):
        for name, value in expected.tensors().items():
            if value is None:
                assert got[name] is None, name
            else:
                assert torch.equal(got[name], value), name
