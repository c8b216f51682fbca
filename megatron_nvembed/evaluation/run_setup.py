"""The evaluation command's flags resolved (`tools/evaluate_mteb.py`, run by
`mteb_run.run_evaluation`): the cheap checks before anything loads (`check_flags` -> `RunSetup`),
the model loaded and the search index checked against it (`load_checked_embedder`), and what the
run scores into (`Scored`).

A flag (or a file it names) the run cannot use raises `encoder_flags.FlagError` with a message
naming it; the tool reports it as argparse does (its usage line, exit 2).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_nvembed.evaluation.embedder import Embedder
from megatron_nvembed.evaluation.encoder import (
    detect_model_format,
    load_embedder,
    query_template_of,
)
from megatron_nvembed.evaluation.encoder_flags import (
    FlagError,
    embedder_kwargs,
    encoder_flag_error,
)
from megatron_nvembed.retrieval.search import check_index


@dataclass(frozen=True)
class RunSetup:
    """What the flags resolve to before anything loads.

    Attributes:
        fmt: the model's format (`encoder.detect_model_format`).
        revision: "iter_0000042" for a checkpoint, "hf" for a model folder.
        template: the model's query template (`encoder.query_template_of`).
        model: the model folder's resolved path; name: its name in the results (--name).
        out: --output; work: the BEIR folders' corpus shards (--work-dir, default OUT/embeddings).
        is_main: rank 0 (read from RANK: no process group exists yet).
    """

    fmt: str
    revision: str
    template: str
    model: str
    name: str
    out: Path
    work: Path
    is_main: bool


@dataclass
class Scored:
    """What a run scored: each task's summary entry (mteb tasks, then BEIR folders), each task's
    query instruction, and mteb's result folder (None without mteb tasks)."""

    per_task: dict[str, dict]
    instructions: dict[str, str]
    results_dir: str | None = None


def _revision(model: str, fmt: str) -> str:
    if fmt != "megatron":
        return "hf"
    from megatron_nvembed.checkpoint.store import latest_iteration

    try:
        return f"iter_{latest_iteration(model):07d}"
    except (FileNotFoundError, ValueError) as err:
        raise FlagError(f"--model: {err}") from err


def check_flags(args: argparse.Namespace) -> RunSetup:
    """The cheap checks: bad flags and paths fail before any model or mteb import.

    Raises:
        FlagError: naming the flag.
    """
    if not (args.tasks or args.benchmark or args.beir_dir):
        raise FlagError("nothing to evaluate: give --tasks, --benchmark and/or --beir-dir")
    problem = encoder_flag_error(args)
    if problem:
        raise FlagError(problem)
    if args.shard_size < 1:
        raise FlagError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.index == "exact" and args.search_params:
        raise FlagError(
            f"--search-params {args.search_params!r}: the exact search takes none (see --index)"
        )
    try:
        fmt = detect_model_format(args.model)
    except FileNotFoundError as err:
        raise FlagError(f"--model: {err}") from err
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise FlagError(f"--output {out}: exists and is not a directory")
    work = Path(args.work_dir) if args.work_dir else out / "embeddings"
    if args.beir_dir and work.exists() and not work.is_dir():
        raise FlagError(f"--work-dir {work}: exists and is not a directory")
    revision = _revision(args.model, fmt)
    try:  # task definitions go into the model's own query template
        template = query_template_of(args.model)
    except (FileNotFoundError, ValueError) as err:
        raise FlagError(f"--model: {err}") from err
    model = Path(args.model).resolve()
    name = args.name or f"megatron_nvembed/{model.name}"
    is_main = int(os.environ.get("RANK", "0")) == 0
    return RunSetup(fmt, revision, template, str(model), name, out, work, is_main)


def load_checked_embedder(args: argparse.Namespace, needs_index: bool) -> Embedder:
    """The model (`encoder.load_embedder` at the encoder flags); with `needs_index` (a BEIR
    folder left to score), --index / --search-params checked against its width.

    Raises:
        FlagError: the model does not load, or the index does not fit it.
    """
    try:
        embedder = load_embedder(args.model, **embedder_kwargs(args))
    except (FileNotFoundError, ValueError) as err:
        raise FlagError(f"--model: {err}") from err
    if needs_index:
        try:
            check_index(args.index, args.search_params, embedder.dim)
        except ValueError as err:
            raise FlagError(str(err)) from err
    return embedder
