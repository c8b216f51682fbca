"""The gloo test harness really runs every rank and surfaces failures.

Run alone: pytest tests/unit/test_testing_harness.py
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_nvembed.core.launch import run_distributed


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
