"""The evaluation command (`tools/evaluate_mteb.py`): one model scored on mteb tasks and on local
BEIR folders, results written under the output folder.

`run_evaluation(args)` runs it in named steps, every check before the model loads:
1. `run_setup.check_flags`: the flags and the model folder (its format, revision, query
   template);
2. `beir_run.plan_beir_folders`: each --beir-dir folder opened and checked, or its finished
   result file kept (--resume);
3. `select_mteb_tasks`: the mteb tasks of --tasks / --benchmark and their query instructions;
4. `run_setup.load_checked_embedder`: the model, and the search index checked against its width;
5. `run_mteb_tasks` (mteb's result files under OUT/results/) and `beir_run.run_beir_folders`
   (one OUT/beir/<name>.json each);
6. `write_run_summary`: summary.json and summary.md (rank 0).

A flag (or a file it names) the run cannot use raises `encoder_flags.FlagError` naming it; the tool
reports it as argparse does (its usage line, exit 2).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_nvembed.evaluation import mteb_eval as me
from megatron_nvembed.evaluation.beir_run import BeirJob, plan_beir_folders, run_beir_folders
from megatron_nvembed.evaluation.embedder import Embedder
from megatron_nvembed.evaluation.encoder_flags import FlagError
from megatron_nvembed.evaluation.run_setup import (
    RunSetup,
    Scored,
    check_flags,
    load_checked_embedder,
)

logger = logging.getLogger("evaluate_mteb")  # the tool's name in its progress lines


@dataclass
class MtebSelection:
    """The mteb tasks of --tasks / --benchmark by name (in order), each leaf task's query
    instruction, and mteb's version (None when no mteb task was asked for)."""

    tasks: dict[str, object] = field(default_factory=dict)
    instructions: dict[str, str] = field(default_factory=dict)
    version: str | None = None


def _resolve_mteb_tasks(names: list[str], benchmark: str | None) -> list:
    import mteb

    tasks = []
    if benchmark:
        try:
            tasks.extend(mteb.get_benchmark(benchmark).tasks)
        except (KeyError, ValueError) as err:
            raise FlagError(f"--benchmark {benchmark!r}: {err}") from err
    for name in names:
        try:
            tasks.append(mteb.get_task(name))
        except KeyError as err:
            from mteb.mocks import MOCK_TASK_REGISTRY  # mteb's offline test tasks

            if name not in MOCK_TASK_REGISTRY:
                raise FlagError(f"--tasks {name}: {err.args[0] if err.args else err}") from err
            tasks.append(MOCK_TASK_REGISTRY[name]())
    return tasks


def select_mteb_tasks(
    args: argparse.Namespace, template: str, beir: dict[str, BeirJob]
) -> MtebSelection:
    """The mteb tasks asked for, each a text task named once (BEIR folders' names included),
    and the query instruction of every task that calls the encoder.

    Raises:
        FlagError: an unknown task or benchmark, a task twice, a task not of text, a task
            without an instruction.
    """
    if not (args.tasks or args.benchmark):
        return MtebSelection()
    import mteb

    selected = MtebSelection(version=mteb.__version__)
    tasks = _resolve_mteb_tasks(args.tasks, args.benchmark)
    for t in tasks:
        n = t.metadata.name
        if n in selected.tasks or n in beir:
            raise FlagError(
                f"task {n!r} selected twice (check --tasks, --benchmark and --beir-dir names)"
            )
        if t.metadata.modalities != ["text"]:
            raise FlagError(f"task {n!r} is not a text task (modalities {t.metadata.modalities})")
        selected.tasks[n] = t
    for t in me.leaf_tasks(tasks):
        n = t.metadata.name
        try:
            selected.instructions[n] = me.resolve_instruction(
                n, args.instruction, prefer_override=False, template=template
            )
        except ValueError as err:
            raise FlagError(str(err)) from err
    return selected


def _result_cache(mteb, out: Path, is_main: bool):
    """mteb's result cache at `out`; other ranks read it (for --resume) but never write it."""

    class ReadOnlyCache(mteb.ResultCache):
        def save_to_cache(self, *a, **k):
            return None

    return (mteb.ResultCache if is_main else ReadOnlyCache)(out)


def run_mteb_tasks(
    args: argparse.Namespace, setup: RunSetup, embedder: Embedder, selected: MtebSelection
) -> Scored:
    """Evaluates the selected mteb tasks (`mteb.evaluate`, results cached under OUT; --resume
    keeps finished ones) and summarises each (`mteb_eval.summarize_task`)."""
    if not selected.tasks:
        return Scored({}, dict(selected.instructions))
    import mteb

    meta = me.model_meta(setup.name, setup.revision, embedder.dim, args.max_length)

    def fallback(task_name: str) -> str:
        return me.resolve_instruction(
            task_name, args.instruction, prefer_override=False, template=setup.template
        )

    encoder = me.MtebEncoder(embedder, meta, selected.instructions, fallback)
    cache = _result_cache(mteb, setup.out, embedder.is_main)
    result = mteb.evaluate(
        encoder,
        list(selected.tasks.values()),
        cache=cache,
        overwrite_strategy="only-missing" if args.resume else "always",
        encode_kwargs={"batch_size": args.batch_size},
        show_progress_bar=embedder.is_main,
        raise_error=True,
    )
    per_task = {}
    for r in result.task_results:
        t = selected.tasks[r.task_name]
        per_task[r.task_name] = me.summarize_task(r.scores, t.metadata.type, t.metadata.main_score)
    results_dir = str(cache.get_task_result_path("x", meta).parent)
    return Scored(per_task, encoder.instructions, results_dir)


def write_run_summary(
    args: argparse.Namespace,
    setup: RunSetup,
    embedder: Embedder,
    beir: dict[str, BeirJob],
    scored: Scored,
    mteb_version: str | None,
    seconds: float,
) -> None:
    """OUT/summary.json and OUT/summary.md (`mteb_eval.write_summary`), the table on stdout and
    the throughput line; on rank 0 only."""
    summary = me.summarize(scored.per_task)
    st = embedder.stats
    summary.update(
        {
            "model": setup.model,
            "model_format": setup.fmt,
            "model_name": setup.name,
            "revision": setup.revision,
            "mteb_version": mteb_version,
            "results_dir": scored.results_dir,
            "beir_results": {n: str(job.result) for n, job in beir.items()},
            "instructions": dict(sorted(scored.instructions.items())),
            "encoding": {
                "texts": st.texts,
                "seconds": round(st.seconds, 3),
                "texts_per_second": round(st.texts_per_second, 2),
                "truncated": st.truncated,
                "max_length": args.max_length,
                "max_tokens": embedder.token_budget,
                "batch_size": args.batch_size,
                "data_parallel_ranks": embedder.dp_size,
                "tensor_model_parallel_size": args.tensor_model_parallel_size,
            },
            "evaluation_seconds": round(seconds, 3),
        }
    )
    if beir:
        summary["beir_search"] = {
            "index": args.index,
            "search_params": args.search_params,
            "shard_size": args.shard_size,
            "work_dir": str(setup.work.resolve()),
        }
    me.write_summary(setup.out, summary, setup.name)
    print(me.render_markdown(summary, setup.name))
    logger.info(
        "embedded %d texts in %.1fs (%.1f texts/s); evaluation %.1fs; wrote %s",
        st.texts,
        st.seconds,
        st.texts_per_second,
        seconds,
        setup.out / "summary.json",
    )


def run_evaluation(args: argparse.Namespace) -> int:
    """Runs `tools/evaluate_mteb.py` (see its help for the flags and the files written): a
    collective under torchrun, every rank calls it with the same flags.

    Args:
        args: the tool's parsed flags.

    Returns:
        0 (the exit status).

    Raises:
        FlagError: a flag, or a file it names, the run cannot use (naming the flag).
    """
    setup = check_flags(args)
    beir = plan_beir_folders(args, setup)
    selected = select_mteb_tasks(args, setup.template, beir)
    embedder = load_checked_embedder(args, any(job.done is None for job in beir.values()))
    setup.out.mkdir(parents=True, exist_ok=True)
    if embedder.is_main:
        logger.info(
            "%s model %s (%d-d), %d mteb tasks and %d BEIR folders, %d data-parallel ranks, "
            "results in %s",
            setup.fmt,
            args.model,
            embedder.dim,
            len(selected.tasks),
            len(beir),
            embedder.dp_size,
            setup.out,
        )
    start = time.perf_counter()
    scored = run_mteb_tasks(args, setup, embedder, selected)
    run_beir_folders(args, setup, embedder, beir, scored)
    if embedder.is_main:
        seconds = time.perf_counter() - start
        write_run_summary(args, setup, embedder, beir, scored, selected.version, seconds)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    return 0
