"""Runs a plan on this machine, one cell after another, resumable.

A cell with done.json is skipped; in an unfinished cell the finished steps (their markers) are
skipped and an unfinished training run resumes from its last checkpoint (`--load`); a base
checkpoint that exists is not made again; a failed cell does not stop the others. Each step's
output goes to its log file; one line per step goes to stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from megatron_nvembed.ablation import cells as cell_files
from megatron_nvembed.ablation.bases import derive_mask_variant
from megatron_nvembed.ablation.plan import CellPlan, Plan
from megatron_nvembed.ablation.steps import (
    ROOT,
    DeriveStep,
    EvalStep,
    Step,
    TrainStep,
    render_argv,
)
from megatron_nvembed.checkpoint.store import is_checkpoint_dir
from megatron_nvembed.utils.fileio import write_atomic

EvalMain = Callable[[list[str]], int | None]
"""An evaluation entry point called in this process with an EvalStep's flags (the `main` of
tools/evaluate_mteb.py); returns its exit status (None: 0)."""


def _run_logged(argv: list[str], log: Path, env: dict[str, str]) -> None:
    """Runs `argv` from the repository root with its output into `log`.

    Raises:
        RuntimeError: on a non-zero exit, naming the log and its first error lines.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(argv), flush=True)
    # A one-node local step finds its own free port (torchrun --standalone); a MASTER_PORT
    # inherited from a surrounding job would make every step listen on that one port.
    inherited = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(
            argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**inherited, **env}
        )
    if proc.returncode != 0:
        text = log.read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [ln for ln in text if ln.lower().startswith("error") or "Error: " in ln]
        raise RuntimeError(f"exit {proc.returncode}, see {log}: " + " | ".join(errors[:3]))


def _eval_in_process(eval_main: EvalMain, step: EvalStep, log: Path) -> None:
    """`eval_main` on the step's flags in this process (saves an interpreter start and the mteb
    import per cell), with its output and its log records going to `log`.

    Raises:
        RuntimeError: on a non-zero exit status (an argparse error included), naming the log.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(render_argv(step)) + "   (in process)", flush=True)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with (
        open(log, "w", encoding="utf-8") as f,
        contextlib.redirect_stdout(f),
        contextlib.redirect_stderr(f),
    ):
        # the tool's logging set-up is a no-op while root has a handler: its log goes here
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        try:
            rc = eval_main(render_argv(step, program=False))
        except SystemExit as err:  # argparse errors
            rc = err.code
        finally:
            root.handlers = saved[0]
            root.setLevel(saved[1])
    if rc not in (0, None):
        raise RuntimeError(f"evaluation failed (exit {rc}), see {log}")


def _run_step(step: Step, log: Path, nproc: int, eval_main: EvalMain | None) -> float:
    """Runs one step; returns its seconds. Raises what the step raised (RuntimeError on a
    failed command)."""
    start = time.perf_counter()
    if isinstance(step, DeriveStep):
        print("$ " + shlex.join(render_argv(step)), flush=True)
        derive_mask_variant(step.src, step.dst, step.mask)
    elif isinstance(step, EvalStep) and nproc == 1 and eval_main is not None:
        _eval_in_process(eval_main, step, log)
    elif isinstance(step, EvalStep) and nproc > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        torchrun += ["--standalone"]  # torchrun binds a free port itself: nothing to race for
        threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        _run_logged(render_argv(step, torchrun), log, threads)
    elif isinstance(step, TrainStep):
        env = {
            "NPROC_PER_NODE": str(nproc),
            "PYTHON": sys.executable,
        }
        _run_logged(render_argv(step), log, env)
    else:
        _run_logged(render_argv(step), log, {})
    return time.perf_counter() - start


def _warn_if_changed(out: Path, cell: CellPlan) -> None:
    """A finished cell whose recorded commands differ from the plan's gets a warning."""
    old = cell_files.read_plan(out, cell.cell.name)
    if old is None:
        return
    new = cell.record()
    if [s["argv"] for s in old["steps"]] != [s["argv"] for s in new["steps"]]:
        print(
            f"warning: {cell_files.cell_dir(out, cell.cell.name)} finished with other commands "
            "than this grid's (delete the folder to redo it)",
            flush=True,
        )


def _run_cell(plan: Plan, cell: CellPlan, eval_main: EvalMain | None) -> None:
    """The cell's missing base steps, its unfinished steps, then done.json."""
    out, name = plan.out, cell.cell.name
    for step in plan.bases[cell.cell.base]:
        if not is_checkpoint_dir(step.output):
            sec = _run_step(step, out / "bases" / "logs" / f"{step.name}.log", 1, None)
            print(f"  {step.name}: {sec:.1f}s", flush=True)
    for step in cell.steps:
        marker = cell_files.step_marker(out, name, step.name)
        if marker.is_file():
            print(f"  {step.name}: finished earlier", flush=True)
            continue
        log = cell_files.step_log(out, name, step.name)
        sec = _run_step(step, log, plan.nproc, eval_main)
        if isinstance(step, TrainStep):  # stopped early (a signal) but exit 0: not finished
            cell_files.check_trained(step.save, cell.train_iters[step.name])
        write_atomic(marker, json.dumps({"seconds": round(sec, 2)}))
        print(f"  {step.name}: {sec:.1f}s", flush=True)
    cell_files.finish_cell(out, name)


def run_local(plan: Plan, *, eval_main: EvalMain | None = None) -> dict[str, str]:
    """Runs every unfinished cell of `plan`, one after another.

    Args:
        plan: the plan (`plan.build_plan`).
        eval_main: with `plan.nproc == 1`, evaluations call it in this process (tools/ablate.py
            passes tools/evaluate_mteb.py's `main`); None: every evaluation is a subprocess
            (under torchrun when `plan.nproc > 1`, whatever `eval_main` is).

    Returns:
        {cell: "done" | "skipped" | "failed: <first line of the error>"}.
    """
    status: dict[str, str] = {}
    for name, cell in plan.cells.items():
        if cell_files.is_done(plan.out, name):
            _warn_if_changed(plan.out, cell)
            print(f"== {name}: finished earlier, skipped", flush=True)
            status[name] = "skipped"
            continue
        print(f"== {name}", flush=True)
        cell_files.write_plan(plan.out, name, cell.record())
        try:
            _run_cell(plan, cell, eval_main)
            status[name] = "done"
        except Exception as err:  # one failed cell must not stop the grid
            print(f"  FAILED: {err}", flush=True)
            status[name] = f"failed: {str(err).splitlines()[0]}"
    return status
