"""InfoNCE over each query's own candidates plus optional in-batch candidates from every DP rank.

`contrastive_loss(query, candidates, inputs, config, group)` takes this rank's embeddings (b
local queries, n = 1 + max hard negatives, d embedding width):
- `query` [b, d] and `candidates` [b, n, d], L2-normalised by the pooling head, so a dot product
  is a cosine score; `candidates[:, 0]` is the positive;
- `inputs`, a `LossInputs` (`megatron_nvembed/core/loss_inputs.py`: candidate mask, per-query
  in-batch switch, text and document hashes, teacher scores, shapes on its fields), built by
  collation;
- `config`, the `ContrastiveLossConfig` (`config.py`).

It is five parts, each a function with its own documentation:
1. the gathered pool (`pool.gather_pool`): the in-batch candidates of every rank;
2. the exclusion masks (`masks.exclusion_masks`): the visibility rule below as boolean masks;
3. the per-width InfoNCE (`width_scores`, `info_nce`), once per Matryoshka width;
4. the distillation term (`teacher_target`, `distillation`);
5. the statistics (`stats.call_stats`).

Visibility rule. Query i always scores its own present candidates. If `in_batch[i]` is True (and
in-batch negatives are on for the call), it also scores every present candidate -- positive and
hard negatives -- of every *other* query j in the global batch (all ranks of the data-parallel
group) with `in_batch[j]` True. Excluded, own or in-batch: any negative whose hash equals query
i's own positive's, or whose document id equals the positive's (`mask_identical_positives`;
ids only where both have one). With `false_negative_margin = m`, any negative
whose score exceeds `m x` query i's positive score is excluded too. A query with `in_batch`
False sees only its own candidates, even inside a blended batch.

Optional in-batch terms of the denominator: `query_query` adds the other visible queries q_j
(score q_i . q_j; with `mask_identical_positives`, not a q_j identical to q_i or whose positive
is identical to q_i's or has its document id); `document_document` adds the visible in-batch
candidates again, scored against q_i's positive (p_i . c). The margin rule compares every term's
scores with `m x` q_i . p_i. With `matryoshka` the loss is the weighted sum of this loss over
prefix widths of the embeddings (`matryoshka.py`). With `distill_weight = w > 0`, each query with
teacher scores adds `w x KL(softmax(t / T_d) || softmax(s / T))` over its own present candidates
(not those identical to its positive): t the teacher's scores, T_d `distill_temperature`, s the
student's cosine scores (at each Matryoshka width).

Loss of query i: `logsumexp_{c in C_i}(s_ic / T) - s_ip / T` with s = cosine score, T the
temperature, C_i every score kept for query i (positive included). Scores are computed in
float32 (or float64 if the inputs are float64): with T = 0.02 a bf16 score would be off by up to
~0.2 in the logit.

Reduction and data parallelism. When candidates are gathered over a group of W ranks holding B
queries in all, each rank returns `(W / B) x sum of its local query losses`. The gather's
backward sums the gradient every rank's loss sends to each embedding, and DDP averages parameter
gradients over the W ranks, so the averaged gradient is exactly the gradient of the mean loss over
the B queries computed in one process, also when ranks hold different numbers of queries. With
equal local sizes `W / B = 1 / b`: the returned value is the plain local mean. Without a gather
(in-batch off, or no group) the rank returns its local mean; DDP's average is then the global
mean when local sizes are equal (the data sampler guarantees this). Either way, the DP-average of
the returned values is the global-batch mean loss, which is what the training log reports.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from megatron_nvembed.core.logging_utils import get_logger, log_rank0
from megatron_nvembed.core.loss_inputs import LossInputs
from megatron_nvembed.loss.config import ContrastiveLossConfig
from megatron_nvembed.loss.masks import Exclusions, exclusion_masks
from megatron_nvembed.loss.matryoshka import prefix
from megatron_nvembed.loss.matryoshka import terms as matryoshka_terms
from megatron_nvembed.loss.pool import GatheredPool, gather_pool
from megatron_nvembed.loss.stats import ContrastiveStats, call_stats

logger = get_logger(__name__)

# Excluded logits are filled with a large *finite* negative number after the temperature division:
# exp() of it underflows to exactly 0, its gradient is exactly 0, and a row whose candidates are
# all excluded but the positive still has a finite logsumexp (loss 0), where -inf could give NaN.
_EXCLUDED = -1e9

Blocks = list[tuple[torch.Tensor, torch.Tensor]]
"""Columns of one width's scores: (scores [b, m], which of them count [b, m] bool) per block,
the query's own candidates first (column 0 the positive)."""


def contrastive_loss(
    query: torch.Tensor,
    candidates: torch.Tensor,
    inputs: LossInputs,
    config: ContrastiveLossConfig | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, ContrastiveStats]:
    """InfoNCE loss of this rank's queries (rules and reduction: see the module docstring).

    Args:
        query: [b, d] query embeddings.
        candidates: [b, n, d] candidate embeddings, position 0 the positive.
        inputs: the batch's `LossInputs` ([b, n] / [b] fields). `candidate_ids` is required when
            in-batch negatives and `mask_identical_positives` are on, `query_ids` when the
            query-query term and `mask_identical_positives` are, `teacher_scores` when
            `distill_weight` > 0.
        config: the settings (validated here; None: the defaults). `in_batch_negatives` must be
            equal on every rank of `group` (it decides whether collectives run).
        group: the data-parallel group to gather candidates over (None: this process only). Every
            rank of the group must call with the same `n`, `d`, dtype and settings.

    Returns:
        (loss scalar in the compute dtype (float32 or float64), ContrastiveStats).

    Raises:
        ValueError: on inconsistent shapes, an input missing that a setting needs, or a
            Matryoshka width above d. `config` is taken as validated (`ContrastiveLoss` and the
            training config validate it once, not on every call).
        RuntimeError: a query without its positive (`candidate_mask[:, 0]` False), checked on
            the mask's device: at once on the CPU, at the next synchronisation on a GPU.
    """
    config = ContrastiveLossConfig() if config is None else config
    widths = _checked_widths(query, candidates, inputs, config)
    inputs = _completed(inputs)
    compute = torch.promote_types(query.dtype, torch.float32)
    pool = gather_pool(query, candidates, inputs, config, group)
    masks = exclusion_masks(inputs, pool, config)
    teacher = teacher_target(inputs.teacher_scores, masks.own, config, compute)
    loss = counts = None
    for width, weight in widths:
        blocks = width_scores(query, candidates, pool, masks, width, config, compute)
        per_query, kept = info_nce(blocks, config)  # [b], [b, columns]
        if teacher is not None:
            per_query = per_query + distillation(blocks[0][0], teacher, config)
        term = weight * _reduce(per_query, pool)
        loss = term if loss is None else loss + term
        if counts is None:  # candidates each query was scored against (the first width's)
            counts = kept.sum(dim=1).to(torch.float64)  # [b]
    return loss, call_stats(counts, pool)


def _checked_widths(
    query, candidates, inputs: LossInputs, config
) -> list[tuple[int | None, float]]:
    """Checks the embeddings and inputs against each other and the settings; returns the
    (width, weight) terms of the loss (Matryoshka widths checked against d)."""
    if candidates.dim() != 3:
        raise ValueError(f"candidates must be [b, n, d], got shape {tuple(candidates.shape)}")
    b, n, d = candidates.shape
    if query.shape != (b, d):
        raise ValueError(f"query must be [b, d] = {(b, d)}, got {tuple(query.shape)}")
    inputs.check(b, n)
    if not query.is_floating_point() or not candidates.is_floating_point():
        raise ValueError("query and candidates must be floating-point embeddings")
    identical = config.mask_identical_positives
    if config.in_batch_negatives and identical and inputs.candidate_ids is None:
        raise ValueError(
            "mask_identical_positives needs candidate_ids (sequence_hash of the candidates' "
            "token ids); pass them or set mask_identical_positives=False"
        )
    if config.query_query and identical and inputs.query_ids is None:
        raise ValueError(
            "query_query with mask_identical_positives needs query_ids (sequence_hash of the "
            "queries' token ids)"
        )
    if config.distill_weight and inputs.teacher_scores is None:
        raise ValueError("distill_weight > 0 needs teacher_scores (the records' pos/neg_scores)")
    if b:
        # Checked where the mask lives, with no host round trip: on the CPU this raises at once,
        # on a GPU it fails the stream (the error surfaces at the step's statistics read).
        torch._assert_async(
            inputs.candidate_mask[:, 0].all(),
            "every query needs its positive: candidate_mask[:, 0] must be all True",
        )
    m = config.matryoshka
    return list(matryoshka_terms(None if m is None else m.validate(width=d)))


def _completed(inputs: LossInputs) -> LossInputs:
    """The inputs as the parts read them: boolean masks, `in_batch` all True when absent,
    `document_ids` int64 and 0 (none) when absent."""
    mask = inputs.candidate_mask.bool()
    in_batch = inputs.in_batch
    if in_batch is None:
        in_batch = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    docs = inputs.document_ids
    docs = torch.zeros_like(mask, dtype=torch.long) if docs is None else docs.long()
    return replace(inputs, candidate_mask=mask, in_batch=in_batch.bool(), document_ids=docs)


def width_scores(
    query: torch.Tensor,
    candidates: torch.Tensor,
    pool: GatheredPool | None,
    masks: Exclusions,
    width: int | None,
    config: ContrastiveLossConfig,
    compute: torch.dtype,
) -> Blocks:
    """Every score of one Matryoshka width, block by block, with the mask of each.

    Args:
        query: [b, d]; candidates: [b, n, d] (this rank's).
        pool: the gathered pool or None; its queries give the query-query block.
        masks: `exclusion_masks` of the call.
        width: the prefix width (None: the full embedding).
        config: reads `document_document`.
        compute: float32 or float64, the dtype the scores are computed in.

    Returns:
        [(own [b, n], masks.own)], then with a pool (q . c [b, B*n], masks.in_batch), the
        query-query block (q . q_j [b, B], masks.queries) and the document-document block
        (p . c [b, B*n], masks.in_batch) when on.
    """
    q = prefix(query.to(compute), width)  # [b, d']
    c = prefix(candidates.to(compute), width)  # [b, n, d']
    blocks = [(torch.einsum("bd,bnd->bn", q, c), masks.own)]  # [b, n] cosine scores
    if pool is not None:
        cands = prefix(pool.candidates.to(compute), width)  # [B*n, d']
        blocks.append((q @ cands.T, masks.in_batch))  # [b, B*n]
        if pool.queries is not None:
            blocks.append((q @ prefix(pool.queries.to(compute), width).T, masks.queries))
        if config.document_document:
            blocks.append((c[:, 0] @ cands.T, masks.in_batch))  # [b, B*n]: p_i . c
    return blocks


def info_nce(blocks: Blocks, config: ContrastiveLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-log softmax of each query's positive over every score it keeps, at one width.

    Args:
        blocks: `width_scores`.
        config: reads `temperature` and `false_negative_margin`.

    Returns:
        (per-query loss [b], which columns counted [b, all blocks' columns] bool).
    """
    m = config.false_negative_margin
    if m is not None:
        # Every negative, whatever its term, against m x this width's positive score; the rule
        # is a selection, not a gradient path.
        pos = blocks[0][0][:, :1].detach()  # [b, 1]
        below = [s.detach() <= m * pos for s, _ in blocks]
        below[0][:, 0] = True  # the positive itself
        blocks = [(s, k & ok) for (s, k), ok in zip(blocks, below)]
    kept = torch.cat([k for _, k in blocks], dim=1)  # [b, n (+ in-batch columns)]
    scores = torch.cat([s for s, _ in blocks], dim=1) / config.temperature
    scores = scores.masked_fill(~kept, _EXCLUDED)
    return torch.logsumexp(scores, dim=1) - scores[:, 0], kept


@dataclass
class Teacher:
    """The teacher's distribution over each query's own candidates (one for every width)."""

    log_probs: torch.Tensor
    """[b, n] log softmax(t / T_d) over `keep`; ~0 probability elsewhere."""
    keep: torch.Tensor
    """[b, n] bool: present, scored by the teacher, not a copy of the positive."""
    has: torch.Tensor
    """[b] bool: the query has teacher scores (its positive's is finite)."""


def teacher_target(
    teacher_scores: torch.Tensor | None,
    own: torch.Tensor,
    config: ContrastiveLossConfig,
    compute: torch.dtype,
) -> Teacher | None:
    """The distillation target, or None when the term is off (`distill_weight` 0).

    Args:
        teacher_scores: [b, n], NaN where none (required when the term is on).
        own: [b, n] `Exclusions.own` (identical copies of the positive left out).
        config: reads `distill_weight` and `distill_temperature`.
        compute: the scores' dtype.
    """
    if not config.distill_weight:
        return None
    teacher = teacher_scores.to(compute)
    keep = own & torch.isfinite(teacher)  # [b, n]
    logits = (teacher.nan_to_num(0.0) / config.distill_temperature).masked_fill(~keep, _EXCLUDED)
    return Teacher(torch.log_softmax(logits, dim=1), keep, torch.isfinite(teacher[:, 0]))


def distillation(own: torch.Tensor, teacher: Teacher, config: ContrastiveLossConfig):
    """`distill_weight x KL(teacher || student)` of each query at one width (0 without
    teacher scores).

    Args:
        own: [b, n] the student's cosine scores of its own candidates at this width.
        teacher: `teacher_target`.
        config: reads `temperature` and `distill_weight`.

    Returns:
        [b] the term to add to each query's loss.
    """
    student = torch.log_softmax(
        (own / config.temperature).masked_fill(~teacher.keep, _EXCLUDED), dim=1
    )  # [b, n]
    target = teacher.log_probs
    kl = (target.exp() * (target - student)).masked_fill(~teacher.keep, 0.0).sum(dim=1)
    return config.distill_weight * torch.where(teacher.has, kl, 0.0)


def _reduce(per_query: torch.Tensor, pool: GatheredPool | None) -> torch.Tensor:
    """This rank's share of the global mean (module docstring: reduction)."""
    if pool is not None and pool.world > 1:
        return per_query.sum() * (pool.world / max(pool.size, 1))
    return per_query.sum() / max(per_query.shape[0], 1)


class ContrastiveLoss(nn.Module):
    """`contrastive_loss` with its settings and the data-parallel group bound at construction.

    Args:
        config: ContrastiveLossConfig (validated here).
        group: the data-parallel process group (never the world group once TP or PP > 1).
        global_batch_size: queries per optimizer step over all DP ranks; when given, the first
            call logs (rank 0) whether the in-batch pool spans the whole global batch.
    """

    def __init__(
        self,
        config: ContrastiveLossConfig,
        group: dist.ProcessGroup | None = None,
        global_batch_size: int | None = None,
    ):
        super().__init__()
        self.config = config.validate()
        self.group = group
        self.global_batch_size = global_batch_size
        self.last_stats: ContrastiveStats | None = None
        self._pending: list[ContrastiveStats] = []
        self._announced = False

    def forward(
        self, query: torch.Tensor, candidates: torch.Tensor, inputs: LossInputs
    ) -> torch.Tensor:
        """Loss of this rank's queries (arguments as in `contrastive_loss`).

        The call's stats are kept in `last_stats` and accumulated until `pop_stats()`.

        Raises:
            ValueError: see `contrastive_loss`; in particular when `mask_identical_positives` is
                on, in-batch negatives are on, and `inputs.candidate_ids` is missing.
        """
        loss, stats = contrastive_loss(query, candidates, inputs, self.config, self.group)
        self.last_stats = stats
        self._pending.append(stats)
        if not self._announced:
            self._announced = True
            log_rank0(logger, "contrastive loss: %s", stats.summary(self.global_batch_size))
        return loss

    def pop_stats(self) -> ContrastiveStats | None:
        """Merged stats of every call since the last pop (one logged iteration); None if none."""
        if not self._pending:
            return None
        merged = ContrastiveStats.merge(self._pending)
        self._pending = []
        return merged
