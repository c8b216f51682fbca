"""Snapshots of every random generator dropout may draw from (CPU, CUDA, megatron-core's
tensor-parallel tracker): taken and restored by GradCache's replay and by training checkpoints.

Bottom layer: imports nothing of the package (megatron-core's tracker is read only when
megatron-core is already imported).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


@dataclass
class RngSnapshot:
    """Generator states that dropout may draw from."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    tracker: dict[str, torch.Tensor] | None
    """megatron-core's tensor-parallel RNG tracker states (dropout inside TP regions)."""


def _megatron_tracker():
    # Only if megatron-core is already in use: never import it from the loss package.
    mod = sys.modules.get("megatron.core.tensor_parallel.random")
    if mod is None or getattr(mod, "_CUDA_RNG_STATE_TRACKER", None) is None:
        return None
    return mod.get_cuda_rng_tracker()


def capture_rng_state() -> RngSnapshot:
    """The current CPU, CUDA (if initialised) and megatron tracker (if in use) generator states."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    tracker = _megatron_tracker()
    states = None
    if tracker is not None:
        states = {k: v.clone() for k, v in tracker.get_states().items()}
    return RngSnapshot(cpu=torch.get_rng_state(), cuda=cuda, tracker=states)


def restore_rng_state(state: RngSnapshot) -> None:
    """Sets every generator captured in `state` back to it."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda)
    if state.tracker is not None:
        tracker = _megatron_tracker()
        if tracker is None:
            raise RuntimeError("megatron's RNG tracker was captured but is no longer available")
        tracker.set_states({k: v.clone() for k, v in state.tracker.items()})
