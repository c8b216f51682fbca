"""A cell's files under `OUT/cells/<cell>/`: `plan.json` (settings and commands), the step
markers `steps/<step>.done`, the logs `logs/<step>.log` and `done.json`, written atomically last.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megatron_nvembed.ablation.grid import DEFAULT_OBJECTIVE
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


def finish_cell(out: str | os.PathLike, cell: str) -> dict:
    """Writes the cell's done.json (atomically) from its plan.json and evaluation summary.

    Returns:
        The done.json content: the cell's settings (objective and its flags included),
        final checkpoint, category scores, average
        and seconds per finished step.

    Raises:
        FileNotFoundError: the cell has no plan.json or no evaluation summary.
    """
    cdir = cell_dir(out, cell)
    plan = json.loads((cdir / PLAN_FILE).read_text())
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
