"""GradCache: in-batch negatives over the whole global batch at the memory of one micro-batch.

Phase 1 embeds every micro-batch without keeping activations. The loss and its gradients with
respect to *all* embeddings are then computed on the cached embeddings (the cross-rank gather
happens here). Phase 2 re-runs each micro-batch's forward with autograd, under the random state
it had in phase 1 (so dropout masks replay exactly), and backpropagates the cached embedding
gradients. The parameter gradients equal those of the uncached computation; the price is one
extra forward per micro-batch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    # Megatron-core keeps tensor-parallel dropout streams in its own tracker; capture them only
    # if megatron-core is in use (never import it from here).
    random_mod = sys.modules.get("megatron.core.tensor_parallel.random")
    if random_mod is not None and getattr(random_mod, "_CUDA_RNG_STATE_TRACKER", None) is not None:
        tracker = random_mod.get_cuda_rng_tracker()
        state["tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        tracker = sys.modules["megatron.core.tensor_parallel.random"].get_cuda_rng_tracker()
        tracker.set_states({k: v.clone() for k, v in state["tracker"].items()})


def grad_cache_step(
    encode_fn: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
    micro_batches: Sequence[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """One GradCache forward/backward over `micro_batches`; gradients land in `.grad`.

    Args:
        encode_fn: micro-batch -> (query embeddings [b_i, d], candidate embeddings [b_i, n, d]).
        micro_batches: this rank's micro-batches of the global batch, in order.
        loss_fn: (all queries [sum b_i, d], all candidates [sum b_i, n, d]) -> scalar loss; it
            may gather across data-parallel ranks.
        no_sync: optional context-manager factory (DDP's `no_sync`) entered for every
            micro-batch's backward but the last, so gradients are reduced once.

    Returns:
        The loss (detached).
    """
    states, queries, candidates = [], [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_rng_state())
            q, c = encode_fn(mb)
            queries.append(q)
            candidates.append(c)
    after_phase1 = _rng_state()
    all_q = torch.cat(queries).requires_grad_(True)
    all_c = torch.cat(candidates).requires_grad_(True)
    loss = loss_fn(all_q, all_c)
    loss.backward()
    grad_q, grad_c = all_q.grad, all_c.grad
    start = 0
    for i, mb in enumerate(micro_batches):
        _set_rng_state(states[i])
        last = i == len(micro_batches) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            q, c = encode_fn(mb)
            end = start + q.shape[0]
            torch.autograd.backward([q, c], [grad_q[start:end], grad_c[start:end]])
        start = end
    # Leave the generators where the uncached computation would have left them.
    _set_rng_state(after_phase1)
    return loss.detach()
