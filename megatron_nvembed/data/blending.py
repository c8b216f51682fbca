"""Blended global batches: datasets mixed by weight inside every global batch, deterministic,
identical whatever the number of ranks, sharded over data-parallel ranks, exactly resumable.

Global batch t is a pure function of (seed, dataset sizes, weights, global batch size, t); the
per-dataset read positions it starts from are themselves fixed by the batches before it:
1. its composition, drawn with a generator seeded by (seed, t):
   - `"systematic"` (default): dataset k gets floor(w_k G) or ceil(w_k G) of the G slots, with
     expectation exactly w_k G (systematic sampling: one uniform offset, G evenly spaced points
     over the cumulative weights), then the slots are shuffled so every rank's slice mixes tasks;
   - `"multinomial"`: every slot draws its dataset independently (more batch-to-batch variance);
   - `"homogeneous"` (batching by task): the whole global batch comes from one dataset, drawn
     with probability w_k, so every rank's slice, and every in-batch negative, is from the
     query's own dataset; the share of batches per dataset is w_k in expectation. One dataset
     per global batch rather than per rank keeps the data independent of the number of ranks
     (and a resume at another DP size exact);
2. its examples: each dataset is read along its own stream, a fresh seeded permutation per pass
   over that dataset (seeded by (seed, dataset, pass));
3. per slot, a positive (one of `pos`) and up to K hard negatives (without replacement from
   `neg`; fewer when fewer exist) drawn with a generator seeded by (seed, t, slot).
DP rank r of R takes slots [r*G/R, (r+1)*G/R) and splits them into micro-batches. Every rank
computes the same global batch, so a run on 1 or on 64 ranks sees the same data, and a checkpoint
taken at one DP size resumes at another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from megatron_nvembed.data.config import BATCH_COMPOSITIONS

_MIX = 0x9E3779B97F4A7C15 & ((1 << 63) - 1)
COMPOSITIONS = BATCH_COMPOSITIONS


def _seed(*parts: int) -> int:
    """A generator seed from integers (deterministic across processes, unlike hash())."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + _MIX) % (1 << 63)
    return h


@dataclass(frozen=True)
class Slot:
    """One example of a global batch: which record, which positive, which hard negatives."""

    dataset: int
    index: int
    positive: int
    negatives: tuple[int, ...]


class BlendedSampler:
    """Yields this rank's micro-batches of `Slot`s, global batch after global batch.

    Args:
        dataset_sizes: records per dataset.
        weights: sampling weight per dataset (normalised here; 0 leaves a dataset out).
        negatives_available: per dataset, a function `index -> (num positives, num negatives)`
            of that record (needed to draw the positive and the hard negatives).
        global_batch_size: queries per global batch G (`--global-batch-size`).
        micro_batch_size: queries per micro-batch (`--micro-batch-size`).
        num_negatives: hard negatives per query K (7 in the paper).
        dp_rank, dp_size: this rank's position in the data-parallel group.
        seed: the data seed.
        composition: `"systematic"` or `"multinomial"` (module docstring).

    Raises:
        ValueError: naming the flag, when the batch sizes, weights or ranks are inconsistent.
    """

    def __init__(
        self,
        dataset_sizes: Sequence[int],
        weights: Sequence[float],
        negatives_available: Sequence[Callable[[int], tuple[int, int]]],
        global_batch_size: int,
        micro_batch_size: int,
        num_negatives: int = 7,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        composition: str = "systematic",
    ):
        if len(dataset_sizes) != len(weights) or not dataset_sizes:
            raise ValueError("--train-data: need one weight per dataset")
        if len(negatives_available) != len(dataset_sizes):
            raise ValueError("negatives_available: need one function per dataset")
        if any(n <= 0 for n in dataset_sizes):
            raise ValueError(f"--train-data: empty dataset among sizes {list(dataset_sizes)}")
        if any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--train-data: weights must be >= 0 with a positive sum: {weights}")
        if micro_batch_size < 1 or global_batch_size < 1:
            raise ValueError("--micro-batch-size and --global-batch-size must be >= 1")
        if num_negatives < 0:
            raise ValueError(f"number of hard negatives must be >= 0, got {num_negatives}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} outside a group of {dp_size}")
        if global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(
                f"--global-batch-size {global_batch_size} must be divisible by "
                f"--micro-batch-size {micro_batch_size} x data-parallel size {dp_size}"
            )
        if composition not in COMPOSITIONS:
            raise ValueError(
                f"--batch-composition must be one of {COMPOSITIONS}, got {composition!r}"
            )
        self.sizes = [int(n) for n in dataset_sizes]
        total = float(sum(weights))
        self.weights = torch.tensor([w / total for w in weights], dtype=torch.float64)  # [D]
        self.available = list(negatives_available)
        self.G, self.mbs, self.K = global_batch_size, micro_batch_size, num_negatives
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.composition = composition
        self.position = 0  # global batches consumed
        self.consumed = [0] * len(self.sizes)  # examples consumed per dataset
        self._perm_cache: dict[int, tuple[int, torch.Tensor]] = {}

    @classmethod
    def for_sources(cls, sources: Sequence, weights: Sequence[float], **kwargs) -> BlendedSampler:
        """A sampler over `RecordSource`s (or any sequences with `counts(index)`);
        `kwargs` as the constructor's."""
        return cls([len(s) for s in sources], weights, [s.counts for s in sources], **kwargs)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The resume state: position and per-dataset read positions, plus what must not change
        across a resume (seed, batch size, dataset sizes, weights, composition). JSON-able."""
        return {
            "position": self.position,
            "consumed": list(self.consumed),
            "seed": self.seed,
            "global_batch_size": self.G,
            "dataset_sizes": list(self.sizes),
            "weights": self.weights.tolist(),
            "composition": self.composition,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at the exact global batch of `state`. The DP size and micro-batch size may
        differ from the run that saved it.

        Raises:
            ValueError: naming the setting that differs from the checkpoint's.
        """
        checks = [
            ("data seed", self.seed, state["seed"]),
            ("--global-batch-size", self.G, state.get("global_batch_size", self.G)),
            ("--train-data dataset sizes", self.sizes, state.get("dataset_sizes", self.sizes)),
            ("--batch-composition", self.composition, state.get("composition", self.composition)),
        ]
        for what, ours, theirs in checks:
            if ours != theirs:
                raise ValueError(f"{what} {ours} differs from the checkpoint's {theirs}")
        if len(state["consumed"]) != len(self.sizes):
            raise ValueError("--train-data: the number of datasets differs from the checkpoint's")
        saved_w = state.get("weights")
        if saved_w is not None and not torch.allclose(
            torch.tensor(saved_w, dtype=torch.float64), self.weights, rtol=0, atol=1e-12
        ):
            raise ValueError(
                f"--train-data weights {self.weights.tolist()} differ from the checkpoint's "
                f"{saved_w}"
            )
        self.position = int(state["position"])
        self.consumed = [int(c) for c in state["consumed"]]

    # -- sampling -----------------------------------------------------------------------------
    def _record(self, k: int, j: int) -> int:
        """Record index of the j-th example read from dataset k."""
        n = self.sizes[k]
        epoch, offset = divmod(j, n)
        cached = self._perm_cache.get(k)
        if cached is None or cached[0] != epoch:  # one permutation (the current pass) per dataset
            g = torch.Generator().manual_seed(_seed(self.seed, k, epoch))
            cached = self._perm_cache[k] = (epoch, torch.randperm(n, generator=g))
        return int(cached[1][offset])

    def _composition(self, t: int) -> list[int]:
        """The dataset of each of the G slots of global batch t."""
        g = torch.Generator().manual_seed(_seed(self.seed, t, 0xB1E4D))
        if self.composition == "multinomial":
            return torch.multinomial(self.weights, self.G, replacement=True, generator=g).tolist()
        if self.composition == "homogeneous":
            return [int(torch.multinomial(self.weights, 1, generator=g))] * self.G
        # systematic sampling: points u, u+1, ..., u+G-1 over the cumulative quotas G*cumsum(w)
        edges = torch.cumsum(self.weights, 0) * self.G  # [D]
        last = int(torch.nonzero(self.weights > 0).max())
        edges[last:] = self.G  # no rounding gap at the top, none into zero-weight datasets
        u = torch.rand((), generator=g, dtype=torch.float64)
        points = u + torch.arange(self.G, dtype=torch.float64)  # [G]
        picks = torch.searchsorted(edges, points, right=True)  # [G] dataset per point
        order = torch.randperm(self.G, generator=g)
        return picks[order].tolist()

    def global_batch(self) -> list[Slot]:
        """The next global batch (all G slots, on every rank); advances the position."""
        t = self.position
        slots = []
        for slot, k in enumerate(self._composition(t)):
            idx = self._record(k, self.consumed[k])
            self.consumed[k] += 1
            n_pos, n_neg = self.available[k](idx)
            sg = torch.Generator().manual_seed(_seed(self.seed, t, slot, 0x5107))
            positive = int(torch.randint(n_pos, (1,), generator=sg)) if n_pos > 1 else 0
            negs = torch.randperm(n_neg, generator=sg)[: self.K].tolist() if n_neg else []
            slots.append(Slot(k, idx, positive, tuple(negs)))
        self.position += 1
        return slots

    def next_micro_batches(self) -> list[list[Slot]]:
        """This DP rank's share of the next global batch, as G / (R * micro-batch) micro-batches."""
        slots = self.global_batch()
        per_rank = self.G // self.dp_size
        mine = slots[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [mine[i : i + self.mbs] for i in range(0, per_rank, self.mbs)]

    def __iter__(self) -> Iterator[list[list[Slot]]]:
        """Endless: this rank's micro-batches of one global batch per step."""
        while True:
            yield self.next_micro_batches()
