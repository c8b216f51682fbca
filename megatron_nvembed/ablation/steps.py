"""The commands of an ablation, as data: one small dataclass per kind of step, and
`render_argv`, the one place where a step becomes the command line that a subprocess, a SLURM
script or `plan.json` shows.

Every path a step holds is absolute (the steps run from the repository root, `ROOT`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the working directory of every step and of the SLURM scripts."""
TRAIN_LAUNCHER = "examples/pretrain_nvembed.sh"
CONVERT_TOOL = "tools/convert_checkpoint.py"
EVAL_TOOL = "tools/evaluate_mteb.py"
ABLATE_TOOL = "tools/ablate.py"


@dataclass(frozen=True)
class ImportStep:
    """A base checkpoint imported from a transformers folder (`convert_checkpoint.py import-hf`)."""

    kind: ClassVar[str] = "import"
    name: str
    """Step name, `import_<base>` (its log file is `OUT/bases/logs/<name>.log`)."""
    hf_dir: str
    """The transformers model folder (`--hf-dir`)."""
    save: str
    """The checkpoint folder written (`--save`)."""
    pooling: str
    """Pooling head of the checkpoint (`--pooling`)."""
    mask: str
    """Attention mask of the checkpoint (`--mask-type`)."""

    @property
    def output(self) -> str:
        return self.save


@dataclass(frozen=True)
class DeriveStep:
    """A mask variant of a base checkpoint (`bases.derive_mask_variant`; in a SLURM script
    `tools/ablate.py --derive-mask`)."""

    kind: ClassVar[str] = "derive"
    name: str
    """Step name, `derive_<base>`."""
    src: str
    """The checkpoint whose weights are reused."""
    dst: str
    """The checkpoint folder written."""
    mask: str
    """Attention mask written into the variant's config."""

    @property
    def output(self) -> str:
        return self.dst


@dataclass(frozen=True)
class TrainStep:
    """One training run of `examples/pretrain_nvembed.sh`; `--save` and `--load` are the same
    folder, so a rerun resumes from its last checkpoint."""

    kind: ClassVar[str] = "train"
    name: str
    """Step name: `stage1`, `stage2` (two-stage) or `train`; also the checkpoint folder's name."""
    recipe: str
    """Recipe without its stage suffix (`--recipe`)."""
    stage: int
    """Recipe stage, 1 or 2 (`--stage`)."""
    pretrained: str
    """Checkpoint the run starts from (`--pretrained-checkpoint`)."""
    data: tuple[str, ...]
    """`--train-data` values: paths or weight/path pairs."""
    save: str
    """Checkpoint folder (`--save`, `--load`; the JSON log goes to `<save>/log.jsonl`)."""
    in_batch_negatives: bool = True
    """False adds `--no-in-batch-negatives`."""
    extra: tuple[str, ...] = ()
    """More training flags, given last so that they win over the schedule's."""

    @property
    def output(self) -> str:
        return self.save


@dataclass(frozen=True)
class EvalStep:
    """The evaluation of a cell's final checkpoint with `tools/evaluate_mteb.py --resume`."""

    kind: ClassVar[str] = "eval"
    model: str
    """The checkpoint evaluated (`--model`)."""
    out: str
    """Result folder (`--output`)."""
    run_name: str
    """Model name in mteb's results (`--name`)."""
    beir_dirs: tuple[str, ...] = ()
    """Local BEIR folders (`--beir-dir`)."""
    tasks: tuple[str, ...] = ()
    """mteb task names (`--tasks`)."""
    instruction: str | None = None
    """Query instruction override (`--instruction`); None: the tool's default."""
    name: str = "eval"
    """Step name."""

    @property
    def output(self) -> str:
        return self.out


@dataclass(frozen=True)
class FinishStep:
    """A SLURM cell script's last command: `tools/ablate.py --finish-cell` writes done.json."""

    kind: ClassVar[str] = "finish"
    out: str
    """The grid's output folder."""
    cell: str
    """The cell's name."""
    name: str = "finish"
    """Step name."""

    @property
    def output(self) -> str:
        return str(Path(self.out) / "cells" / self.cell)


@dataclass(frozen=True)
class CheckStep:
    """A SLURM cell script's command after a training run: `tools/ablate.py --check-trained`
    fails unless the run's checkpoint reached the run's last iteration (`cells.check_trained`),
    so that the run's step marker is written only then."""

    kind: ClassVar[str] = "check"
    out: str
    """The grid's output folder."""
    cell: str
    """The cell's name."""
    step: str
    """The training run's step name (`stage1`, `stage2`, `train`)."""

    @property
    def name(self) -> str:
        return f"check_{self.step}"

    @property
    def output(self) -> str:
        return str(Path(self.out) / "cells" / self.cell / "steps")


Step = ImportStep | DeriveStep | TrainStep | EvalStep | FinishStep | CheckStep


def render_argv(
    step: Step, launcher: Sequence[str] | None = None, *, program: bool = True
) -> list[str]:
    """The command line of `step`.

    Args:
        step: the step.
        launcher: what runs the program; None: `bash` for a training run, this Python
            interpreter for a tool. `[]` leaves it out (the caller puts e.g. torchrun in front).
        program: False leaves out the launcher and the program too: the flags alone, as a
            tool's `main(argv)` takes them.

    Returns:
        `[*launcher, <absolute path of the program>, *flags]`, or the flags alone.

    Raises:
        TypeError: `step` is not one of the step classes.
    """
    if isinstance(step, TrainStep):
        path, default = TRAIN_LAUNCHER, ["bash"]
        flags = ["--recipe", step.recipe, "--stage", str(step.stage)]
        flags += [] if step.in_batch_negatives else ["--no-in-batch-negatives"]
        flags += ["--pretrained-checkpoint", step.pretrained, "--train-data", *step.data]
        flags += ["--save", step.save, "--load", step.save, "--log-json", f"{step.save}/log.jsonl"]
        flags += step.extra
    else:
        default = [sys.executable]
        if isinstance(step, ImportStep):
            path = CONVERT_TOOL
            flags = ["import-hf", "--hf-dir", step.hf_dir, "--save", step.save]
            flags += ["--pooling", step.pooling, "--mask-type", step.mask]
        elif isinstance(step, DeriveStep):
            path, flags = ABLATE_TOOL, ["--derive-mask", step.src, step.dst, step.mask]
        elif isinstance(step, EvalStep):
            path = EVAL_TOOL
            flags = ["--model", step.model, "--output", step.out, "--resume"]
            flags += ["--name", step.run_name]
            flags += ["--beir-dir", *step.beir_dirs] if step.beir_dirs else []
            flags += ["--tasks", *step.tasks] if step.tasks else []
            flags += [] if step.instruction is None else ["--instruction", step.instruction]
        elif isinstance(step, FinishStep):
            path, flags = ABLATE_TOOL, ["--finish-cell", step.out, step.cell]
        elif isinstance(step, CheckStep):
            path, flags = ABLATE_TOOL, ["--check-trained", step.out, step.cell, step.step]
        else:
            raise TypeError(f"not an ablation step: {step!r}")
    if not program:
        return flags
    return [*(default if launcher is None else launcher), str(ROOT / path), *flags]


def step_record(step: Step) -> dict:
    """What `plan.json` says of a step: name, kind, the folder it writes and its command line."""
    return {"name": step.name, "kind": step.kind, "argv": render_argv(step), "output": step.output}
