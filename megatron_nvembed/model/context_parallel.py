"""Context parallelism (`--context-parallel-size`): each text split over the CP ranks.

Transformer Engine's context-parallel attention runs on packed THD tokens. Every text is padded
to a multiple of 2 x CP (x TP with sequence parallelism) and cut into 2 x CP equal chunks; CP rank
r holds chunks r and 2 x CP - 1 - r of every text. That is the layout megatron-core's
`get_thd_batch_on_this_cp_rank` and its RoPE for THD expect (with a causal mask it also balances
the attention work), computed here in plain torch (`cp_token_positions`) so that it needs
neither Transformer Engine nor a GPU.

After the last layer every CP rank gathers the whole sequence (`gather_context_parallel`), so the
pooling head and the loss see every token, as without context parallelism, and run identically on
each CP rank. Gradients then come out right under megatron-core's DDP, which averages over the
data x context parallel ranks: the head's parameters get the same full gradient on each CP rank
(the average is the gradient), while each rank's backbone computes the part of the gradient that
flows through its own tokens, so the gather's backward multiplies this rank's slice of the
(complete) gradient by CP and the average over CP ranks becomes the sum of the parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CPLayout:
    """Where the real tokens of a micro-batch's texts sit in the padded THD stream, and which of
    those positions this CP rank holds."""

    cu_seqlens_padded: torch.Tensor
    """[n + 1] int32 offsets of the padded texts."""
    max_len_padded: int
    """Longest padded text."""
    real: torch.Tensor
    """[t] int64 position of each real token (in THD order) in the padded stream."""
    ranks: list[torch.Tensor]
    """Per CP rank: [total / CP] int64 positions (in the padded stream) that the rank holds."""
    total: int
    """Tokens in the padded stream."""


def cp_token_positions(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in the padded THD stream that CP rank `cp_rank` holds: of every text (padded
    length a multiple of 2 x `cp_size`), chunks `cp_rank` and `2 x cp_size - 1 - cp_rank` of its
    2 x `cp_size` equal chunks, in that order, texts one after another.

    Raises:
        ValueError: a padded length that does not split into 2 x `cp_size` chunks.
    """
    bounds = cu_seqlens_padded.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if (end - start) % (2 * cp_size):
            raise ValueError(
                f"a text padded to {end - start} tokens does not split into 2 x "
                f"--context-parallel-size ({cp_size}) chunks"
            )
        chunk = (end - start) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(parts).to(cu_seqlens_padded.device)


def cp_layout(
    lengths: torch.Tensor, text: torch.Tensor, pos: torch.Tensor, cp_size: int, multiple: int
) -> CPLayout:
    """The padded THD layout of `lengths` texts for `cp_size` CP ranks.

    Args:
        lengths: [n] tokens per text.
        text, pos: [t] text of each real token and its position in the text (THD order).
        cp_size: context-parallel ranks.
        multiple: each text is padded to a multiple of this (2 x CP, x TP with sequence
            parallelism, so every rank's share splits evenly over its TP group).
    """
    padded = (lengths + multiple - 1) // multiple * multiple
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(padded, 0)
    real = cu[text].long() + pos.long()
    ranks = [cp_token_positions(cu, cp_size, r) for r in range(cp_size)]
    return CPLayout(cu, int(padded.max()), real, ranks, int(cu[-1]))


class _GatherContextParallel(torch.autograd.Function):
    """Forward: every CP rank's tokens placed into the whole padded stream. Backward: this rank's
    positions of the (complete) gradient, times `scale`."""

    @staticmethod
    def forward(ctx, local, positions, mine, total, group, scale):
        chunks = [torch.empty_like(local) for _ in positions]
        dist.all_gather(chunks, local.contiguous(), group=group)
        full = local.new_zeros((total, *local.shape[1:]))
        for where, chunk in zip(positions, chunks):
            full[where] = chunk
        ctx.mine, ctx.scale = mine, scale
        return full

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.mine] * ctx.scale, None, None, None, None, None


def gather_context_parallel(local: torch.Tensor, layout: CPLayout, group) -> torch.Tensor:
    """This CP rank's token states [total / CP, ...] -> the whole padded stream [total, ...],
    identical on every CP rank; the backward keeps this rank's positions of the gradient, times
    CP (see the module docstring)."""
    size, rank = group.size(), group.rank()
    return _GatherContextParallel.apply(
        local, layout.ranks, layout.ranks[rank], layout.total, group, float(size)
    )
