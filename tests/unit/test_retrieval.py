"""The corpus-scale pieces without a model: JSONL corpus read by row range, token-budget batches,
sharded corpus encoding (atomic, resumable, refuses foreign folders) and FAISS search.

The encoder here is `HashEmbedder`, an `Embedder` whose "model" maps each text to a fixed
pseudo-random vector (seeded by the text's SHA-256), so shards can be checked against vectors
computed independently of the package.

Exact search is compared with a plain NumPy computation: the full [queries x corpus] score matrix
and a stable argsort (row order exactly equal, scores within 1e-5: FAISS sums in another order).

Run alone: pytest tests/unit/test_retrieval.py
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from megatron_nvembed.data.buckets import length_grouped_batches
from megatron_nvembed.evaluation.embedder import Embedder
from megatron_nvembed.retrieval.corpus import JsonlCorpus, beir_row, embed_row, mining_row
from megatron_nvembed.retrieval.search import exact_search, search
from megatron_nvembed.retrieval.shards import (
    ShardedEmbeddings,
    encode_corpus,
    write_single_array,
)
from megatron_nvembed.utils.checksums import file_checksum, read_manifest

DIM = 16


def hash_vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


class HashEmbedder(Embedder):
    kind = "hash"
    dim = DIM
    device = torch.device("cpu")

    def __init__(self, **kw):
        super().__init__(show_progress=False, **kw)
        self.calls = 0
        self.source = "hash"

    def _lengths(self, texts, instructions):
        return [len((i + t).split()) + 2 for t, i in zip(texts, instructions)]

    def _embed_batch(self, texts, instructions):
        self.calls += 1
        return torch.from_numpy(np.stack([hash_vector(i + t) for t, i in zip(texts, instructions)]))


def write_corpus(path, n, ids=True, blank_every=0):
    lines = []
    for i in range(n):
        row = {"text": f"passage {i} " + "word " * (i % 7)}
        if ids:
            row["id"] = f"d{i}"
        lines.append(json.dumps(row))
        if blank_every and i % blank_every == 0:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n")
    return [json.loads(line)["text"] for line in lines if line.strip()]


def test_corpus_rows_by_range_and_errors(tmp_path):
    texts = write_corpus(tmp_path / "c.jsonl", 50, blank_every=7)
    c = JsonlCorpus(tmp_path / "c.jsonl", mining_row)
    assert len(c) == 50 and c.all_have_ids
    assert [r.text for r in c.rows(0, 50)] == texts
    assert [r.text for r in c.rows(13, 29)] == texts[13:29]
    assert c.row(49).id == "d49" and c.rows(60, 70) == []

    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: expected an object with a string"):
        JsonlCorpus(tmp_path / "bad.jsonl", mining_row)
    (tmp_path / "bad2.jsonl").write_text('{"_id": "x", "text": "a"}\n{"_id": "y", "text": \n')
    with pytest.raises(ValueError, match=r"bad2\.jsonl:2: malformed JSON"):
        JsonlCorpus(tmp_path / "bad2.jsonl", beir_row)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlCorpus(tmp_path / "nope.jsonl", mining_row)

    beir = tmp_path / "b.jsonl"
    beir.write_text(json.dumps({"_id": 7, "title": "T", "text": "body"}) + "\n")
    assert JsonlCorpus(beir, beir_row).row(0) == beir_row(
        {"_id": "7", "title": "T", "text": "body"}, ""
    )
    assert JsonlCorpus(beir, beir_row).row(0).text == "T body"
    emb = tmp_path / "e.jsonl"
    emb.write_text(json.dumps({"text": "q", "instruction": "Find it"}) + "\n")
    assert JsonlCorpus(emb, embed_row).row(0).instruction == "Instruct: Find it\nQuery: "

    # a file edited after the scan is detected, not read at stale offsets
    os.utime(tmp_path / "c.jsonl", ns=(0, 0))
    with pytest.raises(RuntimeError, match="changed while it was being read"):
        c.rows(0, 2)


def test_token_budget_batches_cover_every_row_within_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500).tolist()
    for budget, rows in ((1024, 64), (4096, 8), (100, 1000)):
        batches = length_grouped_batches(lengths, rows, budget)
        assert sorted(i for b in batches for i in b) == list(range(500))
        for b in batches:
            width = max(lengths[i] for i in b)
            assert len(b) <= rows
            assert len(b) * width <= budget or len(b) == 1
        firsts = [max(lengths[i] for i in b) for b in batches]
        assert firsts == sorted(firsts, reverse=True)  # longest batch first


def test_sharded_encoding_equals_independent_vectors_and_resumes(tmp_path):
    texts = write_corpus(tmp_path / "c.jsonl", 103)
    corpus = JsonlCorpus(tmp_path / "c.jsonl", mining_row)
    want = np.stack([hash_vector(t) for t in texts])

    e = HashEmbedder(batch_size=8, max_tokens=40)
    assert encode_corpus(e, corpus, tmp_path / "s", shard_size=10, stop_after_shards=3) is None
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("emb_*.npy")}
    assert sorted(done) == ["emb_00000.npy", "emb_00001.npy", "emb_00002.npy"]
    with pytest.raises(FileNotFoundError, match="8 of 11 shards missing"):
        ShardedEmbeddings(tmp_path / "s")

    e2 = HashEmbedder(batch_size=8, max_tokens=40)
    shards = encode_corpus(e2, corpus, tmp_path / "s", shard_size=10)
    assert e2.last_encode.computed_shards == 8 and e2.last_encode.computed_rows == 73
    for name, mtime in done.items():  # finished shards were not recomputed
        assert (tmp_path / "s" / name).stat().st_mtime_ns == mtime
    got = np.concatenate([emb for _, emb in shards])
    np.testing.assert_array_equal(got, want)
    assert shards.id_of(np.array([[0, 102], [55, 9]])).tolist() == [["d0", "d102"], ["d55", "d9"]]
    np.testing.assert_array_equal(shards.vectors([102, 3]), want[[102, 3]])
    assert shards.rows_of_ids({"d17", "d99", "zz"}) == {"d17": 17, "d99": 99}
    np.testing.assert_allclose(shards.sum(), want.sum(0, dtype=np.float64), rtol=1e-6)
    assert not list((tmp_path / "s").glob(".*.tmp"))

    record = write_single_array(shards, tmp_path / "all.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), want)
    # its record: the file's size and checksum (hashed as written), what it embeds
    assert record == tmp_path / "all.npy.json"
    manifest = read_manifest(record)
    assert list(manifest["files"]) == ["all.npy"] and manifest["meta"] == shards.meta
    assert manifest["files"]["all.npy"] == file_checksum(tmp_path / "all.npy")

    # normalised + another instruction: a different folder's content
    with pytest.raises(ValueError, match=r"holds embeddings of something else.*normalize"):
        encode_corpus(e2, corpus, tmp_path / "s", shard_size=10, normalize=True)
    e3 = HashEmbedder()
    cleared = encode_corpus(
        e3, corpus, tmp_path / "s", shard_size=10, normalize=True, on_mismatch="clear"
    )
    norms = np.linalg.norm(np.concatenate([x for _, x in cleared]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a corpus embedding folder"):
        encode_corpus(e3, corpus, tmp_path / "foreign", shard_size=10)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_a_stale_temporary_file_is_removed_and_a_partial_shard_is_not_a_shard(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 30, ids=False)
    corpus = JsonlCorpus(tmp_path / "c.jsonl", mining_row)
    e = HashEmbedder()
    encode_corpus(e, corpus, tmp_path / "s", shard_size=10, stop_after_shards=1)
    (tmp_path / "s" / ".emb_00001.npy.abc.tmp").write_bytes(b"half a shard")
    shards = encode_corpus(HashEmbedder(), corpus, tmp_path / "s", shard_size=10)
    assert not shards.has_ids and shards.ids(0) is None
    assert not list((tmp_path / "s").glob(".*.tmp"))
    assert shards.num_shards == 3
    # killed before meta.json was renamed into place: the folder holds only that temporary
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / ".meta.json.xyz.tmp").write_text("{")
    assert encode_corpus(HashEmbedder(), corpus, tmp_path / "t", shard_size=10).num_shards == 3


class InMemoryShards:
    """What `exact_search` reads of a `ShardedEmbeddings`: (first row, rows) per shard."""

    def __init__(self, d, shard):
        self.parts = [(lo, d[lo : lo + shard]) for lo in range(0, len(d), shard)]
        self.rows, self.dim = d.shape

    def __iter__(self):
        return iter(self.parts)


def _plain_topk(q, d, k):
    # Products summed in one fixed order per pair (no BLAS blocking): equal rows of `d` get
    # exactly equal scores, so ties are real ties and the stable sort breaks them by row.
    scores = (q.astype(np.float64)[:, None, :] * d.astype(np.float64)[None, :, :]).sum(-1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("shard_size", [7, 50, 1000])
def test_exact_search_equals_the_full_score_matrix(tmp_path, shard_size):
    texts = write_corpus(tmp_path / "c.jsonl", 203)
    corpus = JsonlCorpus(tmp_path / "c.jsonl", mining_row)
    shards = encode_corpus(HashEmbedder(), corpus, tmp_path / "s", shard_size=shard_size)
    d = np.stack([hash_vector(t) for t in texts])
    q = np.random.default_rng(1).standard_normal((31, DIM)).astype(np.float32)
    for k in (1, 10, 250):
        want_s, want_r = _plain_topk(q, d, k)
        got_s, got_r = search(q, shards, k)
        assert got_r.shape == (31, min(k, 203))
        np.testing.assert_array_equal(got_r, want_r)
        np.testing.assert_allclose(got_s, want_s, atol=1e-5)
        mem_s, mem_r = exact_search(q, d, k)  # one in-memory array
        np.testing.assert_array_equal(mem_r, want_r)


def test_exact_search_breaks_ties_by_row():
    base = np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)
    d = np.concatenate([base, base, base])  # every score three times
    q = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    _, got = search(q, d, 6)
    _, want = _plain_topk(q, d, 6)
    np.testing.assert_array_equal(got, want)
    # small integer vectors: many rows tie at the k-th score, inside one shard and across shards
    rng = np.random.default_rng(1)
    q = rng.integers(-2, 3, (24, 8)).astype(np.float32)
    d = rng.integers(-2, 3, (120, 8)).astype(np.float32)
    for k in (5, 50, 119):
        _, want = _plain_topk(q, d, k)
        np.testing.assert_array_equal(search(q, d, k)[1], want)
        for shard in (7, 40):
            np.testing.assert_array_equal(exact_search(q, InMemoryShards(d, shard), k)[1], want)


def test_approximate_index_probing_every_list_is_exact_and_is_cached(tmp_path):
    texts = write_corpus(tmp_path / "c.jsonl", 400)
    corpus = JsonlCorpus(tmp_path / "c.jsonl", mining_row)
    shards = encode_corpus(HashEmbedder(), corpus, tmp_path / "s", shard_size=64)
    d = np.stack([hash_vector(t) for t in texts])
    q = np.random.default_rng(4).standard_normal((20, DIM)).astype(np.float32)
    _, want = _plain_topk(q, d, 10)
    _, got = search(q, shards, 10, index="IVF8,Flat", params="nprobe=8", train_size=400)
    np.testing.assert_array_equal(got, want)
    assert len(list((tmp_path / "s").glob("index_*.faiss"))) == 1
    _, few = search(q, shards, 10, index="IVF8,Flat", params="nprobe=1", train_size=400)
    assert (few == want).mean() < 1.0  # one list of eight: approximate, so some hits differ
    with pytest.raises(ValueError, match="not a FAISS index factory string"):
        search(q, shards, 10, index="NoSuchIndex12")
    with pytest.raises(ValueError, match="the exact search takes none"):
        search(q, shards, 10, params="nprobe=3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_exact_search_on_the_gpu_equals_cpu():
    rng = np.random.default_rng(5)
    d = rng.standard_normal((5000, 64)).astype(np.float32)
    q = rng.standard_normal((100, 64)).astype(np.float32)
    cs, cr = search(q, d, 20)
    gs, gr = search(q, d, 20, device="cuda")
    np.testing.assert_array_equal(gr, cr)
    np.testing.assert_allclose(gs, cs, atol=1e-4)
