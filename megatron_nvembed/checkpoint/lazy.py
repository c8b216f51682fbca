"""Conversions of models larger than memory: meta models, and checkpoints read one tensor at a time.

A conversion (import-hf, export-hf, merge-lora) never holds its model. It builds the model stage on
the meta device (`meta_model`: shapes and megatron-core's checkpoint layout, no storage and no
random initialisation), then:

- writes a checkpoint with `store.save_checkpoint(meta_model, ..., values=produce)`: megatron-core
  plans the save from the meta parameters as for a real model, and each parameter's value is asked
  of `produce(name)` only when its bytes are written (`streaming`), then dropped; the files
  are those of a save of the real model;
- reads a checkpoint with `CheckpointTensors`: torch's distributed-checkpoint reader fills only
  the parameters asked for (their regions of megatron-core's saved global tensors), in any saved
  TP/PP layout, so a reader holds what it asked for: one layer's parameters at a time.

Memory is a fixed overhead (the process, megatron-core's plan) plus the largest parameter (twice,
while its bytes are serialised), whatever the depth of the model: `bench/convert.py` measures it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_nvembed.core.config import EmbeddingModelConfig, ParallelConfig

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
"""The dtypes a checkpoint or an export may hold (`--dtype`)."""


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """The torch dtype of a `--dtype` value.

    Raises:
        ValueError: naming `flag` and the choices.
    """
    if name not in DTYPES:
        raise ValueError(f"{flag} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def meta_model(cfg: EmbeddingModelConfig, dtype: torch.dtype, pg_collection=None, *, lora=None):
    """This rank's model stage on the meta device, parameters in `dtype`: the layout of a
    checkpoint without its storage (nothing allocated, nothing initialised).

    Args:
        lora: {"rank", "alpha", ...}: with LoRA adapters of that rank (their checkpoint keys).
    """
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import apply_lora

    with torch.device("meta"):
        model = build_model(cfg, pg_collection, params_dtype=dtype)
        model.to(dtype)  # norms too, as megatron-core's half-precision wrapper casts them
        if lora is not None:
            apply_lora(model, lora["rank"], lora["alpha"], 0.0)
    return model


def saved_dtype(folder: str | os.PathLike) -> torch.dtype:
    """The dtype of a checkpoint iteration folder's weights (that of its token embedding, or of
    its first tensor), read from the shards' metadata without reading a tensor."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    tensors = {k: v for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}
    key = "embedding.word_embeddings.weight"
    chosen = tensors.get(key) or next(
        (v for k, v in sorted(tensors.items()) if not k.startswith("optimizer")), None
    )
    if chosen is None:
        raise ValueError(f"{folder}: the checkpoint holds no tensor")
    return chosen.properties.dtype


class CheckpointTensors:
    """A checkpoint's parameters read on demand, at TP = PP = 1 whatever layout it was saved at.

    `read(names)` reads those parameters only: their regions of the saved global tensors
    (megatron-core's keys and offsets: `sharded_state_dict()` of a TP = PP = 1 meta model,
    SwiGLU-style halves included) through torch's distributed-checkpoint reader, from whichever
    saved shards hold them; a reader holds what it asked for and nothing else.
    Names are those of the TP = PP = 1 model's state dict (`decoder.layers.3.mlp.linear_fc1.weight`;
    with adapters `...linear_fc1.base.weight`, `...linear_fc1.lora_A`).

    Attributes:
        cfg: the saved model config, its parallel section set to TP = PP = 1.
        lora: the saved LoRA settings, or None.
        dtype: the saved weights' dtype.
        model: the meta model whose layout is read (`names()`).
    """

    def __init__(self, root: str | os.PathLike, iteration: int | None = None):
        from megatron_nvembed.checkpoint.safety import verify_checkpoint_folder
        from megatron_nvembed.checkpoint.store import (
            iteration_dir,
            latest_iteration,
            read_config,
            read_lora,
        )

        self.root = Path(root)
        self.iteration = latest_iteration(root) if iteration is None else iteration
        self.folder = iteration_dir(root, self.iteration)
        verify_checkpoint_folder(self.folder)  # only data, every shard whole: before any read
        self.cfg = read_config(root, self.iteration)
        self.cfg.parallel = ParallelConfig(1, 1)
        self.lora = read_lora(root, self.iteration)
        self.dtype = saved_dtype(self.folder)
        self.model = meta_model(self.cfg, self.dtype, lora=self.lora)
        self._request = self.model.sharded_state_dict()
        self._params = dict(self.model.named_parameters())
        # The same model without adapters: the parameters `merged` gives.
        self.plain = self.model if self.lora is None else meta_model(self.cfg, self.dtype)
        self._plain_params = dict(self.plain.named_parameters())

    def merged(self, name: str) -> torch.Tensor:
        """Parameter `name` of the model without adapters (`self.plain`): the saved tensor, or
        for a layer with LoRA adapters its base weight with s * B A folded in, computed in
        float32 (`model.lora.fold_adapter`, the rule `merge_lora` applies to a loaded model).

        Raises:
            KeyError: a name that is no parameter of `self.plain`.
        """
        from megatron_nvembed.model.lora import fold_adapter

        stem = name.removesuffix(".weight")
        base = stem + ".base.weight"
        if self.lora is None or base not in self._params:
            if name not in self._plain_params:
                raise KeyError(f"{self.folder}: the model has no parameter {name!r}")
            return self.read([name])[name]
        got = self.read([base, stem + ".lora_A", stem + ".lora_B"])
        scale = self.lora["alpha"] / self.lora["rank"]
        a, b = got[stem + ".lora_A"].float(), got[stem + ".lora_B"].float()
        return fold_adapter(got[base].float(), a, b, scale)

    def names(self) -> list[str]:
        """Every parameter name, in the model's order."""
        return list(self._params)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The full tensors of `names` (in the saved dtype); rows of a vocabulary padded
        further than the saved one are zeros.

        Raises:
            KeyError: a name that is no parameter of the model.
            CorruptCheckpointError: shards that do not hold the parameters (named by folder).
        """
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
        from megatron.core.dist_checkpointing.mapping import (
            ShardedTensor,
            apply_factories,
            apply_factory_merges,
        )

        from megatron_nvembed.checkpoint.safety import CorruptCheckpointError
        from megatron_nvembed.checkpoint.store import CHECKPOINT_FAILURES, CONFIG_FILE, first_line

        request = {}
        for name in names:
            if name not in self._params:
                raise KeyError(f"{self.folder}: the model has no parameter {name!r}")
            p = self._params[name]
            data = torch.zeros(p.shape, dtype=p.dtype)
            request[name] = dataclasses.replace(self._request[name], data=data)
        factories = {k: v for k, v in request.items() if not isinstance(v, ShardedTensor)}
        apply_factories(request)  # SwiGLU-style halves: one ShardedTensor per half
        regions = []
        dict_list_map_inplace(lambda t: regions.append(t) or t, request)
        planner = _RegionPlanner(regions)
        try:
            with warnings.catch_warnings():  # no_dist: this process reads alone, as asked
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(
                    {},
                    storage_reader=dcp.FileSystemReader(str(self.folder)),
                    planner=planner,
                    no_dist=True,
                )
        except CHECKPOINT_FAILURES as err:
            raise CorruptCheckpointError(
                f"{self.folder}: the shards do not hold the model of "
                f"{self.folder / CONFIG_FILE} ({type(err).__name__}: {first_line(err)})"
            ) from err
        loaded = dict_list_map_inplace(lambda t: t.data, request)
        loaded = apply_factory_merges(loaded, factories)
        return {name: loaded[name] for name in loaded}


class _RegionPlanner(LoadPlanner):
    """A torch.distributed.checkpoint load plan that reads given regions of the saved global
    tensors (megatron-core ShardedTensors: key, global offset, local shape) into their `data`."""

    def __init__(self, regions: list):
        self.regions = regions
        self.dest: dict[tuple[str, torch.Size], torch.Tensor] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for sh in self.regions:
            if sh.flattened_range is not None:
                raise ValueError(f"{sh.key}: flattened shards are not read here")
            saved = self.metadata.state_dict_metadata.get(sh.key)
            if saved is None:
                raise KeyError(f"the checkpoint holds no tensor {sh.key!r}")
            shape = torch.Size((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
            offsets = torch.Size(sh.global_offset)
            self.dest[(sh.key, offsets)] = sh.data.view(shape)
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=shape)
            items += create_read_items_for_chunk_list(sh.key, saved, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise ValueError(f"{read_item.dest_index.fqn}: a tensor was expected, not an object")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.dest[(read_item.dest_index.fqn, read_item.dest_index.offset)]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor):
        pass


def with_dtype(cfg: EmbeddingModelConfig, dtype: torch.dtype) -> EmbeddingModelConfig:
    """`cfg` with `model.bf16` saying whether `dtype` is bfloat16 (the setting a run started
    from the checkpoint defaults to; `--bf16` / `--fp32` decide at run time)."""
    cfg.model.bf16 = dtype == torch.bfloat16
    return cfg
