"""The evaluation command's local BEIR folders (`tools/evaluate_mteb.py --beir-dir`, run by
`mteb_run.run_evaluation`): each planned before the model loads (`plan_beir_folders`: opened and
checked, or its finished result file kept under --resume, `finished_beir_result`), then scored at
corpus scale (`run_beir_folders`: `retrieval_eval.evaluate_beir_sharded`, corpus shards under
--work-dir/<name>/, one OUT/beir/<name>.json each).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_nvembed.evaluation import mteb_eval as me
from megatron_nvembed.evaluation.beir import BeirFolder, open_beir, require_queries
from megatron_nvembed.evaluation.embedder import Embedder
from megatron_nvembed.evaluation.encoder_flags import FlagError
from megatron_nvembed.evaluation.retrieval_eval import evaluate_beir_sharded
from megatron_nvembed.evaluation.run_setup import RunSetup, Scored
from megatron_nvembed.retrieval.search import describe
from megatron_nvembed.retrieval.shards import META
from megatron_nvembed.utils.fileio import write_atomic

logger = logging.getLogger("evaluate_mteb")  # the tool's name in its progress lines

BEIR_KS = (1, 3, 5, 10, 20, 100, 1000)  # mteb's retrieval cut-offs


@dataclass
class BeirJob:
    """One --beir-dir folder: its result file, its query instruction, and either its finished
    result (`done`, under --resume) or the opened folder to score (`data`)."""

    folder: str
    result: Path
    instruction: str
    done: dict | None
    data: BeirFolder | None


def finished_beir_result(path: Path, expected: dict, is_main: bool) -> dict | None:
    """A finished BEIR result file made with the `expected` settings (split, model, revision,
    instruction); None when missing, truncated, unreadable or made otherwise (rank 0 says why)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        differs = sorted(k for k, v in expected.items() if saved[k] != v)
        if not differs and isinstance(saved["task"]["main_score"], float | int):
            return saved
        reason = f"made with another {', '.join(differs)}" if differs else "no score"
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = f"unreadable ({type(err).__name__}: {err})"
    if is_main:
        logger.warning("%s: %s; evaluating again", path, reason)
    return None


def _open_beir_folder(folder: str, split: str, work: Path, name: str) -> BeirFolder:
    """The folder opened and checked, and its corpus shards' folder `work/name` usable."""
    try:
        data = open_beir(folder, split)
        require_queries(data)
    except (FileNotFoundError, ValueError) as err:
        raise FlagError(f"--beir-dir {folder}: {err}") from err
    wd = work / name
    if wd.is_dir() and any(wd.iterdir()) and not (wd / META).is_file():
        raise FlagError(
            f"--work-dir {work}: {wd} exists and is not a corpus embedding folder "
            "(no meta.json); choose another --work-dir"
        )
    return data


def _plan_beir_folder(args: argparse.Namespace, setup: RunSetup, folder: str, name: str) -> BeirJob:
    instruction_error = None
    try:
        instruction = me.resolve_instruction(
            name, args.instruction, prefer_override=True, template=setup.template
        )
    except ValueError as err:  # reported after the folder's own errors
        instruction, instruction_error = None, str(err)
    result = setup.out / "beir" / f"{name}.json"
    expected = {
        "split": args.beir_split,
        "model": setup.model,
        "revision": setup.revision,
        "instruction": instruction,
    }
    done = finished_beir_result(result, expected, setup.is_main) if args.resume else None
    data = None
    if done is None:
        data = _open_beir_folder(folder, args.beir_split, setup.work, name)
    if instruction_error:
        raise FlagError(instruction_error)
    return BeirJob(folder, result, instruction, done, data)


def plan_beir_folders(args: argparse.Namespace, setup: RunSetup) -> dict[str, BeirJob]:
    """Each --beir-dir folder by task name (the folder's name).

    Raises:
        FlagError: two folders of one name, a folder that is not a BEIR folder, a task without
            an instruction, an unusable corpus shards' folder.
    """
    beir: dict[str, BeirJob] = {}
    for folder in args.beir_dir:
        name = Path(folder).resolve().name
        if name in beir:
            raise FlagError(f"--beir-dir {folder}: a second folder named {name!r}")
        if not Path(folder).is_dir():
            raise FlagError(f"--beir-dir {folder}: not a directory")
        beir[name] = _plan_beir_folder(args, setup, folder, name)
    return beir


def _write_beir_result(
    args: argparse.Namespace,
    setup: RunSetup,
    embedder: Embedder,
    task_name: str,
    job: BeirJob,
    metrics: dict[str, float],
    entry: dict,
    seconds: float,
) -> None:
    """OUT/beir/<name>.json (atomically) and the folder's score line."""
    enc = embedder.last_encode
    wd = setup.work / task_name
    saved = {
        "task_name": task_name,
        "folder": str(Path(job.folder).resolve()),
        "split": args.beir_split,
        "instruction": job.instruction,
        "model": setup.model,
        "model_name": setup.name,
        "revision": setup.revision,
        "num_queries": len(job.data.query_ids),
        "num_documents": len(job.data.corpus),
        "search": describe(args.index, args.search_params),
        "work_dir": str(wd.resolve()),
        "corpus_encoding": {
            "shards": enc.shards,
            "shard_size": args.shard_size,
            "computed_shards": enc.computed_shards,
            "computed_rows": enc.computed_rows,
            "seconds": round(enc.seconds, 3),
            "passages_per_second": round(enc.passages_per_second, 2),
        },
        "evaluation_seconds": round(seconds, 3),
        "task": entry,
    }
    write_atomic(job.result, json.dumps(saved, indent=1, allow_nan=False))
    logger.info(
        "%s: nDCG@10 %.4f | recall@10 %.4f | MRR@10 %.4f | %d queries, %d passages "
        "(%d shards computed, %d kept) | %s | wrote %s",
        task_name,
        metrics["ndcg_at_10"],
        metrics["recall_at_10"],
        metrics["mrr_at_10"],
        saved["num_queries"],
        saved["num_documents"],
        enc.computed_shards,
        enc.shards - enc.computed_shards,
        saved["search"],
        job.result,
    )


def _score_beir_folder(
    args: argparse.Namespace, setup: RunSetup, embedder: Embedder, task_name: str, job: BeirJob
) -> dict:
    """One folder at corpus scale (a collective); its summary entry."""
    wd = setup.work / task_name
    if not args.resume and embedder.is_main and (wd / META).is_file():
        shutil.rmtree(wd)  # without --resume every shard is computed again
    start = time.perf_counter()
    try:
        metrics = evaluate_beir_sharded(
            embedder,
            job.data,
            wd,
            instruction=job.instruction,
            ks=BEIR_KS,
            shard_size=args.shard_size,
            index=args.index,
            params=args.search_params,
            on_mismatch="clear",
        )
    except ValueError as err:
        raise FlagError(f"--beir-dir {job.folder}: {err}") from err
    entry = me.retrieval_task_entry(metrics, args.beir_split)
    if embedder.is_main:
        seconds = time.perf_counter() - start
        _write_beir_result(args, setup, embedder, task_name, job, metrics, entry, seconds)
    return entry


def run_beir_folders(
    args: argparse.Namespace,
    setup: RunSetup,
    embedder: Embedder,
    beir: dict[str, BeirJob],
    scored: Scored,
) -> None:
    """Scores each BEIR folder left to score (finished ones kept), adding them to `scored`.

    Raises:
        FlagError: a folder's evaluation refused (naming --beir-dir).
    """
    for task_name, job in beir.items():
        scored.instructions[task_name] = job.instruction
        if job.done is not None:
            scored.per_task[task_name] = job.done["task"]
            if embedder.is_main:
                logger.info("%s: finished earlier, kept %s", task_name, job.result)
            continue
        scored.per_task[task_name] = _score_beir_folder(args, setup, embedder, task_name, job)
