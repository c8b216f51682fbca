"""LoRA on megatron-core's tensor-parallel linear layers (`linear_qkv`, `linear_proj`,
`linear_fc1`, `linear_fc2`), written here because peft's megatron dispatcher fails on current
megatron-core (KeyError `fan_in_fan_out`, then `lora_bias`; see shared/DESIGN.md).

For a base layer y = W x (W split over TP ranks), the adapter adds s * B A x with s = alpha / r:
- column-parallel W (rows split): A [r, in] is replicated, B [out/tp, r] is split like W. The
  low-rank activation A x goes through megatron-core's copy-to-TP-region, whose backward sums its
  gradient over the TP group, so A's gradient is the full one on every rank.
- row-parallel W (columns split): A [r, in/tp] is split like W, B [out, r] is replicated; the
  partial products A_r x_r are summed over the TP group (reduce-from-TP-region).
So `merge()` gives exactly W + s B A on every shard. B starts at zero (the adapted model starts
equal to the base); A from a seeded Kaiming-uniform draw of the full matrix, sliced per rank, so
initialisation does not depend on the TP size. Dropout applies to the adapter's input only.

The adapters in PEFT's file format (exported module names): `conversion.peft_adapters`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from torch import nn

from megatron_nvembed.utils.sharding import uses_te_names

COLUMN_TARGETS = ("linear_qkv", "linear_fc1")
ROW_TARGETS = ("linear_proj", "linear_fc2")


class LoRAParallelLinear(nn.Module):
    """A megatron-core column- or row-parallel linear layer plus a low-rank adapter.

    Args:
        base: the wrapped `ColumnParallelLinear` / `RowParallelLinear` (frozen by `apply_lora`).
        parallel: "column" or "row".
        rank, alpha, dropout: LoRA r, alpha, and dropout on the adapter input.
        tp_group: the tensor-parallel group of `base`.
        generator: source of A's initialisation (same seed on every TP rank).
        gated: `base` is the fc1 of a gated (SwiGLU) MLP, whose rows checkpoints reorder.
    """

    def __init__(
        self,
        base: nn.Module,
        parallel: str,
        rank: int,
        alpha: float,
        dropout: float,
        tp_group,
        generator: torch.Generator,
        gated: bool = False,
    ):
        super().__init__()
        if parallel not in ("column", "row"):
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
        self.base, self.parallel, self.tp_group = base, parallel, tp_group
        # A gated MLP's fc1 holds [gate; up] rows per TP rank; checkpoints reorder them.
        self.gated = bool(gated)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        tp, tp_rank = tp_group.size(), tp_group.rank()
        out_local, in_local = base.weight.shape
        in_full = in_local * (tp if parallel == "row" else 1)
        full_a = torch.empty(rank, in_full)
        bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform(a=sqrt(5)) bound for a linear layer
        full_a.uniform_(-bound, bound, generator=generator)
        a = full_a.chunk(tp, dim=1)[tp_rank] if parallel == "row" else full_a
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.lora_B = nn.Parameter(torch.zeros(out_local, rank, dtype=dtype, device=device))
        for p in (self.lora_A, self.lora_B):
            # A is replicated for column layers, B for row layers; the other is TP-split.
            split = (p is self.lora_B) if parallel == "column" else (p is self.lora_A)
            p.tensor_model_parallel = split
            p.partition_dim = (0 if parallel == "column" else 1) if split else -1
            p.partition_stride = 1
            # With sequence parallelism the replicated factor sees one slice of the sequence per
            # rank: its gradient is summed over the TP group by `finalize_model_grads`.
            p.sequence_parallel = not split and bool(getattr(base, "sequence_parallel", False))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * B A x for this rank's output shard (column) or the full output (row)."""
        h = F.linear(self.dropout(x), self.lora_A)  # [..., r] (row: partial sum)
        if getattr(self.base, "sequence_parallel", False):
            # Sequence parallelism: a column layer's input is this rank's slice of the sequence
            # (the base gathers it), a row layer's output is scattered back over the sequence.
            if self.parallel == "column":
                h = gather_from_sequence_parallel_region(h, group=self.tp_group)
            else:
                h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        elif self.parallel == "column":
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return self.scale * F.linear(h, self.lora_B)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        return out + self.delta(x), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Checkpoint entries: the base layer under its usual checkpoint keys (so a LoRA model
        reads and writes the same base tensors as a plain one) and the adapters, TP-sharded like
        the base (B along rows for column layers, A along columns for row layers).

        The module-side keys are `prefix + "base.weight"`, `prefix + "lora_A"`, ... (this
        module's own state_dict names); the checkpoint keys are `prefix + "weight"`, ...
        """
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        singleton = (metadata or {}).get("singleton_local_shards", False)
        base_sd = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        out = {}
        for key, value in base_sd.items():
            if self.gated and key == prefix + "weight":
                value = apply_swiglu_sharded_factory(value, sharded_offsets, singleton)
            out[prefix + "base." + key[len(prefix) :]] = value
        axis = {"lora_B": 0} if self.parallel == "column" else {"lora_A": 1}
        adapters = make_sharded_tensors_for_checkpoint(
            {"lora_A": self.lora_A, "lora_B": self.lora_B},
            prefix,
            axis,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=_dp_cp_group(metadata),
        )
        if self.gated:  # B's rows are [gate shard; up shard] per rank, like the base weight
            key = prefix + "lora_B"
            adapters[key] = apply_swiglu_sharded_factory(adapters[key], sharded_offsets, singleton)
        out.update(adapters)
        return out

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Folds s * B A into the base weight shard and returns the base layer."""
        fold_adapter(self.base.weight, self.lora_A, self.lora_B, self.scale)
        return self.base


@torch.no_grad()
def fold_adapter(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """`weight += scale * B A` in place (in `weight`'s dtype); returns `weight`. The one merge
    rule: of a model's adapters (`merge_lora`) and of a checkpoint's, one layer at a time."""
    return weight.add_(scale * (lora_b @ lora_a).to(weight.dtype))


def _dp_cp_group(metadata):
    """The data(+context)-parallel group replica ids are computed over (megatron-core passes it
    in the sharded-state-dict metadata; older callers do not)."""
    group = (metadata or {}).get("dp_cp_group")
    if group is None:
        from megatron_nvembed.core.parallel import data_parallel_group

        group = data_parallel_group()
    return group


def apply_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, seed: int = 1234
) -> list[nn.Parameter]:
    """Wraps every decoder layer's `linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2` and
    freezes the backbone; the pooling head stays trainable.

    Returns:
        The adapter parameters.

    Raises:
        ValueError: rank < 1, or a Transformer Engine model (its norm is fused into `linear_qkv` /
            `linear_fc1`, so the adapter would not see the normalised input; not supported yet).
    """
    if rank < 1:
        raise ValueError(
            f"--lora-rank must be >= 1 for LoRA (0 means full fine-tuning), got {rank}"
        )
    if uses_te_names(model):
        raise ValueError(
            "LoRA on the Transformer Engine backend is not supported yet; "
            "use attention_backend='sdpa' or full fine-tuning (--lora-rank 0)"
        )
    for name, p in model.named_parameters():
        if not name.startswith("pooling."):
            p.requires_grad_(False)
    tp_group = model.pg_collection.tp
    added = []
    for layer in model.decoder.layers:
        offset = layer.layer_number - 1  # global index: the same draw at every PP split
        for owner, names in (
            (layer.self_attention, ("linear_qkv", "linear_proj")),
            (layer.mlp, ("linear_fc1", "linear_fc2")),
        ):
            for j, n in enumerate(names):
                g = torch.Generator().manual_seed(
                    seed + 1000 * offset + 10 * j + (n in ROW_TARGETS)
                )
                kind = "column" if n in COLUMN_TARGETS else "row"
                gated = n == "linear_fc1" and model.config.gated_linear_unit
                wrapped = LoRAParallelLinear(
                    getattr(owner, n), kind, rank, alpha, dropout, tp_group, g, gated=gated
                )
                setattr(owner, n, wrapped)
                added += [wrapped.lora_A, wrapped.lora_B]
    return added


def merge_lora(model: nn.Module) -> int:
    """Folds every adapter into its base weight and unwraps it; returns how many were merged."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRAParallelLinear):
                setattr(module, name, child.merge())
                count += 1
    return count


def has_lora(model: nn.Module) -> bool:
    """True when `model` holds any (unmerged) LoRA adapter."""
    return any(isinstance(m, LoRAParallelLinear) for m in model.modules())
