"""What a hard-negative mining run is asked to do (`MiningOptions`) and what it reports
(`MiningSummary`); `curation.mining.mine_hard_negatives` takes the one and returns the other."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from megatron_nvembed.retrieval.search import EXACT


@dataclass
class MiningOptions:
    """The options of `mine_hard_negatives` (the flags of `tools/mine_hard_negatives.py`)."""

    num_negatives: int = 7
    """Hard negatives kept per query (fewer when the candidates run out)."""
    margin: float = 0.95
    """In (0, 1]: a candidate scoring at or above `margin x` the positive's score is dropped
    (NV-Embed paper: 0.95)."""
    candidates: int = 50
    """Corpus texts retrieved per query before the filter."""
    shard_size: int = 100_000
    """Corpus texts per embedding shard (a reused `corpus_embeddings` folder keeps the shard
    size it was made with)."""
    chunk_size: int = 1024
    """Queries per resumable chunk (appended and recorded in the state file together)."""
    instruction: str | None = None
    """One query instruction for all records; None: each record's own, else its task's."""
    use_instruction: bool = True
    """False: queries are encoded without instruction (a teacher that takes none)."""
    corpus_embeddings: str | os.PathLike | None = None
    """A folder for the corpus embeddings, kept after the run and reused by later runs with the
    same teacher and corpus; None: the private `OUT.cache/`, removed after a successful run."""
    index: str = EXACT
    """`retrieval.search.search`'s `index`: "exact" or a FAISS factory string."""
    search_params: str = ""
    """`retrieval.search.search`'s `params` (search-time parameters of a FAISS index)."""
    stop_after_chunks: int | None = None
    """End the run early after this many query chunks, leaving the partial output and state
    (how tests and users interrupt on purpose); a later call with the same arguments resumes."""
    progress: bool = True
    """A progress bar over the queries (rank 0)."""
    skip_bad_records: bool = False
    """Skip (and count) malformed input lines instead of stopping."""

    def check(self) -> None:
        """Raises ValueError naming the flag of the first bad option."""
        if not 0 < self.margin <= 1:
            raise ValueError(f"--margin must be in (0, 1], got {self.margin}")
        for name in ("num_negatives", "candidates", "shard_size", "chunk_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.index == EXACT and self.search_params:
            raise ValueError(f"--search-params {self.search_params!r}: the exact search takes none")
        if self.stop_after_chunks is not None and self.stop_after_chunks < 1:
            raise ValueError(f"--stop-after-chunks must be >= 1, got {self.stop_after_chunks}")

    @property
    def needs_record_instruction(self) -> bool:
        """Whether records must name their own instruction (a "task" or "instruction"): only
        when queries get one and none is given for all."""
        return self.use_instruction and not self.instruction


@dataclass
class MiningSummary:
    """Counts and timings of a mining run (all runs of one output, when resumed)."""

    queries: int = 0
    queries_short: int = 0
    """Queries that got fewer negatives than asked."""
    short_examples: list[str] = field(default_factory=list)
    dropped_by_margin: int = 0
    dropped_positives: int = 0
    seconds: float = 0.0
    """Query phase (encoding queries and positives, search, selection), all runs of the output."""
    queries_per_second: float = 0.0
    corpus_texts: int = 0
    corpus_encoded: int = 0
    """Corpus texts the runs of this output encoded (0 when the embeddings were reused)."""
    corpus_seconds: float = 0.0
    corpus_passages_per_second: float = 0.0
    """Corpus encoding throughput over all data-parallel ranks (`embedder.last_encode`)."""
    skipped_records: int = 0
    """Malformed input lines skipped (only with skip_bad_records)."""
    truncated_texts: int = 0
    """Corpus texts (those encoded by these runs), queries and positives longer than the
    teacher's maximum length (it truncates them)."""
    index: str = EXACT
    teacher_fingerprint: str = ""
    """The fingerprint of the teacher's weights (`evaluation.encoder.model_fingerprint`)."""

    @classmethod
    def from_dict(cls, d: dict) -> MiningSummary:
        """The summary saved in a state file (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def add_selection(self, short: bool, query: str, dropped_pos: int, dropped_margin: int):
        """Counts one query's selection (see `mining_select.select_negatives`)."""
        self.dropped_positives += dropped_pos
        self.dropped_by_margin += dropped_margin
        if short:
            self.queries_short += 1
            if len(self.short_examples) < 5:
                self.short_examples.append(query)

    def finish(self) -> None:
        """Sets the throughputs from the counts and seconds."""
        self.queries_per_second = round(self.queries / max(self.seconds, 1e-9), 2)
        self.corpus_passages_per_second = round(
            self.corpus_encoded / max(self.corpus_seconds, 1e-9), 2
        )


__all__ = ["MiningOptions", "MiningSummary"]
