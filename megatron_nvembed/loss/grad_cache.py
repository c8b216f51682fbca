"""GradCache: in-batch negatives over the whole global batch at the memory of one micro-batch.

Phase 1 embeds every micro-batch without keeping activations, recording the random-generator
state before each one. The loss and its gradients with respect to *all* of this rank's embeddings
are then computed on the cached embeddings (the cross-rank gather happens here, so the in-batch
pool is the whole global batch). Phase 2 re-runs each micro-batch's forward with autograd under
the state it had in phase 1 (dropout masks replay exactly) and backpropagates the cached
embedding gradients. Parameter gradients equal those of the uncached computation; the price is
one extra forward per micro-batch.

The pieces are usable on their own, for drivers that own the forward loop (a pipeline schedule):
`RngReplay` records and replays generator states, `embedding_gradients` runs the loss on cached
embeddings, and `surrogate_loss` turns cached gradients into a scalar whose backward delivers
them, i.e. the "loss" to hand a pipeline schedule's last stage in phase 2. `grad_cache_step`
composes them for the plain (no pipeline) case. See docs/loss.md for the pipeline recipe.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RngSnapshot:
    """Generator states that dropout may draw from."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    tracker: dict[str, torch.Tensor] | None
    """megatron-core's tensor-parallel RNG tracker states (dropout inside TP regions)."""


def _megatron_tracker():
    # Only if megatron-core is already in use: never import it from the loss package.
    mod = sys.modules.get("megatron.core.tensor_parallel.random")
    if mod is None or getattr(mod, "_CUDA_RNG_STATE_TRACKER", None) is None:
        return None
    return mod.get_cuda_rng_tracker()


def capture_rng_state() -> RngSnapshot:
    """The current CPU, CUDA (if initialised) and megatron tracker (if in use) generator states."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    tracker = _megatron_tracker()
    states = None
    if tracker is not None:
        states = {k: v.clone() for k, v in tracker.get_states().items()}
    return RngSnapshot(cpu=torch.get_rng_state(), cuda=cuda, tracker=states)


def restore_rng_state(state: RngSnapshot) -> None:
    """Sets every generator captured in `state` back to it."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda)
    if state.tracker is not None:
        tracker = _megatron_tracker()
        if tracker is None:
            raise RuntimeError("megatron's RNG tracker was captured but is no longer available")
        tracker.set_states({k: v.clone() for k, v in state.tracker.items()})


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


@dataclass
class GradCacheResult:
    """What one `grad_cache_step` did."""

    loss: torch.Tensor
    """This rank's loss (detached), as `loss_fn` returned it."""
    micro_batches: int
    replay_max_diff: float
    """Largest |phase-2 embedding - phase-1 embedding|; 0.0 when the forward replayed exactly
    (anything else means randomness or nondeterminism the RNG capture does not cover, and the
    gradients are those of slightly different embeddings)."""
    embed_seconds: float
    """Phase 1 (forwards without autograd)."""
    loss_seconds: float
    """Loss and embedding gradients (includes the cross-rank gather)."""
    backward_seconds: float
    """Phase 2 (forwards with autograd + backward)."""


def grad_cache_step(
    encode_fn: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
    micro_batches: Sequence[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> GradCacheResult:
    """One GradCache forward/backward over this rank's micro-batches; gradients land in `.grad`.

    Args:
        encode_fn: micro-batch -> (query embeddings [b_i, d], candidate embeddings [b_i, n, d]).
            It is called twice per micro-batch (without, then with autograd).
        micro_batches: this rank's micro-batches of the global batch, in order.
        loss_fn: (all queries [sum b_i, d], all candidates [sum b_i, n, d]) -> scalar loss; it
            may gather across data-parallel ranks (pass the DP group to the loss).
        no_sync: optional context-manager factory (e.g. DDP's `model.no_sync`), entered around
            every micro-batch's phase-2 forward/backward but the last, so that gradients are
            reduced across ranks once, after the last micro-batch.

    Returns:
        GradCacheResult (loss, replay check, phase timings).

    Raises:
        ValueError: when `micro_batches` is empty.
    """
    if not micro_batches:
        raise ValueError("grad_cache_step needs at least one micro-batch")
    rng = RngReplay()
    t0 = time.perf_counter()
    queries, candidates = [], []
    with torch.no_grad():
        for i, mb in enumerate(micro_batches):
            rng.record(i)
            q, c = encode_fn(mb)
            queries.append(q)
            candidates.append(c)
    rng.end_recording()
    t1 = time.perf_counter()
    loss, grads_q, grads_c = embedding_gradients(loss_fn, queries, candidates)
    t2 = time.perf_counter()
    replay_diff = 0.0
    for i, mb in enumerate(micro_batches):
        rng.replay(i)
        last = i == len(micro_batches) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            q, c = encode_fn(mb)
            with torch.no_grad():
                replay_diff = max(
                    replay_diff,
                    float((q - queries[i]).abs().max()) if q.numel() else 0.0,
                    float((c - candidates[i]).abs().max()) if c.numel() else 0.0,
                )
            torch.autograd.backward([q, c], [grads_q[i].to(q.dtype), grads_c[i].to(c.dtype)])
        queries[i] = candidates[i] = None  # free the cached copy as soon as it is replayed
    rng.finish()
    t3 = time.perf_counter()
    return GradCacheResult(
        loss=loss,
        micro_batches=len(micro_batches),
        replay_max_diff=replay_diff,
        embed_seconds=t1 - t0,
        loss_seconds=t2 - t1,
        backward_seconds=t3 - t2,
    )
