"""Matryoshka representation learning: the loss at several prefix widths of one embedding.

With dimensions (k_1, ..., k_m) and weights (w_1, ..., w_m) the training loss is

    L = sum_j w_j * L_contrastive(prefix_{k_j}(q), prefix_{k_j}(c))

where `prefix_k(x) = x[..., :k] / ||x[..., :k]||` is the first k coordinates of an embedding,
L2-normalised again, so each term scores cosine similarities of the truncated embeddings. Every
term sees the same candidates and masks (the visibility rule of `contrastive.py`); the
score-dependent false-negative margin is applied per term, on that term's scores. After
training, `prefix_k` of the full embedding is the k-dimensional embedding (the encoder's
`--truncate-dim`, `SentenceTransformer(..., truncate_dim=k)` on an export).

Truncating commutes with gathering rows across ranks, so the loss gathers the full embeddings
once and takes the prefixes of the gathered tensor: one collective however many widths.

The settings (`Matryoshka`: widths and weights, validated) are defined in `config.py`, so the
training flags are checked without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from megatron_nvembed.core.config import (
    Matryoshka,  # re-exported: the settings live with the configs
)


def prefix(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The first `dim` coordinates of the embeddings in `x` [..., d], L2-normalised again
    (None: `x` unchanged, already normalised by the pooling head)."""
    if dim is None:
        return x
    return F.normalize(x[..., :dim], dim=-1)


def terms(matryoshka: Matryoshka | None) -> Sequence[tuple[int | None, float]]:
    """The (width, weight) terms of a loss: the full embedding once (width None) without
    Matryoshka."""
    return [(None, 1.0)] if matryoshka is None else matryoshka.terms()
