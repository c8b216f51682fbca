"""`ContrastiveLossConfig`: the settings of the contrastive loss, each one a training flag,
checked once in `validate`.

Each switch is read by the one part of the loss that uses it (`contrastive.py`): the stage switch
and the query-query term by the gather (`pool.py`), identical-text masking by the exclusion masks
(`masks.py`), the document-document term and the margin by the per-width InfoNCE, the
distillation settings by the distillation term. Imports no torch: the training flags are checked
before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_nvembed.core.config import Matryoshka
from megatron_nvembed.utils.options import check_options, option


@dataclass
class ContrastiveLossConfig:
    """Settings of the contrastive loss (`contrastive.py` states the rule they configure)."""

    temperature: float = option(
        0.02, "--temperature", "softmax temperature T: logits are cosine scores / T", above=0.0
    )
    in_batch_negatives: bool = option(
        True,
        "--in-batch-negatives",
        "score other queries' candidates too (the stage-1 recipes: on, stage 2: off); each "
        "dataset's own switch is ANDed with it",
    )
    false_negative_margin: float | None = option(
        None,
        "--false-negative-margin",
        "exclude negatives scoring above this fraction of the positive's score",
        above=0.0,
        max=1.0,
    )
    mask_identical_positives: bool = True
    """Exclude negatives (own or in-batch) whose token ids (or document id) equal the query's
    positive's; with `query_query`, also queries identical to the query or sharing its
    positive."""
    query_query: bool = option(
        False,
        "--query-query-negatives",
        "other in-batch queries are negatives too (needs in-batch negatives)",
    )
    document_document: bool = option(
        False,
        "--document-document-negatives",
        "in-batch documents are negatives of the query's positive too, scored against it "
        "(needs in-batch negatives)",
    )
    matryoshka_dims: list[int] = option(
        default_factory=list,
        flag="--matryoshka-dims",
        help="train the embedding's prefixes too: the loss summed over these widths, each "
        "prefix L2-normalised (e.g. 4096 2048 1024 512 256; docs/loss.md)",
    )
    matryoshka_weights: list[float] = option(
        default_factory=list,
        flag="--matryoshka-weights",
        help="one weight per --matryoshka-dims width (default 1 each)",
    )
    distill_weight: float = option(
        0.0,
        "--distill-weight",
        "weight of the KL term towards the records' teacher scores (pos_scores / neg_scores; "
        "0: off)",
        min=0.0,
    )
    distill_temperature: float = option(
        1.0,
        "--distill-temperature",
        "temperature of the teacher scores in the distillation term",
        above=0.0,
    )

    @property
    def matryoshka(self) -> Matryoshka | None:
        """The prefix widths and weights (validated), or None: the full width only."""
        if not self.matryoshka_dims:
            if self.matryoshka_weights:
                raise ValueError("--matryoshka-weights needs --matryoshka-dims")
            return None
        return Matryoshka(tuple(self.matryoshka_dims), tuple(self.matryoshka_weights)).validate()

    def check_width(self, width: int) -> None:
        """Checks the Matryoshka widths against the embedding width `width`.

        Raises:
            ValueError: naming `--matryoshka-dims`.
        """
        if self.matryoshka_dims:
            Matryoshka(tuple(self.matryoshka_dims), tuple(self.matryoshka_weights)).validate(width)

    def validate(self) -> ContrastiveLossConfig:
        """Checks every field; returns self.

        Raises:
            ValueError: naming the flag.
        """
        check_options(self)
        _ = self.matryoshka
        if (self.query_query or self.document_document) and not self.in_batch_negatives:
            flag = (
                "--query-query-negatives" if self.query_query else "--document-document-negatives"
            )
            raise ValueError(
                f"{flag} adds in-batch terms; it needs in-batch negatives (a stage-1 recipe or "
                "--in-batch-negatives)"
            )
        return self
