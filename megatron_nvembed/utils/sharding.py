"""Tensor-parallel layouts: full tensors <-> one TP rank's shard, by transform kind.

| kind         | per TP rank r of t                                                         |
|--------------|----------------------------------------------------------------------------|
| `replicated` | the same tensor on every rank (norms, latents, row-parallel biases)        |
| `column`     | rows r*n/t .. (r+1)*n/t (column-parallel weight or bias)                   |
| `row`        | columns r*n/t .. (r+1)*n/t (row-parallel weight)                           |
| `vocab`      | vocabulary rows, zero-padded to the allocated row count, split over t      |
| `qkv`        | q, k, v interleaved per query group ([q heads of group g ; k_g ; v_g]),    |
|              | then groups split over ranks                                               |
| `pair`       | two stacked halves split separately: [first_r ; second_r]                  |
|              | (SwiGLU gate/up, the head's K/V, GEGLU value/gate)                         |

The model uses these to initialise its fused layers the same way at every TP size, the HF weight
map (`conversion.hf_mapping`) to convert whole checkpoints, and the PEFT export to split fused
adapters. Bottom layer: imports nothing of the package.
"""

from __future__ import annotations

import torch

# Transformer Engine fuses the pre-attention norm into `linear_qkv`; its weight carries this name.
_TE_FUSED_NORM_SUFFIX = "linear_qkv.layer_norm_weight"


def interleave_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int
) -> torch.Tensor:
    """[q; k; v] rows -> megatron-core's per-query-group layout [q_g heads ; k_g ; v_g] for g.

    Args:
        q: [num_heads * dh, ...] query rows; k, v: [num_groups * dh, ...].
        num_heads, num_groups: attention heads and query groups (GQA).

    Returns:
        [(num_heads + 2 * num_groups) * dh, ...].
    """
    h = q.shape[1:]
    dh = q.shape[0] // num_heads
    qg = q.reshape(num_groups, (num_heads // num_groups) * dh, *h)
    kg = k.reshape(num_groups, dh, *h)
    vg = v.reshape(num_groups, dh, *h)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *h)


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `interleave_qkv`: (q, k, v) rows from the per-query-group layout."""
    h = qkv.shape[1:]
    per_group = qkv.shape[0] // num_groups
    heads_per_group = num_heads // num_groups
    dh = per_group // (heads_per_group + 2)
    g = qkv.reshape(num_groups, per_group, *h)
    q, k, v = torch.split(g, [heads_per_group * dh, dh, dh], dim=1)
    return q.reshape(-1, *h), k.reshape(-1, *h), v.reshape(-1, *h)


def shard(kind: str, tensors: list[torch.Tensor], rank: int, size: int, **kw) -> torch.Tensor:
    """The TP shard of rank `rank` of `size` for a parameter of transform `kind`.

    Args:
        kind: one of the kinds in the module docstring.
        tensors: the full tensors, in HF order (q, k, v for `qkv`; first, second or one stacked
            tensor for `pair`).
        rank, size: the TP rank and TP size.
        **kw: `num_heads`, `num_groups` for `qkv`; `vocab_rows` (the allocated, padded row
            count, `config.padded_vocab_size`) for `vocab`.

    Returns:
        This rank's shard (a view where possible; callers clone before loading).

    Raises:
        ValueError: an unknown kind, or a vocabulary larger than `vocab_rows`.
    """
    if kind == "replicated":
        return tensors[0]
    if kind == "column":
        return tensors[0].chunk(size, dim=0)[rank]
    if kind == "row":
        return tensors[0].chunk(size, dim=1)[rank]
    if kind == "vocab":
        full, rows = tensors[0], kw["vocab_rows"]
        if full.shape[0] > rows:
            raise ValueError(f"vocabulary of {full.shape[0]} rows exceeds the {rows} allocated")
        if rows != full.shape[0]:
            pad = full.new_zeros(rows - full.shape[0], *full.shape[1:])
            full = torch.cat([full, pad], dim=0)
        return full.chunk(size, dim=0)[rank]
    if kind == "qkv":
        qkv = interleave_qkv(*tensors, kw["num_heads"], kw["num_groups"])
        return qkv.chunk(size, dim=0)[rank]
    if kind == "pair":
        if len(tensors) == 1:  # one stacked tensor [first ; second]
            tensors = list(tensors[0].chunk(2, dim=0))
        first, second = tensors
        return torch.cat([first.chunk(size, dim=0)[rank], second.chunk(size, dim=0)[rank]], dim=0)
    raise ValueError(f"unknown transform kind {kind!r}")


def unshard(kind: str, shards: list[torch.Tensor], n_hf: int, **kw) -> list[torch.Tensor]:
    """Full tensors from all TP shards (in rank order): the inverse of `shard`.

    Args:
        kind: the transform kind.
        shards: every rank's shard, in rank order.
        n_hf: how many full tensors to return (2 for a `pair` kept as two halves, 1 stacked).
        **kw: `num_heads`, `num_groups` for `qkv`; `vocab_size` (rows to keep) for `vocab`.

    Returns:
        The full tensors, as many as `shard` took (`qkv`: q, k, v).

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "replicated":
        return [shards[0]]
    if kind == "column":
        return [torch.cat(shards, dim=0)]
    if kind == "row":
        return [torch.cat(shards, dim=1)]
    if kind == "vocab":
        return [torch.cat(shards, dim=0)[: kw["vocab_size"]]]
    if kind == "qkv":
        return list(split_qkv(torch.cat(shards, dim=0), kw["num_heads"], kw["num_groups"]))
    if kind == "pair":
        halves = [s.chunk(2, dim=0) for s in shards]
        first = torch.cat([h[0] for h in halves], dim=0)
        second = torch.cat([h[1] for h in halves], dim=0)
        return [first, second] if n_hf == 2 else [torch.cat([first, second], dim=0)]
    raise ValueError(f"unknown transform kind {kind!r}")


def uses_te_names(model: torch.nn.Module) -> bool:
    """True when `model` has Transformer Engine parameter names (norms fused into the linears)."""
    return any(n.endswith(_TE_FUSED_NORM_SUFFIX) for n, _ in model.named_parameters())
