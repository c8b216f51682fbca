"""bf16 training keeps float32 master weights in the optimizer, as megatron-core does: the model's
parameters are bf16, the optimizer steps float32 copies of them and writes the bf16 rounding
back. The property that matters: an update smaller than a bf16 parameter's spacing is kept in
the master weight (and reaches the model once updates add up), not rounded away at each step.
The trainer itself runs float32 on CPU (`training/start.py`); this builds a GPU run's bf16 model
and optimizer with the trainer's own functions, on CPU.
"""

from __future__ import annotations

import torch

from megatron_nvembed.core.cpu_support import cuda_allocations_on_cpu
from megatron_nvembed.testing import init_single_process_megatron
from megatron_nvembed.training.start import StartingPoint


def _bf16_tiny_trainer_parts():
    from megatron_nvembed.training import setup
    from megatron_nvembed.training.optimizer import build_optimizer
    from megatron_nvembed.training.recipes import get_recipe

    pg = init_single_process_megatron()
    cfg = get_recipe("tiny")
    cfg.model.model.bf16 = True
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.clip_grad = 0.0
    model = setup.build_model(cfg, cfg.model.validate(), pg, StartingPoint("scratch"))
    ddp, optimizer, _ = build_optimizer(cfg.optimizer, model, cfg.model)
    return ddp, optimizer


def _model_and_master_pairs(optimizer):
    """(bf16 model parameter, its float32 master) pairs of megatron-core's (distributed)
    optimizer; one data-parallel rank, so each master shard is the whole parameter, flattened."""
    pairs = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for models, masters in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
            pairs += list(zip(models, masters))
    return pairs


def test_bf16_training_steps_float32_master_weights_and_keeps_updates_below_bf16_spacing():
    ddp, optimizer = _bf16_tiny_trainer_parts()
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    pairs = _model_and_master_pairs(optimizer)
    bf16 = [p for p in trainable if p.dtype == torch.bfloat16]
    # the weights are bf16 (megatron-core's torch-norm fallback keeps the norms' float32, and
    # the optimizer steps those in place)
    assert len(bf16) > len(trainable) / 2
    assert all(p.dtype in (torch.bfloat16, torch.float32) for p in trainable)
    assert {id(p) for p, _ in pairs} == {id(p) for p in bf16}
    assert all(m.dtype == torch.float32 and m.numel() == p.numel() for p, m in pairs)
    # before a step each master weight is its bf16 parameter, exactly upcast
    assert all(torch.equal(m, p.detach().float().flatten()) for p, m in pairs)

    lr = 1e-6  # Adam's first step moves each weight by about lr, far below bf16's spacing
    for group in optimizer.param_groups:
        group["lr"] = lr
    before = [(p.detach().clone(), m.detach().clone()) for p, m in pairs]
    for p in trainable:
        p.main_grad.fill_(1.0)  # megatron-core DDP's gradient buffer, which the optimizer reads
    with cuda_allocations_on_cpu():  # as the trainer steps it (grad norm buffers)
        optimizer.step()

    moved = torch.cat([m.detach() - m0 for (_, m), (_, m0) in zip(pairs, before)])
    start = torch.cat([m0 for _, m0 in before])
    # every master weight moved by -lr (Adam's first step on a unit gradient): within 1% plus
    # float32's rounding of the subtraction at the weight's magnitude
    slack = 0.01 * lr + 2 * torch.finfo(torch.float32).eps * start.abs()
    assert ((moved + lr).abs() <= slack).all()
    for (p, m), (p0, _) in zip(pairs, before):
        # the model holds the masters' bf16 rounding ...
        assert torch.equal(p.detach().flatten(), m.detach().to(torch.bfloat16))
        # ... which, for weights away from zero (bf16 spacing 2^-8 relative), is unchanged:
        # a bf16 optimizer state would have lost these updates, the masters keep them
        far = p0.float().flatten().abs() > 1e-2
        assert torch.equal(p.detach().flatten()[far], p0.flatten()[far])
