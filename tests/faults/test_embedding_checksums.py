"""Embedding shards that prove their bytes, and outputs that name their model.

Real damage on disk to the shards of `retrieval.shards.encode_corpus` (what `tools/embed.py`,
mining and BEIR evaluation write): a truncated shard, a flipped byte, a `meta.json` replaced by
another model's run's, a model folder whose weights were replaced at the same path. The models
are two tiny sentence-transformers folders built here (same architecture, other random weights),
loaded once per module; everything runs in this process (`tools/embed.py`'s `main` is called).
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from megatron_nvembed.evaluation.encoder import load_embedder, model_fingerprint
from megatron_nvembed.retrieval.corpus import JsonlCorpus, mining_row
from megatron_nvembed.retrieval.shard_files import ShardError
from megatron_nvembed.retrieval.shards import ShardedEmbeddings, encode_corpus

pytestmark = pytest.mark.faults

TEXTS = [f"passage {i} about {w}" for i, w in enumerate(["plants", "sky", "rivers"] * 4)]
SHARD = 4  # 12 texts: 3 shards


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny sentence-transformers folders ("a", "b": other weights), loaded."""
    from megatron_nvembed.testing import build_qwen3_embedding_tokenizer, save_tiny_qwen3_embedding

    root = tmp_path_factory.mktemp("models")
    build_qwen3_embedding_tokenizer(TEXTS, root / "tok")
    for name, seed in (("a", 0), ("b", 1)):
        save_tiny_qwen3_embedding(root / name, root / "tok", seed=seed)
    loaded = {n: load_embedder(root / n, show_progress=False) for n in ("a", "b")}
    return root, loaded


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    )
    return JsonlCorpus(path, mining_row)


def _all(shards: ShardedEmbeddings) -> np.ndarray:
    return np.concatenate([np.array(e) for _, e in shards])


@pytest.mark.parametrize("damage", ["truncated", "byte flipped"])
def test_resume_recomputes_a_damaged_shard(models, corpus, tmp_path, caplog, damage):
    """Fault: a finished embedding shard is truncated or has a byte flipped on disk (a full disk, a bad copy, a failing drive) before a rerun of the same command.
    Happens: the rerun verifies every finished shard against its record, names the damaged file in one log line and recomputes that shard; the intact ones are kept.
    Do: nothing; check the log line if the disk is suspect."""
    _, m = models
    folder = tmp_path / "s"
    want = _all(encode_corpus(m["a"], corpus, folder, shard_size=SHARD))
    target = folder / "emb_00001.npy"
    data = bytearray(target.read_bytes())
    if damage == "truncated":
        target.write_bytes(data[: len(data) - 40])
    else:
        data[-5] ^= 0x10  # inside the float data
        target.write_bytes(bytes(data))
    kept = {p: (folder / p).stat().st_mtime_ns for p in ("emb_00000.npy", "emb_00002.npy")}
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed.retrieval.shards"):
        shards = encode_corpus(m["a"], corpus, folder, shard_size=SHARD)
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and str(target) in lines[0], lines
    assert m["a"].last_encode.computed_shards == 1
    assert {p: (folder / p).stat().st_mtime_ns for p in kept} == kept
    np.testing.assert_array_equal(_all(shards), want)


def test_reader_refuses_a_damaged_shard_naming_the_file(models, corpus, tmp_path):
    """Fault: a shard of a finished embedding folder has a byte flipped, or its ids file is truncated, after it was written.
    Happens: `ShardedEmbeddings` (search, mining, `--output`'s single array) verifies each file before its first use and refuses the damaged one with an error naming it; no damaged vector is served.
    Do: rerun the embedding command on the folder: it recomputes the damaged shard."""
    _, m = models
    folder = tmp_path / "s"
    encode_corpus(m["a"], corpus, folder, shard_size=SHARD)
    emb = folder / "emb_00002.npy"
    data = bytearray(emb.read_bytes())
    data[-1] ^= 0x01
    emb.write_bytes(bytes(data))
    shards = ShardedEmbeddings(folder)
    np.asarray(shards.embeddings(0))  # intact shards still read
    with pytest.raises(ShardError, match=f"{emb}: damaged"):
        shards.embeddings(2)
    with pytest.raises(ShardError, match="emb_00002.npy: damaged"):
        list(shards)

    ids = folder / "ids_00001.npy"
    ids.write_bytes(ids.read_bytes()[:-8])
    with pytest.raises(ShardError, match=f"{ids}: .* bytes, its record emb_00001.json says"):
        ShardedEmbeddings(folder)


def test_a_meta_json_of_another_models_run_is_refused(models, corpus, tmp_path, capsys):
    """Fault: an embedding folder's `meta.json` is replaced by the one of a run with another model (a copy mix-up), so the folder claims model B's embeddings while its shards are model A's.
    Happens: every shard's record names the model that made it; a resume with model B and a reader both refuse the folder, naming both model fingerprints (exit 2 for `tools/embed.py`); a private cache (mining's `OUT.cache`) is cleared and recomputed.
    Do: delete the folder (or put its own `meta.json` back) and rerun."""
    root, m = models
    fa, fb = model_fingerprint(root / "a", "sentence-transformers"), m["b"].fingerprint
    assert fa == m["a"].fingerprint and fa != fb
    a_dir, b_dir = tmp_path / "a_run", tmp_path / "b_run"
    encode_corpus(m["a"], corpus, a_dir, shard_size=SHARD, stop_after_shards=2)
    want_b = _all(encode_corpus(m["b"], corpus, b_dir, shard_size=SHARD))
    shutil.copy(b_dir / "meta.json", a_dir / "meta.json")

    with pytest.raises(ValueError, match=f"made by model {fa}, but .*meta.json says model {fb}"):
        encode_corpus(m["b"], corpus, a_dir, shard_size=SHARD)
    assert (a_dir / "emb_00000.npy").is_file()  # a user's folder is left as it was
    with pytest.raises(FileNotFoundError, match="1 of 3 shards missing"):
        ShardedEmbeddings(a_dir)
    shutil.copy(b_dir / "meta.json", a_dir / "meta.json")
    for name in ("emb_00002.npy", "ids_00002.npy", "emb_00002.json"):
        shutil.copy(b_dir / name, a_dir / name)  # complete, but mixed
    with pytest.raises(ShardError, match=f"made by model {fa}, but .*meta.json says model {fb}"):
        ShardedEmbeddings(a_dir)

    cleared = encode_corpus(m["b"], corpus, a_dir, shard_size=SHARD, on_mismatch="clear")
    np.testing.assert_array_equal(_all(cleared), want_b)

    from tools.embed import main as embed_main

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    flags = ["--input", str(tmp_path / "in.jsonl"), "--shard-size", str(SHARD)]
    for name in ("a", "b"):
        assert (
            embed_main([*flags, "--load", str(root / name), "--output-dir", f"{tmp_path}/t{name}"])
            == 0
        )
    shutil.copy(tmp_path / "tb" / "meta.json", tmp_path / "ta" / "meta.json")
    capsys.readouterr()
    assert embed_main([*flags, "--load", str(root / "b"), "--output-dir", f"{tmp_path}/ta"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --output-dir: {tmp_path / 'ta' / 'emb_00000.json'}: "), err
    assert f"made by model {fa}, but" in err and f"says model {fb}" in err, err


def test_resume_with_other_weights_at_the_same_path_is_refused(models, tmp_path, capsys):
    """Fault: `tools/embed.py` is rerun on an unfinished output after the model folder it names got other weights (a newer export copied over it, same path).
    Happens: the output's `meta.json` records the fingerprint of the weights (sizes and checksums of the weight files, not their times); the rerun is refused with one error naming both fingerprints, exit 2, and no shard is touched.
    Do: embed into a new folder (or delete the old one) with the new model."""
    from tools.embed import main as embed_main

    root, m = models
    model = tmp_path / "model"
    shutil.copytree(root / "a", model)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    flags = ["--load", model, "--input", tmp_path / "in.jsonl", "--output-dir", out]
    flags = [*map(str, flags), "--shard-size", str(SHARD)]
    assert embed_main(flags) == 0
    (out / "emb_00002.json").unlink()  # unfinished: the last shard's record is missing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"]["fingerprint"] == m["a"].fingerprint  # a copy: same weights, same print

    shutil.rmtree(model)
    shutil.copytree(root / "b", model)  # model b's weights, same path
    capsys.readouterr()
    assert embed_main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --output-dir: {out}: holds embeddings of something else"), err
    assert f"made by model {m['a'].fingerprint}, this run's is {m['b'].fingerprint}" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_mining_resume_with_another_teacher_is_refused(models, corpus, tmp_path):
    """Fault: an interrupted hard-negative mining run is rerun with another teacher (other weights) into the same output.
    Happens: the state file records the teacher's fingerprint (so does the summary); the rerun is refused naming the state file and both fingerprints, before anything is embedded, and the partial output is kept.
    Do: delete `OUT.partial` and `OUT.state.json` (or choose another output) to mine with the new teacher."""
    from megatron_nvembed.curation.mining import MiningOptions, mine_hard_negatives

    _, m = models
    queries = tmp_path / "q.jsonl"
    words = ["plants", "sky", "rivers", "sky"]
    rows = [{"query": f"what about {w}", "pos": [TEXTS[i]], "neg": []} for i, w in enumerate(words)]
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    opt = dict(
        num_negatives=2,
        candidates=6,
        shard_size=SHARD,
        chunk_size=2,
        use_instruction=False,
        index="exact",
        progress=False,
    )
    first = mine_hard_negatives(
        queries, corpus.path, m["a"], out, MiningOptions(stop_after_chunks=1, **opt)
    )
    assert first.teacher_fingerprint == m["a"].fingerprint and first.queries == 2
    partial = (tmp_path / "out.jsonl.partial").read_bytes()
    state = tmp_path / "out.jsonl.state.json"
    fa, fb = m["a"].fingerprint, m["b"].fingerprint
    with pytest.raises(ValueError, match=f"{state}: .*teacher model {fa}, this run's .* {fb}"):
        mine_hard_negatives(queries, corpus.path, m["b"], out, MiningOptions(**opt))
    assert (tmp_path / "out.jsonl.partial").read_bytes() == partial
    done = mine_hard_negatives(queries, corpus.path, m["a"], out, MiningOptions(**opt))
    assert done.queries == 4 and done.teacher_fingerprint == m["a"].fingerprint
