"""The plan of an ablation: every step of every base checkpoint and of every cell, as typed steps
(`steps.py`), checked before anything runs.

Per cell: the base checkpoint with the cell's pooling and mask (imported once per pooling, the
other mask a mask variant; shared by the cells of every schedule and objective), the training
runs of its schedule with its objective's flags and the evaluation of the final checkpoint.
Schedules: `two-stage` (stage 1 on the stage-1 data, then stage 2 on the stage-2 data from its
weights), `single-stage-inbatch` (the stage-1 recipe on all data) and
`single-stage-no-inbatch` (the same with `--no-in-batch-negatives`). Objectives
(`grid.OBJECTIVES`, `--objective`): training flags given to each training run of the cell through
`TrainStep.extra`, before the user's `-- FLAGS` (so those win).
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_nvembed.ablation.grid import DEFAULT_OBJECTIVE, OBJECTIVES, Cell, base_name, cells
from megatron_nvembed.ablation.steps import (
    DeriveStep,
    EvalStep,
    ImportStep,
    TrainStep,
    render_argv,
    step_record,
)
from megatron_nvembed.checkpoint.store import TRACKER, is_checkpoint_dir, read_config

BaseStep = ImportStep | DeriveStep


@dataclass
class CellPlan:
    """A cell with the steps that make it."""

    cell: Cell
    """The cell's grid values."""
    recipe: str
    """Training recipe without its stage suffix."""
    base: str
    """The base checkpoint folder its first training run starts from."""
    steps: list[TrainStep | EvalStep]
    """Training runs, then the evaluation."""
    beir_sets: list[str]
    """Names of the local BEIR sets it is evaluated on (columns of the report)."""
    objective_flags: tuple[str, ...] = ()
    """The training flags of the cell's objective (in every training run, before `-- FLAGS`)."""
    train_iters: dict[str, int] = field(default_factory=dict)
    """Training run name -> its last iteration (`--train-iters`, given or the recipe's): a run
    is finished only when its checkpoint reached it."""

    @property
    def final_checkpoint(self) -> str:
        return [s for s in self.steps if isinstance(s, TrainStep)][-1].save

    def _step_record(self, step: TrainStep | EvalStep) -> dict:
        if isinstance(step, TrainStep) and step.name in self.train_iters:
            return {**step_record(step), "train_iters": self.train_iters[step.name]}
        return step_record(step)

    def record(self) -> dict:
        """The cell's plan.json: its settings and the command line of each step."""
        return {
            "cell": self.cell.name,
            "schedule": self.cell.schedule,
            "pooling": self.cell.pooling,
            "mask": self.cell.mask,
            "objective": self.cell.objective,
            "objective_flags": list(self.objective_flags),
            "recipe": self.recipe,
            "base": self.base,
            "base_name": self.cell.base,
            "final_checkpoint": self.final_checkpoint,
            "beir_sets": self.beir_sets,
            "steps": [self._step_record(s) for s in self.steps],
        }


@dataclass
class Plan:
    """Every step of a grid under one output folder."""

    out: Path
    """The grid's output folder (absolute)."""
    recipe: str
    """Training recipe without its stage suffix."""
    nproc: int
    """Processes per node of training and evaluation."""
    bases: dict[str, list[BaseStep]]
    """Base name -> the steps that make it, in order (empty: the given checkpoint itself)."""
    base_paths: dict[str, str]
    """Base name -> its checkpoint folder."""
    cells: dict[str, CellPlan]
    """Cell name -> its plan, in grid order."""


def combine_data(stage1: Sequence[str], stage2: Sequence[str]) -> list[str]:
    """The `--train-data` of the single-stage schedules: every dataset of both stages.

    Args:
        stage1, stage2: `--train-data` values (paths, or weight/path pairs) of the two stages.

    Returns:
        Paths only on both sides: the union of the paths (equal weights). Otherwise each side's
        weights rescaled to sum to its number of datasets (a dataset weighs 1 on average, as in
        an unweighted list), and the pairs of both sides concatenated.

    Raises:
        ValueError: naming `--train-data` on a malformed weight/path list.
    """
    from megatron_nvembed.data.loading import parse_data_paths

    if not stage2:
        return list(stage1)
    if not (_weighted(stage1) or _weighted(stage2)):
        return list(dict.fromkeys([*stage1, *stage2]))
    out: list[str] = []
    for tokens in (stage1, stage2):
        pairs = parse_data_paths(list(tokens))
        total = sum(w for w, _ in pairs)
        out += [t for w, p in pairs for t in (repr(w * len(pairs) / total), p)]
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _weighted(tokens: Sequence[str]) -> bool:
    return bool(tokens) and _is_number(tokens[0])


def _absolute_data(tokens: Sequence[str]) -> tuple[str, ...]:
    """Data paths made absolute (the steps run from the repository root); weights and names
    that are not local paths (`datasets` hub names) are kept."""
    return tuple(
        t if _is_number(t) or not Path(t).exists() else str(Path(t).resolve()) for t in tokens
    )


@dataclass(frozen=True)
class _Data:
    """`--train-data` values of the schedules (absolute paths)."""

    stage1: tuple[str, ...]
    stage2: tuple[str, ...]
    both: tuple[str, ...]
    """Both stages' data, for the single-stage schedules (`combine_data`)."""


def _plan_bases(
    out: Path, grid: Mapping[str, Sequence[str]], base_hf: str | None, base_checkpoint: str | None
) -> tuple[dict[str, list[BaseStep]], dict[str, str]]:
    """The steps of every base checkpoint: with `base_hf`, import-hf for the first mask of each
    pooling and a mask variant of it for the other mask; with `base_checkpoint`, the checkpoint
    itself for its mask and a mask variant of it for the other."""
    bases: dict[str, list[BaseStep]] = {}
    paths: dict[str, str] = {}
    if base_checkpoint is not None:
        ckpt = str(Path(base_checkpoint).resolve())
        cfg = read_config(base_checkpoint)
        wrong = [p for p in grid["pooling"] if p != cfg.pooling.type]
        if wrong:
            raise ValueError(
                f"--base-checkpoint {base_checkpoint} has {cfg.pooling.type!r} pooling; pooling "
                f"{wrong} needs a new head: use --base-hf, or --grid pooling={cfg.pooling.type}"
            )
    for pooling in grid["pooling"]:
        for mask in grid["mask"]:
            name = base_name(pooling, mask)
            path = str(out / "bases" / name)
            paths[name] = path
            if base_checkpoint is not None:
                if cfg.model.mask_type == mask:
                    paths[name], bases[name] = ckpt, []
                else:
                    bases[name] = [DeriveStep(f"derive_{name}", ckpt, path, mask)]
            elif mask == grid["mask"][0]:
                hf_dir = str(Path(base_hf).resolve())
                bases[name] = [ImportStep(f"import_{name}", hf_dir, path, pooling, mask)]
            else:
                first = bases[base_name(pooling, grid["mask"][0])]
                bases[name] = [*first, DeriveStep(f"derive_{name}", first[0].output, path, mask)]
    return bases, paths


def _train_steps(
    cdir: Path, schedule: str, recipe: str, base: str, data: _Data, extra: tuple[str, ...]
) -> list[TrainStep]:
    """The training runs of a cell under its schedule, each saving into `cdir/<step name>`."""
    if schedule == "two-stage":
        one = TrainStep("stage1", recipe, 1, base, data.stage1, str(cdir / "stage1"), extra=extra)
        two = TrainStep(
            "stage2", recipe, 2, one.save, data.stage2, str(cdir / "stage2"), extra=extra
        )
        return [one, two]
    in_batch = schedule == "single-stage-inbatch"
    return [TrainStep("train", recipe, 1, base, data.both, str(cdir / "train"), in_batch, extra)]


_SET_BY_THE_GRID = {
    "recipe": "--recipe",
    "stage": "--stage",
    "checkpoint.pretrained_checkpoint": "--pretrained-checkpoint",
    "data.train_data": "--train-data",
    "checkpoint.save": "--save",
    "checkpoint.load": "--load",
    "logging.log_json": "--log-json",
    "loss.in_batch_negatives": "--in-batch-negatives (the schedule axis)",
}
"""Training flags (by argparse dest) that the grid sets per cell: no objective may set them."""


def _training_parser() -> argparse.ArgumentParser:
    """The trainer's flag parser (`pretrain_nvembed.py`), raising instead of exiting, with
    `--recipe` defaulting to None so that giving it shows."""
    from megatron_nvembed.training.arguments import build_parser

    parser = build_parser()
    parser.exit_on_error = False
    parser.set_defaults(recipe=None)
    return parser


def check_objective(
    name: str, flags: Sequence[str], parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Checks an objective's flags against the trainer's flag parser.

    Args:
        name: the objective's name (for the messages).
        flags: its training flags.
        parser: `_training_parser()` (made when None).

    Returns:
        The flags parsed (flags not given are None).

    Raises:
        ValueError: naming `--objective` on a flag the trainer does not know, a malformed value,
            or a flag the grid sets per cell (recipe, stage, data, checkpoints, in-batch
            negatives: the schedule axis).
    """
    parser = _training_parser() if parser is None else parser
    where = f"--objective {name}={shlex.join(flags)}"
    try:
        args, unknown = parser.parse_known_args(list(flags))
    except argparse.ArgumentError as err:
        raise ValueError(f"{where}: {err}") from None
    if unknown:
        raise ValueError(f"{where}: not training flags of examples/pretrain_nvembed.sh: {unknown}")
    owned = [flag for dest, flag in _SET_BY_THE_GRID.items() if getattr(args, dest) is not None]
    if owned:
        raise ValueError(f"{where}: the grid sets {', '.join(owned)} per cell, not an objective")
    return args


def _check_in_batch(
    cell: Cell, steps: Sequence[TrainStep], objective: argparse.Namespace, parser
) -> None:
    """Refuses a cell whose objective (or `-- FLAGS`) turns on query-query / document-document
    negatives in a training run without in-batch negatives: the trainer would refuse that run.

    Raises:
        ValueError: naming `--grid objective=` (or `-- FLAGS`), the flag, the cell and the run.
    """
    for step in steps:
        try:
            args, _ = parser.parse_known_args(render_argv(step, program=False))
        except argparse.ArgumentError as err:
            # the grid's and the objective's flags parse (checked): the error is in -- FLAGS
            raise ValueError(f"-- FLAGS: {err}") from None
        given = getattr(args, "loss.in_batch_negatives")
        in_batch = step.stage == 1 if given is None else given
        if in_batch:
            continue
        for dest, flag in (
            ("loss.query_query", "--query-query-negatives"),
            ("loss.document_document", "--document-document-negatives"),
        ):
            if not getattr(args, dest):
                continue
            source = (
                f"--grid objective={cell.objective}" if getattr(objective, dest) else "-- FLAGS"
            )
            drop = (
                f"leave schedule {cell.schedule} out of --grid (single-stage-inbatch keeps them on)"
            )
            if not step.in_batch_negatives:
                why, fix = f"schedule {cell.schedule} turns them off", drop
            elif given is None:
                why, fix = "stage 2 turns them off", drop
            else:
                why = "--no-in-batch-negatives in -- FLAGS turns them off"
                fix = "drop --no-in-batch-negatives from -- FLAGS"
            raise ValueError(
                f"{source}: {flag} needs in-batch negatives, and {why} in run {step.name!r} of "
                f"cell {cell.name}: {fix}"
            )


def _train_iters(step: TrainStep, parser: argparse.ArgumentParser) -> int:
    """The last iteration of a training run: its `--train-iters`, else its recipe's."""
    from megatron_nvembed.training.recipes import get_recipe

    args, _ = parser.parse_known_args(render_argv(step, program=False))
    given = getattr(args, "optimizer.train_iters")
    return given if given is not None else get_recipe(step.recipe, step.stage).optimizer.train_iters


def build_plan(
    *,
    out: str | os.PathLike,
    grid: Mapping[str, Sequence[str]],
    recipe: str,
    stage1_data: Sequence[str],
    stage2_data: Sequence[str],
    base_hf: str | None = None,
    base_checkpoint: str | None = None,
    eval_beir: Sequence[str] = (),
    tasks: Sequence[str] = (),
    instruction: str | None = None,
    nproc: int = 1,
    extra: Sequence[str] = (),
    objectives: Mapping[str, Sequence[str]] = OBJECTIVES,
) -> Plan:
    """Every step of every base and cell of `grid`.

    Args:
        out: the grid's output folder.
        grid: the selected axis values (`grid.parse_grid`).
        recipe: training recipe, with or without its `_stage1` / `_stage2` suffix.
        stage1_data, stage2_data: `--train-data` values of the two stages.
        base_hf, base_checkpoint: exactly one: a transformers folder to import, or a checkpoint.
        eval_beir, tasks, instruction: what each final checkpoint is evaluated on.
        nproc: processes per node of training and evaluation.
        extra: more training flags, given to every training run last.
        objectives: objective name -> training flags (`grid.parse_objectives`): each training
            run of a cell gets its objective's flags, before `extra`.

    Returns:
        The plan; nothing is written.

    Raises:
        ValueError: naming the flag (missing data for a schedule, a base checkpoint whose pooling
            differs from a selected pooling, an unknown recipe, nothing to evaluate, an
            objective's flag the trainer does not know or that cannot hold in a cell's run, ...).
        FileNotFoundError: `base_checkpoint` has no model config.
    """
    out = Path(out).resolve()
    if (base_hf is None) == (base_checkpoint is None):
        raise ValueError("give exactly one of --base-hf and --base-checkpoint")
    if base_hf is not None and not (Path(base_hf) / "config.json").is_file():
        raise ValueError(f"--base-hf {base_hf}: no config.json (not a transformers model folder)")
    if base_checkpoint is not None and not is_checkpoint_dir(base_checkpoint):
        raise ValueError(f"--base-checkpoint {base_checkpoint}: no {TRACKER} (not a checkpoint)")
    if not stage1_data:
        raise ValueError("--stage1-data is required")
    if "two-stage" in grid["schedule"] and not stage2_data:
        raise ValueError("schedule two-stage needs --stage2-data")
    if not (eval_beir or tasks):
        raise ValueError("nothing to evaluate: give --eval-beir and/or --tasks")
    recipe = recipe.removesuffix("_stage1").removesuffix("_stage2")
    from megatron_nvembed.training.recipes import get_recipe

    get_recipe(recipe, 1)  # unknown recipe -> ValueError naming --recipe
    chosen = list(grid.get("objective", [DEFAULT_OBJECTIVE]))
    unknown = [o for o in chosen if o not in objectives]
    if unknown:
        raise ValueError(f"--grid objective={','.join(unknown)}: not among {list(objectives)}")
    parser = _training_parser()
    parsed = {o: check_objective(o, objectives[o], parser) for o in chosen}
    stage1, stage2 = _absolute_data(stage1_data), _absolute_data(stage2_data)
    data = _Data(stage1, stage2, tuple(combine_data(stage1, stage2)))
    bases, base_paths = _plan_bases(out, grid, base_hf, base_checkpoint)
    beir_dirs = tuple(str(Path(d).resolve()) for d in eval_beir)
    plans = {}
    for cell in cells(grid):
        cdir = out / "cells" / cell.name
        base = base_paths[cell.base]
        flags = tuple(objectives[cell.objective])
        train = _train_steps(cdir, cell.schedule, recipe, base, data, (*flags, *extra))
        _check_in_batch(cell, train, parsed[cell.objective], parser)
        steps: list[TrainStep | EvalStep] = [*train]
        evaluate = EvalStep(
            model=steps[-1].save,
            out=str(cdir / "eval"),
            run_name=f"ablation/{cell.name}",
            beir_dirs=beir_dirs,
            tasks=tuple(tasks),
            instruction=instruction,
        )
        beir_sets = [Path(d).name for d in beir_dirs]
        iters = {t.name: _train_iters(t, parser) for t in train}
        plans[cell.name] = CellPlan(
            cell, recipe, base, [*steps, evaluate], beir_sets, flags, train_iters=iters
        )
    return Plan(out, recipe, nproc, bases, base_paths, plans)
