"""Checkpoint saves that produce each parameter's value only when its bytes are written.

`store.save_checkpoint(model, ..., values=produce)` of a model built on the meta device
(`lazy.meta_model`: shapes and megatron-core's checkpoint layout, no storage) lets megatron-core
plan the save as for a real model; each write item's tensor is a meta parameter or a view of one,
and its value is the same view of `produce(name)`, asked for when the item is written and dropped
after it (`_Resolver`). The files are those a save of the real model writes. Reading one tensor
at a time is `lazy.CheckpointTensors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def _storage(tensor: torch.Tensor) -> int:
    # Views of a meta tensor share its storage object (and nothing else identifies them: a
    # detached view has no `_base`, a meta tensor no data pointer).
    return tensor.untyped_storage()._cdata


class _Resolver:
    """Real values for the meta tensors of a save plan: each write item's tensor is a meta
    parameter or a view of one (megatron-core's SwiGLU halves, prepended axes); its value is the
    same view of `values(name)`, cloned when it is part of a larger tensor, so that only its own
    bytes are serialised."""

    def __init__(self, model: torch.nn.Module, values: Callable[[str], torch.Tensor]):
        self.params = {}  # storage -> (order, name, parameter)
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.is_meta and (p.storage_offset() != 0 or not p.is_contiguous()):
                raise ValueError(f"{name}: a meta parameter must own its storage to be produced")
            self.params[_storage(p)] = (i, name, p)
        self.values = values
        self._last: tuple[int, torch.Tensor] | None = None

    def key(self, tensor: torch.Tensor) -> tuple[int, int]:
        entry = self.params.get(_storage(tensor)) if tensor.is_meta else None
        return (entry[0] if entry else -1), tensor.storage_offset()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_meta:
            return tensor
        storage = _storage(tensor)
        if storage not in self.params:
            raise RuntimeError("a meta tensor in the save plan belongs to no model parameter")
        if self._last is None or self._last[0] != storage:
            self._last = None  # drop the previous parameter before producing the next
            _, name, param = self.params[storage]
            value = self.values(name)
            if value.shape != param.shape or value.dtype != param.dtype:
                raise ValueError(
                    f"{name}: produced {tuple(value.shape)} {value.dtype}, the checkpoint "
                    f"layout holds {tuple(param.shape)} {param.dtype}"
                )
            value = value.contiguous()
            if value.storage_offset() != 0 or value.untyped_storage().nbytes() != value.nbytes:
                value = value.clone()  # a slice of a larger tensor: own bytes, the rest freed
            self._last = (storage, value)
        value = self._last[1]
        view = value.as_strided(tensor.size(), tensor.stride(), tensor.storage_offset())
        return view.clone() if view.numel() != value.numel() else view

    def ordered(self, tensor_data: list) -> Iterator:
        """(item, value) pairs of one file, grouped by parameter, each produced when written."""
        for item, tensor in sorted(tensor_data, key=lambda pair: self.key(pair[1])):
            yield item, self(tensor)
        self._last = None


@contextmanager
def resolving_writes(resolver: _Resolver | None):
    """While active, megatron-core's save keeps meta tensors in its plan (no copy to the host)
    and `store._writes_in_this_process` resolves them as it writes them (`resolver.ordered`)."""
    if resolver is None:
        yield
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    writer = fsa.FileSystemWriterAsync
    saved = writer.__dict__["preload_tensors"]

    def preload_tensors(write_buckets, non_blocking=True):
        return write_buckets  # meta tensors stay where they are until written

    writer.preload_tensors = staticmethod(preload_tensors)
    try:
        yield
    finally:
        writer.preload_tensors = saved


def streaming_strategy():
    """megatron-core's torch_dist save strategy with one file per rank: its write items form one
    list, which the resolver reorders so that each parameter is produced once."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
