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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import nn

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

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * B A x for this rank's output shard (column) or the full output (row)."""
        h = F.linear(self.dropout(x), self.lora_A)  # [..., r] (row: partial sum)
        if self.parallel == "column":
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
        self.base.weight.add_(self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype))
        return self.base


def _dp_cp_group(metadata):
    """The data(+context)-parallel group replica ids are computed over (megatron-core passes it
    in the sharded-state-dict metadata; older callers do not)."""
    group = (metadata or {}).get("dp_cp_group")
    if group is None:
        from megatron_nvembed.parallel import data_parallel_group

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
    from megatron_nvembed.conversion.hf_mapping import uses_te_names

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
    return any(isinstance(m, LoRAParallelLinear) for m in model.modules())


def lora_to_hf(
    shards: list[dict[str, torch.Tensor]], cfg, backbone_prefix: str = "embedding_model."
) -> dict[str, torch.Tensor]:
    """Adapters of all TP shards (one PP stage set) -> PEFT-named full tensors.

    Args:
        shards: per TP rank (in rank order), `{module name: (lora_A, lora_B)}` flattened as
            `{name + ".lora_A": A, name + ".lora_B": B}` with megatron module names
            (`decoder.layers.{i}.self_attention.linear_qkv`, ...), global layer indices.
        cfg: the model config (head counts for the QKV layout).

    Returns:
        `{"base_model.model.<prefix>layers.{i}.self_attn.q_proj.lora_A.weight": ..., ...}`:
        the fused QKV adapter becomes q/k/v adapters sharing A with B split by output rows (and
        likewise gate/up), which is exact because the fused output rows are those projections.
    """
    from megatron_nvembed.conversion.hf_mapping import split_qkv

    m = cfg.model
    out = {}
    names = sorted({k.rsplit(".lora_", 1)[0] for k in shards[0]})
    for name in names:
        layer = int(name.split(".")[2])
        kind = name.rsplit(".", 1)[1]
        a_parts = [s[name + ".lora_A"] for s in shards]
        b_parts = [s[name + ".lora_B"] for s in shards]
        base = f"base_model.model.{backbone_prefix}layers.{layer}."
        if kind in COLUMN_TARGETS:
            a = a_parts[0]
            if kind == "linear_qkv":
                b = torch.cat(b_parts, dim=0)  # per-query-group rows, as the fused weight
                targets = zip(
                    ("q_proj", "k_proj", "v_proj"),
                    split_qkv(b, m.num_attention_heads, m.num_query_groups),
                )
                prefix = "self_attn."
            else:
                halves = [p.chunk(2, dim=0) for p in b_parts]
                gate = torch.cat([h[0] for h in halves])
                up = torch.cat([h[1] for h in halves])
                targets = (("gate_proj", gate), ("up_proj", up))
                prefix = "mlp."
            for proj, b_rows in targets:
                out[f"{base}{prefix}{proj}.lora_A.weight"] = a.clone()
                out[f"{base}{prefix}{proj}.lora_B.weight"] = b_rows.contiguous().clone()
        else:
            a = torch.cat(a_parts, dim=1)
            proj = "self_attn.o_proj" if kind == "linear_proj" else "mlp.down_proj"
            out[f"{base}{proj}.lora_A.weight"] = a.contiguous().clone()
            out[f"{base}{proj}.lora_B.weight"] = b_parts[0].clone()
    return out


# PEFT adapter files for the exported models. "nvembed": the exported NV-Embed model
# (`embedding_model.*` backbone, the trained `latent_attention_model` head saved whole through
# peft's `modules_to_save`); "mistral": a plain transformers `MistralModel` (backbone only).
PEFT_TARGETS = {"nvembed": "embedding_model.", "mistral": ""}
PEFT_HEAD_MODULE = "latent_attention_model"
PEFT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def head_to_hf(
    shards: list[dict[str, torch.Tensor]], cfg, head_prefix: str = PEFT_HEAD_MODULE + "."
) -> dict[str, torch.Tensor]:
    """The pooling head's full HF tensors from all TP shards (in rank order) of its `pooling.*`
    parameters, by the export's rules (`hf_mapping.head_rules`); empty for a parameter-free head.
    """
    from megatron_nvembed.conversion.hf_mapping import head_rules, unshard

    out = {}
    for rule in head_rules(cfg):
        full = unshard(rule.kind, [s[rule.megatron] for s in shards], len(rule.hf))
        for name, tensor in zip(rule.hf, full):
            out[head_prefix + name] = tensor.contiguous().clone()
    return out


def check_peft_options(base_model_name_or_path: str | None, target: str) -> None:
    """Raises ValueError naming the flag when PEFT adapters cannot be written as asked."""
    if target not in PEFT_TARGETS:
        raise ValueError(f"--peft-target must be one of {sorted(PEFT_TARGETS)}, got {target!r}")
    if not base_model_name_or_path:
        raise ValueError(
            "--peft-dir needs --peft-base-model: the base model the adapters apply to "
            "(hub id or path), recorded as base_model_name_or_path for AutoPeftModel"
        )


def peft_adapter_config(
    rank: int, alpha: float, dropout: float, base_model_name_or_path: str, with_head: bool
) -> dict:
    """PEFT's `adapter_config.json` for our adapters.

    `auto_mapping` names transformers' `AutoModel`, not the model's own class: for a model
    loaded with trust_remote_code, peft would record the class's dynamic module
    (`transformers_modules.<dir>.<hash>.modeling_nvembed`), which is outside `AutoPeftModel`'s
    import allowlist and importable only after that code was loaded in the same process;
    `AutoModel` finds the class from the base model's own config (`auto_map`) instead, given
    `trust_remote_code=True`.
    """
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "auto_mapping": {"base_model_class": "AutoModel", "parent_library": "transformers"},
        "task_type": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "bias": "none",
        "target_modules": list(PEFT_TARGET_MODULES),
        "modules_to_save": [PEFT_HEAD_MODULE] if with_head else None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }


def save_peft_adapters(
    model: nn.Module,
    cfg,
    out_dir,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    base_model_name_or_path: str,
    target: str = "nvembed",
) -> None:
    """Writes PEFT's `adapter_config.json` + `adapter_model.safetensors` for an export of the
    checkpoint the LoRA run started from (all ranks call it; rank 0 of the TP group writes; one
    pipeline stage only).

    Args:
        model: the model with its LoRA adapters (not merged) and its trained pooling head.
        base_model_name_or_path: the base model the adapters apply to, a hub id or a path,
            recorded as given (`AutoPeftModel` loads it from there).
        target: "nvembed": module names of the exported NV-Embed model, with the pooling head
            (trained alongside LoRA) as `modules_to_save`; `PeftModel.from_pretrained` /
            `AutoPeftModel.from_pretrained(..., trust_remote_code=True)` then reproduce the merged
            export. "mistral": module names of a plain transformers `MistralModel`
            (`layers.N.*`), backbone adapters only (the head is not part of that model).

    Raises:
        ValueError: unknown target, empty base model name, or pipeline parallelism.
    """
    import json
    from pathlib import Path

    import torch.distributed as dist
    from safetensors.torch import save_file

    check_peft_options(base_model_name_or_path, target)
    if model.pg_collection.pp.size() != 1:
        raise ValueError("save_peft_adapters supports --pipeline-model-parallel-size 1 only")
    local = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRAParallelLinear):
            local[name + ".lora_A"] = mod.lora_A.detach().cpu()
            local[name + ".lora_B"] = mod.lora_B.detach().cpu()
    with_head = target == "nvembed"
    head_local = {}
    if with_head:
        head_local = {
            n: p.detach().cpu() for n, p in model.named_parameters() if n.startswith("pooling.")
        }
    group = model.pg_collection.tp
    shards = [None] * group.size()
    if group.size() > 1:
        dist.all_gather_object(shards, (local, head_local), group=group)
    else:
        shards = [(local, head_local)]
    if group.rank() != 0:
        return
    tensors = lora_to_hf([s[0] for s in shards], cfg, backbone_prefix=PEFT_TARGETS[target])
    if with_head:
        head = head_to_hf([s[1] for s in shards], cfg)
        tensors.update({"base_model.model." + k: v for k, v in head.items()})
        with_head = bool(head)  # parameter-free pooling: nothing to save
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = peft_adapter_config(rank, alpha, dropout, base_model_name_or_path, with_head)
    tmp = out / (PEFT_WEIGHTS_NAME + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / PEFT_WEIGHTS_NAME)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_peft_adapters(base_model: nn.Module, adapter_dir, **kwargs):
    """`peft.PeftModel.from_pretrained(base_model, adapter_dir, **kwargs)` that fails on a
    mismatch. peft itself warns only about the model's adapter keys missing from the file, drops
    saved keys that match nothing without a word, and leaves unmatched adapters at their no-op
    initialisation (e.g. adapters for the NV-Embed export applied to a plain `MistralModel`).

    Args:
        base_model: a transformers model (the exported NV-Embed model, or a `MistralModel` for
            `--peft-target mistral` adapters).
        adapter_dir: a local folder with `adapter_config.json` + `adapter_model.safetensors`.

    Returns:
        The `PeftModel`.

    Raises:
        FileNotFoundError: no adapter file in `adapter_dir`.
        ValueError: naming the adapter file, the saved keys that match no module of the model
            and the model's adapter / saved-module keys that the file does not provide
            (`base_model` has then already been wrapped by peft; load it afresh).
    """
    from pathlib import Path

    try:
        from peft import PeftModel, get_peft_model_state_dict
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading PEFT adapters needs peft: pip install 'megatron_nvembed[lora]'"
        ) from err
    from safetensors import safe_open

    path = Path(adapter_dir) / PEFT_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no PEFT adapter file")
    with safe_open(str(path), framework="pt") as f:
        saved = set(f.keys())
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir), **kwargs)
    # The keys peft itself would save for this model (embedding layers are never adapted here;
    # "auto" would look the base model's config up, on the hub for a hub id).
    expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    unmatched, missing = sorted(saved - expected), sorted(expected - saved)
    if unmatched or missing:
        raise ValueError(
            f"{path}: the adapters do not fit {type(base_model).__name__}: "
            f"{len(unmatched)} saved key(s) match no module of the model {unmatched[:8]}, "
            f"{len(missing)} adapter key(s) of the model are not in the file {missing[:8]}"
        )
    return peft_model
