"""The gloo test harness really runs every rank and surfaces failures; a process that initialises
megatron-core's groups again does not keep the previous ones (their gloo threads).

Run alone: pytest tests/unit/test_testing_harness.py
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_nvembed.core.launch import run_distributed
from megatron_nvembed.core.parallel import destroy_parallel
from megatron_nvembed.testing import init_single_process_megatron


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world_size))


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank one failed on purpose")


def test_all_reduce_over_two_ranks():
    run_distributed(_sum_ranks, 2)


def test_failure_on_one_rank_is_raised():
    with pytest.raises(mp.ProcessRaisedException, match="rank one failed on purpose"):
        run_distributed(_fail_on_rank_one, 2)


def _gloo_threads() -> int:
    """Threads of this process that gloo process groups run (named pt_gloo_* / gloo_*)."""
    return sum(
        (task / "comm").read_text(errors="replace").startswith(("gloo", "pt_gloo"))
        for task in Path("/proc/self/task").iterdir()
        if (task / "comm").exists()
    )


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_initialising_again_destroys_the_previous_groups_and_their_threads():
    destroy_parallel()
    before = _gloo_threads()  # groups other tests of this process may still reference
    init_single_process_megatron()
    first = _gloo_threads()
    per_init = first - before
    assert per_init > 0  # the groups of one initialisation run threads
    for _ in range(3):
        init_single_process_megatron(tp=1, pp=1, seed=7)
    # Kept groups would add 3 x per_init threads; destroyed ones leave less than one init's worth
    # (a few threads of other groups may come or go meanwhile).
    assert _gloo_threads() - first < per_init, (before, first, _gloo_threads())
