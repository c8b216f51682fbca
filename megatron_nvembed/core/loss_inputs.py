"""The contrastive loss's per-batch inputs besides the embeddings, as one object: `LossInputs`.

Collation builds it once per micro-batch (`data.collate.collate`); the training step carries it
whole in its `ModelBatch`, moves it to the device whole (`to`), and GradCache concatenates the
micro-batches' inputs whole (`cat`) for the loss over a rank's share of the global batch; the
loss (`loss.contrastive_loss`) reads it. It sits at the base of the package so that the data
pipeline, which builds it, and the loss, which reads it, share the type without importing each
other.

Shapes: b queries, n = 1 + K candidates per query (position 0 the positive).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class LossInputs:
    """What the loss needs of a batch besides its embeddings (shapes on the fields).

    Only `candidate_mask` is required; an absent field means what its docstring says (the
    collator fills every field).
    """

    candidate_mask: torch.Tensor
    """[b, n] bool: True for present candidates, False for absent hard negatives (ragged
    counts); column 0, the positive, must be all True."""
    in_batch: torch.Tensor | None = None
    """[b] bool: the query's dataset allows in-batch negatives (None: every query's does). The
    stage switch is the loss config's `in_batch_negatives`; a query meets another query's
    candidates when both say so."""
    candidate_ids: torch.Tensor | None = None
    """[b, n] int64: `hashing.sequence_hash` of each candidate's token ids (identical-text
    masking; required by it once in-batch negatives are on)."""
    query_ids: torch.Tensor | None = None
    """[b] int64: the same hash of each query's token ids, instruction included (the
    query-query term's identical-text masking)."""
    teacher_scores: torch.Tensor | None = None
    """[b, n] float: a teacher's score of each candidate, NaN where none (the distillation
    term)."""
    document_ids: torch.Tensor | None = None
    """[b, n] int64: `hashing.id_hash` of each candidate's document id, 0 where it has none
    (duplicate masking by id; None: no text has one)."""

    @property
    def shape(self) -> tuple[int, int]:
        """(b queries, n candidates per query)."""
        b, n = self.candidate_mask.shape
        return b, n

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Every field by name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device, non_blocking: bool = False) -> LossInputs:
        """The same inputs on `device` (one copy of every present tensor)."""
        return replace(
            self,
            **{
                k: None if v is None else v.to(device, non_blocking=non_blocking)
                for k, v in self.tensors().items()
            },
        )

    @classmethod
    def cat(cls, parts: Sequence[LossInputs]) -> LossInputs:
        """The inputs of several micro-batches as one batch: every field concatenated along the
        query dimension, in order (GradCache's loss over all of a rank's micro-batches).

        Raises:
            ValueError: no parts, or a field present in some parts and absent in others.
        """
        if not parts:
            raise ValueError("LossInputs.cat needs at least one part")
        out = {}
        for name in parts[0].tensors():
            values = [getattr(p, name) for p in parts]
            present = [v is not None for v in values]
            if any(present) and not all(present):
                raise ValueError(f"LossInputs.cat: {name} is given for some parts only")
            out[name] = torch.cat(values) if all(present) else None
        return cls(**out)

    def check(self, b: int, n: int) -> None:
        """Checks every present field's shape against b queries with n candidates each.

        Raises:
            ValueError: naming the first field whose shape differs.
        """
        for name, value in self.tensors().items():
            if value is None:
                continue
            per_query = name in ("in_batch", "query_ids")
            want, label = ((b,), "[b]") if per_query else ((b, n), "[b, n]")
            if tuple(value.shape) != want:
                raise ValueError(f"{name} must be {label} = {want}, got {tuple(value.shape)}")
