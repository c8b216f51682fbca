"""From sampled slots to the tensors the model and the contrastive loss take.

Candidates are laid out [b, 1 + K]: position 0 is the sampled positive, then up to K sampled hard
negatives. An absent negative (the record had fewer than K) is an empty text (BOS + EOS, two
tokens, then padding) whose `candidate_mask` entry is False: the candidate tensors always have
b * (1 + K) rows (as GradCache and pipeline schedules want fixed shapes) at the cost of a short
row. What the loss needs besides the embeddings is built here, once, as one `LossInputs`
(`megatron_nvembed/core/loss_inputs.py`), which the training step carries and moves whole.
Candidate ids are `megatron_nvembed.utils.hashing.sequence_hash` of each row's token ids, so equal
texts (a positive that is also another query's positive) get equal ids; query ids the same of
each query's token ids; document ids `hashing.id_hash` of the records' `pos_ids` / `neg_ids`
(0 where a record gives none), so the same document under another text is recognised too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from megatron_nvembed.core.config import DEFAULT_QUERY_TEMPLATE
from megatron_nvembed.core.loss_inputs import LossInputs
from megatron_nvembed.data.blending import Slot
from megatron_nvembed.data.records import Record
from megatron_nvembed.data.templates import query_instruction
from megatron_nvembed.data.tokenization import tokenize_for_embedding
from megatron_nvembed.utils.hashing import id_hash, sequence_hash


@dataclass
class EmbeddingBatch:
    """One micro-batch of b queries with 1 + K candidates each."""

    query: dict[str, torch.Tensor]
    """input_ids / attention_mask / pool_mask, [b, s_q]."""
    candidates: dict[str, torch.Tensor]
    """input_ids / attention_mask / pool_mask, [b * (1 + K), s_c]."""
    loss_inputs: LossInputs
    """What the contrastive loss needs besides the embeddings, every field filled (n = 1 + K):
    `candidate_mask` [b, n] bool (False for absent hard negatives); `in_batch` [b] bool (the
    query's dataset allows in-batch negatives, its `in_batch_negatives` flag; the stage switch
    is the loss's `ContrastiveLossConfig.in_batch_negatives`, not folded in here: a query meets
    other queries' candidates when both say so); `candidate_ids` [b, n] int64 hashes of the
    candidates' token ids; `query_ids` [b] int64 hashes of the queries' token ids, instruction
    included; `teacher_scores` [b, n] float32 (the records' `pos_scores` / `neg_scores`; NaN for
    a record without scores and for absent negatives); `document_ids` [b, n] int64 `id_hash` of
    the candidates' `pos_ids` / `neg_ids`, 0 where there is none."""
    dataset_index: torch.Tensor
    """[b] int64."""
    truncated: int
    """Texts cut at the maximum length."""

    def to(self, device) -> EmbeddingBatch:
        """The same batch on `device` (every tensor copied, the loss inputs whole)."""
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return replace(
            self,
            query=move(self.query),
            candidates=move(self.candidates),
            loss_inputs=self.loss_inputs.to(device),
            dataset_index=self.dataset_index.to(device),
        )


def collate(
    slots: Sequence[Slot],
    datasets: Sequence[Sequence[Record]],
    tokenizer,
    *,
    num_negatives: int = 7,
    max_length: int = 512,
    dataset_in_batch: Sequence[bool] | None = None,
    pool_mask_convention: str = "nvembed",
    pad_to_multiple_of: int | None = 8,
    query_template: str = DEFAULT_QUERY_TEMPLATE,
) -> EmbeddingBatch:
    """Tokenises a micro-batch of slots (see `BlendedSampler`).

    Args:
        slots: the micro-batch's slots.
        datasets: the records of each dataset, indexed by `Slot.dataset` / `Slot.index`.
        tokenizer: a tokenizer that adds BOS (pad = EOS).
        num_negatives: K.
        max_length: token limit per text.
        dataset_in_batch: per dataset, whether its queries use in-batch negatives (default all).
        pool_mask_convention: see `tokenize_for_embedding`.
        pad_to_multiple_of: see `tokenize_for_embedding`.
        query_template: the model's query prefix (`config.PromptConfig`).

    Returns:
        An `EmbeddingBatch` (shapes on its fields).

    Raises:
        ValueError: an empty micro-batch, or a slot whose dataset has no `dataset_in_batch` flag.
    """
    if not slots:
        raise ValueError("collate: empty micro-batch")
    if dataset_in_batch is not None and max(s.dataset for s in slots) >= len(dataset_in_batch):
        raise ValueError(f"dataset_in_batch has {len(dataset_in_batch)} flags; a slot needs more")
    recs = [datasets[s.dataset][s.index] for s in slots]
    queries = [r.query for r in recs]
    instructions = [query_instruction(r.task, r.instruction, template=query_template) for r in recs]
    q, cut_q = tokenize_for_embedding(
        tokenizer,
        queries,
        instructions,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        convention=pool_mask_convention,
    )
    texts, present, teacher, doc_ids = [], [], [], []
    nan = float("nan")
    for slot, rec in zip(slots, recs):
        chosen = slot.negatives[:num_negatives]
        row = [rec.pos[slot.positive]] + [rec.neg[i] for i in chosen]
        pad = num_negatives + 1 - len(row)
        texts += row + [""] * pad
        present.append([True] * len(row) + [False] * pad)
        doc_ids.append(
            [_id(rec.pos_ids, slot.positive)] + [_id(rec.neg_ids, i) for i in chosen] + [0] * pad
        )
        if rec.pos_scores is None:
            teacher.append([nan] * (num_negatives + 1))
        else:
            scores = [rec.pos_scores[slot.positive]] + [rec.neg_scores[i] for i in chosen]
            teacher.append(scores + [nan] * pad)
    c, cut_c = tokenize_for_embedding(
        tokenizer, texts, None, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of
    )
    b, n = len(slots), num_negatives + 1
    flags = (
        dataset_in_batch
        if dataset_in_batch is not None
        else [True] * (1 + max(s.dataset for s in slots))
    )
    loss_inputs = LossInputs(
        candidate_mask=torch.tensor(present, dtype=torch.bool),
        in_batch=torch.tensor([bool(flags[s.dataset]) for s in slots]),
        candidate_ids=sequence_hash(c["input_ids"], c["attention_mask"]).view(b, n),
        query_ids=sequence_hash(q["input_ids"], q["attention_mask"]),
        teacher_scores=torch.tensor(teacher, dtype=torch.float32),
        document_ids=torch.tensor(doc_ids, dtype=torch.long),
    )
    return EmbeddingBatch(
        query=q,
        candidates=c,
        loss_inputs=loss_inputs,
        dataset_index=torch.tensor([s.dataset for s in slots], dtype=torch.long),
        truncated=cut_q + cut_c,
    )


def _id(ids: list[str] | None, i: int) -> int:
    """`id_hash` of a record's i-th document id; 0 when the record has none."""
    return 0 if ids is None else id_hash(ids[i])
