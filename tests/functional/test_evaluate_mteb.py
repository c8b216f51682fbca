"""tools/evaluate_mteb.py end to end, offline, on mteb's bundled mock tasks and a local BEIR folder.

A tiny Mistral is imported (TP=1 checkpoint) and exported (fp32 NV-Embed HF directory). Then:
- checkpoint, one process: 7 mock tasks (one per paper category, through mteb) + the BEIR folder
  (corpus-scale path: shards of 5 passages, exact search). summary.json's nDCG@10 / nDCG@1 /
  recall@10 of the BEIR folder and of MockRetrievalTask equal `metrics.retrieval_metrics` on
  embeddings computed independently here (the exported model's `encode`, one text at a time,
  queries with the instruction, documents without) within 1e-5 (mteb rounds to 5 decimals);
  summary.md lists every category; mteb's result files and OUT/beir/toybeir.json exist; no
  temporary file is left; --resume reads them back without encoding.
- BEIR resume: a truncated OUT/beir/toybeir.json is evaluated again under --resume with the
  corpus shards kept (only the 5 queries embedded); with one shard removed too, only that shard's
  passages and the queries are embedded; without --resume every shard is computed again; the
  scores stay equal (1e-6).
- HF directory, one process, and checkpoint under torchrun at DP=2 (BEIR corpus in 4 shards split
  over the ranks): the same scores (1e-5), and the 2-rank BEIR metrics equal the 1-process ones
  (1e-6).
- errors: a BEIR folder without qrels/test.tsv, a model path that is neither format, an unknown
  task, a task outside Table 7 without --instruction, --search-params with the exact search, an
  --index that is not a FAISS factory string: exit 2 naming the path / flag / task.

Run alone: pytest tests/functional/test_evaluate_mteb.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_nvembed.testing import (
    build_word_tokenizer,
    init_single_process_megatron,
    save_tiny_hf_decoder,
)

pytest.importorskip("mteb")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import evaluate_mteb  # noqa: E402

DEFINITION = "Given a question, retrieve passages that answer it"
INSTRUCTION = f"Instruct: {DEFINITION}\nQuery: "
TOL = 1e-5  # mteb stores scores rounded to 5 decimals
MOCKS = [
    "MockRetrievalTask",
    "MockRerankingTask",
    "MockClusteringTask",
    "MockPairClassificationTask",
    "MockClassificationTask",
    "MockSTSTask",
    "MockSummarizationTask",
]
DOCS = [
    ("", "plants make food from light and water"),
    ("Sky", "the sky is blue because air scatters blue light"),
    ("", "paris is the capital of france"),
    ("Boiling", "water boils at one hundred degrees"),
    ("", "cats sleep most of the day"),
    ("", "the moon orbits the earth every month"),
    ("Bread", "bread is made from flour and water"),
    ("", "light travels faster than sound"),
    ("", "the earth orbits the sun once a year"),
    ("", "berlin is the capital of germany"),
    ("", "dogs like to play in the park"),
    ("", "leaves are green because of chlorophyll"),
    ("Rain", "rain falls when clouds get heavy"),
    ("", "the capital of italy is rome"),
]
QUERIES = [
    "how do plants make food",
    "why is the sky blue",
    "what is the capital of france",
    "what orbits the earth",
    "when does it rain",
]
QRELS = [(0, 0, 2), (0, 11, 1), (1, 1, 1), (2, 2, 2), (2, 13, 1), (3, 5, 2), (3, 8, 1), (4, 12, 1)]


def _write_beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i, (title, text) in enumerate(DOCS):
            f.write(json.dumps({"_id": f"d{i}", "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for i, q in enumerate(QUERIES + ["an unjudged query"]):
            f.write(json.dumps({"_id": f"q{i}", "text": q}) + "\n")
    lines = "".join(f"q{q}\td{d}\t{s}\n" for q, d, s in QRELS)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + lines)
    return folder


def _mock_retrieval_data():
    from mteb.mocks import MOCK_TASK_REGISTRY

    task = MOCK_TASK_REGISTRY["MockRetrievalTask"]()
    task.load_data()
    split = task.dataset["default"]["test"]
    corpus = [(r["id"], f"{r['title']} {r['text']}".strip()) for r in split["corpus"]]
    queries = [(r["id"], r["text"]) for r in split["queries"]]
    return queries, corpus, split["relevant_docs"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModel

    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf

    tmp = tmp_path_factory.mktemp("evaluate_mteb")
    mock_q, mock_c, _ = _mock_retrieval_data()
    texts = [t for _, t in DOCS + [("", q) for q in QUERIES]] + [t for _, t in mock_q + mock_c]
    tok = build_word_tokenizer(texts + [INSTRUCTION])
    src = save_tiny_hf_decoder(tmp / "src", tok)
    import_hf(src, tmp / "ckpt")
    init_single_process_megatron()
    export_hf(tmp / "ckpt", tmp / "hf", dtype="float32")
    hf = AutoModel.from_pretrained(tmp / "hf", trust_remote_code=True).eval()
    beir = _write_beir(tmp / "toybeir")
    return {"tmp": tmp, "hf": hf, "beir": beir}


def _independent(hf, texts, instruction):
    with torch.no_grad():
        emb = torch.stack([hf.encode([t], instruction=instruction)[0] for t in texts])
    return torch.nn.functional.normalize(emb.float(), dim=-1).numpy()


def _expected(hf, beir: Path) -> dict[str, dict[str, float]]:
    from megatron_nvembed.evaluation.beir import load_beir
    from megatron_nvembed.evaluation.metrics import retrieval_metrics

    data = load_beir(beir)
    q, d = _independent(hf, data.queries, INSTRUCTION), _independent(hf, data.corpus, "")
    want = {"toybeir": retrieval_metrics(q @ d.T, data.query_ids, data.corpus_ids, data.qrels)}
    # what a runner that forgot the query instruction would report
    q0 = _independent(hf, data.queries, "")
    want["no_instruction"] = retrieval_metrics(
        q0 @ d.T, data.query_ids, data.corpus_ids, data.qrels
    )
    mq, mc, rel = _mock_retrieval_data()
    q = _independent(hf, [t for _, t in mq], INSTRUCTION)
    d = _independent(hf, [t for _, t in mc], "")
    want["MockRetrievalTask"] = retrieval_metrics(
        q @ d.T, [i for i, _ in mq], [i for i, _ in mc], rel
    )
    return want


def _check_retrieval(summary: dict, want: dict) -> None:
    for name, metrics in want.items():
        if name == "no_instruction":
            continue
        got = summary["tasks"][name]
        for key in ("ndcg_at_10", "ndcg_at_1", "recall_at_10"):
            assert abs(got[key] - metrics[key]) <= TOL, (name, key, got[key], metrics[key])
        assert got["main_metric"] == "ndcg_at_10"
        assert abs(got["main_score"] - metrics["ndcg_at_10"]) <= TOL


@pytest.mark.functional
def test_checkpoint_hf_and_torchrun(setup, capsys):
    tmp, hf, beir = setup["tmp"], setup["hf"], setup["beir"]
    want = _expected(hf, beir)
    # the comparison can tell a missing query instruction apart (0.44 with it, 0.74 without, for
    # this seeded model; its score gaps >= 4e-4 leave the rankings far above float noise)
    assert abs(want["toybeir"]["ndcg_at_10"] - want["no_instruction"]["ndcg_at_10"]) > 10 * TOL

    out = tmp / "out_ckpt"
    common = ["--beir-dir", str(beir), "--instruction", DEFINITION, "--batch-size", "3"]
    rc = evaluate_mteb.main(
        ["--model", str(tmp / "ckpt"), "--tasks", *MOCKS, *common, "--shard-size", "5"]
        + ["--output", str(out)]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    _check_retrieval(summary, want)
    assert set(summary["tasks"]) == {*MOCKS, "toybeir"}
    cats = summary["categories"]
    for cat, n in [
        ("Retrieval", 2),
        ("Rerank", 1),
        ("Clustering", 1),
        ("PairClass", 1),
        ("Classification", 1),
        ("STS", 1),
        ("Summarization", 1),
    ]:
        assert cats[cat]["num_tasks"] == n, cat
    retrieval_avg = (want["toybeir"]["ndcg_at_10"] + want["MockRetrievalTask"]["ndcg_at_10"]) / 2
    assert abs(cats["Retrieval"]["average"] - retrieval_avg) <= TOL
    mains = [t["main_score"] for t in summary["tasks"].values()]
    assert abs(summary["average"]["score"] - np.mean(mains)) <= 1e-12
    assert summary["instructions"]["toybeir"] == INSTRUCTION
    assert summary["encoding"]["texts"] > 0 and summary["encoding"]["texts_per_second"] > 0

    md = (out / "summary.md").read_text()
    header = (
        "| Retrieval (2) | Rerank (1) | Clustering (1) | PairClass (1) | Classification (1) "
        "| STS (1) | Summarization (1) | Average (8) |"
    )
    assert header in md
    for cat in ("Retrieval", "Rerank", "Clustering", "PairClass", "Classification", "STS"):
        assert f"\n## {cat}\n" in md
    assert f"| toybeir | Retrieval | ndcg_at_10 | {100 * want['toybeir']['ndcg_at_10']:.2f} |" in md
    results = out / "results" / "megatron_nvembed__ckpt" / "iter_0000000"
    for name in MOCKS:
        saved = json.loads((results / f"{name}.json").read_text())
        assert saved["task_name"] == name
    saved = json.loads((out / "beir" / "toybeir.json").read_text())
    assert saved["task_name"] == "toybeir" and saved["task"] == summary["tasks"]["toybeir"]
    assert saved["num_queries"] == 5 and saved["num_documents"] == len(DOCS)
    assert saved["corpus_encoding"]["shards"] == 3 == saved["corpus_encoding"]["computed_shards"]
    assert len(list((out / "embeddings" / "toybeir").glob("emb_*.npy"))) == 3
    assert not list(out.rglob("*.tmp"))
    # --resume reads the finished tasks back from OUT/results instead of encoding again
    argv = ["--model", str(tmp / "ckpt"), "--tasks", "MockRetrievalTask", *common]
    assert evaluate_mteb.main([*argv, "--output", str(out), "--resume"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["encoding"]["texts"] == 0 and set(resumed["tasks"]) == set(want) - {
        "no_instruction"
    }
    _check_retrieval(resumed, want)
    capsys.readouterr()

    # BEIR alone: a truncated result is evaluated again, the finished corpus shards are kept
    beir_argv = ["--model", str(tmp / "ckpt"), *common, "--shard-size", "5", "--output", str(out)]
    result_file = out / "beir" / "toybeir.json"
    first = summary["tasks"]["toybeir"]

    def rerun(*extra) -> dict:
        assert evaluate_mteb.main([*beir_argv, *extra]) == 0
        got = json.loads((out / "summary.json").read_text())
        for key, value in first.items():
            if isinstance(value, float):
                assert abs(got["tasks"]["toybeir"][key] - value) <= 1e-6, key
        return got

    result_file.write_text(result_file.read_text()[:40])
    again = rerun("--resume")
    assert again["encoding"]["texts"] == 5  # the queries; the corpus shards were kept
    assert json.loads(result_file.read_text())["corpus_encoding"]["computed_shards"] == 0
    (out / "embeddings" / "toybeir" / "emb_00001.npy").unlink()
    result_file.write_text("{")
    again = rerun("--resume")
    assert again["encoding"]["texts"] == 5 + 5  # the missing shard and the queries
    assert json.loads(result_file.read_text())["corpus_encoding"]["computed_shards"] == 1
    again = rerun()  # without --resume: everything again
    assert again["encoding"]["texts"] == 5 + len(DOCS)
    assert set(again["tasks"]) == {"toybeir"}
    capsys.readouterr()

    # the exported HF directory, one process
    out_hf = tmp / "out_hf"
    args = ["--tasks", "MockRetrievalTask", *common, "--output"]
    assert evaluate_mteb.main(["--model", str(tmp / "hf"), *args, str(out_hf)]) == 0
    summary_hf = json.loads((out_hf / "summary.json").read_text())
    assert summary_hf["model_format"] == "hf"
    _check_retrieval(summary_hf, want)

    # the checkpoint under torchrun, 2 data-parallel ranks
    out_dp = tmp / "out_dp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [str(ROOT / "tools" / "evaluate_mteb.py"), "--model", str(tmp / "ckpt")]
    proc = subprocess.run(
        [*cmd, *args[:-1], "--shard-size", "4", "--output", str(out_dp)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary_dp = json.loads((out_dp / "summary.json").read_text())
    assert summary_dp["encoding"]["data_parallel_ranks"] == 2
    _check_retrieval(summary_dp, want)
    assert "2 data-parallel ranks" in proc.stderr
    for key, value in first.items():  # 1 process vs 2 ranks, BEIR metrics
        if isinstance(value, float):
            assert abs(summary_dp["tasks"]["toybeir"][key] - value) <= 1e-6, key
    saved = json.loads((out_dp / "beir" / "toybeir.json").read_text())
    assert saved["corpus_encoding"]["computed_shards"] == 4
    assert summary_dp["encoding"]["texts"] >= len(DOCS) + 5  # both ranks' corpus shards
    assert "encoded 14 passages (4 shards)" in proc.stderr


@pytest.mark.functional
def test_errors_name_the_culprit(setup, capsys):
    tmp, beir = setup["tmp"], setup["beir"]
    ckpt, out = str(tmp / "ckpt"), str(tmp / "out_err")

    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as exc:
            evaluate_mteb.main(list(argv))
        assert exc.value.code == 2
        return capsys.readouterr().err

    broken = tmp / "broken_beir"
    broken.mkdir()
    for name in ("corpus.jsonl", "queries.jsonl"):
        (broken / name).write_text((beir / name).read_text())
    err = fails("--model", ckpt, "--beir-dir", str(broken), "--output", out)
    assert "--beir-dir" in err and str(broken / "qrels" / "test.tsv") in err
    err = fails("--model", str(tmp / "toybeir"), "--beir-dir", str(beir), "--output", out)
    assert "--model" in err and str(tmp / "toybeir") in err
    err = fails("--model", ckpt, "--tasks", "NoSuchTaskAnywhere", "--output", out)
    assert "--tasks NoSuchTaskAnywhere" in err
    err = fails("--model", ckpt, "--tasks", "MockSTSTask", "--output", out)
    assert "MockSTSTask" in err and "--instruction" in err
    err = fails("--model", ckpt, "--output", out)
    assert "--tasks" in err and "--beir-dir" in err
    err = fails(
        "--model", ckpt, "--beir-dir", str(beir), "--search-params", "nprobe=4", "--output", out
    )
    assert "--search-params" in err and "exact" in err
    assert not Path(out).exists()
    bad_index = ["--index", "NoSuchIndex", "--instruction", DEFINITION, "--output", out]
    err = fails("--model", ckpt, "--beir-dir", str(beir), *bad_index)
    assert "--index 'NoSuchIndex'" in err and "FAISS" in err
