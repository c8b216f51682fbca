"""A cell's files under `OUT/cells/<cell>/`: `plan.json` (settings, commands and each training
run's `train_iters`), the step markers `steps/<step>.done`, the logs `logs/<step>.log` and
`done.json`, written atomically last. A training run counts as finished only when its
checkpoint's tracker names its last iteration (`check_trained`): a run stopped early (a signal,
a time limit) gets no marker, and its cell no done.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megatron_nvembed.ablation.grid import DEFAULT_OBJECTIVE
from megatron_nvembed.checkpoint.store import latest_iteration
from megatron_nvembed.utils.fileio import write_atomic

PLAN_FILE = "plan.json"
DONE_FILE = "done.json"
SUMMARY = Path("eval") / "summary.json"
"""The evaluation summary of a cell, relative to its folder (tools/evaluate_mteb.py writes it)."""


def cell_dir(out: str | os.PathLike, cell: str) -> Path:
    """The folder of cell `cell` under the grid's output folder `out`."""
    return Path(out) / "cells" / cell


def is_done(out: str | os.PathLike, cell: str) -> bool:
    """Whether the cell finished (its done.json exists; a finished cell is never run again)."""
    return (cell_dir(out, cell) / DONE_FILE).is_file()


def step_marker(out: str | os.PathLike, cell: str, step: str) -> Path:
    """The file whose presence says that step `step` of the cell finished."""
    return cell_dir(out, cell) / "steps" / f"{step}.done"


def step_log(out: str | os.PathLike, cell: str, step: str) -> Path:
    """The log file of step `step` of the cell."""
    return cell_dir(out, cell) / "logs" / f"{step}.log"


def write_plan(out: str | os.PathLike, cell: str, record: dict) -> None:
    """Writes the cell's plan.json (atomically)."""
    write_atomic(cell_dir(out, cell) / PLAN_FILE, json.dumps(record, indent=1))


def read_plan(out: str | os.PathLike, cell: str) -> dict | None:
    """The cell's plan.json, or None when it is missing or unreadable."""
    try:
        return json.loads((cell_dir(out, cell) / PLAN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def reached_iteration(save: str | os.PathLike) -> int:
    """The iteration of a training run's last checkpoint (its tracker file); 0 without one."""
    try:
        return latest_iteration(save)
    except (FileNotFoundError, ValueError):
        return 0


def check_trained(save: str | os.PathLike, iters: int) -> int:
    """A training run finished: its checkpoint `save` reached its last iteration `iters`.

    Returns:
        The checkpoint's iteration.

    Raises:
        RuntimeError: the checkpoint is missing or before iteration `iters` (the run stopped
            early: a signal, a time limit), naming the folder and both iterations.
    """
    reached = reached_iteration(save)
    if reached < iters:
        raise RuntimeError(
            f"{save}: checkpoint at iteration {reached} of {iters}: training has not finished "
            "(run the grid again, or resubmit the cell's job, to resume it)"
        )
    return reached


def _train_records(plan: dict, cell: str) -> list[dict]:
    """The training runs of a cell's plan.json, each with its `train_iters`.

    Raises:
        RuntimeError: a run without `train_iters` (plan.json of an older tools/ablate.py).
    """
    runs = [s for s in plan["steps"] if s["kind"] == "train"]
    for run in runs:
        if "train_iters" not in run:
            raise RuntimeError(
                f"{cell}/plan.json: run {run['name']!r} has no train_iters (written by an older "
                "tools/ablate.py): run the grid again to rewrite it"
            )
    return runs


def check_trained_step(out: str | os.PathLike, cell: str, step: str) -> int:
    """`check_trained` for training run `step` of the cell (its plan.json's folder and
    iterations): what a SLURM cell script runs before writing the run's step marker.

    Raises:
        RuntimeError: as check_trained, or `step` is not a training run of the cell.
        FileNotFoundError: the cell has no plan.json.
    """
    plan = json.loads((cell_dir(out, cell) / PLAN_FILE).read_text())
    for run in _train_records(plan, cell):
        if run["name"] == step:
            return check_trained(run["output"], run["train_iters"])
    raise RuntimeError(f"{cell}: no training run {step!r} in plan.json")


def progress(out: str | os.PathLike, cell: str) -> str:
    """Where an unfinished cell stands, for the report: its first unfinished step, with the
    iteration a training run's checkpoint reached ("stage1 at iteration 571 of 3000")."""
    plan = read_plan(out, cell)
    if plan is None:
        return "no plan.json"
    for s in plan["steps"]:
        if step_marker(out, cell, s["name"]).is_file():
            continue
        if s["kind"] == "train":
            of = f" of {s['train_iters']}" if "train_iters" in s else ""
            return f"{s['name']} at iteration {reached_iteration(s['output'])}{of}"
        return f"{s['name']} not finished"
    return "every step finished, done.json not written"


def finish_cell(out: str | os.PathLike, cell: str) -> dict:
    """Writes the cell's done.json (atomically) from its plan.json and evaluation summary.

    Returns:
        The done.json content: the cell's settings (objective and its flags included),
        final checkpoint, category scores, average
        and seconds per finished step.

    Raises:
        FileNotFoundError: the cell has no plan.json or no evaluation summary.
        RuntimeError: a training run's checkpoint did not reach its last iteration.
    """
    cdir = cell_dir(out, cell)
    plan = json.loads((cdir / PLAN_FILE).read_text())
    for run in _train_records(plan, cell):
        check_trained(run["output"], run["train_iters"])
    summary_path = cdir / SUMMARY
    summary = json.loads(summary_path.read_text())
    seconds = {}
    for s in plan["steps"]:
        marker = step_marker(out, cell, s["name"])
        if marker.is_file():
            seconds[s["name"]] = json.loads(marker.read_text() or "{}").get("seconds")
    done = {
        **{k: plan[k] for k in ("cell", "schedule", "pooling", "mask")},
        # a plan.json written before the objective axis existed: the default objective
        "objective": plan.get("objective", DEFAULT_OBJECTIVE),
        "objective_flags": plan.get("objective_flags", []),
        **{k: plan[k] for k in ("recipe", "beir_sets")},
        "checkpoint": plan["final_checkpoint"],
        "summary": str(summary_path),
        "categories": {c: v["average"] for c, v in summary["categories"].items()},
        "average": summary["average"]["score"],
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(cdir / DONE_FILE, json.dumps(done, indent=1))
    return done
