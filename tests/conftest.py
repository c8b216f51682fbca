"""Test tiers as markers: every test carries the marker of its folder (`unit`, `distributed`,
`functional`, `gpu`, `faults`, `compat`, `slurm`), so `pytest -m unit` runs the fast tier and
`pytest -m "not faults and not compat"` leaves out the slow ones. A test may carry more
markers of its own (a functional test that starts gloo processes is also `distributed`)."""

from pathlib import Path

import pytest

TIERS = ("unit", "distributed", "functional", "gpu", "faults", "compat", "slurm")
_ROOT = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(_ROOT).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="module", autouse=True)
def _process_groups_destroyed_after_each_module():
    """A module whose tests built models in this process leaves megatron-core's groups behind;
    they are destroyed when the module ends (each gloo group keeps threads that wake up until it
    is destroyed: hundreds of them slow every later test of the worker)."""
    yield
    import sys

    if "megatron_nvembed.core.parallel" in sys.modules:
        sys.modules["megatron_nvembed.core.parallel"].destroy_parallel()
