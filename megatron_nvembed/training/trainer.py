"""The training loop: one iteration = one global batch = one optimizer step.

The parts, in the order `train()` uses them: `setup.py` (model configuration, tokenizer, this
rank's model stage), `optimizer.py` (megatron-core DDP, optimizer, schedule and their CPU
work-arounds), `step.py` (the step runner: direct or GradCache, through megatron-core's
schedules), `metrics.py` (the step's one statistics all-reduce, throughput, MFU, the log
record), `guards.py` (non-finite steps, SIGTERM and exit conditions) and `checkpointing.py`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_nvembed.core.cpu_support import cuda_allocations_on_cpu
from megatron_nvembed.core.flops import flop_shape
from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.training import checkpointing as ckpt
from megatron_nvembed.training import setup
from megatron_nvembed.training.config import TrainingConfig
from megatron_nvembed.training.guards import (
    NonFiniteGuard,
    SigtermFlag,
    exit_reason,
    latest_or_none,
    nonfinite_grads,
    require_finite_weights,
)
from megatron_nvembed.training.metrics import StepStatistics, TrainingLog
from megatron_nvembed.training.step import StepRunner

logger = get_logger(__name__)


@dataclass
class TrainResult:
    """What `train` returns (on every rank)."""

    iteration: int
    losses: dict[int, float] = field(default_factory=dict)
    """Global-batch mean loss of every iteration run in this call."""
    skipped: int = 0
    exit_reason: str = "done"
    """Why the loop stopped: "done" (`--train-iters` reached), "sigterm", "exit_interval"
    (`--exit-interval`) or "exit_duration" (`--exit-duration-in-mins`)."""
    evals: dict[int, dict] = field(default_factory=dict)


def train(cfg: TrainingConfig) -> TrainResult:
    """Runs (or resumes) training as configured; every rank calls it.

    Raises:
        ValueError / FileNotFoundError: bad settings or inputs, naming the flag or file.
        RuntimeError: too many non-finite losses in a row.
    """
    from megatron_nvembed.training.sinks import require_sink_packages

    started = time.perf_counter()  # the clock of elapsed_s, eta_s and --exit-duration-in-mins
    cfg.validate()
    require_sink_packages(cfg.logging)
    run = setup.build(cfg)
    ck = cfg.checkpoint
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    iteration = setup.resume(run, guard) if run.start.resuming else 0
    rank, dp, ddp, optimizer = dist.get_rank(), run.layout["dp"], run.ddp, run.optimizer
    plan = setup.step_plan(cfg, run.model_cfg)
    step = StepRunner(
        ddp, run.loss_fn, run.pg, grad_cache=cfg.grad_cache, plan=plan, device=run.device
    )
    if rank == 0:
        logger.info(_start_line(cfg, run.layout, run.model, run.lora))
    result = TrainResult(iteration=iteration, skipped=guard.skipped)
    shape = flop_shape(run.model_cfg, cfg.lora.rank)
    evaluator = None
    if cfg.evaluation.eval_interval:
        from megatron_nvembed.training.validation import Validator

        evaluator = Validator(
            cfg.evaluation, cfg.data.seq_length, run.tokenizer, run.model, run.pg,
            run.model_cfg.prompts.query_template,
        )  # fmt: skip
    # A run resumed from --save at its last iteration (a finished run relaunched) has nothing
    # new to save.
    saver = _Saver(
        run, guard, saved_at=iteration if run.start.resuming and run.start.own_save else None
    )
    sigterm, log = SigtermFlag(), None
    try:
        log = TrainingLog(cfg, run.device, started)
        run.model.train()
        while iteration < cfg.optimizer.train_iters:
            start = time.perf_counter()
            batches = step.prepare(run.data.next_global_batch())
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            local_loss = step.run(batches)
            minutes = (time.perf_counter() - started) / 60.0
            stats = StepStatistics.reduce(
                local_loss, batches, shape, cfg.loss.in_batch_negatives, contributes=step.contributes,
                nonfinite_grads=nonfinite_grads(ddp), sigterm=sigterm.raised,
                over_time=(ck.exit_duration_in_mins or math.inf) < minutes, device=run.device,
            )  # fmt: skip
            iteration += 1
            loss_value, grad_norm = stats.loss / dp, None
            # A finite loss can still come with non-finite gradients (an overflow in the
            # backward): such a step is skipped too, so weights never take a non-finite update.
            if guard.update(math.isfinite(loss_value) and stats.nonfinite_grads == 0, iteration):
                with cuda_allocations_on_cpu():
                    _, grad_norm, _ = optimizer.step()
                run.scheduler.step(increment=1)
            else:
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
            result.losses[iteration] = loss_value
            result.iteration, result.skipped = iteration, guard.skipped
            log.step(
                iteration, loss_value, optimizer, grad_norm, time.perf_counter() - start, stats,
                run.loss_fn.pop_stats(), guard.skipped,
            )  # fmt: skip
            if evaluator is not None and iteration % cfg.evaluation.eval_interval == 0:
                result.evals[iteration] = evaluator(iteration)
                log.evaluation(iteration, result.evals[iteration])
            reason = exit_reason(ck, iteration, stats.sigterm > 0, stats.over_time > 0, minutes)
            if reason is not None:
                if rank == 0:
                    what = "saving" if ck.save else "not saving (no --save)"
                    logger.warning("%s: %s at iteration %d and exiting", reason[1], what, iteration)
                result.exit_reason = reason[0]
                break
            if ck.save and ck.save_interval and iteration % ck.save_interval == 0:
                saver(iteration)
        if ck.save and saver.saved_at != iteration:
            saver(iteration)
        if rank == 0:
            logger.info(run.data.summary())
        return result
    finally:
        sigterm.restore()
        if log is not None:
            log.close()


def _start_line(cfg: TrainingConfig, layout: dict, model, lora) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    d = cfg.data
    return (
        f"training {cfg.recipe} stage {cfg.stage}: TP={layout['tp']} PP={layout['pp']} "
        f"DP={layout['dp']}, {trainable}/{total} parameters trainable "
        f"({f'LoRA r={cfg.lora.rank}' if lora else 'full fine-tuning'}), global batch "
        f"{d.global_batch_size} = {d.global_batch_size // (d.micro_batch_size * layout['dp'])}"
        f" micro-batch(es) of {d.micro_batch_size} per DP rank, GradCache "
        f"{'on' if cfg.grad_cache else 'off'}, in-batch negatives "
        f"{'on' if cfg.loss.in_batch_negatives else 'off'}"
    )


class _Saver:
    """Saves a training checkpoint when the run is sound (`__call__(iteration)`)."""

    def __init__(self, run: setup.Run, guard: NonFiniteGuard, saved_at: int | None):
        self.run, self.guard = run, guard
        self.saved_at = saved_at

    def __call__(self, it: int) -> None:
        run, cfg, rank = self.run, self.run.cfg, dist.get_rank()
        save = cfg.checkpoint.save
        self.saved_at = it
        if self.guard.in_row:
            # The weights are those of the last applied step, but a run whose last step was
            # non-finite is diverging or reading bad data: its checkpoint is never the latest.
            if rank == 0:
                logger.warning(
                    "iteration %d: not saving, the last step was skipped as non-finite (%d in "
                    "a row); the latest checkpoint stays %s",
                    it,
                    self.guard.in_row,
                    latest_or_none(save),
                )
            return
        require_finite_weights(run.model, it, save)
        ckpt.save_training_checkpoint(
            save, it, run.model, run.model_cfg, run.optimizer, run.scheduler, run.data,
            {
                "skipped": self.guard.skipped,
                "layout": run.layout,
                "recipe": cfg.recipe,
                "stage": cfg.stage,
                "config": cfg.to_dict(),
            },
            run.lora,
            run.start.tokenizer_dir(cfg.data.tokenizer),
        )  # fmt: skip
        if rank == 0:
            logger.info("saved checkpoint %s at iteration %d", save, it)
