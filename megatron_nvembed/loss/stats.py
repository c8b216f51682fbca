"""What the loss scored, per call and merged per logged iteration (`ContrastiveStats`).

`contrastive.py` builds one record per loss call; `ContrastiveLoss.pop_stats` merges a logged
iteration's records; the trainer logs `summary()` and writes the fields to `--log-json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_nvembed.loss.pool import GatheredPool


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


def call_stats(counts: torch.Tensor, pool: GatheredPool | None) -> ContrastiveStats:
    """The record of one loss call.

    Args:
        counts: [b] float64, the candidates (positive included) each local query's softmax ran
            over (at the first width); it stays on its device.
        pool: the call's gathered pool, or None (in-batch negatives off).
    """
    b = counts.shape[0]
    if b:
        summary = torch.stack([counts.sum(), counts.min(), counts.max()])  # [3], on the device
    else:
        summary = torch.zeros(3, dtype=torch.float64, device=counts.device)
    world = 1 if pool is None else pool.world
    return ContrastiveStats(
        local_queries=b,
        counts=summary,
        pool_queries=0 if pool is None else pool.size,
        dp_size=world,
        gathered_embeddings=pool.candidates.shape[0] if world > 1 else 0,
        gather_bytes=0 if pool is None else pool.gather_bytes,
        gather_timings=[] if pool is None else pool.timings,
    )
