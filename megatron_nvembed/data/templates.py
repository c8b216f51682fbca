"""Task definitions (paper Tables 6 and 7) and NV-Embed's query instruction template.

Queries get `"Instruct: {task_definition}\\nQuery: "` (or a model's own query template, e.g.
Qwen3-Embedding's `"Instruct: {task_definition}\\nQuery:"`; `config.PromptConfig`); documents never
get an instruction.
Task names are matched ignoring case and punctuation ("TREC-COVID" == "TRECCOVID"), the JSON's
`aliases` add the tables' own spellings ("Natural Question", "NQ"), and every STS evaluation task
uses Table 7's shared "STS" instruction.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from pathlib import Path

from megatron_nvembed.core.config import DEFAULT_QUERY_TEMPLATE

TASK_DEFINITIONS_FILE = Path(__file__).with_name("task_definitions.json")
SPLITS = ("train", "eval")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.cache
def _tables() -> dict[str, dict[str, str]]:
    data = json.loads(TASK_DEFINITIONS_FILE.read_text(encoding="utf-8"))
    return {split: {_norm(k): v for k, v in data[split].items()} for split in SPLITS}


@functools.cache
def _aliases() -> dict[str, str]:
    data = json.loads(TASK_DEFINITIONS_FILE.read_text(encoding="utf-8"))
    return {_norm(k): _norm(v) for k, v in data["aliases"].items()}


@functools.cache
def task_names(split: str = "train") -> tuple[str, ...]:
    """Task names of Table 6 (`train`) or Table 7 (`eval`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return tuple(json.loads(TASK_DEFINITIONS_FILE.read_text(encoding="utf-8"))[split])


def get_task_definition(task: str, split: str = "train") -> str:
    """The task definition of `task` from Table 6 (`split="train"`) or Table 7 (`"eval"`).

    Raises:
        ValueError: unknown split, or unknown task (the message lists close names).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    table = _tables()[split]
    key = _norm(task)
    # two alias hops: "Natural Question" -> NaturalQuestions (Table 6) -> NQ (Table 7's MTEB name)
    for _ in range(3):
        if key in table:
            return table[key]
        if key not in _aliases():
            break
        key = _aliases()[key]
    key = _norm(task)
    if split == "eval" and (key.startswith("sts") or key in ("sickr", "biosses")):
        return table["sts"]
    close = difflib.get_close_matches(task, task_names(split), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown task {task!r} for split {split!r}{hint} (give the record an explicit "
        '"instruction" to use a task outside the paper\'s tables)'
    )


def format_query_instruction(task_definition: str, template: str = DEFAULT_QUERY_TEMPLATE) -> str:
    """The query prefix for a task definition (default: NV-Embed's template)."""
    return template.format(instruction=task_definition)


def query_instruction(
    task: str,
    instruction: str | None = None,
    split: str = "train",
    template: str = DEFAULT_QUERY_TEMPLATE,
) -> str:
    """The instruction prefix of a query: the record's own `instruction` (a task definition, or a
    complete prefix starting with "Instruct:", kept as written) when given, else the task's
    definition, each put into `template`."""
    if instruction:
        if instruction.startswith("Instruct:"):
            return instruction
        return format_query_instruction(instruction, template)
    return format_query_instruction(get_task_definition(task, split), template)
