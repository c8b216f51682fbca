"""The optimizer side of training: megatron-core's DDP, (distributed) optimizer and
learning-rate schedule, and the work-arounds megatron-core 0.16.1 needs when it falls back to
torch's Adam (no Transformer Engine / Apex, e.g. on CPU), all in one place."""

from __future__ import annotations

import torch

from megatron_nvembed.core.cpu_support import cuda_allocations_on_cpu
from megatron_nvembed.training.config import OptimizerConfig


def build_optimizer(cfg: OptimizerConfig, model, model_cfg):
    """megatron-core DDP around `model`, its (distributed) Adam and the learning-rate schedule;
    the model config gets the DDP hooks the schedules call (no_sync, finalize, grad scaling).

    Returns:
        (ddp, optimizer, scheduler)
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = model_cfg.model.bf16
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    opt_cfg = MegatronOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    with cuda_allocations_on_cpu():
        ddp = DistributedDataParallel(model.config, ddp_cfg, model)
        optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    _patch_torch_adam_step_state(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=cfg.decay_iters,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters,
        wd_incr_style="constant",
        # A resume keeps the checkpoint's schedule unless --override-opt-param-scheduler;
        # `check_schedule` refuses different schedule flags before anything is built.
        use_checkpoint_opt_param_scheduler=not cfg.override_opt_param_scheduler,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss if bf16 else None
    return ddp, optimizer, scheduler


def _patch_torch_adam_step_state(optimizer) -> None:
    """Work-around (megatron-core 0.16.1, torch Adam fallback without TE/Apex): loading a
    `fully_reshardable` distributed-optimizer state copies every key of the live Adam state,
    including torch's per-parameter "step", which the saved shards do not carry (the step is
    restored from the param groups). Feed the live step back so the copy is a no-op for it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def setter(model_param, tensors, opt=opt, original=original):
            group, order = opt.model_param_group_index_map[model_param]
            live = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
            if "step" in live and "step" not in tensors:
                tensors = dict(tensors, step=live["step"])
            original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = setter


def unshare_adam_steps(optimizer) -> None:
    """Work-around (same fallback): megatron-core restores torch Adam's per-parameter "step" as
    one tensor object shared by every parameter; torch's multi-tensor Adam increments each
    parameter's step in place, so the shared counter would advance once per parameter per
    iteration and the bias correction after a resume would differ from an uninterrupted run."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def init_empty_adam_state(optimizer) -> None:
    """Work-around (same fallback): a distributed optimizer whose torch Adam has never stepped
    has no per-parameter state, and megatron-core's `state_dict()` (needed to request a
    checkpoint load) asserts on the missing "step". Give every parameter zero state first;
    the load then overwrites all of it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["step"] = torch.tensor(0.0)
                    inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
