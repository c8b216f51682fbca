"""Sequence packing: several texts per row, so the backbone does not compute on padding.

`pack_batch` takes a right-padded tokenized batch (`input_ids` / `attention_mask` / `pool_mask`,
[n, s]) and places its n texts into rows of at most `pack_length` tokens by first-fit decreasing.
`segment_ids` [rows, L] numbers the texts of a row 1..k in order of position (0 = padding);
`NVEmbedModel.forward(..., segment_ids=...)` lets each text attend only to itself (THD layout
with `cu_seqlens` on the te / sdpa backends, a block-diagonal mask on local), restarts RoPE
positions at 0 for each text and returns one embedding per text in packed order: row-major by
(row, segment). `PackedBatch.restore` puts them back in the original order:

    packed = pack_batch(batch, pack_length=512)
    emb = model(**packed.model_inputs())[packed.restore]   # == model(**batch)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEYS = ("input_ids", "attention_mask", "pool_mask")


@dataclass
class PackedBatch:
    """Packed texts (shapes on the fields)."""

    input_ids: torch.Tensor
    """[rows, L] int64."""
    attention_mask: torch.Tensor
    """[rows, L] int64, 1 for real tokens (== segment_ids > 0)."""
    pool_mask: torch.Tensor
    """[rows, L] int64, the texts' pool masks, moved with their tokens."""
    segment_ids: torch.Tensor
    """[rows, L] int64: 0 = padding, 1..k = the k-th text of the row."""
    order: torch.Tensor
    """[n] int64: packed text j (row-major by (row, segment)) is original text order[j]."""
    restore: torch.Tensor
    """[n] int64: `packed_outputs[restore]` is in the original order (the inverse of `order`)."""
    lengths: torch.Tensor
    """[n] int64: real tokens of each original text."""
    padding_fraction_before: float
    """Padding share of the unpacked [n, s] batch."""
    padding_fraction_after: float
    """Padding share of the packed [rows, L] batch."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `NVEmbedModel.forward`."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pool_mask": self.pool_mask,
            "segment_ids": self.segment_ids,
        }

    def to(self, device) -> PackedBatch:
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return PackedBatch(
            **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        )


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to at most `capacity` (longest items placed first;
    ties in original order; each bin keeps its items in placement order)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


def pack_batch(
    batch: dict[str, torch.Tensor],
    pack_length: int,
    *,
    pad_to_multiple_of: int | None = 8,
    pad_id: int | None = None,
) -> PackedBatch:
    """Packs a right-padded batch into rows of at most `pack_length` tokens (first-fit
    decreasing).

    Args:
        batch: `input_ids`, `attention_mask` and optionally `pool_mask` (default: the attention
            mask), each [n, s], right-padded.
        pack_length: the most tokens per packed row.
        pad_to_multiple_of: round the packed width (the fullest row) up to this, capped at
            `pack_length` (None: the fullest row exactly).
        pad_id: token id for padding (default: the batch's own padding id, else 0).

    Returns:
        A `PackedBatch`.

    Raises:
        ValueError: a text longer than `pack_length` (named by index), an empty text, a batch
            that is not right-padded, or bad arguments.
    """
    if pack_length < 1:
        raise ValueError(f"pack_length must be >= 1, got {pack_length}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pool = batch.get("pool_mask")
    if pool is None:
        pool = mask
    if ids.dim() != 2 or ids.shape != mask.shape or ids.shape != pool.shape:
        raise ValueError(
            "pack_batch: input_ids, attention_mask and pool_mask must all be [n, s], got "
            f"{tuple(ids.shape)}, {tuple(mask.shape)}, {tuple(pool.shape)}"
        )
    n, s = ids.shape
    if n == 0:
        raise ValueError("pack_batch: no texts")
    real = mask.bool()
    lengths = real.long().sum(dim=1)  # [n]
    positions = torch.arange(s, device=mask.device)
    if not torch.equal(real, positions[None, :] < lengths[:, None]):
        raise ValueError("pack_batch: the batch must be right-padded (attention mask 1...1 0...0)")
    lens = lengths.tolist()
    for i, length in enumerate(lens):
        if length == 0:
            raise ValueError(f"pack_batch: text {i} is empty (no real tokens)")
        if length > pack_length:
            raise ValueError(
                f"pack_batch: text {i} has {length} tokens, more than pack_length={pack_length} "
                "(raise --seq-length or truncate the texts)"
            )
    if pad_id is None:
        padded = ~real
        pad_id = int(ids[padded][0]) if bool(padded.any()) else 0

    bins = first_fit_decreasing(lens, pack_length)
    width = max(sum(lens[i] for i in b) for b in bins)
    if pad_to_multiple_of:
        width = min(-(-width // pad_to_multiple_of) * pad_to_multiple_of, pack_length)
    rows = len(bins)
    out_ids = ids.new_full((rows, width), pad_id)
    out_mask = mask.new_zeros((rows, width))
    out_pool = pool.new_zeros((rows, width))
    seg = torch.zeros((rows, width), dtype=torch.long, device=ids.device)
    order = []
    for r, items in enumerate(bins):
        start = 0
        for k, i in enumerate(items, start=1):
            end = start + lens[i]
            out_ids[r, start:end] = ids[i, : lens[i]]
            out_mask[r, start:end] = 1
            out_pool[r, start:end] = pool[i, : lens[i]]
            seg[r, start:end] = k
            order.append(i)
            start = end
    order_t = torch.tensor(order, dtype=torch.long, device=ids.device)
    restore = torch.empty_like(order_t)
    restore[order_t] = torch.arange(n, dtype=torch.long, device=ids.device)
    total = float(sum(lens))
    return PackedBatch(
        input_ids=out_ids,
        attention_mask=out_mask,
        pool_mask=out_pool,
        segment_ids=seg,
        order=order_t,
        restore=restore,
        lengths=lengths,
        padding_fraction_before=1.0 - total / (n * s),
        padding_fraction_after=1.0 - total / (rows * width),
    )


def unpack_batch(packed: PackedBatch) -> dict[str, torch.Tensor]:
    """The original right-padded batch (width = the longest text), in the original order."""
    n = packed.order.numel()
    lens = packed.lengths.tolist()
    width = max(lens)
    ids = packed.input_ids.new_zeros((n, width))
    mask = packed.attention_mask.new_zeros((n, width))
    pool = packed.pool_mask.new_zeros((n, width))
    j = 0
    for r in range(packed.segment_ids.shape[0]):
        row = packed.segment_ids[r]
        for k in range(1, int(row.max()) + 1):
            where = (row == k).nonzero().flatten()
            i = int(packed.order[j])
            ids[i, : where.numel()] = packed.input_ids[r, where]
            mask[i, : where.numel()] = 1
            pool[i, : where.numel()] = packed.pool_mask[r, where]
            j += 1
    return {"input_ids": ids, "attention_mask": mask, "pool_mask": pool}
