"""The ablation grid: its three axes (pooling, attention mask, training schedule), the `--grid`
flag that selects a subset of them, and the cells (one per combination) with their names.

Imports nothing heavy: `tools/ablate.py` checks `--grid` before torch is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from megatron_nvembed.config import MASK_TYPES

# The paper's order (Tables 2-4): rows of the report and cells of a run follow it.
POOLINGS = ("eos", "mean", "latent", "self-attention")
MASKS = MASK_TYPES
SCHEDULES = ("two-stage", "single-stage-inbatch", "single-stage-no-inbatch")
AXES: dict[str, tuple[str, ...]] = {"pooling": POOLINGS, "mask": MASKS, "schedule": SCHEDULES}
ORDER = ("schedule", "pooling", "mask")
"""Axis order of a cell's name and of every listing of cells (plans, scripts, tables)."""


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """Selects values of the axes from `--grid` items.

    Args:
        specs: `--grid` items such as `["pooling=mean,latent", "mask=causal"]`.

    Returns:
        Every axis with its selected values in the axis' canonical order; an axis not named keeps
        all of its values.

    Raises:
        ValueError: naming `--grid` on an unknown axis, an unknown or missing value, or an axis
            given twice.
    """
    grid = {axis: list(values) for axis, values in AXES.items()}
    seen = set()
    for spec in specs:
        axis, sep, values = spec.partition("=")
        if not sep or axis not in AXES:
            raise ValueError(f"--grid {spec!r}: expected AXIS=V1,V2 with AXIS in {sorted(AXES)}")
        if axis in seen:
            raise ValueError(f"--grid: axis {axis!r} given twice")
        seen.add(axis)
        chosen = [v for v in values.split(",") if v]
        bad = [v for v in chosen if v not in AXES[axis]]
        if bad or not chosen:
            raise ValueError(f"--grid {spec!r}: {axis} must be among {list(AXES[axis])}")
        grid[axis] = [v for v in AXES[axis] if v in chosen]
    return grid


def cell_name(schedule: str, pooling: str, mask: str) -> str:
    """The folder name of a cell under `OUT/cells/`: `<schedule>_<pooling>_<mask>`."""
    return f"{schedule}_{pooling}_{mask}"


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

    @property
    def name(self) -> str:
        return cell_name(self.schedule, self.pooling, self.mask)

    @property
    def base(self) -> str:
        """The name of the base checkpoint the cell trains from (shared by all schedules)."""
        return base_name(self.pooling, self.mask)


def cells(grid: Mapping[str, Sequence[str]]) -> Iterator[Cell]:
    """Every cell of `grid` (as `parse_grid` returns it), schedule-major (see ORDER)."""
    for schedule in grid["schedule"]:
        for pooling in grid["pooling"]:
            for mask in grid["mask"]:
                yield Cell(schedule, pooling, mask)


def order_key(settings: Mapping[str, str]) -> list[int]:
    """Sort key of anything with `schedule`, `pooling` and `mask` values (a finished cell's
    record): its place in the full grid; a value the axes do not know sorts last."""
    key = []
    for axis in ORDER:
        values = AXES[axis]
        key.append(values.index(settings[axis]) if settings[axis] in values else len(values))
    return key
