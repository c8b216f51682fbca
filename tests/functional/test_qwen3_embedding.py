"""Qwen3-Embedding checkpoints as such: imported from sentence-transformers' layout, tokenised and
pooled as that model is, fine-tuned with the `qwen3_embedding_8b` recipe, exported back to the
layout sentence-transformers loads natively.

A tiny random Qwen3-Embedding-style folder is built locally and saved by the installed
sentence-transformers' own `save()` (`save_tiny_qwen3_embedding`: a `Qwen3Model`, a byte-level BPE
tokenizer whose post-processor appends `<|endoftext|>` with no BOS, `eos_token` `<|im_end|>`, left
padding, Transformer + last-token Pooling + Normalize modules and the `"Instruct: ...\\nQuery:"`
prompt; sentence-transformers 6 writes its own layout, tests/functional/test_st_layouts.py has
both versions' forms). The independent references are transformers'
`AutoTokenizer` / `AutoModel` (the model card's recipe: left padding, the last position's state,
L2-normalised) and `SentenceTransformer` on the folder, neither running this package's code.

- Tokenisation: our rows (right-padded) hold exactly the ids transformers' tokenizer gives for
  prompt + text with `truncation=True`, a cut text included, each ending in `<|endoftext|>`.
- Import: the folder's layout gives the eos head, normalisation, causal mask and the query
  template; a layout with a module whose weights would be lost is refused naming the file.
- Embeddings: our checkpoint (right padding) = transformers (left padding) = sentence-
  transformers, max |diff| <= 1e-5 (fp32), for queries with the prompt and for documents.
- Fine-tune: 2 LoRA iterations of the recipe (lr raised so the weights move) change the
  embeddings; `export-hf --format sentence-transformers` of the result, moved to another folder,
  loads in `SentenceTransformer` without remote code and gives our embeddings of the fine-tune
  (<= 1e-5), its prompts following the model's template.
- Tools (`tools/embed.py`, MTEB's Table 7 prefixes, mining) put task definitions into the
  model's template, read from the checkpoint or the folder's prompt.
- The export refuses a model the layout cannot hold (another head, a bidirectional mask, a
  tokenizer that appends no end token), naming `--format`, before writing anything.

Run alone: pytest tests/functional/test_qwen3_embedding.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_nvembed.testing import (
    QWEN3_EMBEDDING_QUERY_PROMPT,
    build_qwen3_embedding_tokenizer,
    run_distributed,
    save_tiny_qwen3_embedding,
    write_synthetic_retrieval,
)

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
TEXTS = [
    "what is the capital of france",
    "paris is the capital of france and a large city on the seine",
    "how tall is the eiffel tower?",
    "The tower is 330 metres tall.\nIt was built in 1889 for the world fair.",
    "q1x2 w3 q1x4",
]
QUERY_DEFINITION = "Given a web search query, retrieve relevant passages that answer the query"


def _cli(*args, ok: bool = True) -> subprocess.CompletedProcess:
    drop = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _train_and_embed(rank, world, data, base, ft, out):
    """2 LoRA iterations of the recipe from `base` into `ft`; embeddings of both checkpoints."""
    from megatron_nvembed.data.templates import format_query_instruction
    from megatron_nvembed.evaluation.encoder import load_embedder
    from megatron_nvembed.training.recipes import get_recipe
    from megatron_nvembed.training.trainer import train

    cfg = get_recipe("qwen3_embedding_8b")
    cfg.data.train_data, cfg.checkpoint.pretrained_checkpoint, cfg.checkpoint.save = (
        [data["train"]],
        base,
        ft,
    )
    cfg.data.global_batch_size, cfg.data.micro_batch_size, cfg.data.num_negatives = 8, 2, 3
    (
        cfg.optimizer.train_iters,
        cfg.optimizer.lr_warmup_iters,
        cfg.optimizer.lr,
        cfg.data.seq_length,
    ) = 2, 0, 5e-3, 64
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    cfg.model.model.bf16, cfg.logging.log_interval, cfg.checkpoint.save_interval = False, 1, 2
    losses = train(cfg).losses
    result = {"losses": losses}
    for name, path in (("base", base), ("ft", ft)):
        emb = load_embedder(path)
        template = emb.cfg.prompts.query_template
        for kind, prefix in (
            ("query", format_query_instruction(QUERY_DEFINITION, template)),
            ("export_query", format_query_instruction(_st_definition(), template)),
            ("doc", None),
        ):
            result[f"{name}_{kind}"] = np.asarray(emb.embed(TEXTS, prefix)).tolist()
    Path(out).write_text(json.dumps(result))


def _st_definition() -> str:
    from megatron_nvembed.conversion.st_layout import QUERY_DEFINITION

    return QUERY_DEFINITION


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen3e")
    data = write_synthetic_retrieval(tmp / "data", num_topics=4, train_per_topic=8)
    corpus = [json.loads(x)["query"] for x in Path(data["train"]).read_text().splitlines()]
    build_qwen3_embedding_tokenizer(
        corpus + TEXTS + [QWEN3_EMBEDDING_QUERY_PROMPT] * 4, tmp / "tok"
    )
    save_tiny_qwen3_embedding(tmp / "q3e", tmp / "tok")
    _cli("import-hf", "--hf-dir", tmp / "q3e", "--save", tmp / "base")
    out = tmp / "embeddings.json"
    run_distributed(
        _train_and_embed, 1, {"train": data["train"]}, str(tmp / "base"), str(tmp / "ft"), str(out)
    )
    _cli("export-hf", "--load", tmp / "ft", "--hf-dir", tmp / "export", "--dtype", "float32",
         "--format", "sentence-transformers")  # fmt: skip
    shutil.move(tmp / "export", tmp / "moved")  # the folder must not depend on where it was written
    return tmp, {
        k: torch.tensor(v) if k != "losses" else v for k, v in json.loads(out.read_text()).items()
    }


def _max_diff(a, b) -> float:
    return (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item()


def test_tokenisation_equals_the_qwen3_embedding_tokenizer(run):
    """Our rows = transformers' `AutoTokenizer` ids of prompt + text with `truncation=True`: no
    BOS, `<|endoftext|>` appended by the tokenizer (not `eos_token` <|im_end|> added as text), and
    a text cut at `max_length` keeps it last (counted as truncated); the encoder's token counts
    agree."""
    from transformers import AutoTokenizer

    from megatron_nvembed.data.tokenization import load_tokenizer, tokenize_for_embedding
    from megatron_nvembed.evaluation.embedder import token_lengths

    tmp, _ = run
    ours, ref = load_tokenizer(tmp / "tok"), AutoTokenizer.from_pretrained(tmp / "tok")
    end = ref.convert_tokens_to_ids("<|endoftext|>")
    assert ref.padding_side == "left" and ref.eos_token == "<|im_end|>"
    for prefix in (QWEN3_EMBEDDING_QUERY_PROMPT, None):
        full = [(prefix or "") + t for t in TEXTS]
        lengths = [len(r) for r in ref(full)["input_ids"]]
        max_length = sorted(lengths)[len(lengths) // 2]  # some rows are cut, some are not
        want = ref(full, truncation=True, max_length=max_length)["input_ids"]
        batch, cut = tokenize_for_embedding(
            ours, TEXTS, prefix, max_length=max_length, pad_to_multiple_of=None
        )
        assert cut == sum(n > max_length for n in lengths) > 0
        # the encoder's length estimate (batching, truncation counts) counts the same tokens
        assert token_lengths(ours, TEXTS, [prefix or ""] * len(TEXTS)) == lengths
        for i, row in enumerate(want):
            got = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            assert got == row and got[-1] == end and end not in got[:-1], i


def test_import_reads_the_sentence_transformers_layout(run, tmp_path):
    """The imported Qwen3-Embedding folder is a causal model with a normalised eos head and the
    folder's query template; a folder whose modules hold weights we would drop (Dense) or whose
    pooling has no equivalent head (CLS) is refused naming the file."""
    from megatron_nvembed.checkpoint.store import read_config
    from megatron_nvembed.conversion.st_layout import read_st_layout

    tmp, _ = run
    cfg = read_config(tmp / "base")
    assert cfg.model.mask_type == "causal" and cfg.model.qk_layernorm
    assert cfg.pooling.type == "eos" and cfg.pooling.normalize
    assert cfg.prompts.query_template == "Instruct: {instruction}\nQuery:"
    dense = tmp_path / "dense"
    shutil.copytree(tmp / "q3e", dense)
    modules = json.loads((dense / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "name": "9", "path": "9_Dense",
                       "type": "sentence_transformers.models.Dense"})  # fmt: skip
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules\.json: module 2 has type .*Dense"):
        read_st_layout(dense)
    cls = tmp_path / "cls"
    shutil.copytree(tmp / "q3e", cls)
    pooling = json.loads((cls / "1_Pooling/config.json").read_text())
    pooling["pooling_mode"] = "cls"  # sentence-transformers 6's form (the folder is saved by it)
    (cls / "1_Pooling/config.json").write_text(json.dumps(pooling))
    with pytest.raises(ValueError, match=r"1_Pooling/config\.json: pooling_mode is 'cls'"):
        read_st_layout(cls)


def test_imported_model_embeds_as_transformers_and_sentence_transformers(run):
    """Our checkpoint (right padding, eos pooling of the appended token) against transformers
    with the model card's recipe (left padding, last position, L2-normalised) and against
    `SentenceTransformer` on the original folder: max |diff| <= 1e-5 for queries (prompt) and
    documents."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    tmp, emb = run
    prompt = f"Instruct: {QUERY_DEFINITION}\nQuery:"
    assert prompt == QWEN3_EMBEDDING_QUERY_PROMPT
    tok = AutoTokenizer.from_pretrained(tmp / "q3e")
    model = AutoModel.from_pretrained(tmp / "q3e").float().eval()
    st = SentenceTransformer(str(tmp / "q3e"), device="cpu")
    for kind, prefix in (("query", prompt), ("doc", "")):
        batch = tok([prefix + t for t in TEXTS], padding=True, return_tensors="pt")
        assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is exercised
        with torch.no_grad():
            last = model(**batch).last_hidden_state[:, -1]
        want = torch.nn.functional.normalize(last, dim=-1)
        assert _max_diff(emb[f"base_{kind}"], want) <= TOL, kind
        kwargs = {"prompt_name": "query"} if prefix else {}
        got = st.encode(TEXTS, convert_to_tensor=True, **kwargs)
        assert _max_diff(emb[f"base_{kind}"], got) <= TOL, kind


def test_tools_put_definitions_into_the_models_template(run):
    """`tools/embed.py` on the imported checkpoint and on the sentence-transformers export of the
    fine-tune turns a task definition into the model's own prefix ("...\\nQuery:", no space): the
    same embeddings as the checkpoints given the complete prompt (<= 1e-5). The template is read from the checkpoint, the original folder's prompt and
    the export's; MTEB's Table 7 prefixes and mining's use it too."""
    from megatron_nvembed.curation.mining_select import query_prefix
    from megatron_nvembed.data.records import Record
    from megatron_nvembed.evaluation.encoder import query_template_of
    from megatron_nvembed.evaluation.mteb_eval import resolve_instruction

    tmp, emb = run
    template = "Instruct: {instruction}\nQuery:"
    for folder in ("base", "q3e", "moved"):
        assert query_template_of(tmp / folder) == template, folder
    stsb = resolve_instruction("STSBenchmark", None, prefer_override=False, template=template)
    assert stsb.startswith("Instruct: ") and stsb.endswith("\nQuery:")
    rec = Record("q", ["p"], [], None, instruction=QUERY_DEFINITION)
    assert query_prefix(rec, None, True, template) == QWEN3_EMBEDDING_QUERY_PROMPT
    lines = [json.dumps({"text": t, "instruction": QUERY_DEFINITION}) for t in TEXTS]
    (tmp / "queries.jsonl").write_text("\n".join(lines) + "\n")
    drop = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # our checkpoint, and the sentence-transformers export of the fine-tune (its own prompt
    # template read from the folder; run by sentence-transformers)
    for folder, want in (("base", emb["base_query"]), ("moved", emb["ft_query"])):
        out = tmp / f"tool_{folder}.npy"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "embed.py"), "--load", str(tmp / folder),
             "--input", str(tmp / "queries.jsonl"), "--output", str(out)],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _max_diff(torch.from_numpy(np.load(out)), want) <= TOL, folder


def test_fine_tune_exports_to_sentence_transformers_natively(run):
    """The recipe's 2 LoRA iterations move the embeddings (> 1e-3); the sentence-transformers
    export of the fine-tune, moved elsewhere, loads with the library's own modules (no model code
    in the folder, no remote code) and gives our embeddings of the fine-tune: max |diff| <= 1e-5
    for queries (its `query` prompt, the model's template) and documents."""
    from sentence_transformers import SentenceTransformer

    tmp, emb = run
    assert len(emb["losses"]) == 2 and all(np.isfinite(v) for v in emb["losses"].values())
    assert _max_diff(emb["ft_query"], emb["base_query"]) > 1e-3
    folder = tmp / "moved"
    assert not list(folder.glob("*.py"))
    modules = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    assert modules == [
        f"sentence_transformers.models.{n}" for n in ("Transformer", "Pooling", "Normalize")
    ]
    st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=False)
    assert st.prompts["query"] == f"Instruct: {_st_definition()}\nQuery:"
    got_q = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    got_d = st.encode(TEXTS, convert_to_tensor=True)
    assert _max_diff(got_q, emb["ft_export_query"]) <= TOL
    assert _max_diff(got_d, emb["ft_doc"]) <= TOL


def test_sentence_transformers_export_refuses_what_the_layout_cannot_hold(run, tmp_path):
    """Another head, a bidirectional mask, or a tokenizer that appends no end token: refused
    naming `--format sentence-transformers` and the cause; from the command line exit code 2,
    before anything is written."""
    from megatron_nvembed.checkpoint.store import read_config
    from megatron_nvembed.conversion.export_hf import check_st_exportable
    from megatron_nvembed.testing import build_word_tokenizer

    tmp, _ = run
    tok = tmp / "base" / "tokenizer"
    check_st_exportable(read_config(tmp / "base"), tok)  # the imported model is exportable
    for field, value, cause in (
        ("type", "latent", "pooling head is 'latent'"),
        ("mask_type", "bidirectional", "bidirectional mask"),
    ):
        cfg = read_config(tmp / "base")
        setattr(cfg.pooling if field == "type" else cfg.model, field, value)
        with pytest.raises(ValueError, match=f"--format sentence-transformers: .*{cause}"):
            check_st_exportable(cfg, tok)
    mistral_like = tmp_path / "tok"
    build_word_tokenizer(TEXTS).save_pretrained(mistral_like)
    with pytest.raises(ValueError, match="appends no end token"):
        check_st_exportable(read_config(tmp / "base"), mistral_like)
    # the command line: a checkpoint whose saved config has a latent head
    bad = tmp_path / "latent"
    shutil.copytree(tmp / "base", bad)
    for path in bad.glob("iter_*/nvembed_config.json"):
        config = json.loads(path.read_text())
        config["pooling"]["type"] = "latent"
        path.write_text(json.dumps(config))
    proc = _cli("export-hf", "--load", bad, "--hf-dir", tmp_path / "out",
                "--format", "sentence-transformers", ok=False)  # fmt: skip
    assert proc.returncode == 2 and "--format sentence-transformers" in proc.stderr
    assert not (tmp_path / "out").exists()
