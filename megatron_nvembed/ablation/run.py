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
from megatron_nvembed.ablation.cells import finish_cell
from megatron_nvembed.ablation.grid import parse_grid, parse_objectives
from megatron_nvembed.ablation.local import run_local
from megatron_nvembed.ablation.plan import Plan, build_plan
from megatron_nvembed.ablation.report import collect
from megatron_nvembed.ablation.slurm import write_slurm


def plan_grid(args: argparse.Namespace, extra: list[str]) -> Plan:
    """The plan of `--grid` (and `--objective`, the `--` training flags) under `--out`.

    Raises:
        ValueError / FileNotFoundError: naming the flag.
    """
    if args.nproc < 1:
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
        nproc=args.nproc,
        extra=extra,
        objectives=objectives,
    )
    for folder in args.eval_beir:
        if not Path(folder).is_dir():
            raise ValueError(f"--eval-beir {folder}: not a directory")
    return plan


def run_plan(plan: Plan, args: argparse.Namespace, load_eval_main) -> dict[str, str]:
    """Runs `plan` here (cell name -> status), or writes its SLURM scripts (`--run slurm`: no
    status). `load_eval_main()` returns the in-process evaluation's `main` (called only for a
    local run without `--eval-subprocess`)."""
    print(f"{len(plan.cells)} cells: {', '.join(plan.cells)}", flush=True)
    if args.run == "slurm":
        written = write_slurm(
            plan,
            nodes=args.slurm_nodes,
            gpus_per_node=args.slurm_gpus_per_node,
            time_limit=args.slurm_time,
            sbatch_lines=args.sbatch,
        )
        print(f"wrote {len(written)} scripts; submit with: bash {written[-1]}")
        return {}
    eval_main = None if args.eval_subprocess or load_eval_main is None else load_eval_main()
    return run_local(plan, eval_main=eval_main)


def report(out: Path, status: dict[str, str]) -> int:
    """Collects the finished cells into `out`/ablation.{md,csv,png}, prints the table and each
    failed cell; returns 1 when a cell failed."""
    rows = collect(out)
    written = ".csv, .png" if rows and (out / "ablation.png").is_file() else ".csv"
    print(f"collected {len(rows)} finished cells into {out / 'ablation.md'} ({written})")
    print((out / "ablation.md").read_text())
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    for name, why in failed.items():
        print(f"{name}: {why}", file=sys.stderr)
    return 1 if failed else 0


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
    if args.finish_cell:
        done = finish_cell(*args.finish_cell)
        print(f"{done['cell']}: done (average {done['average']})")
        return 0
    status: dict[str, str] = {}
    if not args.collect:
        try:
            plan = plan_grid(args, extra)
        except (ValueError, FileNotFoundError) as err:
            if usage_error is None:
                raise
            usage_error(str(err))
        status = run_plan(plan, args, load_eval_main)
    return report(Path(args.out), status)
