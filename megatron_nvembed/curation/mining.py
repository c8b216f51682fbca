"""Positive-aware hard-negative mining with a teacher embedder, at corpus scale.

For each query: retrieve the top `candidates` corpus texts (inner product of L2-normalised
teacher embeddings, i.e. cosine), drop its positives (exact text match) and every candidate
scoring at or above `margin x` the positive's score (NV-Embed paper: margin 0.95), keep the best
`num_negatives`. With several positives the lowest positive score is the reference (the stricter
threshold). Corpus lines may carry an "id"; when all do, each output record also gets "neg_ids"
(as strings).

The teacher is any `evaluation.encoder.Embedder` (`load_embedder`: a megatron_nvembed
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
  file `OUT.state.json` records the run's fingerprint, the queries done and the byte size of
  `OUT.partial`. A rerun with the same inputs and options truncates `OUT.partial` to that size
  (a kill between the append and the state write duplicates nothing) and resumes; the finished
  file is renamed into place.
- Data-parallel (torchrun): the corpus shards are split by `encode_corpus`; each chunk is cut
  into blocks of `teacher.batch_size` queries, every rank takes a contiguous run of blocks,
  encodes each block's queries and positives in one `embed_local` call, searches and builds the
  output lines of its queries; rank 0 gathers them in input order, appends them and writes the
  state. A block's embeddings do not depend on the number of ranks, so the output is the same
  file as a one-process run's.

Only queries get an instruction: the `instruction` argument for all, else each record's own
`instruction`, else its task's template; none with `use_instruction=False`. Input records need a
`task` (or `instruction`) only when that instruction comes from the record; a record that lacks
it stops the run before the teacher is loaded or anything is encoded.

Over 400 lines: the mining pipeline's resumable phases (corpus shards, query chunks, search, the
positive-aware filter) and their data-parallel write-out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from megatron_nvembed.config import DEFAULT_QUERY_TEMPLATE
from megatron_nvembed.data.records import (
    MissingInstructionError,
    ReadStats,
    Record,
    iter_records,
)
from megatron_nvembed.data.templates import query_instruction
from megatron_nvembed.fileio import write_atomic
from megatron_nvembed.logging_utils import get_logger

logger = get_logger(__name__)

STATE_VERSION = 2


@dataclass
class MiningSummary:
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
    index: str = "exact"

    @classmethod
    def from_dict(cls, d: dict) -> MiningSummary:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------
# process group helpers (identities without one)


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _broadcast(obj):
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list | None:
    """Every rank's `obj` on rank 0 (list by global rank), None elsewhere."""
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _all_sum(value: int) -> int:
    dist = _dist()
    if dist is None:
        return value
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return sum(out)


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _global_rank() -> int:
    dist = _dist()
    return 0 if dist is None else dist.get_rank()


# ---------------------------------------------------------------------------------------------
# pieces


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_fingerprint(path: str | os.PathLike) -> dict:
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def query_prefix(
    rec: Record,
    instruction: str | None,
    use_instruction: bool,
    template: str = DEFAULT_QUERY_TEMPLATE,
) -> str:
    """The instruction prefix of a record's query ("" without instruction), in the teacher's
    query template."""
    if not use_instruction:
        return ""
    return query_instruction(rec.task, instruction or rec.instruction, template=template)


def _normalize(emb: np.ndarray) -> np.ndarray:
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def select_negatives(
    scores: np.ndarray,
    rows: np.ndarray,
    pos_score: float,
    positives: set[str],
    text_of: Callable[[int], str],
    *,
    margin: float,
    num_negatives: int,
) -> tuple[list[str], list[int], int, int]:
    """The positive-aware rule on one query's candidates (best first).

    Returns:
        (negative texts, their corpus rows, candidates dropped as positives, dropped by the
        margin); the counts cover the candidates examined until `num_negatives` were found.
    """
    negs: list[str] = []
    neg_rows: list[int] = []
    dropped_pos = dropped_margin = 0
    for score, row in zip(scores.tolist(), rows.tolist()):
        if row < 0:  # an approximate index found fewer candidates
            break
        text = text_of(row)
        if text in positives:
            dropped_pos += 1
            continue
        if score >= margin * pos_score:
            dropped_margin += 1
            continue
        if text not in negs:
            negs.append(text)
            neg_rows.append(row)
        if len(negs) == num_negatives:
            break
    return negs, neg_rows, dropped_pos, dropped_margin


@dataclass
class _Options:
    num_negatives: int
    margin: float
    candidates: int
    instruction: str | None
    use_instruction: bool
    index: str
    search_params: str
    device: str


def _mine_blocks(
    blocks: list[list[Record]], teacher, shards, corpus, opt: _Options
) -> tuple[list[bytes], list[tuple[bool, str, int, int]], int]:
    """Output lines of this rank's blocks, in order.

    Returns:
        (one JSONL line per record, (short, query, dropped positives, dropped by margin) per
        record, texts the teacher truncated).
    """
    from megatron_nvembed.retrieval.search import search

    recs = [r for b in blocks for r in b]
    if not recs:
        return [], [], 0
    template = getattr(teacher, "query_template", DEFAULT_QUERY_TEMPLATE)
    truncated_before = teacher.stats.truncated
    q_parts, pos_scores = [], []
    for block in blocks:
        # one call per block: its queries (with their instructions) and all their positives
        texts = [r.query for r in block] + [p for r in block for p in r.pos]
        prefixes = [query_prefix(r, opt.instruction, opt.use_instruction, template) for r in block]
        prefixes += [""] * (len(texts) - len(block))
        emb = _normalize(teacher.embed_local(texts, prefixes, label="queries and positives"))
        q, p = emb[: len(block)], emb[len(block) :]
        at = 0
        for i, r in enumerate(block):
            pos_scores.append(float((p[at : at + len(r.pos)] @ q[i]).min()))
            at += len(r.pos)
        q_parts.append(q)
    truncated = teacher.stats.truncated - truncated_before
    q = np.ascontiguousarray(np.concatenate(q_parts), dtype=np.float32)
    scores, rows = search(
        q,
        shards,
        opt.candidates,
        index=opt.index,
        params=opt.search_params,
        device=opt.device,
    )
    cache: dict[int, object] = {}

    def corpus_row(i: int):
        if i not in cache:
            cache[i] = corpus.row(i)
        return cache[i]

    lines, info = [], []
    with_ids = corpus.all_have_ids
    for j, rec in enumerate(recs):
        negs, neg_rows, d_pos, d_margin = select_negatives(
            scores[j],
            rows[j],
            pos_scores[j],
            set(rec.pos),
            lambda i: corpus_row(i).text,
            margin=opt.margin,
            num_negatives=opt.num_negatives,
        )
        rec.neg = negs
        if rec.pos_scores is not None:  # a teacher's scores of the replaced negatives
            rec.pos_scores = rec.neg_scores = None
        # an input's own ids would not match the new "neg"
        rec.neg_ids = [corpus_row(i).id for i in neg_rows] if with_ids else None
        lines.append((json.dumps(rec.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))
        info.append((len(negs) < opt.num_negatives, rec.query, d_pos, d_margin))
    return lines, info, truncated


def _split_blocks(chunk: list[Record], block: int, rank: int, size: int) -> list[list[Record]]:
    """Rank `rank`'s contiguous run of the chunk's blocks of `block` records."""
    blocks = [chunk[i : i + block] for i in range(0, len(chunk), block)]
    n = len(blocks)
    return blocks[n * rank // size : n * (rank + 1) // size]


def _remove_own_temporaries(*paths: Path) -> None:
    """Temporaries `write_atomic` left for these files (a killed run), nothing else."""
    import glob

    for p in paths:
        for t in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
            t.unlink(missing_ok=True)


def _chunks(records: Iterator[Record], chunk_size: int) -> Iterator[list[Record]]:
    while chunk := list(itertools.islice(records, chunk_size)):
        yield chunk


def mine_hard_negatives(
    input_path: str | os.PathLike,
    corpus_path: str | os.PathLike,
    teacher,
    output_path: str | os.PathLike,
    *,
    num_negatives: int = 7,
    margin: float = 0.95,
    candidates: int = 50,
    shard_size: int = 100_000,
    chunk_size: int = 1024,
    instruction: str | None = None,
    use_instruction: bool = True,
    corpus_embeddings: str | os.PathLike | None = None,
    index: str = "exact",
    search_params: str = "",
    stop_after_chunks: int | None = None,
    progress: bool = True,
    skip_bad_records: bool = False,
) -> MiningSummary:
    """Fills each record's "neg" (see the module docstring); returns a summary (complete on
    rank 0; under torchrun every rank calls this with the same arguments).

    Args:
        teacher: an `Embedder`, or a function without arguments returning one, called once the
            inputs are checked (so bad input costs no model load).
        shard_size: corpus texts per embedding shard (a reused `corpus_embeddings` folder keeps
            the shard size it was made with).
        corpus_embeddings: a folder for the corpus embeddings, kept after the run and reused;
            None: the private `OUT.cache/`.
        index, search_params: `retrieval.search.search`'s `index` and `params`.
        stop_after_chunks: end the run early (leaving the partial output and state) — how tests
            and users interrupt on purpose; a later call with the same arguments resumes.

    Raises:
        ValueError: naming file:line of a bad input record (e.g. one with neither "task" nor
            "instruction" when `use_instruction` and no `instruction`: the message says what to
            add) or a bad corpus line; a bad option; a `corpus_embeddings` folder made for
            another teacher or corpus.
        FileNotFoundError: a missing input or corpus file.
    """
    from tqdm import tqdm

    from megatron_nvembed.retrieval.corpus import JsonlCorpus, mining_row
    from megatron_nvembed.retrieval.search import EXACT, check_index, search
    from megatron_nvembed.retrieval.shards import META, encode_corpus

    if not 0 < margin <= 1:
        raise ValueError(f"--margin must be in (0, 1], got {margin}")
    for name, value in [
        ("num-negatives", num_negatives),
        ("candidates", candidates),
        ("shard-size", shard_size),
        ("chunk-size", chunk_size),
    ]:
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if index == EXACT and search_params:
        raise ValueError(f"--search-params {search_params!r}: the exact search takes none")
    out = Path(output_path)
    partial = out.parent / (out.name + ".partial")
    state_file = out.parent / (out.name + ".state.json")
    private = corpus_embeddings is None
    folder = out.parent / (out.name + ".cache") if private else Path(corpus_embeddings)

    # 1. inputs, checked before the teacher is loaded
    read = ReadStats()
    # records name their own instruction (task or "instruction") only when none is given for all
    needs_instruction = use_instruction and not instruction

    def records() -> Iterator[Record]:
        return iter_records(
            input_path,
            skip_bad_records=skip_bad_records,
            needs_instruction=needs_instruction,
            stats=ReadStats(),
        )

    if not Path(input_path).is_file():
        raise FileNotFoundError(f"{input_path}: no such file")
    try:
        total = sum(
            1
            for _ in iter_records(
                input_path,
                skip_bad_records=skip_bad_records,
                needs_instruction=needs_instruction,
                stats=read,
            )
        )
    except MissingInstructionError as err:
        raise ValueError(
            f"{err}; or give all queries one with --instruction TEXT, or none with --no-instruction"
        ) from err
    corpus = JsonlCorpus(corpus_path, mining_row)
    if len(corpus) == 0:
        raise ValueError(f"{corpus_path}: the corpus has no lines")

    # 2. the teacher
    if not hasattr(teacher, "embed_local"):
        teacher = teacher()
    check_index(index, search_params, int(teacher.dim))
    device = str(getattr(teacher, "device", "cpu"))
    is_main = _global_rank() == 0
    block = int(teacher.batch_size)
    if not private and (folder / META).is_file():
        try:  # a reused folder keeps its shard size (the output does not depend on it)
            shard_size = int(json.loads((folder / META).read_text())["shard_size"])
        except (ValueError, KeyError, TypeError):
            pass  # encode_corpus reports the folder
    fp = _fingerprint(
        {
            "version": STATE_VERSION,
            "input": _file_fingerprint(input_path),
            "corpus": corpus.fingerprint(),
            "teacher": teacher.identity(),
            "batches": [teacher.batch_size, teacher.token_budget],
            "options": [num_negatives, margin, candidates, chunk_size, instruction],
            "more": [use_instruction, skip_bad_records, index, search_params],
        }
    )

    # 3. resume (rank 0 owns the output files)
    start_state = None
    if is_main:
        _remove_own_temporaries(state_file, partial)
        start_state = _resume(state_file, partial, fp, output_path)
    done, saved = _broadcast(start_state)
    summary = MiningSummary.from_dict(saved) if saved else MiningSummary()
    summary.corpus_texts = len(corpus)
    summary.skipped_records = read.skipped
    summary.index = index

    # 4. the corpus embeddings (split over the data-parallel ranks)
    if is_main and private and folder.is_dir() and not (folder / META).is_file():
        shutil.rmtree(folder)  # a private cache of an older layout
    _barrier()
    truncated_before = teacher.stats.truncated
    shards = encode_corpus(
        teacher,
        corpus,
        folder,
        shard_size=shard_size,
        instruction="",
        normalize=True,
        on_mismatch="clear" if private else "error",
    )
    enc = teacher.last_encode
    if enc is not None and enc.computed_rows:
        summary.corpus_encoded += enc.computed_rows
        summary.corpus_seconds += enc.seconds
    # counted once per data-parallel rank (tensor-parallel ranks encode the same texts)
    computed = teacher.stats.truncated - truncated_before
    summary.truncated_texts += _all_sum(computed if teacher.is_writer else 0)
    if index != EXACT and done < total:
        # build (and save beside the shards) the index once, before the ranks search it
        if is_main:
            search(np.zeros((1, shards.dim), np.float32), shards, 1, index=index, params="")
        _barrier()

    # 5. queries, chunk by chunk
    opt = _Options(
        num_negatives=num_negatives,
        margin=margin,
        candidates=candidates,
        instruction=instruction,
        use_instruction=use_instruction,
        index=index,
        search_params=search_params,
        device=device,
    )
    rank, size = int(teacher.dp_rank), int(teacher.dp_size)
    bar = tqdm(
        total=total, initial=done, disable=not (progress and is_main), desc="mining", unit="q"
    )
    chunks_run = 0
    start = time.perf_counter()
    stream = itertools.islice(records(), done, None)
    for chunk in _chunks(stream, chunk_size):
        mine = _split_blocks(chunk, block, rank, size)
        lines, info, truncated = _mine_blocks(mine, teacher, shards, corpus, opt)
        payload = (rank, lines, info, truncated) if teacher.is_writer else None
        gathered = _gather(payload)
        done += len(chunk)
        chunks_run += 1
        if is_main:
            parts = sorted((p for p in gathered if p is not None), key=lambda p: p[0])
            data = b"".join(line for p in parts for line in p[1])
            got = sum(len(p[1]) for p in parts)
            if got != len(chunk):  # a broken split would silently lose records
                raise RuntimeError(f"chunk of {len(chunk)} queries: {got} output lines")
            for short, query, d_pos, d_margin in (x for p in parts for x in p[2]):
                summary.dropped_positives += d_pos
                summary.dropped_by_margin += d_margin
                if short:
                    summary.queries_short += 1
                    if len(summary.short_examples) < 5:
                        summary.short_examples.append(query)
            summary.truncated_texts += sum(p[3] for p in parts)
            with open(partial, "ab") as fh:
                fh.write(data)
                size_now = fh.tell()
            summary.queries = done
            summary.seconds += time.perf_counter() - start
            start = time.perf_counter()
            state = {
                "fingerprint": fp,
                "done": done,
                "partial_bytes": size_now,
                "summary": asdict(summary),
            }
            write_atomic(state_file, json.dumps(state))
            bar.update(len(chunk))
        if stop_after_chunks is not None and chunks_run >= stop_after_chunks and done < total:
            bar.close()
            _finish_summary(summary)
            _barrier()
            return summary
    bar.close()
    if done != total:  # the input changed while it was read
        raise RuntimeError(f"{input_path}: {done} records read, {total} counted at the start")
    summary.queries = done
    _finish_summary(summary)
    if is_main:
        os.replace(partial, out)
        state_file.unlink(missing_ok=True)
        if private:
            shutil.rmtree(folder, ignore_errors=True)
        logger.info(
            "mined %s: %d queries (%d short of %d negatives) in %.1fs, %.1f queries/s",
            out,
            summary.queries,
            summary.queries_short,
            num_negatives,
            summary.seconds,
            summary.queries_per_second,
        )
    _barrier()
    return summary


def _resume(state_file: Path, partial: Path, fp: str, output_path) -> tuple[int, dict | None]:
    """(queries done, saved summary) of a matching earlier run, with `partial` truncated to the
    size recorded after its last chunk; else (0, None) with `partial` emptied."""
    state = None
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            state = None
    if (
        isinstance(state, dict)
        and state.get("fingerprint") == fp
        and partial.is_file()
        and partial.stat().st_size >= int(state.get("partial_bytes", -1)) >= 0
    ):
        os.truncate(partial, int(state["partial_bytes"]))
        logger.info("resuming %s after %d queries", output_path, state["done"])
        return int(state["done"]), state["summary"]
    state_file.unlink(missing_ok=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb"):
        pass
    return 0, None


def _finish_summary(summary: MiningSummary) -> None:
    summary.queries_per_second = round(summary.queries / max(summary.seconds, 1e-9), 2)
    summary.corpus_passages_per_second = round(
        summary.corpus_encoded / max(summary.corpus_seconds, 1e-9), 2
    )


__all__ = ["MiningSummary", "mine_hard_negatives", "query_prefix", "select_negatives"]
