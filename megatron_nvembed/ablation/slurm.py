"""SLURM scripts of a plan: `OUT/slurm/bases.sbatch`, one `<cell>.sbatch` per unfinished cell and
`submit_all.sh`; nothing is submitted.

Each cell script maps the allocation onto examples/pretrain_nvembed.sh's environment as
examples/pretrain_nvembed.slurm does, skips its finished steps (the same markers as a local
run), evaluates under torchrun on the first node and writes done.json last
(`tools/ablate.py --finish-cell`).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from megatron_nvembed.ablation import cells as cell_files
from megatron_nvembed.ablation.plan import CellPlan, Plan
from megatron_nvembed.ablation.steps import ROOT, FinishStep, TrainStep, render_argv
from megatron_nvembed.checkpoint.store import TRACKER
from megatron_nvembed.utils.fileio import write_atomic


def _header(
    job: str,
    nodes: int,
    logs: Path,
    gpus_per_node: int,
    time_limit: str,
    sbatch_lines: Sequence[str],
) -> list[str]:
    return [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={job}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --signal=TERM@300",
        "#SBATCH --requeue",
        f"#SBATCH --output={logs}/%x-%j.out",
        *[f"#SBATCH {line}" for line in sbatch_lines],
        "set -euo pipefail",
        f"cd {shlex.quote(str(ROOT))}",
    ]


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
            lines.append(f"[[ -f {tracker} ]] || {shlex.join(render_argv(step))}")
    return [*lines, 'echo "bases ready"']


def _cell_body(out: Path, cell: CellPlan, gpus_per_node: int) -> list[str]:
    """A cell's steps, each skipped when its marker exists, then done.json."""
    name = cell.cell.name
    lines = [
        f"CELL={shlex.quote(str(cell_files.cell_dir(out, name)))}",
        'if [[ -f "$CELL/done.json" ]]; then echo "$CELL finished earlier"; exit 0; fi',
        'mkdir -p "$CELL/steps" "$CELL/logs"',
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'export MASTER_PORT="${MASTER_PORT:-6000}"',
        'export NNODES="$SLURM_NNODES"',
        f'export GPUS_PER_NODE="${{SLURM_GPUS_PER_NODE:-{gpus_per_node}}}"',
    ]
    for step in cell.steps:
        marker = f'"$CELL/steps/{step.name}.done"'
        if isinstance(step, TrainStep):
            inner = "NODE_RANK=$SLURM_NODEID " + shlex.join(render_argv(step))
            cmd = f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}"
        else:
            cmd = 'torchrun --nproc_per_node "$GPUS_PER_NODE" ' + shlex.join(render_argv(step, []))
        lines += [f"if [[ ! -f {marker} ]]; then", f"  {cmd}", f"  echo '{{}}' > {marker}", "fi"]
    lines.append(shlex.join(render_argv(FinishStep(str(out), name))))
    return lines


def write_slurm(
    plan: Plan,
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    time_limit: str = "24:00:00",
    sbatch_lines: Sequence[str] = (),
) -> list[Path]:
    """Writes the SLURM scripts of `plan` (each atomically) and the plan.json of every unfinished
    cell.

    Args:
        plan: the plan (`plan.build_plan`).
        nodes: nodes per cell job (training runs on all of them, the evaluation on the first).
        gpus_per_node: `#SBATCH --gpus-per-node`, and the processes per node.
        time_limit: `#SBATCH --time` of every job.
        sbatch_lines: more `#SBATCH` line contents, e.g. `--partition=x`.

    Returns:
        The paths written: bases.sbatch, the cell scripts, then submit_all.sh.
    """
    out = plan.out
    sdir = out / "slurm"
    (sdir / "logs").mkdir(parents=True, exist_ok=True)

    def header(job: str, n: int) -> list[str]:
        return _header(job, n, sdir / "logs", gpus_per_node, time_limit, sbatch_lines)

    bases = sdir / "bases.sbatch"
    write_atomic(bases, "\n".join([*header("ablation-bases", 1), *_bases_body(plan)]) + "\n")
    cell_scripts = []
    for name, cell in plan.cells.items():
        if cell_files.is_done(out, name):
            continue
        cell_files.write_plan(out, name, cell.record())
        path = sdir / f"{name}.sbatch"
        lines = [*header(f"ablation-{name}", nodes), *_cell_body(out, cell, gpus_per_node)]
        write_atomic(path, "\n".join(lines) + "\n")
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
