"""`tools/ablate.py`'s work after its flags are parsed: plan the grid, run it here or write its
SLURM scripts, then collect the report.

`run_ablation(args, extra, eval_main)` returns the exit code; bad flags raise `ValueError` naming
the flag (the tool turns it into its usage error).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_nvembed.ablation.bases import derive_mask_variant
from megatron_nvembed.ablation.cells import check_trained_step, finish_cell
from megatron_nvembed.ablation.grid import parse_grid, parse_objectives
from megatron_nvembed.ablation.local import run_local
from megatron_nvembed.ablation.plan import Plan, build_plan
from megatron_nvembed.ablation.report import collect, load_incomplete
from megatron_nvembed.ablation.slurm import SlurmOptions, write_slurm


def plan_grid(args: argparse.Namespace, extra: list[str]) -> Plan:
    """The plan of `--grid` (and `--objective`, the `--` training flags) under `--out`.

    Raises:
        ValueError / FileNotFoundError: naming the flag.
    """
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    objectives = parse_objectives(args.objective)
    plan = build_plan(
        out=Path(args.out),
        grid=parse_grid(args.grid, objectives),
        recipe=args.recipe,
        stage1_data=args.stage1_data,
        stage2_data=args.stage2_data,
        base_hf=args.base_hf,
        base_checkpoint=args.base_checkpoint,
        eval_beir=args.eval_beir,
        tasks=args.tasks,
        instruction=args.instruction,
        nproc=1 if args.nproc is None else args.nproc,
        extra=extra,
        objectives=objectives,
    )
    for folder in args.eval_beir:
        if not Path(folder).is_dir():
            raise ValueError(f"--eval-beir {folder}: not a directory")
    return plan


def slurm_options(args: argparse.Namespace) -> SlurmOptions:
    """The `--slurm-*` flags and `--nproc`: GPUs per node `--slurm-gpus-per-node`, else
    `--nproc` when given, else 8; processes per node the allocated GPUs, or `--nproc` (default 1)
    on CPU nodes (`--slurm-gpus-per-node 0`).

    Raises:
        ValueError: naming the flags, when `--nproc` and a GPU count disagree, or a count is
            negative.
    """
    gpus = args.slurm_gpus_per_node
    if gpus is None:
        gpus = 8 if args.nproc is None else args.nproc
    if gpus < 0 or args.slurm_signal_lead < 0:
        raise ValueError("--slurm-gpus-per-node and --slurm-signal-lead must be >= 0")
    if gpus > 0 and args.nproc is not None and args.nproc != gpus:
        raise ValueError(
            f"--nproc {args.nproc} with --slurm-gpus-per-node {gpus}: on GPU nodes a job runs one "
            "process per allocated GPU (give one of the two; --nproc alone sets both)"
        )
    return SlurmOptions(
        nodes=args.slurm_nodes,
        gpus_per_node=gpus,
        nproc=1 if args.nproc is None else args.nproc,
        time_limit=args.slurm_time,
        signal_lead=args.slurm_signal_lead,
        sbatch_lines=args.sbatch,
    )


def run_plan(
    plan: Plan, args: argparse.Namespace, load_eval_main, slurm: SlurmOptions | None = None
) -> dict[str, str]:
    """Runs `plan` here (cell name -> status), or writes its SLURM scripts with `slurm`
    (`--run slurm`: no status). `load_eval_main()` returns the in-process evaluation's `main`
    (called only for a local run without `--eval-subprocess`)."""
    print(f"{len(plan.cells)} cells: {', '.join(plan.cells)}", flush=True)
    if slurm is not None:
        written = write_slurm(plan, slurm)
        print(f"wrote {len(written)} scripts; submit with: bash {written[-1]}")
        return {}
    eval_main = None if args.eval_subprocess or load_eval_main is None else load_eval_main()
    return run_local(plan, eval_main=eval_main)


def report(out: Path, status: dict[str, str]) -> int:
    """Collects the finished cells into `out`/ablation.{md,csv,png}, prints the table and each
    failed cell; returns 1 when a cell failed."""
    rows = collect(out)
    written = ".csv, .png" if rows and (out / "ablation.png").is_file() else ".csv"
    unfinished = load_incomplete(out)
    more = f"; {len(unfinished)} incomplete cells listed there" if unfinished else ""
    print(f"collected {len(rows)} finished cells into {out / 'ablation.md'} ({written}){more}")
    print((out / "ablation.md").read_text())
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    for name, why in failed.items():
        print(f"{name}: {why}", file=sys.stderr)
    return 1 if failed else 0


def _say(job, line) -> int:
    """Runs a cell script's bookkeeping step: its line and 0, or one error line and 1."""
    try:
        result = job()
    except (RuntimeError, OSError) as err:  # OSError: a cell folder or plan.json missing
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(line(result))
    return 0


def run_ablation(
    args: argparse.Namespace, extra: list[str], load_eval_main=None, usage_error=None
) -> int:
    """The whole of `tools/ablate.py` after parsing: a SLURM job's single step
    (`--derive-mask`, `--finish-cell`), or plan + run + report (`--collect`: report only).

    Args:
        args: the tool's parsed flags.
        extra: the training flags after `--`.
        load_eval_main: returns `tools/evaluate_mteb.py`'s `main` for in-process evaluations
            (None, or `--eval-subprocess`: a subprocess per evaluation).
        usage_error: called with the message of a bad flag found while planning (the tool's
            `parser.error`); None: the error is raised.

    Raises:
        ValueError / FileNotFoundError: a bad flag, naming it (without `usage_error`).
    """
    if args.derive_mask:
        derive_mask_variant(*args.derive_mask)
        print(f"wrote {args.derive_mask[1]}")
        return 0
    if args.check_trained:
        _, cell, step = args.check_trained
        return _say(
            lambda: check_trained_step(*args.check_trained),
            lambda reached: f"{cell}: {step} finished (iteration {reached})",
        )
    if args.finish_cell:
        return _say(
            lambda: finish_cell(*args.finish_cell),
            lambda done: f"{done['cell']}: done (average {done['average']})",
        )
    status: dict[str, str] = {}
    if not args.collect:
        try:
            plan = plan_grid(args, extra)
            slurm = slurm_options(args) if args.run == "slurm" else None
        except (ValueError, FileNotFoundError) as err:
            if usage_error is None:
                raise
            usage_error(str(err))
        status = run_plan(plan, args, load_eval_main, slurm)
    return report(Path(args.out), status)
