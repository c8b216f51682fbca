"""Gathering embeddings across a process group with exact gradients.

`all_gather_with_grad(x, group)` concatenates every rank's rows in rank order *within that
group*; its backward sums the gradient that every rank's loss sends to each row (an all-reduce
over the group) and returns each rank the slice of the rows it produced. A rank's embeddings
therefore receive the gradient of the *sum of all ranks' losses*, exactly as if the whole batch
had been computed in one process. Nothing is detached.

The group must be the data-parallel group: under tensor or pipeline parallelism the world group
also contains ranks that hold copies of the same data (tensor-parallel peers) or no embeddings at
all (earlier pipeline stages).

Ranks may hold different numbers of rows: the row counts are gathered first and every rank pads
to the largest (collectives need equal shapes); the padding never reaches the result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in `group`; 1 for None or when torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def gather_row_counts(rows: int, group: dist.ProcessGroup, device: torch.device) -> list[int]:
    """Every rank's row count, in rank order within `group` (one small all_gather).

    A caller gathering several tensors whose row counts are proportional (e.g. b queries and
    b x n candidates) exchanges the counts once and passes them as `sizes` to the gathers below.

    Args:
        rows: this rank's row count.
        group: the process group (at least two ranks; callers check `group_size` first).
        device: where the collective runs (the device of the tensors to gather).

    Returns:
        [n_0, n_1, ...] with one entry per rank of `group`.
    """
    n = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    return [int(s.item()) for s in sizes]


def _padded_all_gather(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    width = max(sizes)
    padded = x
    if x.shape[0] < width:  # all_gather needs equal shapes
        padded = torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int], rank: int):
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        return _padded_all_gather(x, group, sizes)  # [sum sizes, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss may depend on every gathered row: the gradient a row receives is the
        # sum over ranks. Only the producing rank keeps its slice.
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd owns `grad`
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def all_gather_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None, *, sizes: list[int] | None = None
) -> tuple[torch.Tensor, int]:
    """Concatenates `x` from every rank of `group` along dim 0, differentiably.

    Args:
        x: [n_r, ...] this rank's rows (n_r may differ between ranks; trailing dims may not).
        group: the data-parallel group; None, or a group of one rank, is the identity.
        sizes: every rank's row count (`gather_row_counts`), when the caller already has them;
            None gathers them here.

    Returns:
        (gathered [sum_r n_r, ...] in rank order within `group`, offset of this rank's rows in it).
        Backward: this rank's `x` receives the sum over all ranks of the gradient sent to its rows.
    """
    if group_size(group) == 1:
        return x, 0
    rank = dist.get_rank(group)  # rank *within* the group: it orders the concatenation
    if sizes is None:
        sizes = gather_row_counts(x.shape[0], group, x.device)
    out = _AllGatherWithGrad.apply(x, group, sizes, rank)
    return out, sum(sizes[:rank])


def all_gather_no_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None, *, sizes: list[int] | None = None
) -> torch.Tensor:
    """Concatenation of `x` over `group` (rank order), for tensors that need no gradient.

    Booleans travel as uint8 (gloo has no boolean collectives). Rows may differ between ranks;
    `sizes` as in `all_gather_with_grad`.
    """
    if group_size(group) == 1:
        return x
    with torch.no_grad():
        if sizes is None:
            sizes = gather_row_counts(x.shape[0], group, x.device)
        if x.dtype == torch.bool:
            return _padded_all_gather(x.to(torch.uint8), group, sizes).bool()
        return _padded_all_gather(x, group, sizes)
