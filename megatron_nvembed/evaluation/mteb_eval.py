"""MTEB (mteb 2.x) evaluation of a megatron_nvembed checkpoint or an exported NV-Embed model.

- `MtebEncoder` adapts an `embedder.Embedder` to mteb's encoder protocol. Queries, and every text
  of tasks without a query/document split (STS, classification, clustering, pair
  classification, summarization), get the task's NV-Embed instruction
  (`"Instruct: {Table 7 definition}\\nQuery: "`, masked out of pooling); documents
  (`prompt_type == "document"`) get none. Embeddings are L2-normalised and scored by cosine.
- Local BEIR folders are not mteb tasks: `tools/evaluate_mteb.py` scores them at corpus scale
  (`beir_run`, with `retrieval_eval.evaluate_beir_sharded`); `retrieval_task_entry` files their
  metrics in the summary like an mteb retrieval task's.
- The command itself runs in `mteb_run.run_evaluation`.
- `summarize` / `render_markdown` reduce mteb's results to `summary.json` and a table grouped as
  in the NV-Embed paper (Retrieval, Rerank, Clustering, PairClass, Classification, STS,
  Summarization, Average over the tasks of those seven categories).

mteb is imported lazily: the instruction and category helpers work without it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from megatron_nvembed.core.config import DEFAULT_QUERY_TEMPLATE
from megatron_nvembed.data.templates import (
    format_query_instruction,
    get_task_definition,
    query_instruction,
)
from megatron_nvembed.utils.fileio import write_atomic

CATEGORIES = (
    "Retrieval",
    "Rerank",
    "Clustering",
    "PairClass",
    "Classification",
    "STS",
    "Summarization",
)
# mteb task type -> NV-Embed paper column; other types are reported under "Other" and left out of
# the average (the paper's MTEB has none).
TASK_TYPE_TO_CATEGORY = {
    "Retrieval": "Retrieval",
    "Reranking": "Rerank",
    "Clustering": "Clustering",
    "PairClassification": "PairClass",
    "Classification": "Classification",
    "MultilabelClassification": "Classification",
    "STS": "STS",
    "Summarization": "Summarization",
}
OTHER = "Other"


def category_of(task_type: str) -> str:
    return TASK_TYPE_TO_CATEGORY.get(task_type, OTHER)


def _table7_name(task_name: str) -> str:
    # mteb versions its re-uploads ("TwentyNewsgroupsClustering.v2"); Table 7 names the task.
    return re.sub(r"\.v\d+$", "", task_name)


def table7_instruction(task_name: str, template: str = DEFAULT_QUERY_TEMPLATE) -> str | None:
    """The query prefix for an MTEB task from Table 7's definition in the model's `template`
    (default NV-Embed's), or None when the table lacks it."""
    try:
        definition = get_task_definition(_table7_name(task_name), "eval")
    except ValueError:
        return None
    return format_query_instruction(definition, template)


def resolve_instruction(
    task_name: str,
    override: str | None,
    *,
    prefer_override: bool,
    template: str = DEFAULT_QUERY_TEMPLATE,
) -> str:
    """The query prefix of one task, definitions put into the model's query `template`
    (`evaluation.encoder.query_template_of`).

    Args:
        task_name: the mteb task name (or a local BEIR folder's name).
        override: `--instruction` (a task definition, a complete "Instruct: ...\\nQuery: "
            prefix, or "" for no instruction); None when not given.
        prefer_override: True for local BEIR folders (`--instruction` wins over Table 7);
            False for mteb tasks (Table 7 wins; `--instruction` covers tasks it lacks).

    Raises:
        ValueError: when neither Table 7 nor `override` gives an instruction.
    """
    if override is not None and (prefer_override or table7_instruction(task_name) is None):
        return query_instruction(task_name, override, template=template) if override else ""
    found = table7_instruction(task_name, template)
    if found is None:
        raise ValueError(
            f"task {task_name!r} has no instruction in the paper's Table 7 "
            "(megatron_nvembed/data/task_definitions.json); pass --instruction TEXT "
            '(or --instruction "" for none)'
        )
    return found


def leaf_tasks(tasks: Iterable) -> list:
    """The tasks that actually call the encoder (aggregate tasks expand to their parts)."""
    out = []
    for t in tasks:
        parts = getattr(t.metadata, "tasks", None)
        out.extend(leaf_tasks(parts) if parts else [t])
    return out


def _unit_rows(x) -> torch.Tensor:
    t = x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, np.float32))
    return torch.nn.functional.normalize(torch.atleast_2d(t), dim=-1)


class MtebEncoder:
    """mteb's encoder protocol over an `Embedder` (see the module docstring for instructions)."""

    def __init__(self, embedder, model_meta, instructions: dict[str, str], fallback: Callable):
        """
        Args:
            embedder: an `embedder.Embedder`.
            model_meta: the `mteb.ModelMeta` results are filed under.
            instructions: task name -> query prefix, resolved before the run.
            fallback: task name -> query prefix for a task missing from `instructions`.
        """
        self.embedder = embedder
        self._meta = model_meta
        self.instructions = dict(instructions)
        self.fallback = fallback

    @property
    def mteb_model_meta(self):
        return self._meta

    def instruction_for(self, task_name: str, prompt_type) -> str:
        if (
            prompt_type is not None
            and str(getattr(prompt_type, "value", prompt_type)) == "document"
        ):
            return ""
        if task_name not in self.instructions:
            self.instructions[task_name] = self.fallback(task_name)
        return self.instructions[task_name]

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(f"{task_metadata.name}: only text inputs are supported")
            texts.extend(batch["text"])
        ins = self.instruction_for(task_metadata.name, prompt_type)
        kind = str(getattr(prompt_type, "value", prompt_type)) if prompt_type else "texts"
        emb = self.embedder.embed(
            texts, ins, label=f"{task_metadata.name} [{hf_split}/{hf_subset}] {kind}"
        )
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, 1e-12)

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarities [n1, n2] (a 1-D input counts as one row)."""
        a, b = _unit_rows(embeddings1), _unit_rows(embeddings2)
        return a @ b.transpose(0, 1)

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity of each pair of rows [n]."""
        return (_unit_rows(embeddings1) * _unit_rows(embeddings2)).sum(-1)


def model_meta(name: str, revision: str, embed_dim: int, max_tokens: int):
    """An `mteb.ModelMeta` naming a local model (results go to `results/<name>/<revision>/`)."""
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    return ModelMeta.create_empty(
        {
            "name": name,
            "revision": revision,
            "embed_dim": embed_dim,
            "max_tokens": max_tokens,
            "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": True,
            "framework": ["PyTorch"],
            "modalities": ["text"],
        }
    )


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def summarize_task(scores: dict[str, list[dict]], task_type: str, main_metric: str) -> dict:
    """One task's entry: every numeric metric averaged over its evaluated splits and subsets
    (non-finite values left out; a metric with none is null), plus type, category, main metric."""
    entries = [e for split in scores.values() for e in split]
    metrics: dict[str, list[float]] = {}
    for e in entries:
        for k, v in e.items():
            if isinstance(v, bool) or not isinstance(v, int | float | np.number):
                continue
            metrics.setdefault(k, []).append(float(v))
    out = {
        "type": task_type,
        "category": category_of(task_type),
        "main_metric": main_metric,
        "main_score": _mean(metrics.pop("main_score", [])),
        "splits": sorted(scores),
        "subsets": sorted({str(e.get("hf_subset")) for e in entries}),
    }
    out.update({k: _mean(v) for k, v in sorted(metrics.items())})
    return out


def retrieval_task_entry(metrics: dict[str, float], split: str) -> dict:
    """The summary entry of a retrieval task scored outside mteb (a local BEIR folder), shaped as
    `summarize_task`'s: type Retrieval, main metric nDCG@10, then every metric."""
    out = {
        "type": "Retrieval",
        "category": category_of("Retrieval"),
        "main_metric": "ndcg_at_10",
        "main_score": float(metrics["ndcg_at_10"]),
        "splits": [split],
        "subsets": ["default"],
    }
    out.update({k: float(v) for k, v in sorted(metrics.items())})
    return out


def summarize(tasks: dict[str, dict]) -> dict:
    """`{"tasks": ..., "categories": {cat: {"num_tasks", "average", "tasks"}}, "average": ...}`;
    the average is over every task of the seven paper categories, as MTEB's overall score."""
    cats: dict[str, list[str]] = {c: [] for c in (*CATEGORIES, OTHER)}
    for name, t in tasks.items():
        cats[t["category"]].append(name)
    categories = {
        c: {
            "num_tasks": len(names),
            "average": _mean([tasks[n]["main_score"] for n in names]),
            "tasks": names,
        }
        for c, names in cats.items()
        if names or c in CATEGORIES
    }
    in_avg = [n for c in CATEGORIES for n in cats[c]]
    return {
        "tasks": tasks,
        "categories": categories,
        "average": {
            "num_tasks": len(in_avg),
            "score": _mean([tasks[n]["main_score"] for n in in_avg]),
        },
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def render_markdown(summary: dict, title: str) -> str:
    """The paper-style table (scores x 100) and one table of tasks per category."""
    cats = summary["categories"]
    head = [f"{c} ({cats[c]['num_tasks']})" for c in CATEGORIES]
    head.append(f"Average ({summary['average']['num_tasks']})")
    row = [_fmt(cats[c]["average"]) for c in CATEGORIES] + [_fmt(summary["average"]["score"])]
    lines = [
        f"# MTEB: {title}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| " + " | ".join(row) + " |",
        "",
        "Main scores x 100. A category is the mean of its tasks; Average is the mean over all "
        "tasks of the seven categories (MTEB's overall score).",
    ]
    for c in (*CATEGORIES, OTHER):
        names = cats.get(c, {}).get("tasks", [])
        if not names:
            continue
        note = " (not in the average)" if c == OTHER else ""
        lines += ["", f"## {c}{note}", "", "| task | type | metric | score |", "|---|---|---|---|"]
        for n in names:
            t = summary["tasks"][n]
            lines.append(f"| {n} | {t['type']} | {t['main_metric']} | {_fmt(t['main_score'])} |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | os.PathLike, summary: dict, title: str) -> None:
    """`summary.json` (NaN-free) and `summary.md` under `out_dir`, each written atomically."""
    write_atomic(Path(out_dir) / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
    write_atomic(Path(out_dir) / "summary.md", render_markdown(summary, title))
