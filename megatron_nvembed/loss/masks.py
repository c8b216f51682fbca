"""Which scores count for each query: the visibility rule and identical-text exclusions as masks.

Query i always scores its own present candidates. With a pool (`pool.py`) and `in_batch[i]`
True, it also scores every present candidate of every *other* pooled query j with `in_batch[j]`
True, and with the query-query term those queries themselves. With
`ContrastiveLossConfig.mask_identical_positives` (the only switch read here) a negative is left
out when it is query i's positive under another name: equal text hash (`candidate_ids`), or
equal document id where the positive has one (`document_ids`, 0 meaning none); a query-query
negative is left out when it is query i itself (equal `query_ids`) or its positive is. The
score-dependent false-negative margin is not a mask of this kind: it is applied per width, on
that width's scores (`contrastive.info_nce`).

Shapes: b local queries, B pooled queries, n candidates per query. True = the score counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_nvembed.core.loss_inputs import LossInputs
from megatron_nvembed.loss.config import ContrastiveLossConfig
from megatron_nvembed.loss.pool import GatheredPool


@dataclass
class Exclusions:
    """What each local query may score (True: counts), one mask per block of scores."""

    own: torch.Tensor
    """[b, n] its own candidates (the positive, column 0, always True)."""
    in_batch: torch.Tensor | None
    """[b, B*n] the pooled candidates (None: no pool); used by the query's own score against
    them and by the document-document term's positive score."""
    queries: torch.Tensor | None
    """[b, B] the pooled queries (None: no query-query term)."""


def exclusion_masks(
    inputs: LossInputs, pool: GatheredPool | None, config: ContrastiveLossConfig
) -> Exclusions:
    """The masks of the visibility rule and identical-text exclusions (module docstring).

    Args:
        inputs: this rank's loss inputs, candidate_mask / in_batch bool and document_ids int64
            present (the loss fills absent ones in); candidate_ids needed with a pool and
            masking, query_ids with the query-query term and masking (the loss checks).
        pool: the gathered pool, or None (own candidates only).
        config: reads `mask_identical_positives`.

    Returns:
        Exclusions.
    """
    identical = config.mask_identical_positives
    ids, docs = inputs.candidate_ids, inputs.document_ids
    own = inputs.candidate_mask.clone()  # [b, n]
    if identical and ids is not None:
        own[:, 1:] &= ids[:, 1:] != ids[:, :1]
    pos_doc, has_doc = docs[:, :1], docs[:, :1] != 0  # [b, 1] each; no id matches nothing
    if identical:
        own[:, 1:] &= ~((docs[:, 1:] == pos_doc) & has_doc)
    if pool is None:
        return Exclusions(own, None, None)

    b, n = inputs.shape
    big_b, theirs = pool.size, pool.inputs
    mine = torch.arange(b, device=own.device) + pool.first  # [b] pool index of each local query
    others = torch.arange(big_b, device=own.device)[None, :] != mine[:, None]  # [b, B]
    visible = others & theirs.in_batch[None, :] & inputs.in_batch[:, None]  # [b, B]
    # [b, B*n]: present candidates of visible queries (own candidates are the `own` block)
    cross = (visible[:, :, None] & theirs.candidate_mask[None]).reshape(b, big_b * n)
    if identical:
        cross = cross & (theirs.candidate_ids.reshape(1, big_b * n) != ids[:, :1])
        cross = cross & ~((theirs.document_ids.reshape(1, big_b * n) == pos_doc) & has_doc)
    queries = None
    if pool.queries is not None:
        queries = visible  # [b, B]
        if identical:
            queries = queries & (theirs.query_ids[None, :] != inputs.query_ids.long()[:, None])
            queries = queries & (theirs.candidate_ids[None, :, 0] != ids[:, :1])
            queries = queries & ~((theirs.document_ids[None, :, 0] == pos_doc) & has_doc)
    return Exclusions(own, cross, queries)
