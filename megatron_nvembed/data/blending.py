"""Blended global batches: datasets mixed by weight inside every global batch, deterministic,
identical whatever the number of ranks, sharded over data-parallel ranks, exactly resumable.

Global batch t is a pure function of (seed, dataset sizes, weights, global batch size, t and the
per-dataset positions reached before it):
1. its composition: each of the G slots draws a dataset from the weights (a multinomial draw
   from a generator seeded by (seed, t)), so every batch mixes tasks in proportion;
2. its examples: each dataset is read along its own stream, a fresh seeded permutation per pass
   over that dataset (seeded by (seed, dataset, pass));
3. per slot, a positive (one of `pos`) and up to K hard negatives (without replacement from
   `neg`; fewer when fewer exist) drawn with a generator seeded by (seed, t, slot).
DP rank r of R takes slots [r*G/R, (r+1)*G/R) and splits them into micro-batches. Every rank
computes the same global batch, so a run on 1 or on 64 ranks sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIX = 0x9E3779B97F4A7C15 & ((1 << 63) - 1)


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
        weights: sampling weight per dataset (normalised here).
        negatives_available: per dataset, a function `index -> (num positives, num negatives)`
            of that record (needed to draw the positive and the hard negatives).
        global_batch_size: queries per global batch (`--global-batch-size`).
        micro_batch_size: queries per micro-batch (`--micro-batch-size`).
        num_negatives: hard negatives per query (7 in the paper).
        dp_rank, dp_size: this rank's position in the data-parallel group.
        seed: the data seed.

    Raises:
        ValueError: naming the flag, when the batch sizes or weights are inconsistent.
    """

    def __init__(
        self,
        dataset_sizes: list[int],
        weights: list[float],
        negatives_available,
        global_batch_size: int,
        micro_batch_size: int,
        num_negatives: int = 7,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
    ):
        if len(dataset_sizes) != len(weights) or not dataset_sizes:
            raise ValueError("--train-data: need one weight per dataset")
        if any(n <= 0 for n in dataset_sizes):
            raise ValueError(f"--train-data: empty dataset among sizes {dataset_sizes}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--train-data: weights must be >= 0 with a positive sum: {weights}")
        if global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(
                f"--global-batch-size {global_batch_size} must be divisible by "
                f"--micro-batch-size {micro_batch_size} x data-parallel size {dp_size}"
            )
        self.sizes = list(dataset_sizes)
        total = float(sum(weights))
        self.weights = torch.tensor([w / total for w in weights], dtype=torch.float64)
        self.available = negatives_available
        self.G, self.mbs, self.K = global_batch_size, micro_batch_size, num_negatives
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.position = 0  # global batches consumed
        self.consumed = [0] * len(self.sizes)  # examples consumed per dataset
        self._perm_cache: dict[int, tuple[int, torch.Tensor]] = {}

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"position": self.position, "consumed": list(self.consumed), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data seed {self.seed} differs from the checkpoint's {state['seed']}")
        if len(state["consumed"]) != len(self.sizes):
            raise ValueError("--train-data: the number of datasets differs from the checkpoint's")
        self.position = int(state["position"])
        self.consumed = [int(c) for c in state["consumed"]]

    # -- sampling -----------------------------------------------------------------------------
    def _record(self, k: int, j: int) -> int:
        n = self.sizes[k]
        epoch, offset = divmod(j, n)
        cached = self._perm_cache.get(k)
        if cached is None or cached[0] != epoch:  # one permutation (the current pass) per dataset
            g = torch.Generator().manual_seed(_seed(self.seed, k, epoch))
            cached = self._perm_cache[k] = (epoch, torch.randperm(n, generator=g))
        return int(cached[1][offset])

    def global_batch(self) -> list[Slot]:
        """The next global batch (all G slots); advances the position."""
        t = self.position
        g = torch.Generator().manual_seed(_seed(self.seed, t, 0xB1E4D))
        picks = torch.multinomial(self.weights, self.G, replacement=True, generator=g).tolist()
        slots = []
        for slot, k in enumerate(picks):
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
        """This DP rank's share of the next global batch, as micro-batches."""
        slots = self.global_batch()
        per_rank = self.G // self.dp_size
        mine = slots[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [mine[i : i + self.mbs] for i in range(0, per_rank, self.mbs)]
