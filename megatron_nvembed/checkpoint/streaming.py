"""Checkpoint saves that produce each parameter's value only when its bytes are written.

`store.save_checkpoint(model, ..., values=produce)` of a model built on the meta device
(`lazy.meta_model`: shapes and megatron-core's checkpoint layout, no storage) lets megatron-core
plan the save as for a real model; each write item's tensor is a meta parameter or a view of one,
and its value is the same view of `produce(name)`, asked for when the item is written and dropped
after it (`Resolver`). The files are those a save of the real model writes. Reading one tensor
at a time is `lazy.CheckpointTensors`.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def _storage(tensor: torch.Tensor) -> int:
    # Views of a meta tensor share its storage object (and nothing else identifies them: a
    # detached view has no `_base`, a meta tensor no data pointer).
    return tensor.untyped_storage()._cdata


class Resolver:
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
def resolving_writes(resolver: Resolver | None):
    """While active, megatron-core's save keeps meta tensors in its plan (no copy to the host)
    and `writes_in_this_process` resolves them as it writes them (`resolver.ordered`)."""
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


def merge_in_place(request: dict) -> None:
    """Makes the model's split parameters (megatron-core's SwiGLU-style factories: a parameter
    saved as consecutive halves) load without a copy: the halves are loaded into views of the
    parameter, so megatron-core's merge, a concatenation into a new tensor kept until the
    whole model is loaded (one fc1 per layer: memory growing with depth), is replaced by the
    parameter itself when the halves are exactly its consecutive parts."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    for value in request.values():
        if isinstance(value, ShardedTensorFactory):
            value.merge_fn = parameter_if_parts(value.merge_fn, value.data)


def parameter_if_parts(merge_fn, data: torch.Tensor):
    def merge(parts):
        if isinstance(parts, (list, tuple)) and data.is_contiguous():
            offset = data.storage_offset()
            for t in parts:
                if not (
                    isinstance(t, torch.Tensor)
                    and t.is_contiguous()
                    and t.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()
                    and t.storage_offset() == offset
                ):
                    break
                offset += t.numel()
            else:
                if offset == data.storage_offset() + data.numel():
                    return data
        return merge_fn(parts)

    return merge


@contextmanager
def writes_in_this_process(resolver: Resolver | None = None, checksums: dict | None = None):
    """Makes megatron-core's torch_dist save write every shard from the rank's own process.

    megatron-core 0.16's writer hands a save's buckets to forked worker processes and collects
    their results through a spawned multiprocessing Manager that lives on after the first save.
    On preemption torchrun sends SIGTERM to each worker's whole process group: the Manager dies
    with it (the next save, the one the signal asked for, fails with BrokenPipeError), and a
    writer that dies leaves the save waiting forever. Written here, bucket after bucket, with the
    results in an in-process queue, a save has no child to lose and any write error (disk full)
    comes back as this rank's exception. Sequential writes cost little: the shards of one rank
    go to one filesystem anyway. With a `streaming.Resolver`, each bucket's meta tensors get
    their values as they are written. With `checksums`, each file's size and checksum
    (`utils.checksums.file_checksum`, read back while still in the page cache) is recorded
    there by its path right after it is written: the rank's part of the checkpoint manifest.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    from megatron_nvembed.utils.checksums import file_checksum

    writer = fsa.FileSystemWriterAsync
    saved_fn = writer.__dict__["write_preloaded_data_multiproc"]
    saved_queue = fsa._results_queue

    def write_buckets(transform_list, use_msc, rank, write_buckets, results_queue):
        results = {}
        for i, bucket in enumerate(write_buckets):
            if resolver is not None:
                path, key, (bytes_data, tensor_data) = bucket
                bucket = (path, key, (bytes_data, resolver.ordered(tensor_data)))
            local, count = queue.Queue(), queue.Queue()
            count.put(i)
            extra = {"use_msc": use_msc} if use_msc else {}
            writer.write_preloaded_data(transform_list, i, bucket, local, count, True, **extra)
            _, out = local.get_nowait()
            if isinstance(out, Exception):
                results_queue.put(out)
                return
            results[i] = out
            if checksums is not None:
                checksums[bucket[0]] = file_checksum(bucket[0])
        results_queue.put(results)

    writer.write_preloaded_data_multiproc = staticmethod(write_buckets)
    fsa._results_queue = queue.Queue()
    try:
        yield
    finally:
        writer.write_preloaded_data_multiproc = saved_fn
        fsa._results_queue = saved_queue
