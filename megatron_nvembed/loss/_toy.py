"""A tiny trainable text encoder and synthetic contrastive batches, for the loss tests.

Pure torch (no megatron-core), float64, so that equivalence tests can use tight tolerances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_nvembed.core.loss_inputs import LossInputs
from megatron_nvembed.utils.hashing import sequence_hash


class ToyEncoder(nn.Module):
    """Token embedding + dropout + masked mean + linear + L2 norm: ids [m, s], mask -> [m, d]."""

    def __init__(self, vocab: int = 50, width: int = 16, dim: int = 8, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, width, dtype=torch.float64)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(width, dim, dtype=torch.float64)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(torch.float64).unsqueeze(-1)  # [m, s, 1]
        h = (self.drop(self.emb(ids)) * m).sum(1) / m.sum(1).clamp(min=1)  # [m, width]
        return F.normalize(self.proj(h), dim=-1)  # [m, d]


def toy_batch(
    b: int, n: int, seed: int, vocab: int = 50, s: int = 6, document_ids: bool = False
) -> dict[str, torch.Tensor]:
    """b queries with n candidates each (positive + n-1 negatives, every third row one short).

    Query b-1's positive repeats query 1's (so identical-positive masking has work to do across a
    rank boundary when the batch is split in halves), and query 2's dataset has in-batch
    negatives off. With `document_ids` (b >= 8): "document_ids" [b, n], distinct except that query
    b-2's hard negative 1 is query 0's positive's document and queries 3 and 5 have positives of
    one document (both across the halves' boundary), and query 4's texts have none (0).
    """
    g = torch.Generator().manual_seed(seed)
    q_ids = torch.randint(0, vocab, (b, s), generator=g)
    c_ids = torch.randint(0, vocab, (b, n, s), generator=g)
    c_ids[b - 1, 0] = c_ids[1, 0]
    c_tok = torch.ones(b, n, s, dtype=torch.long)
    c_tok[:, :, -1] = torch.randint(0, 2, (b, n), generator=g)  # some padded rows
    c_tok[b - 1, 0] = c_tok[1, 0]
    c_mask = torch.ones(b, n, dtype=torch.bool)
    c_mask[::3, -1] = False  # ragged hard-negative counts
    in_batch = torch.ones(b, dtype=torch.bool)
    in_batch[2] = False
    hashes = sequence_hash(c_ids.reshape(b * n, s), c_tok.reshape(b * n, s)).view(b, n)
    teacher = torch.randn(b, n, generator=g, dtype=torch.float64) * 4  # a reranker's logits
    teacher[~c_mask] = float("nan")
    teacher[b // 2] = float("nan")  # one query without teacher scores
    out = {
        "q_ids": q_ids,
        "q_tok": torch.ones(b, s, dtype=torch.long),
        "c_ids": c_ids,
        "c_tok": c_tok,
        "candidate_mask": c_mask,
        "in_batch": in_batch,
        "candidate_ids": hashes,
        "query_ids": sequence_hash(q_ids, torch.ones_like(q_ids)),
        "teacher_scores": teacher,
    }
    if document_ids:
        ids = torch.arange(1, b * n + 1, dtype=torch.long).view(b, n) * 104729
        ids[b - 2, 1] = ids[0, 0]
        ids[5, 0] = ids[3, 0]
        ids[4] = 0
        out["document_ids"] = ids
    return out


def encode(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries [b, d], candidates [b, n, d]) of a toy batch."""
    b, n, s = batch["c_ids"].shape
    q = model(batch["q_ids"], batch["q_tok"])
    c = model(batch["c_ids"].reshape(b * n, s), batch["c_tok"].reshape(b * n, s))
    return q, c.view(b, n, -1)


def slice_batch(batch: dict, start: int, end: int) -> dict:
    """Rows start..end of every tensor in a toy batch."""
    return {k: v[start:end] for k, v in batch.items()}


def loss_inputs(batch: dict) -> LossInputs:
    """The `LossInputs` of a toy batch (or of a slice of one): its loss keys, those it lacks
    or holds as None absent."""
    return LossInputs(
        candidate_mask=batch["candidate_mask"],
        **{
            k: batch.get(k)
            for k in ("in_batch", "candidate_ids", "query_ids", "teacher_scores", "document_ids")
        },
    )
