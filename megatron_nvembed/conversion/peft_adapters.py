"""PEFT adapter files for LoRA runs: the adapters of `model.lora`, under the module names of the
exported NV-Embed model (or of a plain transformers `MistralModel`), plus the trained pooling head.

`save_peft_adapters` writes `adapter_config.json` + `adapter_model.safetensors` (the fused QKV
and gate/up adapters split into q/k/v and gate/up adapters sharing A, exact since the fused
output rows are those projections); `load_peft_adapters` applies such files with peft and fails
on any key that matches nothing. The layouts come from `megatron_nvembed.utils.sharding`, the head's HF
names from `hf_mapping.head_rules`: that name map is why this lives in conversion/ and not next
to the adapter layers.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_nvembed.conversion.hf_mapping import head_rules
from megatron_nvembed.model.lora import COLUMN_TARGETS, LoRAParallelLinear
from megatron_nvembed.utils.sharding import unshard


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
    m = cfg.model
    heads = dict(num_heads=m.num_attention_heads, num_groups=m.num_query_groups)
    out = {}
    names = sorted({k.rsplit(".lora_", 1)[0] for k in shards[0]})
    for name in names:
        layer = int(name.split(".")[2])
        kind = name.rsplit(".", 1)[1]
        a_parts = [s[name + ".lora_A"] for s in shards]
        b_parts = [s[name + ".lora_B"] for s in shards]
        base = f"base_model.model.{backbone_prefix}layers.{layer}."
        if kind in COLUMN_TARGETS:
            # B is split like the fused weight's rows: per query group, or [gate_r ; up_r].
            if kind == "linear_qkv":
                projs, prefix = ("q_proj", "k_proj", "v_proj"), "self_attn."
                b_full = unshard("qkv", b_parts, 3, **heads)
            else:
                projs, prefix = ("gate_proj", "up_proj"), "mlp."
                b_full = unshard("pair", b_parts, 2)
            for proj, b_rows in zip(projs, b_full):
                out[f"{base}{prefix}{proj}.lora_A.weight"] = a_parts[0].clone()
                out[f"{base}{prefix}{proj}.lora_B.weight"] = b_rows.contiguous().clone()
        else:
            (a,) = unshard("row", a_parts, 1)  # A is split like the row-parallel weight
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
