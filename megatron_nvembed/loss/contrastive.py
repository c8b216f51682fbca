"""InfoNCE over each query's own candidates plus optional in-batch candidates from every DP rank.

Inputs per rank (b local queries, n = 1 + max hard negatives, d embedding width):
- `query` [b, d] and `candidates` [b, n, d], L2-normalised by the pooling head, so a dot product
  is a cosine score; `candidates[:, 0]` is the positive.
- `candidate_mask` [b, n] bool: False for absent hard negatives (ragged counts).
- `in_batch` [b] bool: this query's dataset switch (the stage switch is `in_batch_negatives`).
- `candidate_ids` [b, n] int64: `hashing.sequence_hash` of each candidate's token ids.
- `query_ids` [b] int64: the same hash of each query's token ids (query-query term only).
- `teacher_scores` [b, n] float: a teacher's score of each candidate, NaN where none
  (distillation term only).
- `document_ids` [b, n] int64: `hashing.id_hash` of each candidate's document id, 0 where it has
  none (optional).

Visibility rule. Query i always scores its own present candidates. If `in_batch[i]` is True (and
in-batch negatives are on for the call), it also scores every present candidate -- positive and
hard negatives -- of every *other* query j in the global batch (all ranks of the data-parallel
group) with `in_batch[j]` True. Excluded, own or in-batch: any negative whose hash equals query
i's own positive's, or whose document id equals the positive's (`mask_identical_positives`;
ids only where both have one). With `false_negative_margin = m`, any negative
whose score exceeds `m x` query i's positive score is excluded too. A query with `in_batch`
False sees only its own candidates, even inside a blended batch.

Optional in-batch terms of the denominator, each a switch: `query_query` adds the other visible
queries q_j (score q_i . q_j; with `mask_identical_positives`, not a q_j identical to q_i or
whose positive is identical to q_i's or has its document id); `document_document` adds the visible in-batch candidates
again, scored against q_i's positive (p_i . c). The margin rule compares every term's scores
with `m x` q_i . p_i. With `matryoshka` the loss is the weighted sum of this loss over prefix
widths of the embeddings (`matryoshka.py`). With `distill_weight = w > 0`, each query with
teacher scores adds `w x KL(softmax(t / T_d) || softmax(s / T))` over its own present candidates
(not those identical to its positive): t the teacher's scores, T_d `distill_temperature`, s the
student's cosine scores (at each Matryoshka width).

Loss of query i: `logsumexp_{c in C_i}(s_ic / T) - s_ip / T` with s = cosine score, T the
temperature, C_i every score kept for query i (positive included). Scores are computed in float32 (or float64 if the inputs are float64): with T = 0.02
a bf16 score would be off by up to ~0.2 in the logit.

Reduction and data parallelism. When candidates are gathered over a group of W ranks holding B
queries in all, each rank returns `(W / B) x sum of its local query losses`. The gather's
backward sums the gradient every rank's loss sends to each embedding, and DDP averages parameter
gradients over the W ranks, so the averaged gradient is exactly the gradient of the mean loss over
the B queries computed in one process, also when ranks hold different numbers of queries. With
equal local sizes `W / B = 1 / b`: the returned value is the plain local mean. Without a gather
(in-batch off, or no group) the rank returns its local mean; DDP's average is then the global
mean when local sizes are equal (the data sampler guarantees this). Either way, the DP-average of
the returned values is the global-batch mean loss, which is what the training log reports.

Over 400 lines on purpose: the config, the statistics record and the loss all implement the
visibility rule above; split, the rule would be read in three places.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megatron_nvembed.logging_utils import get_logger, log_rank0
from megatron_nvembed.loss.config import ContrastiveLossConfig
from megatron_nvembed.loss.gather import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_row_counts,
    group_size,
)
from megatron_nvembed.loss.matryoshka import Matryoshka, prefix
from megatron_nvembed.loss.matryoshka import terms as matryoshka_terms

logger = get_logger(__name__)

# Excluded logits are filled with a large *finite* negative number after the temperature division:
# exp() of it underflows to exactly 0, its gradient is exactly 0, and a row whose candidates are
# all excluded but the positive still has a finite logsumexp (loss 0), where -inf could give NaN.
_EXCLUDED = -1e9


@dataclass
class ContrastiveStats:
    """What one or more loss calls scored; feeds the per-iteration training log.

    The per-query counts and (on CUDA) the gather timing stay on the device: nothing here reads
    a device value back while the step runs. The properties below read them, which the trainer
    does only when it logs (after the step's statistics reduction has synchronised).
    """

    local_queries: int
    """Queries scored on this rank (summed over merged calls)."""
    counts: torch.Tensor
    """[3] float64 on the loss's device: (sum, min, max) over local queries of the candidates
    (positive included) each query's softmax ran over."""
    pool_queries: int
    """Queries whose candidates formed the in-batch pool of one call (all DP ranks); 0 when no
    in-batch candidates were gathered."""
    dp_size: int
    """Ranks in the group the pool was gathered over (1: this rank only)."""
    gathered_embeddings: int
    """Candidate embeddings received by the gather (pool_queries x n, summed over calls)."""
    gather_bytes: int
    """Bytes the gathers returned on this rank (embeddings + masks/ids), summed over calls."""
    gather_timings: list = field(default_factory=list)
    """One per gather: seconds (host clock; gloo is synchronous) or a pair of CUDA events."""
    calls: int = 1
    """Loss calls merged into this record (micro-batches without GradCache; 1 with it)."""

    @property
    def candidates_per_query_mean(self) -> float:
        return float(self.counts[0]) / max(self.local_queries, 1)

    @property
    def candidates_per_query_min(self) -> int:
        return int(self.counts[1]) if self.local_queries else 0

    @property
    def candidates_per_query_max(self) -> int:
        return int(self.counts[2]) if self.local_queries else 0

    @property
    def gather_seconds(self) -> float:
        """Time spent in the gathers, summed over calls (CUDA: between events around them)."""
        return sum(
            t if isinstance(t, float) else t[0].elapsed_time(t[1]) / 1e3
            for t in self.gather_timings
        )

    @staticmethod
    def merge(stats: Sequence[ContrastiveStats]) -> ContrastiveStats:
        """Combines the stats of several calls (e.g. one per micro-batch) into one record."""
        if not stats:
            raise ValueError("ContrastiveStats.merge needs at least one record")
        present = [s.counts for s in stats if s.local_queries]
        counts = stats[0].counts
        if present:
            stacked = torch.stack(present)  # [calls, 3]
            counts = torch.stack(
                [stacked[:, 0].sum(), stacked[:, 1].min(), stacked[:, 2].max()]
            )  # [3]
        return ContrastiveStats(
            local_queries=sum(s.local_queries for s in stats),
            counts=counts,
            pool_queries=max(s.pool_queries for s in stats),
            dp_size=max(s.dp_size for s in stats),
            gathered_embeddings=sum(s.gathered_embeddings for s in stats),
            gather_bytes=sum(s.gather_bytes for s in stats),
            gather_timings=[t for s in stats for t in s.gather_timings],
            calls=sum(s.calls for s in stats),
        )

    def summary(self, global_batch_size: int | None = None) -> str:
        """One log line; states whether the in-batch pool spans the whole global batch.

        Args:
            global_batch_size: queries per optimizer step over all DP ranks (`--global-batch-size`).
        """
        parts = [
            f"candidates/query mean {self.candidates_per_query_mean:.1f} "
            f"min {self.candidates_per_query_min} max {self.candidates_per_query_max}"
        ]
        if self.pool_queries == 0:
            parts.append("in-batch negatives off")
        else:
            pool = f"in-batch pool {self.pool_queries} queries over {self.dp_size} DP rank(s)"
            if global_batch_size is not None and self.pool_queries < global_batch_size:
                pool += (
                    f": one micro-batch per rank x {self.dp_size} DP rank(s), not the whole "
                    f"global batch of {global_batch_size} (GradCache off)"
                )
            elif global_batch_size is not None:
                pool += f" = the whole global batch of {global_batch_size}"
            parts.append(pool)
            parts.append(
                f"gather {self.gathered_embeddings} embeddings, "
                f"{self.gather_bytes / 2**20:.2f} MiB, {self.gather_seconds * 1e3:.1f} ms"
                f" in {self.calls} call(s)"
            )
        return " | ".join(parts)


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


def _check_inputs(query, candidates, candidate_mask, in_batch, candidate_ids) -> None:
    if candidates.dim() != 3:
        raise ValueError(f"candidates must be [b, n, d], got shape {tuple(candidates.shape)}")
    b, n, d = candidates.shape
    if query.shape != (b, d):
        raise ValueError(f"query must be [b, d] = {(b, d)}, got {tuple(query.shape)}")
    if candidate_mask.shape != (b, n):
        raise ValueError(
            f"candidate_mask must be [b, n] = {(b, n)}, got {tuple(candidate_mask.shape)}"
        )
    if in_batch is not None and in_batch.shape != (b,):
        raise ValueError(f"in_batch must be [b] = {(b,)}, got {tuple(in_batch.shape)}")
    if candidate_ids is not None and candidate_ids.shape != (b, n):
        raise ValueError(
            f"candidate_ids must be [b, n] = {(b, n)}, got {tuple(candidate_ids.shape)}"
        )
    if not query.is_floating_point() or not candidates.is_floating_point():
        raise ValueError("query and candidates must be floating-point embeddings")
    if b:
        # Checked where the mask lives, with no host round trip: on the CPU this raises at once,
        # on a GPU it fails the stream (the error surfaces at the step's statistics read).
        torch._assert_async(
            candidate_mask[:, 0].all(),
            "every query needs its positive: candidate_mask[:, 0] must be all True",
        )


def contrastive_loss(
    query: torch.Tensor,
    candidates: torch.Tensor,
    candidate_mask: torch.Tensor,
    *,
    temperature: float = 0.02,
    in_batch: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
    query_ids: torch.Tensor | None = None,
    teacher_scores: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    in_batch_negatives: bool = True,
    false_negative_margin: float | None = None,
    mask_identical_positives: bool = True,
    query_query: bool = False,
    document_document: bool = False,
    matryoshka: Matryoshka | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, ContrastiveStats]:
    """InfoNCE loss of this rank's queries (rules and reduction: see the module docstring).

    Args:
        query: [b, d] query embeddings.
        candidates: [b, n, d] candidate embeddings, position 0 the positive.
        candidate_mask: [b, n] bool, True for present candidates (column 0 must be all True).
        temperature: T > 0; logits are cosine scores / T.
        in_batch: [b] bool per-query switch (default: all True).
        candidate_ids: [b, n] int64 token-id hashes (`sequence_hash`); required when in-batch
            candidates are scored with `mask_identical_positives`.
        query_ids: [b] int64 token-id hashes of the queries; required for `query_query` with
            `mask_identical_positives`.
        teacher_scores: [b, n] teacher scores of the candidates, NaN where a query has none;
            required when `distill_weight` > 0.
        document_ids: [b, n] int64 document-id hashes (`hashing.id_hash`), 0 where none; with
            `mask_identical_positives` a negative with the id of the query's positive is
            excluded like an identical text (None: no ids).
        in_batch_negatives: the stage switch (`ContrastiveLossConfig.in_batch_negatives`, the
            trainer's `--in-batch-negatives`; applied here only): False scores own candidates
            only and skips the gather. Must be equal on every rank of `group` (it decides
            whether collectives run).
        false_negative_margin: None, or m in (0, 1]: exclude negatives scoring above m x positive.
        mask_identical_positives: exclude candidates (own hard negatives and in-batch ones)
            identical to the query's positive (same token ids, or same document id), and with
            `query_query` other queries identical to the query or sharing its positive.
        query_query: add the other in-batch queries as negatives (score q_i . q_j).
        document_document: add the in-batch candidates as negatives of the query's positive
            (score p_i . c), beside the query's own score against them.
        matryoshka: the loss summed over prefix widths (`matryoshka.py`); None: full width.
        distill_weight: weight of the KL term towards `teacher_scores` (0: off).
        distill_temperature: the teacher scores' temperature in that term.
        group: the data-parallel group to gather candidates over (None: this process only). Every
            rank of the group must call with the same `n`, `d`, dtype and settings.

    Returns:
        (loss scalar in the compute dtype (float32 or float64), ContrastiveStats).

    Raises:
        ValueError: on inconsistent shapes, a bad temperature or margin, identical-positive
            masking requested without `candidate_ids` / `query_ids`, query-query or
            document-document terms without in-batch negatives, or a Matryoshka width above d.
        RuntimeError: a query without its positive (`candidate_mask[:, 0]` False), checked on
            the mask's device: at once on the CPU, at the next synchronisation on a GPU.
    """
    _check_inputs(query, candidates, candidate_mask, in_batch, candidate_ids)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if false_negative_margin is not None and not 0.0 < false_negative_margin <= 1.0:
        raise ValueError(f"false_negative_margin must be in (0, 1], got {false_negative_margin}")
    if in_batch_negatives and mask_identical_positives and candidate_ids is None:
        raise ValueError(
            "mask_identical_positives needs candidate_ids (sequence_hash of the candidates' "
            "token ids); pass them or set mask_identical_positives=False"
        )
    if (query_query or document_document) and not in_batch_negatives:
        raise ValueError(
            "query-query and document-document negatives are in-batch terms: they need "
            "in_batch_negatives (--in-batch-negatives)"
        )
    if query_query and mask_identical_positives and query_ids is None:
        raise ValueError(
            "query_query with mask_identical_positives needs query_ids (sequence_hash of the "
            "queries' token ids)"
        )
    _check_distill(distill_weight, distill_temperature)
    if distill_weight and teacher_scores is None:
        raise ValueError("distill_weight > 0 needs teacher_scores (the records' pos/neg_scores)")
    if teacher_scores is not None and teacher_scores.shape != candidate_mask.shape:
        shape, want = tuple(teacher_scores.shape), tuple(candidate_mask.shape)
        raise ValueError(f"teacher_scores must be [b, n] = {want}, got {shape}")
    if document_ids is not None and document_ids.shape != candidate_mask.shape:
        shape, want = tuple(document_ids.shape), tuple(candidate_mask.shape)
        raise ValueError(f"document_ids must be [b, n] = {want}, got {shape}")
    if query_ids is not None and query_ids.shape != query.shape[:1]:
        shape = tuple(query_ids.shape)
        raise ValueError(f"query_ids must be [b] = {tuple(query.shape[:1])}, got {shape}")
    b, n, d = candidates.shape
    if matryoshka is not None:
        matryoshka = matryoshka.validate(width=d)
    device = query.device
    candidate_mask = candidate_mask.bool()
    in_batch = (
        torch.ones(b, dtype=torch.bool, device=device) if in_batch is None else in_batch.bool()
    )
    compute = torch.promote_types(query.dtype, torch.float32)

    own_keep = candidate_mask.clone()  # [b, n]
    if mask_identical_positives and candidate_ids is not None:
        own_keep[:, 1:] &= candidate_ids[:, 1:] != candidate_ids[:, :1]
    # document ids, 0 where none; a positive without one matches nothing by id
    docs = torch.zeros_like(candidate_mask, dtype=torch.long)
    if document_ids is not None:
        docs = document_ids.long()
    pos_doc, has_doc = docs[:, :1], docs[:, :1] != 0  # [b, 1] each
    if mask_identical_positives:
        own_keep[:, 1:] &= ~((docs[:, 1:] == pos_doc) & has_doc)
    if distill_weight:
        # The teacher's distribution over each query's own present candidates (identical copies
        # of the positive left out), once for every width.
        teacher = teacher_scores.to(compute)
        has_teacher = torch.isfinite(teacher[:, 0])  # [b]
        distill_keep = own_keep & torch.isfinite(teacher)  # [b, n]
        target = torch.log_softmax(
            (teacher.nan_to_num(0.0) / distill_temperature).masked_fill(~distill_keep, _EXCLUDED),
            dim=1,
        )  # [b, n] log-probabilities; ~0 probability where excluded
    q_all = c_all = None  # gathered queries [B, d] / candidates [B*n, d] (in-batch terms)
    keep_cross = keep_qq = None
    world = group_size(group) if in_batch_negatives else 1
    pool_queries, gathered, gather_bytes, timings = 0, 0, 0, []
    total_queries = b
    if in_batch_negatives:
        start = _clock(device)
        ids = candidate_ids if candidate_ids is not None else torch.zeros_like(candidate_mask)
        qids = query_ids if query_ids is not None else torch.zeros_like(in_batch)
        # Masks, switches and hashes travel together as one int64 tensor: one collective.
        meta = torch.cat(
            [
                candidate_mask.long(),
                in_batch.long()[:, None],
                ids.long(),
                qids.long()[:, None],
                docs,
            ],
            dim=1,
        )  # [b, 3n + 2]
        flat = candidates.reshape(b * n, d)  # [b*n, d]
        if world > 1:
            sizes = gather_row_counts(b, group, device)  # queries per rank: one exchange for all
            all_meta = all_gather_no_grad(meta, group, sizes=sizes)  # [B, 3n + 2]
            c_all, offset = all_gather_with_grad(flat, group, sizes=[s * n for s in sizes])
            if query_query:
                q_all, _ = all_gather_with_grad(query, group, sizes=sizes)  # [B, d]
            first = offset // n  # global index of this rank's first query; c_all is [B*n, d]
            timings.append(_elapsed(start, device))
            gather_bytes = sum(
                t.numel() * t.element_size() for t in (c_all, all_meta, q_all) if t is not None
            )
        else:
            all_meta, c_all, q_all, first = meta, flat, query, 0
        big_b = all_meta.shape[0]
        total_queries, pool_queries, gathered = big_b, big_b, big_b * n
        all_mask = all_meta[:, :n].bool()  # [B, n]
        all_inb = all_meta[:, n].bool()  # [B]
        all_ids = all_meta[:, n + 1 : 2 * n + 1]  # [B, n]
        all_qids = all_meta[:, 2 * n + 1]  # [B]
        all_docs = all_meta[:, 2 * n + 2 :]  # [B, n]

        mine = torch.arange(b, device=device) + first  # [b] global index of each local query
        others = torch.arange(big_b, device=device)[None, :] != mine[:, None]  # [b, B]
        visible = others & all_inb[None, :] & in_batch[:, None]  # [b, B]: query j's texts
        # [b, B*n]: present candidates of visible queries (own candidates are scored above)
        keep_cross = (visible[:, :, None] & all_mask[None]).reshape(b, big_b * n)
        if mask_identical_positives:
            keep_cross = keep_cross & (all_ids.reshape(1, big_b * n) != candidate_ids[:, :1])
            keep_cross = keep_cross & ~((all_docs.reshape(1, big_b * n) == pos_doc) & has_doc)
        if query_query:
            keep_qq = visible  # [b, B]
            if mask_identical_positives:
                keep_qq = keep_qq & (all_qids[None, :] != query_ids.long()[:, None])
                keep_qq = keep_qq & (all_ids[None, :, 0] != candidate_ids[:, :1])
                keep_qq = keep_qq & ~((all_docs[None, :, 0] == pos_doc) & has_doc)

    loss = None
    counts = None
    for width, weight in matryoshka_terms(matryoshka):
        q = prefix(query.to(compute), width)  # [b, d']
        c = prefix(candidates.to(compute), width)  # [b, n, d']
        own = torch.einsum("bd,bnd->bn", q, c)  # [b, n] cosine scores
        pos = own[:, :1].detach()  # [b, 1]; the margin rule is a selection, not a gradient path
        blocks = [(own, own_keep)]  # (scores, which of them count) per block of columns
        if in_batch_negatives:
            cands = prefix(c_all.to(compute), width)  # [B*n, d']
            blocks.append((q @ cands.T, keep_cross))  # [b, B*n]
            if query_query:
                blocks.append((q @ prefix(q_all.to(compute), width).T, keep_qq))  # [b, B]
            if document_document:
                blocks.append((c[:, 0] @ cands.T, keep_cross))  # [b, B*n]: p_i . c
        if false_negative_margin is not None:
            # Every negative, whatever its term, against m x this width's positive score.
            below = [s.detach() <= false_negative_margin * pos for s, _ in blocks]
            below[0][:, 0] = True  # the positive itself
            blocks = [(s, k & ok) for (s, k), ok in zip(blocks, below)]
        keep_all = torch.cat([k for _, k in blocks], dim=1)  # [b, n (+ in-batch columns)]
        scores = torch.cat([s for s, _ in blocks], dim=1) / temperature
        scores = scores.masked_fill(~keep_all, _EXCLUDED)
        per_query = torch.logsumexp(scores, dim=1) - scores[:, 0]  # [b]
        if distill_weight:
            student = torch.log_softmax(
                (own / temperature).masked_fill(~distill_keep, _EXCLUDED), dim=1
            )  # [b, n]
            kl = (target.exp() * (target - student)).masked_fill(~distill_keep, 0.0).sum(dim=1)
            per_query = per_query + distill_weight * torch.where(has_teacher, kl, 0.0)
        if world > 1:
            term = per_query.sum() * (world / max(total_queries, 1))
        else:
            term = per_query.sum() / max(b, 1)
        loss = weight * term if loss is None else loss + weight * term
        if counts is None:  # candidates each query was scored against (the first width's)
            counts = keep_all.sum(dim=1).to(torch.float64)  # [b]
    if b:
        summary = torch.stack([counts.sum(), counts.min(), counts.max()])  # [3], on the device
    else:
        summary = torch.zeros(3, dtype=torch.float64, device=device)
    stats = ContrastiveStats(
        local_queries=b,
        counts=summary,
        pool_queries=pool_queries,
        dp_size=world,
        gathered_embeddings=gathered if world > 1 else 0,
        gather_bytes=gather_bytes,
        gather_timings=timings,
    )
    return loss, stats


def _clock(device: torch.device):
    """A start mark: a recorded CUDA event on CUDA (no synchronisation), else the host clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(start, device: torch.device):
    """Seconds since `start` (host clock), or the (start, end) CUDA event pair read later."""
    if device.type == "cuda":
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return (start, end)
    return time.perf_counter() - start


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
        self,
        query: torch.Tensor,
        candidates: torch.Tensor,
        candidate_mask: torch.Tensor,
        in_batch: torch.Tensor | None = None,
        candidate_ids: torch.Tensor | None = None,
        query_ids: torch.Tensor | None = None,
        teacher_scores: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of this rank's queries (shapes as in `contrastive_loss`).

        The call's stats are kept in `last_stats` and accumulated until `pop_stats()`.

        Raises:
            ValueError: see `contrastive_loss`; in particular when `mask_identical_positives` is
                on, in-batch negatives are on, and `candidate_ids` is missing.
        """
        c = self.config
        loss, stats = contrastive_loss(
            query,
            candidates,
            candidate_mask,
            temperature=c.temperature,
            in_batch=in_batch,
            candidate_ids=candidate_ids,
            query_ids=query_ids,
            teacher_scores=teacher_scores,
            document_ids=document_ids,
            in_batch_negatives=c.in_batch_negatives,
            false_negative_margin=c.false_negative_margin,
            mask_identical_positives=c.mask_identical_positives,
            query_query=c.query_query,
            document_document=c.document_document,
            matryoshka=c.matryoshka,
            distill_weight=c.distill_weight,
            distill_temperature=c.distill_temperature,
            group=self.group,
        )
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
