"""Positive-aware hard-negative mining with a teacher encoder and FAISS.

For each query: retrieve the top candidates from the corpus (inner product of L2-normalised
embeddings), drop its positives (exact text match) and every candidate scoring at or above
`margin x` the positive's score (NV-Embed paper: margin 0.95), keep the best `num_negatives`.
With several positives the lowest positive score is the reference (the stricter threshold).

The corpus is embedded once, in shards saved next to the output (`OUT.cache/`), and searched
shard by shard, so it never has to fit in memory; queries are processed in chunks appended to
`OUT.partial` with a state file, so an interrupted run resumes where it stopped. Corpus lines
may carry an "id"; when all do, each output record also gets "neg_ids".

Only queries get an instruction: the `instruction` argument for all, else each record's own
`instruction`, else its task's template; none with `use_instruction=False`. Input records need a
`task` (or `instruction`) only when that instruction comes from the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_nvembed.data.records import (
    MissingInstructionError,
    ReadStats,
    iter_jsonl_lines,
    iter_records,
)
from megatron_nvembed.data.templates import query_instruction
from megatron_nvembed.logging_utils import get_logger

logger = get_logger(__name__)


class Encoder:
    """A sentence-transformers model behind `encode(texts, instruction=None) -> [n, d]`."""

    def __init__(self, model, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size

    def count_truncated(self, texts: list[str], instruction: str | None = None) -> int:
        """How many texts exceed the teacher's maximum sequence length (it truncates them)."""
        limit = getattr(self.model, "max_seq_length", None)
        tok = getattr(self.model, "tokenizer", None)
        if not limit or tok is None:
            return 0
        prefix = instruction or ""
        lengths = tok([prefix + t for t in texts], add_special_tokens=True)["input_ids"]
        return sum(len(ids) > limit for ids in lengths)

    def encode(self, texts: list[str], instruction: str | None = None) -> np.ndarray:
        emb = self.model.encode(
            texts,
            prompt=instruction or None,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return emb.astype(np.float32)


def load_encoder(model: str, batch_size: int = 64, export_dir: str | None = None) -> Encoder:
    """A sentence-transformers model (path or name), an exported NV-Embed directory, or a
    megatron_nvembed checkpoint (exported to `export_dir`, default a temporary folder, in fp32 and
    loaded from there: one process, resharded to TP = PP = 1)."""
    from sentence_transformers import SentenceTransformer

    from megatron_nvembed.checkpoint import is_checkpoint_dir

    if is_checkpoint_dir(model):
        import tempfile

        from megatron_nvembed.conversion.convert import export_hf
        from megatron_nvembed.parallel import initialize_model_parallel

        initialize_model_parallel(1, 1)
        target = Path(export_dir or tempfile.mkdtemp(prefix="nvembed_teacher_")) / "hf"
        export_hf(model, target, dtype="float32")
        logger.info("exported checkpoint %s to %s for mining", model, target)
        model = str(target)

    cfg = Path(model) / "config.json"
    trust = cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "nvembed"
    return Encoder(SentenceTransformer(model, trust_remote_code=trust, device="cpu"), batch_size)


@dataclass
class MiningSummary:
    queries: int = 0
    queries_short: int = 0
    """Queries that got fewer negatives than asked."""
    short_examples: list[str] = field(default_factory=list)
    dropped_by_margin: int = 0
    dropped_positives: int = 0
    seconds: float = 0.0
    corpus_texts: int = 0
    skipped_records: int = 0
    truncated_texts: int = 0
    """Corpus texts, queries and positives longer than the teacher's maximum length."""
    """Malformed input lines skipped (only with skip_bad_records)."""


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_corpus(path: str) -> tuple[list[str], list | None]:
    """Texts of the corpus, and their ids when every line carries one."""
    texts, ids = [], []
    for lineno, obj in iter_jsonl_lines(path):
        if not isinstance(obj.get("text"), str):
            raise ValueError(f'{path}:{lineno}: expected an object with a string "text"')
        texts.append(obj["text"])
        ids.append(obj.get("id"))
    return texts, (ids if all(i is not None for i in ids) else None)


def mine_hard_negatives(
    input_path: str,
    corpus_path: str,
    encoder: Encoder,
    output_path: str,
    *,
    num_negatives: int = 7,
    margin: float = 0.95,
    candidates: int = 50,
    shard_size: int = 100_000,
    chunk_size: int = 1024,
    instruction: str | None = None,
    use_instruction: bool = True,
    stop_after_chunks: int | None = None,
    progress: bool = True,
    skip_bad_records: bool = False,
) -> MiningSummary:
    """Fills each record's "neg" (see the module docstring); returns a summary.

    `stop_after_chunks` ends the run early (leaving the partial output and state) — how tests
    and users interrupt on purpose; a later call with the same arguments resumes.

    Raises:
        ValueError: naming file:line of a bad input record (e.g. one with neither "task" nor
            "instruction" when `use_instruction` and no `instruction`: the message says what to
            add) or a corpus line without "text"; a margin outside (0, 1].
    """
    import faiss
    from tqdm import tqdm

    if not 0 < margin <= 1:
        raise ValueError(f"--margin must be in (0, 1], got {margin}")
    out = Path(output_path)
    partial, state_file = (
        out.with_suffix(out.suffix + ".partial"),
        out.with_suffix(out.suffix + ".state.json"),
    )
    cache = out.with_suffix(out.suffix + ".cache")
    read = ReadStats()
    # records name their own instruction (task or "instruction") only when none is given for all
    needs_instruction = use_instruction and not instruction
    try:
        records = list(
            iter_records(
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
    corpus, corpus_ids = _load_corpus(corpus_path)
    fp = _fingerprint(
        input_path,
        os.path.getsize(input_path),
        corpus_path,
        os.path.getsize(corpus_path),
        num_negatives,
        margin,
        candidates,
        shard_size,
        chunk_size,
        instruction,
        use_instruction,
    )
    summary = MiningSummary(corpus_texts=len(corpus), skipped_records=read.skipped)
    done = 0
    if state_file.is_file() and partial.is_file():
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") == fp:
            done = state["done"]
            summary = MiningSummary(**state["summary"])
            logger.info("resuming %s after %d queries", output_path, done)
    if done == 0:
        partial.write_text("")
        shutil.rmtree(cache, ignore_errors=True)
        summary.truncated_texts = encoder.count_truncated(corpus)
    cache.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    shards = []
    for s, lo in enumerate(range(0, len(corpus), shard_size)):
        f = cache / f"shard_{s:05d}.npy"
        if not f.is_file():
            emb = encoder.encode(corpus[lo : lo + shard_size])
            np.save(cache / f"shard_{s:05d}.tmp.npy", emb)
            os.replace(cache / f"shard_{s:05d}.tmp.npy", f)
        shards.append((lo, f))

    chunks_run = 0
    bar = tqdm(total=len(records), initial=done, disable=not progress, desc="mining", unit="q")
    while done < len(records):
        chunk = records[done : done + chunk_size]
        instr = [
            (query_instruction(r.task, instruction or r.instruction) if use_instruction else None)
            for r in chunk
        ]
        q = (
            np.concatenate([encoder.encode([r.query], i) for r, i in zip(chunk, instr)])
            if len(set(instr)) > 1
            else encoder.encode([r.query for r in chunk], instr[0])
        )
        k = min(candidates, len(corpus))
        best_s = np.full((len(chunk), 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(chunk), 0), dtype=np.int64)
        for lo, f in shards:
            emb = np.load(f, mmap_mode="r")
            index = faiss.IndexFlatIP(emb.shape[1])
            index.add(np.ascontiguousarray(emb))
            s, i = index.search(q, min(k, emb.shape[0]))
            best_s = np.concatenate([best_s, s], axis=1)
            best_i = np.concatenate([best_i, i + lo], axis=1)
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
            best_s = np.take_along_axis(best_s, order, axis=1)
            best_i = np.take_along_axis(best_i, order, axis=1)
        summary.truncated_texts += sum(
            encoder.count_truncated([r.query], i) + encoder.count_truncated(r.pos)
            for r, i in zip(chunk, instr)
        )
        lines = []
        for row, rec in enumerate(chunk):
            pos_emb = encoder.encode(rec.pos)
            pos_score = float((pos_emb @ q[row]).min())
            positives = set(rec.pos)
            negs, neg_ids = [], []
            for score, idx in zip(best_s[row], best_i[row]):
                text = corpus[idx]
                if text in positives:
                    summary.dropped_positives += 1
                    continue
                if score >= margin * pos_score:
                    summary.dropped_by_margin += 1
                    continue
                if text not in negs:
                    negs.append(text)
                    if corpus_ids is not None:
                        neg_ids.append(corpus_ids[idx])
                if len(negs) == num_negatives:
                    break
            if len(negs) < num_negatives:
                summary.queries_short += 1
                if len(summary.short_examples) < 5:
                    summary.short_examples.append(rec.query)
            rec.neg = negs
            if corpus_ids is not None:
                rec.extra["neg_ids"] = neg_ids
            lines.append(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
        with open(partial, "a", encoding="utf-8") as fh:
            fh.writelines(lines)
        done += len(chunk)
        summary.queries = done
        summary.seconds += time.perf_counter() - start
        start = time.perf_counter()
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "done": done, "summary": asdict(summary)}))
        os.replace(tmp, state_file)
        bar.update(len(chunk))
        chunks_run += 1
        if (
            stop_after_chunks is not None
            and chunks_run >= stop_after_chunks
            and done < len(records)
        ):
            bar.close()
            return summary
    bar.close()
    os.replace(partial, out)
    state_file.unlink(missing_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    return summary
