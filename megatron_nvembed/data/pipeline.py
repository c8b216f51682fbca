"""This rank's training batches: `--train-data` datasets -> blended sampler -> collation.

`build_train_data(["0.3", "a.jsonl", "0.7", "b.jsonl"], tokenizer, ...)` opens the datasets
(`loading.load_dataset_spec`), builds a `BlendedSampler` and yields, per training step, this DP
rank's micro-batches as `EmbeddingBatch`es. `state_dict()` / `load_state_dict()` resume at the
exact step; `summary()` reports what was read and how many texts were truncated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from megatron_nvembed.core.config import DEFAULT_QUERY_TEMPLATE
from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.data.blending import BlendedSampler
from megatron_nvembed.data.collate import EmbeddingBatch, collate
from megatron_nvembed.data.loading import load_dataset_spec, parse_data_paths

logger = get_logger(__name__)


class BlendedEmbeddingData:
    """Blended, collated micro-batches for one DP rank.

    Args:
        sources: the datasets (`RecordSource`s, or sequences of `Record` with `counts(i)` and an
            `in_batch_negatives` attribute).
        weights: one sampling weight per dataset.
        tokenizer: a tokenizer that adds BOS (pad = EOS).
        global_batch_size, micro_batch_size, num_negatives, dp_rank, dp_size, seed,
            composition: as `BlendedSampler`.
        max_length, pad_to_multiple_of, pool_mask_convention: as `tokenize_for_embedding`.
        query_template: the model's query prefix (`config.PromptConfig`).
        names: display names of the datasets (default: the sources' `name` or their index).

    Raises:
        ValueError: as `BlendedSampler`.
    """

    def __init__(
        self,
        sources: Sequence,
        weights: Sequence[float],
        tokenizer,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        num_negatives: int = 7,
        max_length: int = 512,
        pad_to_multiple_of: int | None = 8,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        pool_mask_convention: str = "nvembed",
        composition: str = "systematic",
        names: Sequence[str] | None = None,
        query_template: str = DEFAULT_QUERY_TEMPLATE,
    ):
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.sampler = BlendedSampler.for_sources(
            self.sources,
            weights,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            num_negatives=num_negatives,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=seed,
            composition=composition,
        )
        self.in_batch = [bool(getattr(s, "in_batch_negatives", True)) for s in self.sources]
        self.names = list(names or [getattr(s, "name", str(i)) for i, s in enumerate(self.sources)])
        self.collate_kwargs = dict(
            num_negatives=num_negatives,
            max_length=max_length,
            dataset_in_batch=self.in_batch,
            pool_mask_convention=pool_mask_convention,
            pad_to_multiple_of=pad_to_multiple_of,
            query_template=query_template,
        )
        self.truncated = 0  # texts cut at max_length on this rank
        self.texts = 0  # texts tokenised on this rank

    def next_global_batch(self) -> list[EmbeddingBatch]:
        """This rank's micro-batches of the next global batch (G / (R * micro-batch) of them)."""
        out = []
        for slots in self.sampler.next_micro_batches():
            batch = collate(slots, self.sources, self.tokenizer, **self.collate_kwargs)
            self.truncated += batch.truncated
            self.texts += batch.loss_inputs.candidate_mask.numel() + len(slots)
            out.append(batch)
        return out

    def __iter__(self) -> Iterator[list[EmbeddingBatch]]:
        """Endless: one list of micro-batches per training step."""
        while True:
            yield self.next_global_batch()

    def state_dict(self) -> dict:
        """JSON-able resume state (the sampler's, plus this rank's counters)."""
        return {
            "sampler": self.sampler.state_dict(),
            "truncated": self.truncated,
            "texts": self.texts,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at the exact global batch of `state` (see `BlendedSampler.load_state_dict`)."""
        self.sampler.load_state_dict(state["sampler"])
        self.truncated = int(state.get("truncated", 0))
        self.texts = int(state.get("texts", 0))

    def summary(self) -> str:
        """One line per dataset (size, weight, in-batch flag, examples consumed so far, passes)
        and the truncation count."""
        s = self.sampler
        lines = [f"data: {s.position} global batches of {s.G}"]
        for k, name in enumerate(self.names):
            lines.append(
                f"  {name}: {s.sizes[k]} records, weight {float(s.weights[k]):.3f}, "
                f"in_batch_negatives={self.in_batch[k]}, {s.consumed[k]} examples read "
                f"({s.consumed[k] / s.sizes[k]:.2f} passes)"
            )
        lines.append(
            f"  texts truncated at max length on this rank: {self.truncated} of {self.texts}"
        )
        return "\n".join(lines)


def build_train_data(
    train_data: list[str],
    tokenizer,
    *,
    skip_bad_records: bool = False,
    in_batch_negatives: Sequence[bool | None] | None = None,
    data_cache_path: str | None = None,
    **kwargs,
) -> BlendedEmbeddingData:
    """Opens `--train-data` (`["a.jsonl"]` or `["0.3", "a.jsonl", "0.7", "b.jsonl"]`) and returns
    this rank's batches.

    Every record of every dataset is validated before the first batch (types, duplicate keys,
    and task names resolved against Table 6 for records without an `instruction`; see
    `records.record_from_dict`; for JSONL when its index is built, `jsonl_index`, reused by
    later starts until the file changes): a bad record is a ValueError naming `file:line`, the
    key and the cause (with `skip_bad_records`, skipped and counted). Under torch.distributed
    every rank of the default group must call it with the same `train_data` (one rank builds a
    missing index, the others map it). Call it before building the model, so
    bad data stops a run before it costs anything. Nothing here needs the model: only this rank's
    place in the data-parallel group (`dp_rank`, `dp_size`) and the tokenizer, which is first
    used by the first batch.

    Args:
        train_data: the `--train-data` items (see `parse_data_paths`).
        tokenizer: a tokenizer that adds BOS.
        skip_bad_records: `--skip-bad-records` (skipped records are counted and logged).
        in_batch_negatives: per dataset, a flag overriding the data's (None keeps it).
        data_cache_path: `--data-cache-path`: the folder of the JSONL indexes (None: beside
            each file).
        kwargs: `BlendedEmbeddingData` keywords (global_batch_size, micro_batch_size, ...).

    Raises:
        ValueError: the first bad record (`data/a.jsonl:12: key 'neg' must be a list of strings,
            got str`, `...: key 'query' appears twice`, `...: key 'task': unknown task ...`), and
            as `parse_data_paths`, `load_dataset_spec` and `BlendedSampler`.
        FileNotFoundError: as `load_dataset_spec`.
    """
    pairs = parse_data_paths(train_data)
    if in_batch_negatives is not None and len(in_batch_negatives) != len(pairs):
        raise ValueError(
            f"in_batch_negatives has {len(in_batch_negatives)} flags for {len(pairs)} datasets"
        )
    sources = [
        load_dataset_spec(
            path,
            skip_bad_records=skip_bad_records,
            in_batch_negatives=None if in_batch_negatives is None else in_batch_negatives[i],
            data_cache_path=data_cache_path,
        )
        for i, (_, path) in enumerate(pairs)
    ]
    data = BlendedEmbeddingData(sources, [w for w, _ in pairs], tokenizer, **kwargs)
    # What was opened; `summary()` (what was read) belongs at the end of training.
    s = data.sampler
    logger.info(
        "data: %d dataset(s) %s global batches of %d queries (%s)",
        len(data.names),
        "drawn by weight as whole" if s.composition == "homogeneous" else "blended into",
        s.G,
        ", ".join(f"{n} weight {float(w):.3f}" for n, w in zip(data.names, s.weights)),
    )
    return data
