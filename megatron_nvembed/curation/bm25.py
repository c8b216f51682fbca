"""A thin layer over `bm25s` (a maintained sparse-matrix BM25): index texts, rank queries."""

from __future__ import annotations

import numpy as np


class BM25Index:
    """BM25 over `texts` (English stop words removed, lower-cased, bm25s's default scoring).

    Args:
        texts: the documents to index.
    """

    def __init__(self, texts: list[str]):
        import bm25s

        if not texts:
            raise ValueError("BM25 index needs at least one text")
        self._bm25s = bm25s
        self.size = len(texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(
            bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False
        )

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` documents per query.

        Returns:
            (indices [n, k] int, scores [n, k] float), best first; k is capped at the index size.
        """
        k = min(k, self.size)
        tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        return np.asarray(docs), np.asarray(scores)
