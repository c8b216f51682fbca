"""Gathering embeddings across a process group with exact gradients.

`all_gather_with_grad(x, group)` concatenates every rank's rows (in rank order *within that
group*); its backward sums the gradient that every rank's loss sends to each row and returns
each rank the slice of the rows it produced. So a rank's embeddings receive the gradient of
the sum of all ranks' losses, exactly as if the whole batch had been computed in one process.
The group must be the data-parallel group: under tensor or pipeline parallelism the world group
also contains ranks that hold copies of the same data.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int], rank: int):
        width = max(sizes)
        padded = x
        if x.shape[0] < width:  # all_gather needs equal shapes
            padded = torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def all_gather_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, int]:
    """Concatenates `x` from every rank of `group` along dim 0, differentiably.

    Args:
        x: [n_r, ...] this rank's rows (n_r may differ between ranks).
        group: the data-parallel group; None, or a group of one rank, is the identity.

    Returns:
        (gathered [sum n_r, ...], offset of this rank's rows in it).
    """
    if _group_size(group) == 1:
        return x, 0
    rank = dist.get_rank(group)
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    out = _AllGatherWithGrad.apply(x, group, sizes, rank)
    return out, sum(sizes[:rank])


def all_gather_no_grad(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`all_gather_with_grad` for tensors that need no gradient (masks, ids, flags)."""
    if _group_size(group) == 1:
        return x
    with torch.no_grad():
        if x.dtype == torch.bool:  # gloo has no boolean collectives
            return all_gather_with_grad(x.to(torch.uint8), group)[0].bool()
        return all_gather_with_grad(x, group)[0]
