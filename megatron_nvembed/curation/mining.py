"""Positive-aware hard-negative mining with a teacher embedder, at corpus scale.

For each query: retrieve the top `candidates` corpus texts (inner product of L2-normalised
teacher embeddings, i.e. cosine), drop its positives (exact text match) and every candidate
scoring at or above `margin x` the positive's score (NV-Embed paper: margin 0.95), keep the best
`num_negatives`. With several positives the lowest positive score is the reference (the stricter
threshold). Corpus lines may carry an "id"; when all do, each output record also gets "neg_ids"
(as strings).

The teacher is any `evaluation.embedder.Embedder` (`load_embedder`: a megatron_nvembed
checkpoint, an NV-Embed-format folder, or a sentence-transformers folder); its raw embeddings are L2-normalised here.

Corpus scale:
- The corpus is a `retrieval.corpus.JsonlCorpus`: checked once, then read back by row; its texts
  are never all in memory (a candidate's text is read when the positive check or the output
  needs it).
- It is embedded once by `retrieval.shards.encode_corpus` (normalised, no instruction) into
  shards: by default the private `OUT.cache/` (rebuilt when made for another teacher or corpus,
  removed after a successful run), or a user-named `corpus_embeddings` folder, kept and reused by
  later runs on other query files with the same teacher and corpus (a folder made for anything
  else is refused). Memory is one shard, not the corpus.
- Search is `retrieval.search.search`: exact by default (per-shard top-k merged), or a FAISS
  factory index (`index`, `search_params`) for corpora whose embeddings do not fit in memory.
- Queries go in chunks of `chunk_size`, appended to `OUT.partial`; after each chunk the state
  file `OUT.state.json` records the run's fingerprint, the teacher's weights' fingerprint
  (`evaluation.encoder.model_fingerprint`; a rerun with another teacher is refused), the queries
  done and the byte size of `OUT.partial`. A rerun with the same inputs and options truncates
  `OUT.partial` to that size (a kill between the append and the state write duplicates nothing)
  and resumes; the finished file is renamed into place.
- Data-parallel (torchrun): the corpus shards are split by `encode_corpus`; each chunk is cut
  into blocks of `teacher.batch_size` queries, every rank takes a contiguous run of blocks,
  encodes each block's queries and positives in one `embed_local` call, searches and builds the
  output lines of its queries; rank 0 gathers them in input order, appends them and writes the
  state. A block's embeddings do not depend on the number of ranks, so the output is the same
  file as a one-process run's.

Only queries get an instruction: the `instruction` option for all, else each record's own
`instruction`, else its task's template; none with `use_instruction=False`. Input records need a
`task` (or `instruction`) only when that instruction comes from the record; a record that lacks
it stops the run before the teacher is loaded or anything is encoded.

The options are a `MiningOptions` (`curation.mining_options`); the steps, one function each: the
queries read and checked (`count_queries`), the corpus opened (`open_corpus`), the teacher loaded
(`_load_teacher`), the run started or resumed (`start_run`; the files in `curation.mining_state`),
the corpus embedded (`embed_corpus`), the queries mined chunk by chunk (`mine_queries`: per chunk
`mine_chunk`, whose search and positive-aware filter are `curation.mining_select`, then
`record_chunk`), the output put in place (`finish_run`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.curation.mining_options import MiningOptions, MiningSummary
from megatron_nvembed.curation.mining_select import mine_blocks, split_blocks
from megatron_nvembed.curation.mining_state import (
    STATE_VERSION,
    OutputFiles,
    all_sum,
    append_chunk,
    barrier,
    broadcast,
    file_fingerprint,
    fingerprint,
    gather,
    global_rank,
    publish,
    resume,
)
from megatron_nvembed.data.records import MissingInstructionError, ReadStats, Record, iter_records
from megatron_nvembed.retrieval.search import EXACT
from megatron_nvembed.utils.locking import rank0_output_lock

if TYPE_CHECKING:
    from megatron_nvembed.retrieval.corpus import JsonlCorpus
    from megatron_nvembed.retrieval.shards import ShardedEmbeddings

logger = get_logger(__name__)


def mine_hard_negatives(
    input_path: str | os.PathLike,
    corpus_path: str | os.PathLike,
    teacher,
    output_path: str | os.PathLike,
    options: MiningOptions | None = None,
) -> MiningSummary:
    """Fills each record's "neg" (see the module docstring); returns a summary (complete on
    rank 0; under torchrun every rank calls this with the same arguments).

    Args:
        input_path: training records (JSONL or Parquet).
        corpus_path: JSONL, `{"text": ..., "id"?: ...}` per line.
        teacher: an `Embedder`, or a function without arguments returning one, called once the
            inputs are checked (so bad input costs no model load).
        output_path: the records with "neg" filled (JSONL), beside it the run's state.
        options: `MiningOptions` (default: its defaults).

    Raises:
        ValueError: naming file:line of a bad input record (e.g. one with neither "task" nor
            "instruction" when `use_instruction` and no `instruction`: the message says what to
            add) or a bad corpus line; a bad option (naming its flag); a `corpus_embeddings`
            folder made for another teacher or corpus; another job writing `output_path`
            (`utils.locking.OutputLocked`, naming its holder).
        FileNotFoundError: a missing input or corpus file.
    """
    opt = options if options is not None else MiningOptions()
    opt.check()
    total, read = count_queries(input_path, opt)
    corpus = open_corpus(corpus_path)
    # One writer per output: global rank 0 holds its lock from before the teacher loads.
    with rank0_output_lock(output_path, "--output"):
        run = start_run(input_path, corpus, _load_teacher(teacher, opt), output_path, opt, total)
        run.summary.skipped_records = read.skipped
        run.shards = embed_corpus(run)
        if mine_queries(run):
            finish_run(run)
        else:
            run.summary.finish()
            barrier()
    return run.summary


# ---------------------------------------------------------------------------------------------
# the steps


def _records(input_path, opt: MiningOptions, stats: ReadStats) -> Iterator[Record]:
    return iter_records(
        input_path,
        skip_bad_records=opt.skip_bad_records,
        needs_instruction=opt.needs_record_instruction,
        stats=stats,
    )


def count_queries(input_path, opt: MiningOptions) -> tuple[int, ReadStats]:
    """Reads every input record once, before the teacher is loaded.

    Returns:
        (records to mine, the read's counts).

    Raises:
        FileNotFoundError: no input file.
        ValueError: a bad record (file:line); one that must name its own instruction and does
            not also says the flags that would give one.
    """
    if not Path(input_path).is_file():
        raise FileNotFoundError(f"{input_path}: no such file")
    read = ReadStats()
    try:
        total = sum(1 for _ in _records(input_path, opt, read))
    except MissingInstructionError as err:
        raise ValueError(
            f"{err}; or give all queries one with --instruction TEXT, or none with --no-instruction"
        ) from err
    return total, read


def open_corpus(corpus_path) -> JsonlCorpus:
    """The corpus as a `retrieval.corpus.JsonlCorpus` of mining rows, every line checked.

    Raises:
        FileNotFoundError: no corpus file. ValueError: a bad line (file:line), or no line.
    """
    from megatron_nvembed.retrieval.corpus import JsonlCorpus, mining_row

    corpus = JsonlCorpus(corpus_path, mining_row)
    if len(corpus) == 0:
        raise ValueError(f"{corpus_path}: the corpus has no lines")
    return corpus


def _load_teacher(teacher, opt: MiningOptions):
    """The teacher (called when given as a factory), its dimension checked against the index."""
    from megatron_nvembed.retrieval.search import check_index

    if not hasattr(teacher, "embed_local"):
        teacher = teacher()
    check_index(opt.index, opt.search_params, int(teacher.dim))
    return teacher


@dataclass
class MiningRun:
    """What the steps of one `mine_hard_negatives` call share."""

    input_path: str | os.PathLike
    opt: MiningOptions
    files: OutputFiles
    corpus: JsonlCorpus
    teacher: object
    """An `evaluation.embedder.Embedder` (a layer above this one: not imported)."""
    fp: str
    """The run's fingerprint (inputs, teacher, options), kept in the state file."""
    total: int
    done: int
    """Queries written to the partial output (by this run or the runs it resumes)."""
    summary: MiningSummary
    is_main: bool
    shards: ShardedEmbeddings | None = None
    """The corpus embeddings, once embedded."""
    clock: float = 0.0
    """When the query phase's current chunk started (`time.perf_counter`)."""


def start_run(input_path, corpus, teacher, output_path, opt: MiningOptions, total) -> MiningRun:
    """The run's fingerprint, and where an earlier run of the same fingerprint stopped (rank 0
    reads and cuts back the partial output, every rank gets its count and summary)."""
    files = OutputFiles.of(output_path, opt.corpus_embeddings)
    fp = fingerprint(
        {
            "version": STATE_VERSION,
            "input": file_fingerprint(input_path),
            "corpus": corpus.fingerprint(),
            "teacher": teacher.identity(),
            "batches": [teacher.batch_size, teacher.token_budget],
            "options": [
                opt.num_negatives,
                opt.margin,
                opt.candidates,
                opt.chunk_size,
                opt.instruction,
            ],
            "more": [opt.use_instruction, opt.skip_bad_records, opt.index, opt.search_params],
        }
    )
    is_main = global_rank() == 0
    resumed = None
    if is_main:
        try:
            resumed = resume(files, fp, teacher.fingerprint)
        except ValueError as err:
            resumed = str(err)
    resumed = broadcast(resumed)
    if isinstance(resumed, str):
        raise ValueError(resumed)
    done, saved = resumed
    summary = MiningSummary.from_dict(saved) if saved else MiningSummary()
    summary.teacher_fingerprint = teacher.fingerprint
    summary.corpus_texts = len(corpus)
    summary.index = opt.index
    return MiningRun(input_path, opt, files, corpus, teacher, fp, total, done, summary, is_main)


def _shard_size(files: OutputFiles, opt: MiningOptions) -> int:
    """`opt.shard_size`, or the shard size a reused embeddings folder was made with (the output
    does not depend on it)."""
    import json

    from megatron_nvembed.retrieval.shards import META

    if not files.private and (files.embeddings / META).is_file():
        try:
            return int(json.loads((files.embeddings / META).read_text())["shard_size"])
        except (ValueError, KeyError, TypeError):
            pass  # encode_corpus reports the folder
    return opt.shard_size


def embed_corpus(run: MiningRun) -> ShardedEmbeddings:
    """The corpus embeddings (normalised, no instruction; shards split over the data-parallel
    ranks, resumable), and a FAISS index built once before the ranks search it."""
    from megatron_nvembed.retrieval.search import search
    from megatron_nvembed.retrieval.shards import META, encode_corpus

    files, teacher, summary = run.files, run.teacher, run.summary
    if run.is_main and files.private and files.embeddings.is_dir():
        if not (files.embeddings / META).is_file():
            shutil.rmtree(files.embeddings)  # a private cache of an older layout
    barrier()
    truncated_before = teacher.stats.truncated
    shards = encode_corpus(
        teacher,
        run.corpus,
        files.embeddings,
        shard_size=_shard_size(files, run.opt),
        instruction="",
        normalize=True,
        on_mismatch="clear" if files.private else "error",
    )
    enc = teacher.last_encode
    if enc is not None and enc.computed_rows:
        summary.corpus_encoded += enc.computed_rows
        summary.corpus_seconds += enc.seconds
    # counted once per data-parallel rank (tensor-parallel ranks encode the same texts)
    computed = teacher.stats.truncated - truncated_before
    summary.truncated_texts += all_sum(computed if teacher.is_writer else 0)
    if run.opt.index != EXACT and run.done < run.total:
        # build (and save beside the shards) the index once, before the ranks search it
        if run.is_main:
            search(np.zeros((1, shards.dim), np.float32), shards, 1, index=run.opt.index, params="")
        barrier()
    return shards


def _chunks(records: Iterator[Record], chunk_size: int) -> Iterator[list[Record]]:
    while chunk := list(itertools.islice(records, chunk_size)):
        yield chunk


def mine_queries(run: MiningRun) -> bool:
    """The queries not done yet, chunk by chunk, appended to the partial output.

    Returns:
        True when every query is done; False when `stop_after_chunks` ended the run first.
    """
    from tqdm import tqdm

    opt = run.opt
    show = opt.progress and run.is_main
    bar = tqdm(total=run.total, initial=run.done, disable=not show, desc="mining", unit="q")
    chunks_run = 0
    run.clock = time.perf_counter()
    stream = itertools.islice(_records(run.input_path, opt, ReadStats()), run.done, None)
    for chunk in _chunks(stream, opt.chunk_size):
        gathered = mine_chunk(run, chunk)
        run.done += len(chunk)
        chunks_run += 1
        if run.is_main:
            record_chunk(run, gathered, len(chunk))
            bar.update(len(chunk))
        stop = opt.stop_after_chunks
        if stop is not None and chunks_run >= stop and run.done < run.total:
            bar.close()
            return False
    bar.close()
    if run.done != run.total:  # the input changed while it was read
        raise RuntimeError(
            f"{run.input_path}: {run.done} records read, {run.total} counted at the start"
        )
    return True


def mine_chunk(run: MiningRun, chunk: list[Record]) -> list | None:
    """This rank's blocks of the chunk mined (`mining_select.mine_blocks`), gathered on rank 0.

    Returns:
        On rank 0, per rank: (rank, lines, selections, truncated texts), or None for a rank that
        writes nothing (a tensor-parallel peer); None on other ranks.
    """
    teacher = run.teacher
    rank, size = int(teacher.dp_rank), int(teacher.dp_size)
    mine = split_blocks(chunk, int(teacher.batch_size), rank, size)
    device = str(getattr(teacher, "device", "cpu"))
    lines, info, truncated = mine_blocks(mine, teacher, run.shards, run.corpus, run.opt, device)
    return gather((rank, lines, info, truncated) if teacher.is_writer else None)


def record_chunk(run: MiningRun, gathered: list, chunk_len: int) -> None:
    """Rank 0: the gathered lines in input order appended, the summary and state updated."""
    parts = sorted((p for p in gathered if p is not None), key=lambda p: p[0])
    got = sum(len(p[1]) for p in parts)
    if got != chunk_len:  # a broken split would silently lose records
        raise RuntimeError(f"chunk of {chunk_len} queries: {got} output lines")
    summary = run.summary
    for sel in (x for p in parts for x in p[2]):
        summary.add_selection(sel.short, sel.query, sel.dropped_pos, sel.dropped_margin)
    summary.truncated_texts += sum(p[3] for p in parts)
    summary.queries = run.done
    now = time.perf_counter()
    summary.seconds += now - run.clock
    run.clock = now
    append_chunk(
        run.files, b"".join(line for p in parts for line in p[1]), run.fp, run.done, summary
    )


def finish_run(run: MiningRun) -> None:
    """Every query done: rank 0 renames the output into place, removes the state (and a
    private embeddings folder) and logs the summary."""
    summary = run.summary
    summary.queries = run.done
    summary.finish()
    if run.is_main:
        publish(run.files)
        logger.info(
            "mined %s: %d queries (%d short of %d negatives) in %.1fs, %.1f queries/s",
            run.files.out,
            summary.queries,
            summary.queries_short,
            run.opt.num_negatives,
            summary.seconds,
            summary.queries_per_second,
        )
    barrier()


__all__ = ["MiningOptions", "MiningSummary", "mine_hard_negatives"]
