"""InfoNCE over each query's own candidates plus optional in-batch candidates from every DP rank.

Inputs per rank (b local queries, n = 1 + max hard negatives, d embedding width):
- `query` [b, d] and `candidates` [b, n, d], L2-normalised; `candidates[:, 0]` is the positive.
- `candidate_mask` [b, n] bool: False for absent hard negatives (ragged counts).
- `in_batch` [b] bool: this query's dataset (and stage) allows in-batch negatives.
- `candidate_ids` [b, n] int64: hashes of each candidate's token ids (false-negative rule).

Visibility rule. A query always scores its own valid candidates. A query with `in_batch` True
also scores every valid candidate of every *other* query in the global batch (gathered over the
data-parallel group) whose `in_batch` is also True, except candidates whose token ids equal its
own positive's (`mask_identical_positives`). A query with `in_batch` False sees only its own.
With `false_negative_margin = m`, any negative whose cosine score exceeds `m x` the query's
positive score is dropped too.

Reduction. Each rank returns the mean loss over its local queries. The gather's backward sums
the gradient every rank's loss sends to each embedding, and DDP averages parameter gradients over
the DP ranks, so with equal local batch sizes the parameter gradient is exactly that of the mean
loss over the global batch computed in one process (the DP=2 vs DP=1 test checks this).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_nvembed.loss.gather import all_gather_no_grad, all_gather_with_grad

# Masked logits are set to a large finite negative value rather than -inf, so that a row whose
# negatives are all masked still has a finite logsumexp (its loss is then exactly 0).
_MASKED = -1e9


@dataclass
class ContrastiveLossConfig:
    """Settings of the contrastive loss."""

    temperature: float = 0.02
    """Softmax temperature (`--temperature`)."""
    in_batch_negatives: bool = True
    """Stage switch: score other queries' candidates (stage 1) or not (stage 2). Each dataset's
    own switch (the `in_batch` input) is combined with it."""
    false_negative_margin: float | None = None
    """Drop negatives whose score exceeds this fraction of the positive's score (None: off)."""
    mask_identical_positives: bool = True
    """Drop in-batch candidates whose token ids equal the query's own positive."""

    def validate(self) -> ContrastiveLossConfig:
        """Raises ValueError naming the field."""
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        m = self.false_negative_margin
        if m is not None and not 0.0 < m <= 1.0:
            raise ValueError(f"false_negative_margin must be in (0, 1], got {m}")
        return self


@dataclass
class ContrastiveStats:
    """What one loss call scored; feeds the training log."""

    candidates_per_query_mean: float
    candidates_per_query_min: int
    candidates_per_query_max: int
    gathered_queries: int
    """Queries in the gathered batch (this rank's x DP ranks, or just this rank's)."""
    gather_bytes: int
    gather_seconds: float


def contrastive_loss(
    query: torch.Tensor,
    candidates: torch.Tensor,
    candidate_mask: torch.Tensor,
    *,
    temperature: float = 0.02,
    in_batch: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
    use_in_batch: bool = True,
    false_negative_margin: float | None = None,
    mask_identical_positives: bool = True,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, ContrastiveStats]:
    """Mean InfoNCE loss over this rank's queries (see the module docstring for the rules).

    Args:
        query: [b, d]. candidates: [b, n, d], position 0 the positive.
        candidate_mask: [b, n] bool, True for present candidates (position 0 must be True).
        temperature: logits are cosine scores / temperature.
        in_batch: [b] bool per-query switch (default all True).
        candidate_ids: [b, n] int64 token-id hashes (needed for `mask_identical_positives`).
        use_in_batch: stage switch; False skips the gather entirely. Must be equal on all ranks
            of `group` (it decides whether the collective runs).
        false_negative_margin: see ContrastiveLossConfig.
        mask_identical_positives: see ContrastiveLossConfig.
        group: data-parallel group for in-batch candidates; None = this process only.

    Returns:
        (loss scalar, ContrastiveStats).

    Raises:
        ValueError: on inconsistent shapes or a query without its positive.
    """
    b, n, d = candidates.shape
    if query.shape != (b, d) or candidate_mask.shape != (b, n):
        raise ValueError(
            f"shapes disagree: query {tuple(query.shape)}, candidates {tuple(candidates.shape)}, "
            f"candidate_mask {tuple(candidate_mask.shape)}"
        )
    candidate_mask = candidate_mask.bool()
    if not bool(candidate_mask[:, 0].all()):
        raise ValueError("every query needs its positive: candidate_mask[:, 0] must be True")
    if in_batch is None:
        in_batch = torch.ones(b, dtype=torch.bool, device=query.device)
    in_batch = in_batch.bool()

    own = torch.einsum("bd,bnd->bn", query, candidates)  # [b, n] cosine scores
    pos = own[:, :1].detach()  # [b, 1]
    own_keep = candidate_mask.clone()
    if false_negative_margin is not None:
        own_keep[:, 1:] &= own[:, 1:].detach() <= false_negative_margin * pos
    logits = [own]
    kept = [own_keep]

    gathered_queries, gather_bytes, gather_seconds = b, 0, 0.0
    if use_in_batch:
        start = time.perf_counter()
        flat = candidates.reshape(b * n, d)
        all_c, offset = all_gather_with_grad(flat, group)  # [B*n, d]
        all_mask = all_gather_no_grad(candidate_mask, group)  # [B, n]
        all_inb = all_gather_no_grad(in_batch, group)  # [B]
        if candidate_ids is not None:
            all_ids = all_gather_no_grad(candidate_ids.long(), group)  # [B, n]
        gather_seconds = time.perf_counter() - start
        gather_bytes = all_c.numel() * all_c.element_size()
        big_b = all_mask.shape[0]
        gathered_queries = big_b
        cross = query @ all_c.T  # [b, B*n]
        keep = (all_mask & all_inb[:, None]).reshape(1, big_b * n).expand(b, -1).clone()
        keep &= in_batch[:, None]
        own_rows = torch.arange(b, device=query.device) + offset // n  # global index of query i
        owner = torch.arange(big_b, device=query.device).repeat_interleave(n)  # [B*n]
        keep &= owner[None, :] != own_rows[:, None]  # own candidates are already scored
        if mask_identical_positives:
            if candidate_ids is None:
                raise ValueError("mask_identical_positives needs candidate_ids")
            keep &= all_ids.reshape(1, -1) != candidate_ids[:, :1].long()
        if false_negative_margin is not None:
            keep &= cross.detach() <= false_negative_margin * pos
        logits.append(cross)
        kept.append(keep)

    scores = torch.cat(logits, dim=1) / temperature  # [b, n (+ B*n)]
    scores = scores.masked_fill(~torch.cat(kept, dim=1), _MASKED)
    loss = (torch.logsumexp(scores, dim=1) - scores[:, 0]).mean()
    counts = torch.cat(kept, dim=1).sum(dim=1)  # candidates each query was scored against
    stats = ContrastiveStats(
        candidates_per_query_mean=float(counts.float().mean()),
        candidates_per_query_min=int(counts.min()),
        candidates_per_query_max=int(counts.max()),
        gathered_queries=gathered_queries,
        gather_bytes=gather_bytes,
        gather_seconds=gather_seconds,
    )
    return loss, stats


class ContrastiveLoss(nn.Module):
    """`contrastive_loss` with its settings and the data-parallel group bound at construction.

    Args:
        config: ContrastiveLossConfig (validated here).
        group: the data-parallel process group (never the world group once TP or PP > 1).
    """

    def __init__(self, config: ContrastiveLossConfig, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.config = config.validate()
        self.group = group
        self.last_stats: ContrastiveStats | None = None

    def forward(self, query, candidates, candidate_mask, in_batch=None, candidate_ids=None):
        """Returns the loss; the stats of the call are kept in `last_stats`."""
        c = self.config
        loss, self.last_stats = contrastive_loss(
            query,
            candidates,
            candidate_mask,
            temperature=c.temperature,
            in_batch=in_batch,
            candidate_ids=candidate_ids,
            use_in_batch=c.in_batch_negatives,
            false_negative_margin=c.false_negative_margin,
            mask_identical_positives=c.mask_identical_positives and candidate_ids is not None,
            group=self.group,
        )
        return loss


def sequence_hash(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Deterministic int64 hash of each row's real token ids (same on every process).

    Args: input_ids, attention_mask [m, s]. Returns [m] int64. A polynomial rolling hash with
    wrap-around int64 arithmetic; equal token sequences always hash equal.
    """
    ids = input_ids.long() * attention_mask.long()
    powers = torch.ones(ids.shape[1], dtype=torch.long)
    base = 1_000_003
    for i in range(1, ids.shape[1]):
        powers[i] = powers[i - 1] * base  # wraps around in int64, deterministically
    length = attention_mask.long().sum(dim=1)
    return (ids * powers.to(ids.device)).sum(dim=1) * 31 + length
