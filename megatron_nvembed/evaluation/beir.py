"""Local BEIR-format folders: reading and checking them.

A BEIR folder holds `corpus.jsonl` (`{"_id", "title"?, "text"}`), `queries.jsonl`
(`{"_id", "text"}`) and `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header
line). `open_beir` keeps queries and qrels in memory and the corpus as a `JsonlCorpus` (byte
ranges only; qrels' corpus ids are looked up during its one scan; duplicated ids refused, qrels
naming missing queries or documents counted in one warning and scored as MTEB scores them: see
`open_beir`); `load_beir` also reads the
corpus texts (validation sets, tests); `require_queries` refuses a folder with nothing to
evaluate. Scoring is `evaluation.metrics`, the runs `evaluation.retrieval_eval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.data.utf8 import utf8_error
from megatron_nvembed.retrieval.corpus import JsonlCorpus, beir_row
from megatron_nvembed.utils.fileio import resolve_inside

logger = get_logger(__name__)


@dataclass
class BeirData:
    """A BEIR folder read whole, corpus texts included (see `load_beir`)."""

    corpus_ids: list[str]
    corpus: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]


@dataclass
class BeirFolder:
    """A BEIR folder with its corpus left on disk (see `open_beir`)."""

    folder: Path
    split: str
    corpus: JsonlCorpus
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]

    @property
    def qrels_path(self) -> Path:
        return self.folder / "qrels" / f"{self.split}.tsv"


HEADER = ("query-id", "corpus-id", "score")
"""The qrels header BEIR writes and MTEB reads its columns by."""


def _read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    """The judgements and the line of each (query-id, corpus-id) pair.

    Line 1 must be the header `query-id<TAB>corpus-id<TAB>score` (a UTF-8 BOM before it is
    allowed); every other non-blank line holds three tab-separated fields: non-empty ids (kept as
    written) and an integer score (MTEB casts it to int32). A pair listed twice is refused (MTEB builds each query's judgements as a dict,
    `RetrievalDatasetLoader._load_qrels` in mteb/abstasks/retrieval_dataset_loaders.py, so one
    of the two scores would silently be dropped).

    Raises:
        ValueError: naming file:line (bytes that are not UTF-8: `data.utf8.utf8_error`).
    """
    qrels: dict[str, dict[str, int]] = {}
    line_of: dict[tuple[str, str], int] = {}
    header_seen = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(utf8_error(where, err)) from err
            text = text.rstrip("\r\n")
            if not header_seen:
                fields = tuple(c.strip() for c in text.removeprefix("\ufeff").split("\t"))
                if fields != HEADER:
                    raise ValueError(
                        f"{where}: expected the header {chr(9).join(HEADER)!r} (BEIR's; MTEB "
                        f"reads the columns by these names), found {text[:80]!r}"
                    )
                header_seen = True
                continue
            if not text.strip():
                continue
            row = text.split("\t")
            if len(row) != 3:
                raise ValueError(
                    f"{where}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                    f"found {len(row)}"
                )
            qid, did, score = row[0], row[1], row[2].strip()
            if not qid or not did:
                raise ValueError(f"{where}: empty {'query-id' if not qid else 'corpus-id'}")
            if not score.lstrip("+-").isdigit():
                raise ValueError(f"{where}: score {score!r} is not an integer")
            if (qid, did) in line_of:
                raise ValueError(
                    f"{path}: query-id {qid!r} and corpus-id {did!r} on lines "
                    f"{line_of[qid, did]} and {lineno} (a pair is judged once)"
                )
            line_of[qid, did] = lineno
            qrels.setdefault(qid, {})[did] = int(score)
    if not header_seen:
        raise ValueError(f"{path}:1: empty (expected the header {chr(9).join(HEADER)!r})")
    return qrels, line_of


def _missing(
    line_of: dict[tuple[str, str], int], known: set[str] | dict, column: int
) -> tuple[int, int, str, int] | None:
    """(lines, distinct ids, first id, its line) of the qrels lines whose id in `column` (0:
    query-id, 1: corpus-id) is not in `known`; None when there is none."""
    lines = [(n, pair[column]) for pair, n in line_of.items() if pair[column] not in known]
    if not lines:
        return None
    n, first = min(lines)
    return len(lines), len({i for _, i in lines}), first, n


def open_beir(folder: str | Path, split: str = "test") -> BeirFolder:
    """Reads a BEIR folder's queries and qrels and scans its corpus once (texts stay on disk).

    Refused, naming file:line: a malformed line, bytes that are not UTF-8, an id held by two
    lines of corpus.jsonl or queries.jsonl (both lines named), a qrels (query-id, corpus-id)
    pair listed twice (both lines named), a missing or other qrels header (see `_read_qrels`).

    Qrels lines naming a query missing from queries.jsonl or a document missing from the corpus
    are counted in one warning (the qrels file, the counts, the first such id and its line) and
    scored as MTEB scores them. MTEB (mteb >= 2, read in 2.26): `AbsTaskRetrieval._evaluate_subset`
    (mteb/abstasks/retrieval.py, `_filter_queries_without_positives`) searches only the queries
    that have judgements; `calculate_retrieval_scores` (mteb/_evaluators/retrieval_metrics.py)
    scores the search results with pytrec_eval, which evaluates only queries present in both the
    results and the qrels and averages over those. So a judged query absent from queries.jsonl is
    not scored at all (neither in the sum nor in the count); a judged document absent from the
    corpus stays in its query's judgements: it counts in the ideal DCG and in recall's
    denominator and is never retrieved. Here the first are dropped from `qrels` and the second
    kept, and `metrics.ranking_metrics` gives the same nDCG / recall. Queries without judgements
    are not kept either (in file order).

    Raises:
        FileNotFoundError / ValueError: naming the file (and line) at fault; a file that is a
            symbolic link (or in a linked `qrels/`) leading out of the folder (before any is read).
    """
    folder = Path(folder)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (corpus_path, queries_path, qrels_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: missing (BEIR folders need corpus.jsonl, queries.jsonl, qrels/{split}.tsv)"
            )
        resolve_inside(p, folder)  # a symbolic link out of the folder is not read
    qrels, line_of = _read_qrels(qrels_path)
    judged_docs = {d for _, d in line_of}
    found: set[str] = set()

    def check(_, row) -> None:
        if row.id in judged_docs:
            found.add(row.id)

    corpus = JsonlCorpus(corpus_path, beir_row, on_row=check, unique_ids=True)
    queries: dict[str, str] = {}

    def keep(_, row) -> None:
        if row.id in qrels:
            queries[row.id] = row.text

    JsonlCorpus(queries_path, beir_row, on_row=keep, unique_ids=True)
    missing_q = _missing(line_of, queries, 0)
    missing_d = _missing(line_of, found, 1)
    if missing_q or missing_d:
        parts = []
        for what, file, m in (
            ("query-id", "queries.jsonl", missing_q),
            ("corpus-id", "corpus.jsonl", missing_d),
        ):
            if m:
                lines, ids, first, n = m
                parts.append(
                    f"{lines} line(s) name {ids} {what}(s) not in {file} (first {first!r}, "
                    f"line {n})"
                )
        logger.warning(
            "%s: %s; scored as MTEB scores them: such queries are not scored, such documents "
            "count as relevant and never retrieved",
            qrels_path,
            "; ".join(parts),
        )
    qrels = {q: judged for q, judged in qrels.items() if q in queries}
    return BeirFolder(folder, split, corpus, list(queries), list(queries.values()), qrels)


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """`open_beir`, with the corpus texts read into memory (small sets: validation, tests).

    Raises:
        FileNotFoundError / ValueError: naming the file (and line) at fault.
    """
    b = open_beir(folder, split)
    rows = b.corpus.rows(0, len(b.corpus))
    return BeirData([r.id for r in rows], [r.text for r in rows], b.query_ids, b.queries, b.qrels)


def require_queries(data: BeirFolder) -> None:
    """Raises ValueError (naming the file) when no judged query is in queries.jsonl or the
    corpus is empty: nothing to evaluate."""
    if not data.query_ids:
        raise ValueError(f"{data.qrels_path}: no judged query is in queries.jsonl")
    if len(data.corpus) == 0:
        raise ValueError(f"{data.corpus.path}: no document")
