"""Test tiers as markers: every test carries the marker of its folder (`unit`, `distributed`,
`functional`, `gpu`, `faults`, `compat`, `slurm`), so `pytest -m unit` runs the fast tier and
`pytest -m "not faults and not compat"` leaves out the slow ones. A test may carry more
markers of its own (a functional test that starts gloo processes is also `distributed`)."""

from pathlib import Path

import pytest

TIERS = ("unit", "distributed", "functional", "gpu", "faults", "compat", "slurm")
_ROOT = Path(__file__).resolve().parent


# The longest modules start first: under `-n 2 --dist loadfile` a worker takes whole modules in
# collection order, so these run beside the many short ones instead of after them (the slurm
# modules mostly wait on the scheduler and on requeues).
_FIRST = ("slurm/test_slurm_ablation.py", "functional/test_quickstart.py", "slurm/")


def _rank(item) -> int:
    path = Path(str(item.fspath)).resolve().relative_to(_ROOT).as_posix()
    return next((i for i, prefix in enumerate(_FIRST) if path.startswith(prefix)), len(_FIRST))


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(_ROOT).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
    items.sort(key=_rank)  # stable: the order within each group is kept
