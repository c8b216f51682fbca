"""SLURM scripts of a plan: `OUT/slurm/bases.sbatch`, one `<cell>.sbatch` per unfinished cell and
`submit_all.sh`; nothing is submitted.

A cell script trains through examples/slurm_train.sh (job port, processes per node, the requeue
after a signal's save: all from there), skips its finished steps (the same markers as a local
run), writes a training run's marker only once `tools/ablate.py --check-trained` found its
checkpoint at the run's last iteration, evaluates on the first node and writes done.json last
(`tools/ablate.py --finish-cell`, which checks the checkpoints again). Every tool runs under
`$PYTHON`: the interpreter that wrote the scripts unless the job's environment sets another.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_nvembed.ablation import cells as cell_files
from megatron_nvembed.ablation.plan import CellPlan, Plan
from megatron_nvembed.ablation.steps import (
    ROOT,
    CheckStep,
    FinishStep,
    Step,
    TrainStep,
    render_argv,
)
from megatron_nvembed.checkpoint.store import TRACKER
from megatron_nvembed.utils.fileio import write_atomic

SLURM_TRAIN = ROOT / "examples" / "slurm_train.sh"


@dataclass(frozen=True)
class SlurmOptions:
    """What `--run slurm` puts into every job script."""

    nodes: int = 1
    """Nodes per cell job (training runs on all of them, the evaluation on the first)."""
    gpus_per_node: int = 8
    """`#SBATCH --gpus-per-node`; 0: CPU nodes, where each node runs `nproc` processes."""
    nproc: int = 1
    """Processes per node on CPU nodes (NPROC_PER_NODE); with GPUs, the allocation's count."""
    time_limit: str = "24:00:00"
    """`#SBATCH --time` of every job."""
    signal_lead: int = 300
    """Seconds before the time limit at which SLURM sends SIGTERM (`--signal=TERM@N`)."""
    sbatch_lines: Sequence[str] = ()
    """More `#SBATCH` line contents, e.g. `--partition=x`."""
    python: str = sys.executable
    """The interpreter of the tools and the launcher (`PYTHON`, unless the job's environment
    sets it)."""


def _header(job: str, nodes: int, logs: Path, opts: SlurmOptions) -> list[str]:
    return [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={job}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={opts.gpus_per_node}",
        f"#SBATCH --time={opts.time_limit}",
        f"#SBATCH --signal=TERM@{opts.signal_lead}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}/%x-%j.out",
        *[f"#SBATCH {line}" for line in opts.sbatch_lines],
        "set -euo pipefail",
        f"cd {shlex.quote(str(ROOT))}",
        f'export PYTHON="${{PYTHON:-{opts.python}}}"',
    ]


def _python(step: Step) -> str:
    """The step's tool command under `$PYTHON`."""
    return '"$PYTHON" ' + shlex.join(render_argv(step, []))


def _bases_body(plan: Plan) -> list[str]:
    """Every base step the cells need, once, each skipped when its checkpoint exists."""
    lines = []
    seen = set()
    for name in dict.fromkeys(c.cell.base for c in plan.cells.values()):
        for step in plan.bases[name]:
            if step.name in seen:
                continue
            seen.add(step.name)
            tracker = shlex.quote(str(Path(step.output) / TRACKER))
            lines.append(f"[[ -f {tracker} ]] || {_python(step)}")
    return [*lines, 'echo "bases ready"']


# The evaluation's processes: the GPUs SLURM gave this node, else (CPU nodes) NPROC_PER_NODE.
_EVAL_NPROC = [
    'EVAL_NPROC="${SLURM_GPUS_ON_NODE:-0}"',
    '[[ "$EVAL_NPROC" != 0 ]] || EVAL_NPROC="$NPROC_PER_NODE"',
]
_TORCHRUN = '"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$EVAL_NPROC" '


def _cell_body(out: Path, cell: CellPlan, nproc: int) -> list[str]:
    """A cell's steps, each skipped when its marker exists, then done.json."""
    name = cell.cell.name
    lines = [
        f"CELL={shlex.quote(str(cell_files.cell_dir(out, name)))}",
        'if [[ -f "$CELL/done.json" ]]; then echo "$CELL finished earlier"; exit 0; fi',
        'mkdir -p "$CELL/steps" "$CELL/logs"',
        f"export NPROC_PER_NODE={nproc}",
        "# a step's marker: its seconds in this run of the job (atomic)",
        'mark() { printf \'{"seconds": %d}\\n\' "$((SECONDS - START))" >"$1.tmp"; '
        'mv "$1.tmp" "$1"; }',
    ]
    for step in cell.steps:
        marker = f'"$CELL/steps/{step.name}.done"'
        log = f'"$CELL/logs/{step.name}.log"'
        if isinstance(step, TrainStep):
            flags = shlex.join(render_argv(step, program=False))
            run = [
                f"bash {shlex.quote(str(SLURM_TRAIN))} {flags} 2>&1 | tee -a {log}",
                _python(CheckStep(str(out), name, step.name)),
            ]
        else:
            env = 'OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" '
            run = [
                *_EVAL_NPROC,
                f"{env}{_TORCHRUN}{shlex.join(render_argv(step, []))} 2>&1 | tee -a {log}",
            ]
        lines += [f"if [[ ! -f {marker} ]]; then", f"  START=$SECONDS; echo '== {step.name}'"]
        lines += [f"  {line}" for line in run] + [f"  mark {marker}", "fi"]
    lines.append(_python(FinishStep(str(out), name)))
    return lines


def write_slurm(plan: Plan, opts: SlurmOptions | None = None) -> list[Path]:
    """Writes the SLURM scripts of `plan` (each atomically) and the plan.json of every unfinished
    cell.

    Args:
        plan: the plan (`plan.build_plan`).
        opts: nodes, GPUs and processes per node, time limit, signal lead, more #SBATCH lines
            (None: the defaults of `SlurmOptions`).

    Returns:
        The paths written: bases.sbatch, the cell scripts, then submit_all.sh.
    """
    opts = SlurmOptions() if opts is None else opts
    out = plan.out
    sdir = out / "slurm"
    (sdir / "logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create --output's folder
    bases = sdir / "bases.sbatch"
    header = _header("ablation-bases", 1, sdir / "logs", opts)
    write_atomic(bases, "\n".join([*header, *_bases_body(plan)]) + "\n")
    cell_scripts = []
    for name, cell in plan.cells.items():
        if cell_files.is_done(out, name):
            continue
        cell_files.write_plan(out, name, cell.record())
        path = sdir / f"{name}.sbatch"
        header = _header(f"ablation-{name}", opts.nodes, sdir / "logs", opts)
        write_atomic(path, "\n".join([*header, *_cell_body(out, cell, opts.nproc)]) + "\n")
        cell_scripts.append(path)

    submit = [
        "#!/usr/bin/env bash",
        "# Submits the base imports, then every cell once they succeeded.",
        "set -euo pipefail",
        f"BASES=$(sbatch --parsable {shlex.quote(str(bases))})",
        *[f"sbatch --dependency=afterok:$BASES {shlex.quote(str(p))}" for p in cell_scripts],
    ]
    write_atomic(sdir / "submit_all.sh", "\n".join(submit) + "\n")
    os.chmod(sdir / "submit_all.sh", 0o755)
    return [bases, *cell_scripts, sdir / "submit_all.sh"]
