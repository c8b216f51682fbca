"""The in-batch pool: every rank's candidates (and queries), gathered over the data-parallel group.

`gather_pool` is the loss's one cross-rank step. With the stage switch off
(`ContrastiveLossConfig.in_batch_negatives` False) there is no pool and no collective runs.
Otherwise the candidate embeddings are gathered with exact gradients (`gather.py`), the queries
too when the query-query term is on, and the loss inputs the exclusion masks compare (mask,
dataset switch, text and document hashes) travel together as one int64 tensor: one more
collective. Without a group (or a group of one rank) the pool is this rank's own batch.

Shapes: b local queries, B queries in the pool (all ranks), n candidates per query, d width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_nvembed.core.loss_inputs import LossInputs
from megatron_nvembed.loss.config import ContrastiveLossConfig
from megatron_nvembed.loss.gather import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_row_counts,
    group_size,
)


@dataclass
class GatheredPool:
    """The candidates every query with in-batch negatives may score, in rank order."""

    candidates: torch.Tensor
    """[B*n, d] every rank's candidates, query by query (differentiable: the gather's backward
    returns each rank the gradient sent to its rows)."""
    queries: torch.Tensor | None
    """[B, d] every rank's queries, differentiably; None without the query-query term."""
    inputs: LossInputs
    """Every rank's loss inputs: candidate_mask [B, n] bool, in_batch [B] bool, candidate_ids
    [B, n], query_ids [B], document_ids [B, n] (int64; ids 0 where the rank had none)."""
    first: int
    """Index in the pool of this rank's first query."""
    world: int
    """Ranks the pool was gathered over (1: this rank's batch only, no collective)."""
    gather_bytes: int = 0
    """Bytes the gathers returned on this rank (0 without a collective)."""
    timings: list = field(default_factory=list)
    """The gather's duration: seconds (host clock) or a pair of CUDA events (read later)."""

    @property
    def size(self) -> int:
        """B, the queries whose candidates form the pool."""
        return self.inputs.candidate_mask.shape[0]


def gather_pool(
    query: torch.Tensor,
    candidates: torch.Tensor,
    inputs: LossInputs,
    config: ContrastiveLossConfig,
    group: dist.ProcessGroup | None,
) -> GatheredPool | None:
    """The in-batch pool of this call, or None when in-batch negatives are off for the stage.

    Args:
        query: [b, d] this rank's queries.
        candidates: [b, n, d] this rank's candidates.
        inputs: this rank's loss inputs with in_batch and document_ids present (the loss fills
            the absent ones in).
        config: reads `in_batch_negatives` (pool or not) and `query_query` (gather the queries).
        group: the data-parallel group (None: this process only). Every rank of it must call
            with the same n, d, dtype and settings.

    Returns:
        GatheredPool, or None.
    """
    if not config.in_batch_negatives:
        return None
    b, n, d = candidates.shape
    device = query.device
    start = _clock(device)
    zeros = lambda t: torch.zeros_like(t, dtype=torch.long)  # noqa: E731
    ids = inputs.candidate_ids if inputs.candidate_ids is not None else zeros(inputs.candidate_mask)
    qids = inputs.query_ids if inputs.query_ids is not None else zeros(inputs.in_batch)
    # Masks, switches and hashes travel together as one int64 tensor: one collective.
    meta = torch.cat(
        [
            inputs.candidate_mask.long(),
            inputs.in_batch.long()[:, None],
            ids.long(),
            qids.long()[:, None],
            inputs.document_ids,
        ],
        dim=1,
    )  # [b, 3n + 2]
    flat = candidates.reshape(b * n, d)  # [b*n, d]
    world = group_size(group)
    q_all = None
    if world > 1:
        sizes = gather_row_counts(b, group, device)  # queries per rank: one exchange for all
        all_meta = all_gather_no_grad(meta, group, sizes=sizes)  # [B, 3n + 2]
        c_all, offset = all_gather_with_grad(flat, group, sizes=[s * n for s in sizes])
        if config.query_query:
            q_all, _ = all_gather_with_grad(query, group, sizes=sizes)  # [B, d]
        first = offset // n  # pool index of this rank's first query; c_all is [B*n, d]
        timings = [_elapsed(start, device)]
        gather_bytes = sum(
            t.numel() * t.element_size() for t in (c_all, all_meta, q_all) if t is not None
        )
    else:
        all_meta, c_all, first, timings, gather_bytes = meta, flat, 0, [], 0
        q_all = query if config.query_query else None
    gathered = LossInputs(
        candidate_mask=all_meta[:, :n].bool(),
        in_batch=all_meta[:, n].bool(),
        candidate_ids=all_meta[:, n + 1 : 2 * n + 1],
        query_ids=all_meta[:, 2 * n + 1],
        document_ids=all_meta[:, 2 * n + 2 :],
    )
    return GatheredPool(c_all, q_all, gathered, first, world, gather_bytes, timings)


def _clock(device: torch.device):
    """A start mark: a recorded CUDA event on CUDA (no synchronisation), else the host clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(start, device: torch.device):
    """Seconds since `start` (host clock), or the (start, end) CUDA event pair read later."""
    if device.type == "cuda":
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return (start, end)
    return time.perf_counter() - start
