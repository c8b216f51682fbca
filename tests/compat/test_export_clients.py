"""An exported model, after a real tiny training run with the real Mistral-7B tokenizer, loads and
agrees in the clients users load it with; token ids equal NV-Embed's own.

The run (module fixture): a tiny random Mistral carrying Mistral-7B-v0.1's tokenizer files
(see conftest.py) -> `import-hf` -> stage 1 (2 processes) -> stage 2 with LoRA -> `export-hf`
(fp32); `tools/embed.py` embeds queries and documents with the stage-2 checkpoint; then the export
folder is copied elsewhere and the original deleted. Everything below reads the copy.

Proves:
- the tokenizer files are byte-identical from the imported model through every checkpoint to the
  export (nothing re-saves them);
- on 320 varied texts (instruction prefixes, leading / double spaces, newlines, tabs, unicode,
  code, numbers, special-token strings, texts cut at 512 tokens) the token ids and pool masks of
  training (`collate`), of `tools/embed.py` / `tools/evaluate_mteb.py` (the shared `Embedder`),
  and of the export's `encode` (our model files under transformers 5 and 4.42) equal what
  NV-Embed's released `encode` feeds its model under transformers 4.42, and the ids equal
  SentencePiece's own on the same model file (exact integer equality);
- the export gives `tools/embed.py`'s embeddings (max |diff| <= 1e-5, fp32) in NV-Embed's released
  code (transformers 4.42), in our model files under transformers 4.42 and 5, and in
  sentence-transformers with its query prompt; no loader asks a question (stdin is closed);
- one instruction convention: a query with one task definition gives one embedding through a
  training record's tokens, `tools/embed.py`, `evaluate_mteb`'s instruction resolution, the
  export's `encode` and sentence-transformers (<= 1e-5);
- `tools/embed.py` and `tools/evaluate_mteb.py` read a folder in NVIDIA's released layout (its own
  code, its config keys) under transformers 5, where that code does not import: the same
  embeddings (<= 1e-5) and the same nDCG@10 as the checkpoint; our export still loads right in a
  process that tried NVIDIA's code first;
- a causal mask or a mean / EOS / self-attention head is exported in a form that says so: our
  files reproduce the checkpoint's embeddings (<= 1e-5); NV-Embed's released code computes the
  same for the causal latent model and refuses the other heads at load.

Needs the reference venv and NVIDIA's files (conftest.py). Run alone:
  NVEMBED_REFERENCE_PYTHON=.venv-ref/bin/python \\
  NVEMBED_OFFICIAL_CODE=../shared/reference/nvembed_official pytest tests/compat -n 0
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.compat.conftest import HERE, reference_env

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 512
DEFINITION = "Given a question retrieve passages that answer it"  # the synthetic data's
pytestmark = pytest.mark.compat


def _prefix(definition: str) -> str:
    """NV-Embed's query prefix, written out here independently of the package's template."""
    return "Instruct: " + definition + "\nQuery: "


def _clean_env() -> dict:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }


def _run(cmd: list, timeout: int = 600, env: dict | None = None) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,  # an interactive prompt would fail, not hang
        env=env or _clean_env(),
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _torchrun(nproc: int, script: str, *args) -> str:
    return _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + [f"--nproc_per_node={nproc}", script, *args]
    )


def _digest(folder: Path) -> dict[str, str]:
    names = (
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    )
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def varied_texts() -> list[tuple[str, str]]:
    """320 (text, task definition or "" for documents) pairs covering the tokeniser's edge cases."""
    base = [
        "how do plants make food",
        "The Eiffel Tower is 330 metres tall.",
        "what is the capital of France?",
        "Photosynthesis converts light energy into chemical energy.",
        "def add(a, b):\n    return a + b",
        '{"key": [1, 2.5, null], "ok": true}',
        "Prices rose 3.7% in 2023; GDP = $25,462,700,000,000.",
        "Café naïve résumé — déjà vu",
        "東京は日本の首都です。",
        "Москва — столица России.",
        "مرحبا بالعالم",
        "emoji 🙂🚀 and symbols ∑ ∫ ≤ ≥",
        "SELECT * FROM t WHERE id = 42;",
        "<html><body>Hi</body></html>",
        "x</s> y",
        "<s>starts with a BOS string",
        "an <unk> token in the middle",
        "tabs\tbetween\twords",
        "line one\r\nline two",
        "1234567890 0.000001 -42 1e10",
    ]
    variants = [
        lambda t: t,
        lambda t: " " + t,
        lambda t: "  " + t,
        lambda t: t.replace(" ", "  "),
        lambda t: t + " ",
        lambda t: "\n" + t,
        lambda t: t + "\n\n",
        lambda t: "\t" + t,
        lambda t: t.upper(),
        lambda t: "</s> " + t,
        lambda t: t + " <s> " + t,
        lambda t: " ".join([t] * 80),  # longer than 512 tokens: cut
        lambda t: t.replace(" ", "\n"),
        lambda t: "   \t " + t + "   ",
        lambda t: t[: max(1, len(t) // 2)],
        lambda t: "Q: " + t + " A:",
    ]
    definitions = [
        "",
        DEFINITION,
        "Given a question, retrieve passages that answer the question",
        "Given a claim, find documents that refute the claim",
        "Classify the sentiment  of a review ",  # double and trailing space
        "Retrieve semantically similar text.",
    ]
    out = []
    for i, text in enumerate(base):
        for j, variant in enumerate(variants):
            out.append((variant(text), definitions[(i + j) % len(definitions)]))
    return out


def _sentencepiece_ids(spm, text: str, prefix: str) -> list[int]:
    """SentencePiece's ids of NV-Embed's input (prefix + text + EOS, BOS first): special-token
    strings are tokens of their own, every other segment is encoded by SentencePiece itself."""
    specials = {"<s>": 1, "</s>": 2, "<unk>": 0}
    ids = [1]
    for piece in re.split(r"(<s>|</s>|<unk>)", prefix + text + "</s>"):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids.extend(spm.encode(piece))
    return ids[:MAX_LENGTH]


@pytest.fixture(scope="module")
def run(tmp_path_factory, mistral_tokenizer, reference_python, official_code):
    from megatron_nvembed.testing import save_tiny_hf_decoder, write_synthetic_retrieval

    work = tmp_path_factory.mktemp("compat_run")
    data = write_synthetic_retrieval(work / "data", num_topics=8, train_per_topic=4)
    save_tiny_hf_decoder(work / "hf_base", mistral_tokenizer)
    convert = str(ROOT / "tools" / "convert_checkpoint.py")
    pretrain = str(ROOT / "examples" / "pretrain_nvembed.py")
    ckpt = work / "ckpt"
    _run(
        [
            sys.executable,
            convert,
            "import-hf",
            "--hf-dir",
            work / "hf_base",
            "--save",
            ckpt / "base",
        ]
    )
    common = [
        "--recipe",
        "tiny",
        "--train-iters",
        "2",
        "--lr-warmup-iters",
        "1",
        "--global-batch-size",
        "8",
    ]
    _torchrun(
        2,
        pretrain,
        *common,
        "--pretrained-checkpoint",
        ckpt / "base",
        "--train-data",
        data["train"],
        "--save",
        ckpt / "s1",
    )
    _torchrun(
        2,
        pretrain,
        *common,
        "--stage",
        "2",
        "--pretrained-checkpoint",
        ckpt / "s1",
        "--train-data",
        "0.5",
        data["train"],
        "0.5",
        data["train_pairs"],
        "--save",
        ckpt / "s2",
    )
    assert (ckpt / "s2" / "iter_0000002" / "lora.json").is_file()  # stage 2 trained LoRA
    export = work / "export"
    _run(
        [
            sys.executable,
            convert,
            "export-hf",
            "--load",
            ckpt / "s2",
            "--hf-dir",
            export,
            "--dtype",
            "float32",
        ]
    )
    digests = {
        "source": _digest(Path(mistral_tokenizer)),
        **{name: _digest(ckpt / name / "tokenizer") for name in ("base", "s1", "s2")},
        "export": _digest(export),
    }

    queries = ["how do plants make food", " what is  the capital of France?\n", "x</s> y"]
    docs = ["Plants make food from light.", "Paris is the capital of France.", "\tTabbed doc"]
    rows = [{"text": q, "instruction": DEFINITION} for q in queries] + [{"text": d} for d in docs]
    (work / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run(
        [
            sys.executable,
            str(ROOT / "tools" / "embed.py"),
            "--load",
            ckpt / "s2",
            "--input",
            work / "texts.jsonl",
            "--output",
            work / "embed_ckpt.npy",
        ]
    )

    moved = work / "elsewhere" / "my-model"
    shutil.copytree(export, moved)
    shutil.rmtree(export)
    nvidia = work / "elsewhere" / "with-nvidia-code"  # the same folder, NVIDIA's code in it
    shutil.copytree(moved, nvidia)
    for name in ("modeling_nvembed.py", "configuration_nvembed.py"):
        shutil.copyfile(official_code / name, nvidia / name)
    # NVIDIA's release as published: its code only, its config's keys only (no sizes this
    # project adds, class defaults for the rest), the tokenizer named by its hub id.
    release = work / "elsewhere" / "NV-Embed-v2-layout"
    shutil.copytree(nvidia, release)
    for name in ("tokenization_nvembed.py", "sentence_transformers_nvembed.py", "modules.json"):
        (release / name).unlink()
    config = json.loads((release / "config.json").read_text())
    for key in ("ff_mult", "layernorm_eps", "pooling_type"):
        del config["latent_attention_config"][key]
    config["text_config"]["_name_or_path"] = "nvidia/NV-Embed-v2"
    (release / "config.json").write_text(json.dumps(config, indent=2))
    return {
        "work": work,
        "ckpt": ckpt / "s2",
        "moved": moved,
        "nvidia": nvidia,
        "release": release,
        "data": data,
        "digests": digests,
        "queries": queries,
        "docs": docs,
        "embed_ckpt": np.load(work / "embed_ckpt.npy"),
        "reference_python": reference_python,
        "official_code": official_code,
        "tokenizer": Path(mistral_tokenizer),
    }


def _reference_encode(run, jobs: list[dict]) -> list[dict]:
    """Runs the reference client on `jobs` (see reference_client.py); returns one dict a job."""
    tmp = run["work"]
    for k, job in enumerate(jobs):
        job["out"] = str(tmp / f"reference_{job['tag']}_{k}.npz")
    (tmp / "jobs.json").write_text(json.dumps({"jobs": jobs}))
    _run(
        [run["reference_python"], HERE / "reference_client.py", "encode", tmp / "jobs.json"],
        env=reference_env(tmp),
    )
    results = []
    for job in jobs:
        with np.load(job["out"]) as z:
            results.append({k: z[k] for k in z.files})
    return results


def _requests(pairs: list[tuple[str, str]], chunk: int = 40) -> list[dict]:
    """encode() takes one instruction a call: group by definition, in chunks."""
    out = []
    for definition in dict.fromkeys(d for _, d in pairs):
        texts = [t for t, d in pairs if d == definition]
        for k in range(0, len(texts), chunk):
            out.append(
                {
                    "name": f"{len(out)}",
                    "texts": texts[k : k + chunk],
                    "instruction": _prefix(definition) if definition else "",
                    "max_length": MAX_LENGTH,
                }
            )
    return out


def _rows(result: dict, requests: list[dict], what: str) -> list[list[int]]:
    return [json.loads(x) for r in requests for x in result[f"{r['name']}/{what}"]]


def test_tokenizer_files_travel_byte_for_byte(run):
    digests = run["digests"]
    assert all(d == digests["source"] for d in digests.values()), digests


def test_token_ids_and_pool_masks_equal_nvidia_and_sentencepiece(run):
    import sentencepiece

    from megatron_nvembed.data.blending import Slot
    from megatron_nvembed.data.collate import collate
    from megatron_nvembed.data.records import Record
    from megatron_nvembed.evaluation.encoder import load_embedder

    pairs = varied_texts()
    assert len(pairs) >= 300
    requests = _requests(pairs)
    nvidia, ours_442 = _reference_encode(
        run,
        [
            {"tag": "nvidia", "model_dir": str(run["nvidia"]), "requests": requests},
            {"tag": "ours442", "model_dir": str(run["moved"]), "requests": requests},
        ],
    )
    assert "load_error" not in nvidia and "load_error" not in ours_442
    # the texts in the order the requests hold them (grouped by definition)
    order = [(t, d) for group in dict.fromkeys(d for _, d in pairs) for t, d in pairs if d == group]
    want_ids, want_pool = _rows(nvidia, requests, "ids"), _rows(nvidia, requests, "pool")
    assert sum(len(r) == MAX_LENGTH for r in want_ids) >= 15  # the long variant is cut
    assert sum(r[1] == 28705 for r in want_ids) >= 10  # texts that start with a lone "▁"

    def check(name, ids, pool=None):
        bad = [i for i, (a, b) in enumerate(zip(ids, want_ids)) if a != b]
        assert not bad, (
            f"{name}: {len(bad)} of {len(ids)} texts differ in ids, e.g. {order[bad[0]]!r}"
        )
        if pool is not None:
            bad = [i for i, (a, b) in enumerate(zip(pool, want_pool)) if a != b]
            assert not bad, f"{name}: {len(bad)} pool masks differ, e.g. {order[bad[0]]!r}"

    check(
        "our model files under transformers 4.42",
        _rows(ours_442, requests, "ids"),
        _rows(ours_442, requests, "pool"),
    )

    spm = sentencepiece.SentencePieceProcessor(model_file=str(run["tokenizer"] / "tokenizer.model"))
    check("SentencePiece", [_sentencepiece_ids(spm, t, _prefix(d) if d else "") for t, d in order])

    def unpadded(batch):
        n = batch["attention_mask"].sum(1).tolist()
        ids = [r[:k] for r, k in zip(batch["input_ids"].tolist(), n)]
        return ids, [r[:k] for r, k in zip(batch["pool_mask"].tolist(), n)]

    # Training: records through collate (queries with their definition, documents as positives).
    from megatron_nvembed.data.tokenization import load_tokenizer

    tok = load_tokenizer(run["ckpt"] / "tokenizer")
    # (a document's record needs some query instruction; only its positive's tokens are read)
    records = [
        Record(query=t, pos=[t], neg=[], task="SyntheticQA", instruction=d or DEFINITION)
        for t, d in order
    ]
    batch = collate(
        [Slot(0, i, 0, ()) for i in range(len(order))],
        [records],
        tok,
        num_negatives=0,
        max_length=MAX_LENGTH,
        pad_to_multiple_of=None,
    )
    q_ids, q_pool = unpadded(batch.query)
    c_ids, c_pool = unpadded(batch.candidates)
    is_query = [bool(d) for _, d in order]
    check(
        "training (collate)",
        [q if k else c for q, c, k in zip(q_ids, c_ids, is_query)],
        [q if k else c for q, c, k in zip(q_pool, c_pool, is_query)],
    )

    # tools/embed.py and tools/evaluate_mteb.py: the shared Embedder, checkpoint and HF folder.
    for path in (run["ckpt"], run["moved"]):
        embedder = load_embedder(path, batch_size=16, max_length=MAX_LENGTH, show_progress=False)
        fed: dict[int, tuple] = {}
        original = embedder._forward

        def recording(b, _original=original, _fed=fed):
            for ids, pool in zip(*unpadded(b)):
                _fed[len(_fed)] = (ids, pool)
            return _original(b)

        embedder._forward = recording
        texts = [t for t, _ in order]
        embedder.embed(texts, [_prefix(d) if d else "" for _, d in order])
        # the embedder sorts by length: map each fed row back to its text by content
        seen = sorted(fed.values(), key=lambda x: json.dumps(x))
        want = sorted(zip(want_ids, want_pool), key=lambda x: json.dumps(list(x)))
        assert [list(x) for x in seen] == [list(x) for x in want], f"Embedder on {path.name}"

    # The export's encode under transformers 5.
    from transformers import AutoModel

    model = AutoModel.from_pretrained(run["moved"], trust_remote_code=True).eval()
    ids, pool = [], []
    for r in requests:
        b = model.prepare_kwargs_from_batch(r["texts"], r["instruction"], r["max_length"])
        i, p = unpadded(b)
        ids += i
        pool += p
    check("our model files under transformers 5", ids, pool)


def test_export_gives_embed_py_embeddings_in_every_client(run):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    queries, docs, want = run["queries"], run["docs"], run["embed_ckpt"]
    want_q, want_d = want[: len(queries)], want[len(queries) :]
    assert want.dtype == np.float32 and np.isfinite(want).all()

    def close(name, got, ref):
        got = np.asarray(got, dtype=np.float32)
        assert got.shape == ref.shape, name
        assert np.abs(got - ref).max() <= 1e-5, f"{name}: max |diff| {np.abs(got - ref).max()}"

    requests = [
        {
            "name": "q",
            "texts": queries,
            "instruction": _prefix(DEFINITION),
            "max_length": MAX_LENGTH,
        },
        {"name": "d", "texts": docs, "instruction": "", "max_length": MAX_LENGTH},
    ]
    nvidia, ours_442 = _reference_encode(
        run,
        [
            {"tag": "nvidia_emb", "model_dir": str(run["nvidia"]), "requests": requests},
            {"tag": "ours442_emb", "model_dir": str(run["moved"]), "requests": requests},
        ],
    )
    for name, result in (("NV-Embed's released code (4.42)", nvidia), ("ours (4.42)", ours_442)):
        assert "load_error" not in result, result.get("load_error")
        close(name + " queries", result["q/embeddings"], want_q)
        close(name + " documents", result["d/embeddings"], want_d)

    model = AutoModel.from_pretrained(run["moved"], trust_remote_code=True).eval()
    close(
        "ours (transformers 5) queries",
        model.encode(queries, instruction=_prefix(DEFINITION)),
        want_q,
    )
    close("ours (transformers 5) documents", model.encode(docs), want_d)

    st = SentenceTransformer(str(run["moved"]), trust_remote_code=True, device="cpu")
    close("sentence-transformers queries", st.encode(queries, prompt=_prefix(DEFINITION)), want_q)
    close("sentence-transformers documents", st.encode(docs, prompt_name="document"), want_d)
    # The stored "query" prompt is the retrieval definition's prefix.
    q_named = st.encode(queries, prompt_name="query")
    q_direct = model.encode(
        queries, instruction=_prefix("Given a question, retrieve passages that answer the question")
    )
    close("sentence-transformers prompt_name='query'", q_named, q_direct.numpy())
    config = json.loads((run["moved"] / "config.json").read_text())
    assert str(run["work"]) not in json.dumps(config)  # nothing points outside the folder


def test_one_instruction_convention_on_every_path(run):
    """One query and one task definition: the same embedding from every entry point."""
    from sentence_transformers import SentenceTransformer

    from megatron_nvembed.data.blending import Slot
    from megatron_nvembed.data.collate import collate
    from megatron_nvembed.data.records import Record
    from megatron_nvembed.data.templates import query_instruction
    from megatron_nvembed.evaluation import mteb_eval
    from megatron_nvembed.evaluation.encoder import load_embedder

    query = run["queries"][0]
    want = run["embed_ckpt"][0]  # tools/embed.py, {"text": query, "instruction": DEFINITION}
    got = {}
    ckpt = load_embedder(run["ckpt"], show_progress=False)
    record = Record(query=query, pos=["x"], neg=[], task="SyntheticQA", instruction=DEFINITION)
    batch = collate([Slot(0, 0, 0, ())], [[record]], ckpt.tokenizer, num_negatives=0)
    with torch.no_grad():
        got["training record"] = ckpt._forward(batch.query)[0].numpy()
    prefix = mteb_eval.resolve_instruction("MyBEIR", DEFINITION, prefer_override=True)
    got["evaluate_mteb --instruction"] = load_embedder(run["moved"], show_progress=False).embed(
        [query], prefix
    )[0]
    # mining's query prefix of a record (curation/mining_select.py calls query_instruction)
    got["mining"] = ckpt.embed([query], query_instruction(record.task, record.instruction))[0]
    from transformers import AutoModel

    model = AutoModel.from_pretrained(run["moved"], trust_remote_code=True).eval()
    got["export encode"] = model.encode([query], instruction=_prefix(DEFINITION))[0].numpy()
    st = SentenceTransformer(str(run["moved"]), trust_remote_code=True, device="cpu")
    got["sentence-transformers prompt"] = st.encode([query], prompt=_prefix(DEFINITION))[0]
    for name, emb in got.items():
        assert np.abs(np.asarray(emb) - want).max() <= 1e-5, name
    # ... and a different definition is a different input
    other = ckpt.embed([query], _prefix("Retrieve semantically similar text."))[0]
    assert np.abs(other - want).max() > 1e-3


@pytest.mark.parametrize(
    "pooling,mask",
    [
        ("latent", "causal"),
        ("mean", "bidirectional"),
        ("eos", "causal"),
        ("self-attention", "bidirectional"),
    ],
)
def test_heads_and_masks_outside_nvembed_state_themselves(run, pooling, mask):
    from transformers import AutoModel

    from megatron_nvembed.evaluation.encoder import load_embedder

    work = run["work"] / f"{pooling}_{mask}"
    convert = str(ROOT / "tools" / "convert_checkpoint.py")
    _run(
        [
            sys.executable,
            convert,
            "import-hf",
            "--hf-dir",
            run["work"] / "hf_base",
            "--save",
            work / "ckpt",
            "--pooling",
            pooling,
            "--mask-type",
            mask,
        ]
    )
    _run(
        [
            sys.executable,
            convert,
            "export-hf",
            "--load",
            work / "ckpt",
            "--hf-dir",
            work / "hf",
            "--dtype",
            "float32",
        ]
    )
    texts = run["queries"]
    want = load_embedder(work / "ckpt", show_progress=False).embed(texts, _prefix(DEFINITION))
    config = json.loads((work / "hf" / "config.json").read_text())
    assert config["mask_type"] == ("c" if mask == "causal" else "b")
    assert config["latent_attention_config"]["pooling_type"] == pooling
    ours = AutoModel.from_pretrained(work / "hf", trust_remote_code=True).eval()
    got = ours.encode(texts, instruction=_prefix(DEFINITION)).numpy()
    assert np.abs(got - want).max() <= 1e-5, "our model files"

    nvidia = work / "hf_nvidia"
    shutil.copytree(work / "hf", nvidia)
    for name in ("modeling_nvembed.py", "configuration_nvembed.py"):
        shutil.copyfile(run["official_code"] / name, nvidia / name)
    request = {
        "name": "q",
        "texts": texts,
        "instruction": _prefix(DEFINITION),
        "max_length": MAX_LENGTH,
    }
    (result,) = _reference_encode(
        run, [{"tag": f"{pooling}_{mask}", "model_dir": str(nvidia), "requests": [request]}]
    )
    if pooling == "latent":  # a causal backbone is expressible: it must compute the same
        assert "load_error" not in result, result.get("load_error")
        assert np.abs(result["q/embeddings"] - want).max() <= 1e-5, "NV-Embed's code, causal"
    else:  # refused at load, naming the head type it does not know
        assert "nvembed_pooling" in str(result.get("load_error")), result.keys()


def test_tools_read_nvidia_release_layout_natively(run):
    """NVIDIA's released folder (its own code, which does not import under transformers 5) is
    read by tools/embed.py and tools/evaluate_mteb.py directly, side by side with ours."""

    release, work = run["release"], run["work"]
    # The premise: its own code does not import here. Tried in a subprocess, since importing it
    # registers NVIDIA's config classes with transformers' Auto classes for the whole process;
    # our export must still load right after that in the same process (as in an mteb run that
    # evaluates NVIDIA's model, then ours).
    script = (
        "import json, sys\n"
        "from transformers import AutoModel\n"
        "try:\n"
        "    AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "    sys.exit('NVIDIA code imported')\n"
        "except ImportError as err:\n"
        "    print('ImportError:', err, file=sys.stderr)\n"
        "model = AutoModel.from_pretrained(sys.argv[2], trust_remote_code=True).eval()\n"
        "print(json.dumps(model.encode(json.loads(sys.argv[3]), instruction=sys.argv[4]).tolist()))\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(release),
            str(run["moved"]),
            json.dumps(run["queries"]),
            _prefix(DEFINITION),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env=_clean_env(),
    )
    assert proc.returncode == 0 and "ImportError" in proc.stderr, proc.stderr[-3000:]
    after = np.array(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=np.float32)
    assert np.abs(after - run["embed_ckpt"][: len(run["queries"])]).max() <= 1e-5
    _run(
        [
            sys.executable,
            str(ROOT / "tools" / "embed.py"),
            "--load",
            release,
            "--input",
            work / "texts.jsonl",
            "--output",
            work / "embed_release.npy",
        ]
    )
    got = np.load(work / "embed_release.npy")
    assert np.abs(got - run["embed_ckpt"]).max() <= 1e-5
    scores = {}
    for name, model in (("release", release), ("checkpoint", run["ckpt"])):
        out = work / f"eval_{name}"
        _run(
            [
                sys.executable,
                str(ROOT / "tools" / "evaluate_mteb.py"),
                "--model",
                model,
                "--beir-dir",
                run["data"]["eval"],
                "--instruction",
                DEFINITION,
                "--output",
                out,
            ]
        )
        scores[name] = json.loads((out / "summary.json").read_text())["tasks"]["eval"]
    assert scores["release"]["ndcg_at_10"] == pytest.approx(
        scores["checkpoint"]["ndcg_at_10"], abs=1e-6
    )
