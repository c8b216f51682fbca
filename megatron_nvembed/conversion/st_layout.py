"""sentence-transformers' native folder layout for decoder embedding models (Qwen3-Embedding's):
read on import, written on export.

The layout: the backbone as a plain transformers model at the folder's root (config.json,
safetensors, tokenizer files) loaded by a `Transformer` module, then a `Pooling` module
(`1_Pooling/config.json`; last-token or mean pooling), a `Normalize` module when the embeddings are
L2-normalised, and the prompts in `config_sentence_transformers.json` (`{"query": ..., "document":
""}`). sentence-transformers loads it with its own classes, no remote code.

What maps onto this project's model: last-token pooling is the `eos` head, mean pooling the `mean`
head; a plain transformers decoder is causal; a query prompt `"Instruct: <definition>\\nQuery:"`
(with or without the trailing space) gives the model's query template (`config.PromptConfig`).

Two forms of the layout are read, as sentence-transformers 6 itself loads both:
- sentence-transformers <= 5 (and the released models saved by it): module types
  `sentence_transformers.models.<Class>`; the Pooling config holds one boolean per mode
  (`pooling_mode_lasttoken`, `pooling_mode_mean_tokens`, ...) and `word_embedding_dimension`.
- sentence-transformers 6: module types are the classes' full paths
  (`sentence_transformers.base.modules.transformer.Transformer`,
  `sentence_transformers.sentence_transformer.modules.pooling.Pooling`, ...); the Pooling config
  holds `"pooling_mode": "<mode>"` (a list for several concatenated modes) and
  `embedding_dimension`. A present `pooling_mode` wins over the booleans, and a config with
  neither means mean pooling (the Pooling module's default in both versions).
A module is identified by its class name, the type's last component, for types inside the
`sentence_transformers` package only (a remote-code module of the same class name is refused).

Exports are written in the first form, which sentence-transformers 5 and 6 both load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from megatron_nvembed.core.config import EmbeddingModelConfig
from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.utils.fileio import check_links_inside, resolve_inside

logger = get_logger(__name__)

POOLING_MODES = {"lasttoken": "eos", "mean": "mean"}
"""sentence-transformers pooling modes (`pooling_mode`'s values) with an equivalent head here."""
LEGACY_POOLING_KEYS = {"pooling_mode_lasttoken": "lasttoken", "pooling_mode_mean_tokens": "mean"}
"""The boolean Pooling keys sentence-transformers <= 5 wrote for those modes (its other
`pooling_mode_*` keys name modes with no equivalent head)."""
_MODULE = "sentence_transformers.models."
"""The module-type prefix sentence-transformers <= 5 wrote (and exports here write)."""
_PACKAGE = "sentence_transformers."
_MODULES = ("Transformer", "Pooling", "Normalize")
_PROMPT = re.compile(r"Instruct: (?P<definition>[^\n]+)\nQuery:(?P<space> ?)")


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


PROMPTS_FILE = "config_sentence_transformers.json"


def check_folder_inside(folder: str | Path) -> None:
    """Refuses a transformers or sentence-transformers model folder that would make a reader
    leave it, before any file is read: a symbolic link leading out (`fileio.check_links_inside`;
    in huggingface_hub's cache, `snapshots/<revision>/` links into the same model's `blobs/`,
    which is allowed) or a `modules.json` module path (`"../x"`, an absolute path) that does.

    Raises:
        ValueError: naming the link or `modules.json`, the module and where its path leads.
    """
    folder = Path(folder)
    hub_blobs = (folder.parent.parent / "blobs",) if folder.parent.name == "snapshots" else ()
    check_links_inside(folder, also=hub_blobs)
    modules_path = folder / "modules.json"
    modules = _read(modules_path) if modules_path.is_file() else []
    for i, module in enumerate(modules if isinstance(modules, list) else []):
        path = module.get("path") if isinstance(module, dict) else None
        if not isinstance(path, str):
            continue
        try:
            resolve_inside(folder / path, folder, also=hub_blobs)
        except ValueError as err:
            raise ValueError(f"{modules_path}: module {i} has path {path!r}: {err}") from None


def query_prompt(folder: str | Path) -> str | None:
    """The `query` prompt of a sentence-transformers folder (None: no such prompt)."""
    path = Path(folder) / PROMPTS_FILE
    prompts = _read(path).get("prompts", {}) if path.is_file() else {}
    query = prompts.get("query") if isinstance(prompts, dict) else None
    return query if isinstance(query, str) else None


def prompt_query_template(folder: str | Path) -> str | None:
    """The query template behind a folder's `query` prompt when it is of the form
    "Instruct: <definition>\\nQuery:" (with or without the trailing space), else None."""
    query = query_prompt(folder)
    match = _PROMPT.fullmatch(query) if query is not None else None
    return "Instruct: {instruction}\nQuery:" + match["space"] if match else None


def _pooling_mode(path: Path, cfg: dict) -> str:
    """The one pooling mode of a Pooling config in either form (module docstring), if it has an
    equivalent head here.

    Raises:
        ValueError: naming `path` and the field: several or no modes, or a mode with no head.
    """
    need = (
        f"one of {sorted(POOLING_MODES)} is needed (last-token pooling maps to the eos head, "
        "mean pooling to the mean head)"
    )
    if "pooling_mode" in cfg:  # sentence-transformers 6 (its value wins over the booleans)
        mode = cfg["pooling_mode"]
        if isinstance(mode, list) and len(mode) == 1:
            mode = mode[0]
        if not isinstance(mode, str) or mode not in POOLING_MODES:
            raise ValueError(f"{path}: pooling_mode is {mode!r}; {need}")
        return mode
    legacy = [k for k in cfg if k.startswith("pooling_mode_")]
    if not legacy:
        return "mean"  # the Pooling module's default in sentence-transformers 5 and 6
    on = [k for k in legacy if cfg[k] is True]
    if len(on) != 1 or on[0] not in LEGACY_POOLING_KEYS:
        raise ValueError(
            f"{path}: pooling_mode_* keys set true: {on}; {need} (one true key of "
            f"{sorted(LEGACY_POOLING_KEYS)})"
        )
    return LEGACY_POOLING_KEYS[on[0]]


def read_st_layout(hf_dir: str | Path) -> dict | None:
    """The embedding settings of a sentence-transformers folder, or None when `hf_dir` has no
    `modules.json`.

    Returns:
        {"pooling": "eos" | "mean", "normalize": bool, "query_template": str | None}; the
        template is None when the folder has no query prompt or one not of the form
        "Instruct: <definition>\\nQuery:" (a warning names the latter).

    Either form of the layout (sentence-transformers <= 5 or 6; module docstring). A mean-pooled
    folder with a query prompt that `include_prompt`s it is read with a warning: this project's
    mean head leaves the instruction out of the average.

    Raises:
        ValueError: naming the file and key: a module other than sentence-transformers'
            Transformer / Pooling / Normalize (e.g. Dense: its weights would be lost), a pooling
            mode with no equivalent head (or several modes), invalid JSON.
    """
    hf_dir = Path(hf_dir)
    modules_path = hf_dir / "modules.json"
    if not modules_path.is_file():
        return None
    modules = _read(modules_path)
    if not isinstance(modules, list):
        raise ValueError(f"{modules_path}: expected a list of modules")
    kinds = {}
    for i, module in enumerate(modules):
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        name = kind.rsplit(".", 1)[-1] if kind.startswith(_PACKAGE) else ""
        if name not in _MODULES:
            raise ValueError(
                f"{modules_path}: module {i} has type {kind!r}; only sentence-transformers' "
                "Transformer, Pooling and Normalize modules map onto this project's model (other "
                "modules' weights would be lost)"
            )
        kinds[name] = module
    if "Pooling" not in kinds:
        raise ValueError(f"{modules_path}: no Pooling module")
    pooling_path = hf_dir / str(kinds["Pooling"].get("path", "")) / "config.json"
    if not pooling_path.is_file():
        raise FileNotFoundError(f"{pooling_path}: missing (the Pooling module's config)")
    pooling_cfg = _read(pooling_path)
    if not isinstance(pooling_cfg, dict):
        raise ValueError(f"{pooling_path}: expected a JSON object (the Pooling module's config)")
    mode = _pooling_mode(pooling_path, pooling_cfg)
    query = query_prompt(hf_dir)
    if mode == "mean" and query and pooling_cfg.get("include_prompt", True) is not False:
        logger.warning(
            "%s: include_prompt is true: sentence-transformers averages the query prompt's "
            "tokens too, while this project's mean head leaves the instruction out, so "
            "queries embed differently from sentence-transformers' encode (documents alike)",
            pooling_path,
        )
    template = prompt_query_template(hf_dir)
    if query is not None and template is None:
        logger.warning(
            "%s: the query prompt %r is not of the form 'Instruct: <definition>\\nQuery:'; "
            "the model keeps the default query template (set --query-template to train with "
            "another)",
            hf_dir / PROMPTS_FILE,
            query,
        )
    return {
        "pooling": POOLING_MODES[mode],
        "normalize": "Normalize" in kinds,
        "query_template": template,
    }


QUERY_DEFINITION = "Given a question, retrieve passages that answer the question"
"""The task definition of every export's `query` prompt (the paper's retrieval wording):
`encode(texts, prompt_name="query")` adds it in the model's query template; documents get none."""


def prompts_config(query_template: str) -> dict:
    """`config_sentence_transformers.json` of an export: the `query` prompt is
    `QUERY_DEFINITION` in `query_template`, documents get none, cosine similarity."""
    from megatron_nvembed.data.templates import format_query_instruction

    query = format_query_instruction(QUERY_DEFINITION, query_template)
    return {
        "prompts": {"query": query, "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }


def write_st_layout(out: Path, cfg: EmbeddingModelConfig, max_seq_length: int = 512) -> None:
    """Writes the sentence-transformers module files of an `eos`-pooled causal model beside its
    backbone (written separately as a plain transformers model at `out`'s root).

    Prompts: `prompts_config` of the model's query template.
    """
    modules = [{"idx": 0, "name": "0", "path": "", "type": _MODULE + "Transformer"}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": _MODULE + "Pooling"})
    if cfg.pooling.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": _MODULE + "Normalize"}
        )
        (out / "2_Normalize").mkdir(exist_ok=True)
    mode = {v: k for k, v in POOLING_MODES.items()}[cfg.pooling.type]
    pooling = {"word_embedding_dimension": cfg.model.hidden_size, "include_prompt": True}
    pooling.update({k: m == mode for k, m in LEGACY_POOLING_KEYS.items()})
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "1_Pooling/config.json": pooling,
        PROMPTS_FILE: prompts_config(cfg.prompts.query_template),
    }
    for name, value in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(value, indent=2), encoding="utf-8")
