"""Process groups for training and inference, on GPU (NCCL) or CPU (gloo).

This is the one place that reads megatron-core's `parallel_state`; model, pooling and loss code
receive the groups they need as arguments.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import socket
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from megatron_nvembed.core.cpu_support import cpu_mode, enable_cpu_support, model_parallel_seed

T = TypeVar("T")


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago (for tests that start several
    launchers that must agree on one port; anything else rendezvouses without a port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> None:
    """Initialises the default process group from torchrun's environment (or as one process).

    NCCL when CUDA is available, gloo otherwise. A no-op if a group already exists. A lone
    process (no torchrun, WORLD_SIZE unset or 1) rendezvouses with itself through an in-memory
    store: no port is opened, an inherited MASTER_PORT (e.g. of a parent job) is never reused and
    child processes inherit nothing stale.
    """
    if dist.is_initialized():
        return
    # Tools that open a group here (the encoder under torchrun) may end without closing it: a
    # group left to interpreter exit can abort the process (SIGABRT) after its work succeeded.
    atexit.register(destroy_parallel)
    backend = "gloo" if cpu_mode() else "nccl"
    if not cpu_mode():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    lone = os.environ.get("WORLD_SIZE", "1") == "1" and "TORCHELASTIC_RUN_ID" not in os.environ
    if lone:
        dist.init_process_group(
            backend,
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=timeout,
        )
        return
    if "MASTER_PORT" not in os.environ:
        raise ValueError("MASTER_PORT is not set; launch multi-process runs with torchrun")
    dist.init_process_group(backend, timeout=timeout)


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    context_parallel_size: int = 1,
):
    """Creates megatron-core's TP/PP/DP groups and seeds the model-parallel RNG.

    Args:
        tensor_model_parallel_size: ranks that split each layer (`--tensor-model-parallel-size`).
        pipeline_model_parallel_size: stages that split the layer stack
            (`--pipeline-model-parallel-size`).
        seed: base seed; tensor-parallel ranks get distinct dropout streams derived from it.
        context_parallel_size: ranks that split each sequence (`--context-parallel-size`).

    Returns:
        megatron-core `ProcessGroupCollection` with `tp`, `pp`, `dp`, ... groups.

    Raises:
        ValueError: when the world size is not divisible by TP x PP.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if parallel_state.model_parallel_is_initialized() and dist.get_world_size() == 1:
        # A lone process initialising again (tests, tools building several models): its previous
        # groups are destroyed, not just forgotten; each holds gloo threads until destroyed.
        destroy_parallel()
    init_distributed()
    world = dist.get_world_size()
    model_parallel = (
        tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    )
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size "
            f"{tensor_model_parallel_size} x --pipeline-model-parallel-size "
            f"{pipeline_model_parallel_size} x --context-parallel-size {context_parallel_size}"
        )
    if cpu_mode():
        enable_cpu_support()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        # The distributed optimizer asks for gloo copies of the DP groups (for checkpointing
        # its state); on CPU they duplicate the default gloo groups, which is harmless.
        create_gloo_process_groups=True,
    )
    model_parallel_seed(seed, tp_rank=parallel_state.get_tensor_model_parallel_rank())
    return ProcessGroupCollection.use_mpu_process_groups()


def pipeline_stage_info() -> tuple[bool, bool]:
    """(is first pipeline stage, is last pipeline stage) of this rank."""
    from megatron.core import parallel_state

    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        parallel_state.is_pipeline_last_stage(ignore_virtual=True),
    )


def data_parallel_group():
    """This rank's data(+context)-parallel group (for code handed no group by its caller)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def in_rank_stages(job: Callable[[], T]) -> T:
    """`job()` once on every rank of the default group, in three stages: global rank 0, then each
    node's local rank 0 (`LOCAL_RANK`), then the other ranks; each stage starts once the one
    before has finished on every rank. For work that one rank does and the others reuse (the
    training data's indexes: the first builds, the later ones map what it wrote, a node that
    cannot see it builds its own).

    Raises:
        What `job` raised, on the rank that raised it; on every other rank a ValueError with the
        same message (for another kind of error, a RuntimeError naming the rank and the error),
        so no rank waits for one that failed.
    """
    rank = dist.get_rank()
    stage = 0 if rank == 0 else 1 if int(os.environ.get("LOCAL_RANK", rank)) == 0 else 2
    result = None
    for s in range(3):
        mine = None
        if s == stage:
            try:
                result = job()
            except Exception as err:  # every rank learns of it below, then all raise
                mine = err
        said = (
            None if mine is None else (type(mine).__name__, str(mine), isinstance(mine, ValueError))
        )
        failures: list = [None] * dist.get_world_size()
        dist.all_gather_object(failures, said)
        if mine is not None:
            raise mine
        for r, failure in enumerate(failures):
            if failure is not None:
                kind, msg, is_value = failure
                if is_value:
                    raise ValueError(msg)
                raise RuntimeError(f"rank {r} failed: {kind}: {msg}")
    return result


def destroy_parallel() -> None:
    """Tears down megatron-core's model-parallel state (only if megatron-core was imported:
    importing it costs seconds) and torch's default process group, if initialised. Safe to call
    twice.

    Objects left in reference cycles (torch DDP's reducer among them) are collected first, while
    their process group is alive: freed at interpreter exit, after the group is destroyed, they
    abort the process ("terminate called without an active exception").
    """
    import sys

    gc.collect()
    if "megatron.core.parallel_state" in sys.modules:
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
