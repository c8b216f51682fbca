"""The ablation grid: its four axes (pooling, attention mask, training schedule, objective), the
`--grid` flag that selects a subset of them, the `--objective` flag that defines more objectives,
and the cells (one per combination) with their names.

Imports nothing heavy: `tools/ablate.py` checks `--grid` and `--objective` before torch is loaded.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from megatron_nvembed.core.config import MASK_TYPES

# The paper's order (Tables 2-4): rows of the report and cells of a run follow it.
POOLINGS = ("eos", "mean", "latent", "self-attention")
MASKS = MASK_TYPES
SCHEDULES = ("two-stage", "single-stage-inbatch", "single-stage-no-inbatch")

DEFAULT_OBJECTIVE = "infonce"
"""The objective of a grid that does not name the axis, and of a cell recorded without one."""
OBJECTIVES: dict[str, tuple[str, ...]] = {
    # the recipe's loss as it is: InfoNCE with hard (and, by schedule, in-batch) negatives,
    # datasets blended in every global batch
    DEFAULT_OBJECTIVE: (),
    # other in-batch queries and other in-batch documents as negatives too (needs in-batch
    # negatives: schedule single-stage-inbatch, or `-- --in-batch-negatives`)
    "qq-dd": ("--query-query-negatives", "--document-document-negatives"),
    # each global batch from one dataset (drawn by weight) instead of a blend: the paper's
    # blended-vs-homogeneous batches question
    "homogeneous": ("--batch-composition", "homogeneous"),
}
"""The built-in objectives: name -> the training flags it adds to each training run of a cell.
Flags that depend on the model (`--matryoshka-dims`) or on the data (`--distill-weight` needs
teacher scores) are defined on the command line with `--objective NAME=FLAGS`."""

AXES: dict[str, tuple[str, ...]] = {
    "pooling": POOLINGS,
    "mask": MASKS,
    "schedule": SCHEDULES,
    "objective": tuple(OBJECTIVES),
}
"""Each axis with its values (`objective`: the built-in ones; `--objective` adds more)."""
ORDER = ("schedule", "objective", "pooling", "mask")
"""Axis order of every listing of cells (plans, scripts, tables)."""
_OBJECTIVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
"""An objective's name: no `_` (it separates the parts of a cell's name), no `=`, no `/`."""


def parse_objectives(specs: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The objectives available to `--grid objective=`: the built-in ones, then those of
    `--objective` items.

    Args:
        specs: `--objective` items such as `["matryoshka=--matryoshka-dims 64 32 16"]`: a name,
            `=`, then training flags split like a shell command line (shlex).

    Returns:
        Name -> training flags, OBJECTIVES first, then the new ones in the order given.

    Raises:
        ValueError: naming `--objective` on a malformed item, a bad name, a name given twice or
            redefining a built-in objective, or no flags.
    """
    objectives = dict(OBJECTIVES)
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep:
            raise ValueError(f"--objective {spec!r}: expected NAME=FLAGS, e.g. 'x=--flag value'")
        if not _OBJECTIVE_NAME.fullmatch(name):
            raise ValueError(
                f"--objective {spec!r}: the name must be letters, digits, '-' and '.' (no '_': "
                "it separates the parts of a cell's name)"
            )
        if name in OBJECTIVES:
            raise ValueError(
                f"--objective {spec!r}: {name!r} is a built-in objective "
                f"({shlex.join(OBJECTIVES[name]) or 'no flags'}); give yours another name"
            )
        if name in objectives:
            raise ValueError(f"--objective: {name!r} given twice")
        try:
            flags = tuple(shlex.split(text))
        except ValueError as err:
            raise ValueError(f"--objective {spec!r}: {err}") from None
        if not flags or not flags[0].startswith("--"):
            raise ValueError(
                f"--objective {spec!r}: expected training flags after '=', starting with '--' "
                f"(an objective without flags is {DEFAULT_OBJECTIVE!r})"
            )
        objectives[name] = flags
    return objectives


def parse_grid(
    specs: Sequence[str], objectives: Mapping[str, Sequence[str]] = OBJECTIVES
) -> dict[str, list[str]]:
    """Selects values of the axes from `--grid` items.

    Args:
        specs: `--grid` items such as `["pooling=mean,latent", "mask=causal"]`.
        objectives: the objectives available (`parse_objectives`; default: the built-in ones).

    Returns:
        Every axis with its selected values in the axis' canonical order (for `objective`: the
        order of `objectives`). An axis not named keeps all of its values, except `objective`,
        which keeps DEFAULT_OBJECTIVE only (a grid that does not name it is the same grid, with
        the same cell names, as before the axis existed).

    Raises:
        ValueError: naming `--grid` on an unknown axis, an unknown or missing value, or an axis
            given twice.
    """
    axes = {**AXES, "objective": tuple(objectives)}
    grid = {axis: list(values) for axis, values in axes.items()}
    grid["objective"] = [DEFAULT_OBJECTIVE]
    seen = set()
    for spec in specs:
        axis, sep, values = spec.partition("=")
        if not sep or axis not in axes:
            raise ValueError(f"--grid {spec!r}: expected AXIS=V1,V2 with AXIS in {sorted(axes)}")
        if axis in seen:
            raise ValueError(f"--grid: axis {axis!r} given twice")
        seen.add(axis)
        chosen = [v for v in values.split(",") if v]
        bad = [v for v in chosen if v not in axes[axis]]
        if bad or not chosen:
            more = " (define more with --objective NAME=FLAGS)" if axis == "objective" else ""
            raise ValueError(f"--grid {spec!r}: {axis} must be among {list(axes[axis])}{more}")
        grid[axis] = [v for v in axes[axis] if v in chosen]
    return grid


def cell_name(schedule: str, pooling: str, mask: str, objective: str = DEFAULT_OBJECTIVE) -> str:
    """The folder name of a cell under `OUT/cells/`: `<schedule>_<pooling>_<mask>`, then
    `_<objective>` unless the objective is DEFAULT_OBJECTIVE."""
    name = f"{schedule}_{pooling}_{mask}"
    return name if objective == DEFAULT_OBJECTIVE else f"{name}_{objective}"


def base_name(pooling: str, mask: str) -> str:
    """The folder name of a base checkpoint under `OUT/bases/`: `<pooling>_<mask>`."""
    return f"{pooling}_{mask}"


@dataclass(frozen=True)
class Cell:
    """One combination of the grid."""

    schedule: str
    """Training schedule, one of SCHEDULES."""
    pooling: str
    """Pooling head, one of POOLINGS."""
    mask: str
    """Attention mask, one of MASKS."""
    objective: str = DEFAULT_OBJECTIVE
    """Objective: a name of OBJECTIVES or of `--objective`."""

    @property
    def name(self) -> str:
        return cell_name(self.schedule, self.pooling, self.mask, self.objective)

    @property
    def base(self) -> str:
        """The name of the base checkpoint the cell trains from (shared by all schedules and
        objectives: neither changes the imported weights, the pooling head or the mask)."""
        return base_name(self.pooling, self.mask)


def cells(grid: Mapping[str, Sequence[str]]) -> Iterator[Cell]:
    """Every cell of `grid` (as `parse_grid` returns it; without `objective`: the default one),
    in ORDER: schedule, objective, pooling, mask."""
    for schedule in grid["schedule"]:
        for objective in grid.get("objective", [DEFAULT_OBJECTIVE]):
            for pooling in grid["pooling"]:
                for mask in grid["mask"]:
                    yield Cell(schedule, pooling, mask, objective)


def order_key(settings: Mapping[str, str]) -> list[tuple[int, str]]:
    """Sort key of anything with `schedule`, `pooling`, `mask` and (optionally: missing is
    DEFAULT_OBJECTIVE) `objective` values, such as a finished cell's record: its place in the
    full grid (ORDER); a value the axes do not know (an objective of `--objective`) sorts after
    the known ones, by name."""
    key = []
    for axis in ORDER:
        values = AXES[axis]
        value = settings.get(axis, DEFAULT_OBJECTIVE) if axis == "objective" else settings[axis]
        key.append((values.index(value), "") if value in values else (len(values), value))
    return key
