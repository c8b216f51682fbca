"""GradCache: in-batch negatives over the whole global batch at the memory of one micro-batch.

Phase 1 embeds every micro-batch without keeping activations, recording the random-generator
state before each one. The loss and its gradients with respect to *all* of this rank's embeddings
are then computed on the cached embeddings, with the micro-batches' `LossInputs` concatenated
whole (the cross-rank gather happens here, so the in-batch pool is the whole global batch). Phase 2 re-runs each micro-batch's forward with autograd under
the state it had in phase 1 (dropout masks replay exactly) and backpropagates the cached
embedding gradients. Parameter gradients equal those of the uncached computation; the price is
one extra forward per micro-batch.

`grad_cache_step` is the one routine: the trainer (megatron-core's pipeline schedules as its
driver), the tests and the benchmark call it. It is built from `RngReplay` (records and replays
generator states), `embedding_gradients` (the loss on cached embeddings) and `surrogate_loss` (a
scalar whose backward delivers cached gradients: the phase-2 "loss" of a driver that can only
backpropagate a scalar). A driver runs a step function over the micro-batches under
megatron-core's schedule contract (`Driver`); `run_in_order` is the one for a model in one
piece. See docs/loss.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from megatron_nvembed.core.loss_inputs import LossInputs
from megatron_nvembed.utils.rng import RngSnapshot, capture_rng_state, restore_rng_state


class RngReplay:
    """Records the generator state before each micro-batch's first forward; replays it later.

    Usage: `record(i)` before micro-batch i's phase-1 forward, `end_recording()` after the last;
    `replay(i)` before its phase-2 forward; `finish()` afterwards leaves the generators where the
    uncached computation would have left them (after one forward of every micro-batch).
    """

    def __init__(self) -> None:
        self._states: dict[int, RngSnapshot] = {}
        self._end: RngSnapshot | None = None

    def record(self, index: int) -> None:
        """Captures the state for micro-batch `index` (phase 1)."""
        self._states[index] = capture_rng_state()

    def end_recording(self) -> None:
        """Captures the state after phase 1."""
        self._end = capture_rng_state()

    def replay(self, index: int) -> None:
        """Restores the state micro-batch `index` had in phase 1.

        Raises:
            KeyError: when `index` was never recorded.
        """
        if index not in self._states:
            raise KeyError(f"micro-batch {index} was not recorded in phase 1")
        restore_rng_state(self._states[index])

    def finish(self) -> None:
        """Restores the post-phase-1 state (call once phase 2 is done)."""
        if self._end is None:
            raise RuntimeError("RngReplay.finish() before end_recording()")
        restore_rng_state(self._end)


def embedding_gradients(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    queries: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The loss on cached embeddings and its gradient with respect to each micro-batch's share.

    Args:
        loss_fn: (queries [sum b_i, d], candidates [sum b_i, n, d]) -> scalar loss of this rank;
            it may gather over the data-parallel group (every rank must call it).
        queries: per micro-batch [b_i, d], computed without autograd.
        candidates: per micro-batch [b_i, n, d].

    Returns:
        (loss detached, d loss / d queries per micro-batch, d loss / d candidates per micro-batch).
    """
    sizes = [q.shape[0] for q in queries]
    all_q = torch.cat(list(queries)).detach().requires_grad_(True)  # [sum b_i, d]
    all_c = torch.cat(list(candidates)).detach().requires_grad_(True)  # [sum b_i, n, d]
    loss = loss_fn(all_q, all_c)
    grad_q, grad_c = torch.autograd.grad(loss, [all_q, all_c], allow_unused=True)
    grad_q = torch.zeros_like(all_q) if grad_q is None else grad_q
    grad_c = torch.zeros_like(all_c) if grad_c is None else grad_c
    return loss.detach(), list(grad_q.split(sizes)), list(grad_c.split(sizes))


def surrogate_loss(
    outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float = 1.0
) -> torch.Tensor:
    """A scalar whose gradient with respect to each `outputs[k]` is `scale x grads[k]`.

    `sum_k <outputs[k], grads[k]>` with the grads treated as constants: the phase-2 "loss" for a
    driver that can only backpropagate a scalar (megatron-core's pipeline schedules). Those
    schedules divide the last stage's loss by the number of micro-batches; pass
    `scale=num_microbatches` there so the delivered gradient is exactly the cached one.

    Args:
        outputs: phase-2 embeddings (with autograd), any shapes.
        grads: the cached gradients, same shapes as `outputs`.
        scale: multiplier compensating a driver's own loss scaling.

    Raises:
        ValueError: when the lists or shapes differ.
    """
    if len(outputs) != len(grads):
        raise ValueError(f"{len(outputs)} outputs but {len(grads)} gradients")
    total = None
    for out, g in zip(outputs, grads):
        if out.shape != g.shape:
            raise ValueError(f"output {tuple(out.shape)} and gradient {tuple(g.shape)} differ")
        term = (out.to(g.dtype) * g.detach()).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("surrogate_loss needs at least one output")
    return total * scale


StepFunction = Callable[[int, Any], tuple[torch.Tensor, Callable | None]]
"""(index, micro-batch) -> (output, loss function of the output or None): one micro-batch's
forward, in megatron-core's `forward_step_func` shape (the loss function returns
`(loss, info dict)`)."""

Driver = Callable[[StepFunction, Sequence[Any], bool], list]
"""(step function, micro-batches, forward_only) -> what the last stage produced: runs the step
function over the micro-batches in order with megatron-core's schedule contract. Forward-only,
it returns the outputs; training, it backpropagates each micro-batch's loss divided by the
number of micro-batches and returns the loss functions' info dicts. `run_in_order` is the
driver of a model in one piece; the trainer's `ScheduleDriver` (training/step.py) runs
megatron-core's pipeline schedules."""


def run_in_order(
    step_fn: StepFunction,
    micro_batches: Sequence[Any],
    forward_only: bool,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> list:
    """The `Driver` of a model that is not split into pipeline stages.

    Args:
        no_sync: optional context-manager factory (e.g. DDP's `no_sync`), entered around every
            micro-batch's training forward/backward but the last, so that gradients are reduced
            across ranks once, after the last micro-batch.
    """
    out = []
    m = len(micro_batches)
    for i, mb in enumerate(micro_batches):
        quiet = no_sync is not None and not forward_only and i < m - 1
        with no_sync() if quiet else contextlib.nullcontext():
            output, loss_of = step_fn(i, mb)
            if forward_only or loss_of is None:
                out.append(output)
                continue
            loss, info = loss_of(output)
            (loss / m).backward()
            out.append(info)
    return out


@dataclass
class GradCacheResult:
    """What one `grad_cache_step` did."""

    loss: torch.Tensor | None
    """This rank's loss (detached) as `loss_fn` returned it; None off the last pipeline stage."""
    micro_batches: int
    replay_diff: torch.Tensor | None
    """Largest |phase-2 embedding - phase-1 embedding| over the micro-batches (a 0-dim tensor,
    left on the device: reading it is a host sync the training step does not do); None off the
    last stage. 0 when the forward replayed exactly; anything else means randomness or
    nondeterminism the RNG capture does not cover, and the gradients are those of slightly
    different embeddings."""

    @property
    def replay_max_diff(self) -> float:
        return 0.0 if self.replay_diff is None else float(self.replay_diff)


def grad_cache_step(
    forward: Callable[[int, Any], torch.Tensor],
    micro_batches: Sequence[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, LossInputs], torch.Tensor],
    loss_inputs: Callable[[Any], LossInputs],
    drive: Driver = run_in_order,
    last_stage: bool = True,
) -> GradCacheResult:
    """One GradCache forward/backward over this rank's micro-batches; gradients land where the
    driver's backward puts them (`.grad`, or DDP's buffers).

    Phase 1 runs `forward` on every micro-batch through `drive` forward-only, recording the
    generator states; the last stage computes `loss_fn` over all of this rank's embeddings, with
    the micro-batches' loss inputs concatenated (`LossInputs.cat`), and the loss's gradient with
    respect to each embedding; phase 2 replays every forward through `drive`
    training, the last stage's loss being `surrogate_loss` of the cached gradients (scaled by the
    micro-batch count, which the driver divides by).

    Args:
        forward: (index, micro-batch) -> rows [b_i + b_i * n, d]: its queries, then its
            candidates query by query (the last stage's output; other stages return their
            activations). Called twice per micro-batch, without then with autograd.
        micro_batches: this rank's micro-batches of the global batch, in order.
        loss_fn: (all queries [sum b_i, d], all candidates [sum b_i, n, d], their LossInputs)
            -> scalar loss (e.g. a `ContrastiveLoss`); it may gather across data-parallel ranks
            (every rank calls it).
        loss_inputs: micro-batch -> its `LossInputs` (b_i queries, n candidates per query:
            its `shape`).
        drive: runs a step function over the micro-batches (`Driver`).
        last_stage: whether this process holds the last pipeline stage (the embeddings).

    Returns:
        GradCacheResult.

    Raises:
        ValueError: when `micro_batches` is empty.
    """
    if not micro_batches:
        raise ValueError("grad_cache_step needs at least one micro-batch")
    m = len(micro_batches)
    rng = RngReplay()

    def embed(i, mb):
        rng.record(i)
        return forward(i, mb), None

    with torch.no_grad():
        cached = drive(embed, micro_batches, True)
    rng.end_recording()
    loss, grads, diff = None, [], None
    if last_stage:
        parts = [loss_inputs(mb) for mb in micro_batches]
        inputs = LossInputs.cat(parts)  # [sum b_i, n] / [sum b_i]
        queries, candidates = [], []
        for out, part in zip(cached, parts):
            b, n = part.shape
            queries.append(out[:b])  # [b, d]
            candidates.append(out[b:].reshape(b, n, -1))  # [b, n, d]
        loss, grad_q, grad_c = embedding_gradients(
            lambda q, c: loss_fn(q, c, inputs), queries, candidates
        )
        grads = [torch.cat([q, c.flatten(0, 1)]) for q, c in zip(grad_q, grad_c)]  # as `forward`
        del queries, candidates, inputs
        diff = torch.zeros((), dtype=torch.float32)

    def replay_loss(i, out):
        nonlocal diff
        with torch.no_grad():
            gap = (out - cached[i]).abs().amax().float() if out.numel() else diff
            diff = torch.maximum(diff.to(gap.device), gap)
        cached[i] = None  # the phase-1 copy is not needed once replayed
        return surrogate_loss([out], [grads[i]], scale=m), {}

    def replay(i, mb):
        rng.replay(i)
        return forward(i, mb), partial(replay_loss, i)

    drive(replay, micro_batches, False)
    rng.finish()
    return GradCacheResult(loss=loss, micro_batches=m, replay_diff=diff)
