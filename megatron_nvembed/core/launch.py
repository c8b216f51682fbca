"""Local multi-process launching on one machine (gloo on CPU).

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initialises a gloo
process group in each (rendezvous through a TCP store this process opens on a port the OS
picks and keeps it for the run: no port to race for), calls `fn(rank, world_size,
*args)` and re-raises the first failure in the parent. The processes die with the parent (Linux's
parent-death signal): a killed tool leaves no worker writing on, nor one waiting for ever on the
parent's store. `fn` must be a module-level function so
that `torch.multiprocessing.spawn` can pickle it. The checkpoint importer uses it to run one
process per TP x PP shard; tests use it for every distributed check.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_nvembed.core.logging_utils import quiet_known_noise
from megatron_nvembed.core.parallel import (  # free_port: also re-exported
    destroy_parallel,
    free_port,  # noqa: F401  (re-exported: tests and testing import it from here)
)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent ends, however it ends (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have ended before the signal was asked for: then nobody sends it.
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker(
    rank: int,
    fn: Callable,
    world_size: int,
    store_port: int,
    parent_pid: int,
    args: tuple,
    backend: str = "gloo",
) -> None:
    _die_with_parent(parent_pid)
    # The processes meet at the parent's store, not at a port found free a moment ago: such a
    # port can be taken by another process (EADDRINUSE) before rank 0 listens on it.
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    # A spawned process starts with fresh warning filters; the parent's entry point said it once.
    quiet_known_noise()
    # Two cores are shared by all ranks; more threads per rank only adds contention.
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        destroy_parallel()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo"
) -> None:
    """Runs `fn(rank, world_size, *args)` in `world_size` processes on this machine, over gloo
    (or `backend="nccl"`: one GPU per rank).

    Raises:
        torch.multiprocessing.ProcessRaisedException: when any rank raises; the message holds
        that rank's traceback.
    """
    # Port 0: the OS binds a free port at once; the store lives here until the processes end.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        mp.spawn(
            _worker,
            args=(fn, world_size, store.port, os.getpid(), args, backend),
            nprocs=world_size,
            join=True,
        )
    finally:
        del store
