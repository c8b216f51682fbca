"""Top-k inner-product search of query embeddings over corpus embeddings, with FAISS.

`search(queries, corpus, k)` never forms the [queries x corpus] score matrix:

- `index="exact"` (default): each shard is searched exactly (FAISS brute-force inner product on
  CPU; on a GPU, FAISS's GPU kernel when the installed FAISS has one, else a torch matmul + top-k
  on the device; torch on CPU too when FAISS is not installed) and the per-shard top-k lists are
  merged. Memory: one shard plus [q, 2k].
  Results equal a plain `argsort` of the full score matrix, order included: ranks are by score,
  then by row (equal scores: the earlier row first).
- any other value is a FAISS index factory string for corpora whose embeddings do not fit in
  memory, e.g. `"IVF4096,PQ64"` (compressed codes) or `"HNSW32"`: trained on a seeded sample of
  `train_size` rows, filled shard by shard, searched with `params` (e.g. `"nprobe=64"`); saved
  next to the shards (`index_<hash>.faiss`) and reused while the shards and options are the same.

`corpus` is a `ShardedEmbeddings` or one in-memory float32 array (a single shard).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from megatron_nvembed.core.logging_utils import get_logger

logger = get_logger(__name__)

EXACT = "exact"
QUERY_BLOCK = 4096  # queries scored against a shard at once (bounds the [block, shard] scores)
_LOADED: dict = {}  # the last index used, by file: repeated searches (query chunks) reuse it


def _shards(corpus):
    if isinstance(corpus, np.ndarray):
        if corpus.ndim != 2:
            raise ValueError(f"corpus embeddings must be [n, d], got shape {corpus.shape}")
        return [(0, corpus)], corpus.shape[0], corpus.shape[1]
    return corpus, corpus.rows, corpus.dim


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _knn(q: np.ndarray, xb: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of `q` against `xb`: FAISS (its GPU kernel on a GPU when the
    installed FAISS has one); torch matmul + top-k without FAISS or on a GPU without FAISS-GPU."""
    faiss = _faiss()
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if faiss is not None and device.startswith("cuda") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        return faiss.knn_gpu(res, q, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    if faiss is not None and not device.startswith("cuda"):
        return faiss.knn(q, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    import torch

    scores = torch.from_numpy(q).to(device) @ torch.from_numpy(xb).to(device).T
    s, i = torch.topk(scores, k, dim=1)
    return s.cpu().numpy(), i.cpu().numpy()


def _shard_topk(q: np.ndarray, xb: np.ndarray, k: int, device: str):
    """The first `k` rows of `xb` per query by (score descending, row ascending), exactly.

    A kernel's top-k keeps an arbitrary subset of the rows tied at the k-th score; so one more
    hit is fetched, and a query whose k-th and (k+1)-th scores are equal is ranked again from
    its full score row (`q . xb`, a stable sort): the tie is then broken by row."""
    kk = min(k + 1, len(xb))
    s, i = _knn(q, xb, kk, device)
    s, i = np.asarray(s, np.float32), np.asarray(i, np.int64)
    if kk > k:
        tied = np.flatnonzero(s[:, k - 1] == s[:, k])
        for r in tied:
            full = np.asarray(xb, np.float32) @ q[r]
            order = np.argsort(-full, kind="stable")[: k + 1]
            s[r], i[r] = full[order], order
    return s[:, :k], i[:, :k]


def _merge(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the `k` best (score descending, then row ascending)."""
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def exact_search(
    queries: np.ndarray, corpus, k: int, *, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (see the module docstring). Returns (scores float32 [q, k'], rows int64
    [q, k']) with k' = min(k, corpus rows)."""
    shards, n, dim = _shards(corpus)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries have shape {q.shape}; the corpus is {dim}-dimensional")
    k = min(k, n)
    best_s = np.zeros((len(q), 0), np.float32)
    best_r = np.zeros((len(q), 0), np.int64)
    for lo, emb in shards:
        if len(emb) == 0:
            continue
        kk = min(k, len(emb))
        s_parts, r_parts = [], []
        for b in range(0, len(q), QUERY_BLOCK):
            s, i = _shard_topk(q[b : b + QUERY_BLOCK], emb, kk, device)
            s_parts.append(s)
            r_parts.append(i + lo)
        best_s, best_r = _merge(
            np.concatenate([best_s, np.concatenate(s_parts)], 1),
            np.concatenate([best_r, np.concatenate(r_parts)], 1),
            k,
        )
    return best_s, best_r


def _index_file(corpus, spec: str, train_size: int, seed: int) -> Path | None:
    folder = getattr(corpus, "folder", None)
    if folder is None:
        return None
    key = json.dumps([corpus.meta, spec, train_size, seed], sort_keys=True)
    return Path(folder) / f"index_{hashlib.sha256(key.encode()).hexdigest()[:16]}.faiss"


def check_index(index: str, params: str, dim: int) -> None:
    """A bad `index` / `params` pair is a ValueError naming the flag, before any encoding."""
    if index == EXACT:
        if params:
            raise ValueError(f"--search-params {params!r}: the exact search takes none")
        return
    try:
        import faiss
    except ImportError as err:
        raise ValueError(
            f"--index {index!r} needs FAISS: pip install faiss-cpu (or faiss-gpu)"
        ) from err
    try:
        built = faiss.index_factory(dim, index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(
            f"--index {index!r}: not a FAISS index factory string for {dim}-d vectors ({err})"
        ) from err
    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(built, params)
        except RuntimeError as err:
            raise ValueError(f"--search-params {params!r} for --index {index!r}: {err}") from err


def build_index(corpus, spec: str, *, train_size: int = 200_000, seed: int = 0):
    """A FAISS index from factory string `spec` (inner product) holding every corpus row, row i
    as id i; trained first on `train_size` rows drawn without replacement (seeded)."""
    import faiss

    shards, n, dim = _shards(corpus)
    check_index(spec, "", dim)
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(train_size, n), replace=False))
        sample = corpus.vectors(rows) if not isinstance(corpus, np.ndarray) else corpus[rows]
        logger.info("training FAISS index %s on %d of %d vectors", spec, len(rows), n)
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for _, emb in shards:
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
    return index


def search(
    queries: np.ndarray,
    corpus,
    k: int,
    *,
    index: str = EXACT,
    params: str = "",
    train_size: int = 200_000,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus rows per query by inner product (see the module docstring).

    Returns:
        (scores float32 [q, k'], rows int64 [q, k']), best first, k' = min(k, corpus rows);
        an approximate index may return fewer hits for a query (row -1, score -inf).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    check_index(index, params, _shards(corpus)[2])
    if index == EXACT:
        return exact_search(queries, corpus, k, device=device)
    import faiss

    cache = _index_file(corpus, index, train_size, seed)
    if cache is not None and str(cache) in _LOADED:
        built = _LOADED[str(cache)]
    elif cache is not None and cache.is_file():
        built = faiss.read_index(str(cache))
        logger.info("FAISS index %s read from %s", index, cache)
    else:
        built = build_index(corpus, index, train_size=train_size, seed=seed)
        if cache is not None:
            from megatron_nvembed.utils.fileio import write_with

            write_with(cache, lambda tmp: faiss.write_index(built, str(tmp)))
    if cache is not None:
        _LOADED.clear()  # keep one: indexes of big corpora are big
        _LOADED[str(cache)] = built
    if params:
        faiss.ParameterSpace().set_index_parameters(built, params)
    if device.startswith("cuda") and faiss.get_num_gpus() > 0:
        built = faiss.index_cpu_to_all_gpus(built)  # a copy: the cached CPU index is kept
    _, n, _ = _shards(corpus)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    s, i = built.search(q, min(k, n))
    s = np.where(i < 0, -np.inf, s).astype(np.float32)
    return s, i.astype(np.int64)


def describe(index: str, params: str) -> str:
    return "exact inner product" if index == EXACT else f"FAISS {index} ({params or 'defaults'})"


__all__ = ["EXACT", "build_index", "check_index", "describe", "exact_search", "search"]
