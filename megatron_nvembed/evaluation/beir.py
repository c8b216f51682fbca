"""Local BEIR-format folders: reading and checking them.

A BEIR folder holds `corpus.jsonl` (`{"_id", "title"?, "text"}`), `queries.jsonl`
(`{"_id", "text"}`) and `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header
line). `open_beir` keeps queries and qrels in memory and the corpus as a `JsonlCorpus` (byte
ranges only; qrels' corpus ids are checked during its one scan); `load_beir` also reads the
corpus texts (validation sets, tests); `require_queries` refuses a folder with nothing to
evaluate. Scoring is `evaluation.metrics`, the runs `evaluation.retrieval_eval`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from megatron_nvembed.retrieval.corpus import JsonlCorpus, beir_row


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


def _read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """The judgements and, per corpus id, the first line naming it."""
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if lineno == 1 and row and not row[-1].lstrip("-").isdigit():
                continue  # header
            if len(row) < 3 or not row[2].lstrip("-").isdigit():
                raise ValueError(f"{path}:{lineno}: expected query-id, corpus-id, score")
            qid, did, score = row[0], row[1], int(row[2])
            first_line.setdefault(did, lineno)
            qrels.setdefault(qid, {})[did] = score
    return qrels, first_line


def open_beir(folder: str | Path, split: str = "test") -> BeirFolder:
    """Reads a BEIR folder's queries and qrels and scans its corpus once (texts stay on disk).

    Only queries with judgements are kept (in file order). Every corpus id of the qrels must be
    in the corpus (checked during the scan, without keeping the corpus ids).

    Raises:
        FileNotFoundError / ValueError: naming the file (and line) at fault.
    """
    folder = Path(folder)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (corpus_path, queries_path, qrels_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: missing (BEIR folders need corpus.jsonl, queries.jsonl, qrels/{split}.tsv)"
            )
    qrels, first_line = _read_qrels(qrels_path)
    found: set[str] = set()

    def check(_, row) -> None:
        if row.id in first_line:
            found.add(row.id)

    corpus = JsonlCorpus(corpus_path, beir_row, on_row=check)
    missing = [d for d in first_line if d not in found]
    if missing:
        d = min(missing, key=first_line.__getitem__)
        raise ValueError(f"{qrels_path}:{first_line[d]}: corpus-id {d!r} not in corpus")
    queries: dict[str, str] = {}

    def keep(_, row) -> None:
        if row.id in qrels:
            queries[row.id] = row.text

    JsonlCorpus(queries_path, beir_row, on_row=keep)
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
