"""The query side of hard-negative mining (`curation.mining`), one step per function: a rank's
blocks of queries and their positives embedded by the teacher (`embed_blocks`), searched in the
corpus shards (`retrieval.search.search`), and each query's candidates filtered by the
positive-aware rule (`select_negatives`) into its output line (`output_lines`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from megatron_nvembed.core.config import DEFAULT_QUERY_TEMPLATE
from megatron_nvembed.curation.mining_options import MiningOptions
from megatron_nvembed.data.records import Record
from megatron_nvembed.data.templates import query_instruction


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
class Selection:
    """One query's outcome, for the summary (`MiningSummary.add_selection`)."""

    short: bool
    """Fewer negatives than asked."""
    query: str
    dropped_pos: int
    dropped_margin: int


def split_blocks(chunk: list[Record], block: int, rank: int, size: int) -> list[list[Record]]:
    """Rank `rank`'s contiguous run of the chunk's blocks of `block` records (of `size` ranks)."""
    blocks = [chunk[i : i + block] for i in range(0, len(chunk), block)]
    n = len(blocks)
    return blocks[n * rank // size : n * (rank + 1) // size]


def embed_blocks(
    blocks: list[list[Record]], teacher, opt: MiningOptions
) -> tuple[np.ndarray, list[float], int]:
    """The queries of `blocks` (with their instructions) and their positives, one teacher call
    per block (so a block's embeddings do not depend on how blocks are spread over ranks).

    Returns:
        (L2-normalised query embeddings [n, dim] float32 in record order, each query's lowest
        positive score, texts the teacher truncated).
    """
    template = getattr(teacher, "query_template", DEFAULT_QUERY_TEMPLATE)
    truncated_before = teacher.stats.truncated
    q_parts, pos_scores = [], []
    for block in blocks:
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
    return q, pos_scores, truncated


def output_lines(
    recs: list[Record],
    scores: np.ndarray,
    rows: np.ndarray,
    pos_scores: list[float],
    corpus,
    opt: MiningOptions,
) -> tuple[list[bytes], list[Selection]]:
    """Each record with its "neg" (and "neg_ids" when every corpus line has an id) filled from
    its candidates (`scores`, `rows`: [n, candidates], best first), as a JSONL line."""
    cache: dict[int, object] = {}

    def corpus_row(i: int):  # a candidate's text is read when first needed
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
        info.append(Selection(len(negs) < opt.num_negatives, rec.query, d_pos, d_margin))
    return lines, info


def mine_blocks(
    blocks: list[list[Record]], teacher, shards, corpus, opt: MiningOptions, device: str
) -> tuple[list[bytes], list[Selection], int]:
    """Output lines of this rank's blocks, in order: embed, search, select.

    Returns:
        (one JSONL line per record, one `Selection` per record, texts the teacher truncated).
    """
    from megatron_nvembed.retrieval.search import search

    recs = [r for b in blocks for r in b]
    if not recs:
        return [], [], 0
    q, pos_scores, truncated = embed_blocks(blocks, teacher, opt)
    scores, rows = search(
        q, shards, opt.candidates, index=opt.index, params=opt.search_params, device=device
    )
    lines, info = output_lines(recs, scores, rows, pos_scores, corpus, opt)
    return lines, info, truncated


__all__ = ["Selection", "mine_blocks", "query_prefix", "select_negatives", "split_blocks"]
