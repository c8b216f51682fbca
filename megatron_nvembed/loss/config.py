"""Settings of the contrastive loss (`ContrastiveLossConfig`), each validated once in `validate`.

Each switch is read by the one part of the loss that uses it (`contrastive.py`): the stage switch
and the query-query term by the gather (`pool.py`), identical-text masking by the exclusion masks
(`masks.py`), the document-document term and the margin by the per-width InfoNCE, the
distillation settings by the distillation term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_nvembed.config import Matryoshka


@dataclass
class ContrastiveLossConfig:
    """Settings of the contrastive loss."""

    temperature: float = 0.02
    """Softmax temperature T: logits are cosine scores / T (`--temperature`)."""
    in_batch_negatives: bool = True
    """Stage switch: score other queries' candidates (stage 1) or only one's own (stage 2). Each
    dataset's own switch (the per-query `in_batch` input) is ANDed with it."""
    false_negative_margin: float | None = None
    """Exclude negatives scoring above this fraction of the query's positive score (None: off)."""
    mask_identical_positives: bool = True
    """Exclude negatives (own or in-batch) whose token ids equal the query's positive's; with
    `query_query`, also queries identical to the query or sharing its positive."""
    query_query: bool = False
    """Other in-batch queries are negatives too (`--query-query-negatives`)."""
    document_document: bool = False
    """In-batch candidates are negatives of the query's positive too, p_i . c
    (`--document-document-negatives`)."""
    matryoshka: Matryoshka | None = None
    """The loss over prefix widths of the embedding (`--matryoshka-dims`); None: full width."""
    distill_weight: float = 0.0
    """Weight of the KL term towards the teacher's scores (`--distill-weight`; 0: off)."""
    distill_temperature: float = 1.0
    """Temperature of the teacher's scores in that term (`--distill-temperature`)."""

    def validate(self) -> ContrastiveLossConfig:
        """Checks every field; returns self.

        Raises:
            ValueError: naming the offending field.
        """
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            raise ValueError(f"temperature (--temperature) must be > 0, got {self.temperature!r}")
        m = self.false_negative_margin
        if m is not None and not (isinstance(m, int | float) and 0.0 < m <= 1.0):
            raise ValueError(f"false_negative_margin must be None or in (0, 1], got {m!r}")
        for name in (
            "in_batch_negatives",
            "mask_identical_positives",
            "query_query",
            "document_document",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if (self.query_query or self.document_document) and not self.in_batch_negatives:
            raise ValueError(
                "query_query / document_document are in-batch terms: they need in_batch_negatives"
            )
        if self.matryoshka is not None:
            self.matryoshka = self.matryoshka.validate()
        _check_distill(self.distill_weight, self.distill_temperature)
        return self


def _check_distill(weight, temperature) -> None:
    for flag, value in (("--distill-weight", weight), ("--distill-temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{flag} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{flag} must be finite, got {value}")
    if weight < 0:
        raise ValueError(f"--distill-weight must be >= 0 (0: off), got {weight}")
    if not temperature > 0:
        raise ValueError(f"--distill-temperature must be > 0, got {temperature}")
