"""Hashes that agree on every process: of token sequences (the collator gives each candidate one,
and the contrastive loss excludes candidates whose hash equals a query's own positive's) and of
document ids (the same exclusion by id).

Bottom layer: imports nothing of the package, so data/ and loss/ both use it without depending on
each other.
"""

from __future__ import annotations

import hashlib

import torch


def id_hash(document_id: str) -> int:
    """Deterministic non-zero int64 of a document id (0 is kept for "no id"); blake2b, so it does
    not depend on PYTHONHASHSEED. Different ids collide with probability about 2^-64 per pair."""
    value = int.from_bytes(
        hashlib.blake2b(document_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True
    )
    return value or 1


def sequence_hash(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Deterministic int64 hash of each row's real tokens, equal on every process and device.

    Padding (attention_mask 0) is ignored wherever it sits, so the same text padded to different
    widths hashes equal. Integer arithmetic only (wrapping int64), no Python `hash()`, so the
    value does not depend on PYTHONHASHSEED.

    Args:
        input_ids: [m, s] token ids.
        attention_mask: [m, s], 1 for real tokens.

    Returns:
        [m] int64. Equal token sequences hash equal; different ones collide with probability
        about 2^-64 per pair (a collision only hides one in-batch negative).

    Raises:
        ValueError: when the two inputs are not both [m, s].
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and attention_mask must both be [m, s], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    real = attention_mask.bool()
    # Position of each real token among the real tokens of its row (padding may sit anywhere).
    pos = torch.cumsum(real.long(), dim=1) - 1  # [m, s]
    x = _mix64(input_ids.long() * 0x9E3779B1 + pos * 0x85EBCA77 + 1)  # [m, s] per-token words
    x = torch.where(real, x, torch.zeros_like(x))
    length = real.long().sum(dim=1)  # [m]
    # A sum of position-keyed mixed words is order-sensitive (the position is inside the mix).
    return _mix64(x.sum(dim=1) ^ length)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """A SplitMix64-style finaliser on wrapping int64 (arithmetic shifts masked to logical)."""
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    x = x * -7723592293110705685  # 0x94D049BB133111EB as signed int64
    x = x ^ ((x >> 29) & 0x7FFFFFFFF)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as signed int64
    return x ^ ((x >> 32) & 0xFFFFFFFF)
