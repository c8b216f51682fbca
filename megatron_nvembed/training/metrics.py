"""What a step reports: its statistics (loss, tokens, FLOPs, the guards' flags) reduced over
every rank in one all-reduce, the throughput window between log lines, MFU, and the log
record every sink writes (`sinks.py`) with its one-line rendering."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from megatron_nvembed.core.flops import loss_flops, model_step_flops
from megatron_nvembed.core.logging_utils import get_logger

logger = get_logger(__name__)


@dataclass
class StepStatistics:
    """One step's numbers, summed over every rank (each value counted once: by the ranks that
    hold the last pipeline stage and tensor-parallel rank 0; the flags by every rank)."""

    loss: float = 0.0
    """Sum of the data-parallel ranks' losses (divide by DP for the global-batch mean)."""
    tokens: float = 0.0
    """Real tokens of the global batch."""
    padded: float = 0.0
    """Token positions the decoder computed in the training pass (padding included)."""
    sequences: float = 0.0
    flops: float = 0.0
    """Model FLOPs of the real lengths (flops.py): padding and GradCache's extra pass excluded."""
    nonfinite_grads: float = 0.0
    """Ranks whose gradient buffers hold a non-finite value."""
    sigterm: float = 0.0
    """Ranks that received SIGTERM."""
    over_time: float = 0.0
    """Ranks past `--exit-duration-in-mins`."""

    @classmethod
    def reduce(
        cls,
        local_loss: torch.Tensor | None,
        batches: list,
        shape,
        in_batch_negatives: bool,
        *,
        contributes: bool,
        nonfinite_grads: torch.Tensor,
        sigterm: bool,
        over_time: bool,
        device,
    ) -> StepStatistics:
        """The step's one all-reduce and its one host read.

        Args:
            local_loss: this rank's loss (a device tensor) on the last stage, else None.
            batches: this rank's `step.ModelBatch` micro-batches (their host-side counts).
            shape: `flops.flop_shape` of the model.
            contributes: this rank counts the batch (last stage, tensor-parallel rank 0).
            nonfinite_grads: 1.0 when this rank's gradients hold a non-finite value (device).
        """
        lengths = [n for mb in batches for n in mb.lengths]
        useful = model_step_flops(shape, lengths, 0, 0).total + sum(
            loss_flops(shape, *mb.loss_inputs.shape, in_batch_negatives).total for mb in batches
        )
        counted = [
            0.0,
            float(sum(lengths)),
            float(sum(mb.positions for mb in batches)),
            float(sum(b * n + b for b, n in (mb.loss_inputs.shape for mb in batches))),
            float(useful),
        ]
        host = [v * contributes for v in counted] + [0.0, float(sigterm), float(over_time)]
        vec = torch.tensor(host, dtype=torch.float64).to(device)
        if contributes and local_loss is not None:
            vec[0] = local_loss.detach().to(torch.float64)
        vec[5] = nonfinite_grads.to(vec.device, torch.float64)
        dist.all_reduce(vec)
        return cls(*vec.tolist())


@dataclass
class ThroughputWindow:
    """Sums over the iterations since the last log line."""

    time: float = 0.0
    tokens: float = 0.0
    padded: float = 0.0
    sequences: float = 0.0
    flops: float = 0.0
    iters: int = 0

    def add(self, seconds: float, stats: StepStatistics) -> None:
        self.time += seconds
        self.tokens += stats.tokens
        self.padded += stats.padded
        self.sequences += stats.sequences
        self.flops += stats.flops
        self.iters += 1

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    from megatron_nvembed.core.hardware import gpu_peak_bf16_tflops

    return gpu_peak_bf16_tflops(torch.cuda.get_device_name(device))


def log_record(
    iteration,
    loss,
    optimizer,
    grad_norm,
    window,
    stats,
    cfg,
    device,
    peak,
    skipped,
    elapsed_s,
) -> dict:
    """The logged iteration's scalars: the JSON log's line, and what every sink writes."""
    secs = max(window.time, 1e-9)
    tokens_per_s = window.tokens / secs
    # Per GPU, as MFU is: the step's model FLOPs are summed over data-parallel ranks, and each
    # of the world's GPUs holds a TP x PP share of one replica.
    tflops = window.flops / secs / 1e12 / dist.get_world_size()
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    lr = optimizer.param_groups[0]["lr"]
    iteration_time = secs / max(window.iters, 1)
    return {
        "iteration": iteration,
        "loss": loss,
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_s": tokens_per_s,
        "padded_tokens_per_s": window.padded / secs,
        "sequences_per_s": window.sequences / secs,
        "iteration_time_s": iteration_time,
        "tflops": tflops,
        "mfu": None if peak is None else tflops / peak,
        "peak_memory_gib": peak_mem,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "candidates_per_query": None if stats is None else stats.candidates_per_query_mean,
        "candidates_per_query_min": None if stats is None else stats.candidates_per_query_min,
        "in_batch_pool_queries": None if stats is None else stats.pool_queries,
        "gather_seconds": None if stats is None else stats.gather_seconds,
        "gather_bytes": None if stats is None else stats.gather_bytes,
        "skipped_iterations": skipped,
        # Samples (queries) drawn so far, earlier runs of a resumed job included; a skipped
        # step's batch counts, as in Megatron-LM.
        "consumed_samples": iteration * cfg.data.global_batch_size,
        "elapsed_s": elapsed_s,
        # The window's mean iteration time x the iterations left to --train-iters.
        "eta_s": iteration_time * (cfg.optimizer.train_iters - iteration),
    }


def log_line(record, stats, cfg) -> str:
    gn = record["grad_norm"]
    mfu = record["mfu"]
    parts = [
        f"iteration {record['iteration']:>6d}/{cfg.optimizer.train_iters}",
        f"consumed samples {record['consumed_samples']}",
        f"elapsed {hms(record['elapsed_s'])}",
        f"ETA {hms(record['eta_s'])}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.3e}",
        f"grad norm {gn:.3f}" if gn is not None else "grad norm -",
        f"{record['tokens_per_s']:.0f} tokens/s ({record['padded_tokens_per_s']:.0f} padded)",
        f"{record['sequences_per_s']:.1f} seq/s",
        f"{record['iteration_time_s'] * 1e3:.0f} ms/it",
        f"MFU {mfu:.1%}" if mfu is not None else f"{record['tflops']:.3f} TFLOP/s",
        f"peak mem {record['peak_memory_gib']:.2f} GiB",
    ]
    if stats is not None:
        parts.append(stats.summary(cfg.data.global_batch_size))
    if record["skipped_iterations"]:
        parts.append(f"skipped {record['skipped_iterations']}")
    return " | ".join(parts)


def hms(seconds: float) -> str:
    """`H:MM:SS` (hours unbounded)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class TrainingLog:
    """The log line every `--log-interval` iterations and the sinks' records (JSON log,
    TensorBoard, W&B). The line is made where the loss is, the last stage's last DP rank (as
    Megatron-LM's `print_rank_last`), and written by global rank 0: on several nodes rank 0's
    output is the one a user watches (the last rank's is the last node's)."""

    def __init__(self, cfg, device, started: float):
        from megatron_nvembed.training.sinks import Sinks, build_sinks

        self.cfg, self.device, self.started = cfg, device, started
        self.source = dist.get_world_size() - 1
        self.maker = dist.get_rank() == self.source
        self.reporter = dist.get_rank() == 0
        self.sinks = build_sinks(cfg) if self.reporter else Sinks()
        self.window = ThroughputWindow()
        self.peak = peak_tflops(device)

    def step(
        self, iteration, loss, optimizer, grad_norm, seconds, stats, loss_stats, skipped
    ) -> None:
        """Adds one iteration to the throughput window; logs at the interval and the end."""
        self.window.add(seconds, stats)
        cfg = self.cfg
        if iteration % cfg.logging.log_interval and iteration != cfg.optimizer.train_iters:
            return
        record = log_record(
            iteration, loss, optimizer, grad_norm, self.window, loss_stats, cfg, self.device,
            self.peak, skipped, time.perf_counter() - self.started,
        )  # fmt: skip
        box = [(record, log_line(record, loss_stats, cfg)) if self.maker else None]
        if self.source != 0:
            dist.broadcast_object_list(box, src=self.source)
        if self.reporter:
            record, line = box[0]
            logger.info(line)
            self.sinks.write(record, iteration)
        self.window.reset()

    def evaluation(self, iteration: int, metrics: dict) -> None:
        if self.reporter:
            self.sinks.write({"iteration": iteration, "eval": metrics}, iteration)

    def close(self) -> None:
        self.sinks.close()
