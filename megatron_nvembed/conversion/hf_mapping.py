"""Declarative map between transformers / NV-Embed state dicts and `NVEmbedModel` shards.

One table names every parameter on both sides and the transform kind between them (`replicated`,
`column`, `row`, `vocab`, `qkv`, `pair`); the transforms themselves, full tensors <-> one TP
rank's shard, are `megatron_nvembed.utils.sharding`'s (its docstring tabulates the layouts).

HF-side names are those of transformers' `MistralModel` / `LlamaModel` / `Qwen2Model` /
`Qwen3Model` (no `model.` prefix) for the backbone and NV-Embed's `latent_attention_model.*` for
the head; prefixes are arguments so that `*ForCausalLM` (`model.`) and NV-Embed
(`embedding_model.`) layouts use the same table. Pipeline
stages hold layers `p*L/P .. (p+1)*L/P - 1` under local indices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron_nvembed.core.config import EmbeddingModelConfig, padded_vocab_size
from megatron_nvembed.utils.sharding import shard, unshard, uses_te_names


@dataclass(frozen=True)
class Rule:
    """One parameter: its megatron-side name, its HF-side name(s) and the transform kind."""

    megatron: str
    hf: tuple[str, ...]
    kind: str


LAYER_RULES = (
    Rule("input_layernorm.weight", ("input_layernorm.weight",), "replicated"),
    Rule(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "row"),
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated"),
    Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "pair"),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "row"),
)
# Qwen2's Q/K/V biases: fused like the weights (per query group, then split over TP ranks).
QKV_BIAS_RULE = Rule(
    "self_attention.linear_qkv.bias",
    ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "qkv",
)
# Qwen3's per-head Q/K RMSNorm weights ([head_dim], shared by every head): on every TP rank.
QK_NORM_RULES = (
    Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "replicated"),
    Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "replicated"),
)
EMBEDDING_RULE = Rule("embedding.word_embeddings.weight", ("embed_tokens.weight",), "vocab")
FINAL_NORM_RULE = Rule("decoder.final_layernorm.weight", ("norm.weight",), "replicated")

_ATTN_BLOCK = "cross_attend_blocks.0."
_FF_BLOCK = "cross_attend_blocks.1."
HEAD_RULES = {
    # NV-Embed's head; the self-attention ablation head uses the same names minus the latents.
    "latents": Rule("pooling.latents", ("latents",), "replicated"),
    "norm_context.weight": Rule(
        "pooling.norm_context.weight", (_ATTN_BLOCK + "norm_context.weight",), "replicated"
    ),
    "norm_context.bias": Rule(
        "pooling.norm_context.bias", (_ATTN_BLOCK + "norm_context.bias",), "replicated"
    ),
    "norm.weight": Rule("pooling.norm.weight", (_ATTN_BLOCK + "norm.weight",), "replicated"),
    "norm.bias": Rule("pooling.norm.bias", (_ATTN_BLOCK + "norm.bias",), "replicated"),
    "to_q": Rule("pooling.to_q.weight", (_ATTN_BLOCK + "fn.to_q.weight",), "column"),
    "to_kv": Rule("pooling.to_kv.weight", (_ATTN_BLOCK + "fn.to_kv.weight",), "pair"),
    "to_out": Rule("pooling.to_out.weight", (_ATTN_BLOCK + "fn.to_out.weight",), "row"),
    "ff_norm.weight": Rule("pooling.ff_norm.weight", (_FF_BLOCK + "norm.weight",), "replicated"),
    "ff_norm.bias": Rule("pooling.ff_norm.bias", (_FF_BLOCK + "norm.bias",), "replicated"),
    "ff_in.weight": Rule("pooling.ff_in.weight", (_FF_BLOCK + "fn.net.0.weight",), "pair"),
    "ff_in.bias": Rule("pooling.ff_in.bias", (_FF_BLOCK + "fn.net.0.bias",), "pair"),
    "ff_out.weight": Rule("pooling.ff_out.weight", (_FF_BLOCK + "fn.net.2.weight",), "row"),
    "ff_out.bias": Rule("pooling.ff_out.bias", (_FF_BLOCK + "fn.net.2.bias",), "replicated"),
}

# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


# ---------------------------------------------------------------------------------------------
# Whole-model maps
# ---------------------------------------------------------------------------------------------


def layer_rules(cfg: EmbeddingModelConfig) -> list[Rule]:
    """Rules of one decoder layer for this backbone (Q/K/V biases and Q/K norms when present)."""
    extra = [QKV_BIAS_RULE] if cfg.model.add_qkv_bias else []
    if cfg.model.qk_layernorm:
        extra += QK_NORM_RULES
    return [*LAYER_RULES[:2], *extra, *LAYER_RULES[2:]]


def head_rules(cfg: EmbeddingModelConfig) -> list[Rule]:
    """Rules of the pooling head (none for parameter-free pooling)."""
    if cfg.pooling.type == "latent":
        return list(HEAD_RULES.values())
    if cfg.pooling.type == "self-attention":
        return [r for k, r in HEAD_RULES.items() if k not in ("latents",) and "context" not in k]
    return []


def stage_rules(
    cfg: EmbeddingModelConfig, pp_rank: int, te_names: bool = False
) -> list[tuple[str, tuple[str, ...], str]]:
    """(megatron name, HF names without prefixes, kind) for every parameter of one PP stage.

    HF backbone names are returned with a leading `b:` and head names with `h:`, so callers can
    prefix them (`model.`, `embedding_model.`, `latent_attention_model.`).
    """
    m = cfg.model
    pp = cfg.parallel.pipeline_model_parallel_size
    per_stage = m.num_layers // pp
    out = []
    if pp_rank == 0:
        out.append((EMBEDDING_RULE.megatron, tuple("b:" + n for n in EMBEDDING_RULE.hf), "vocab"))
    for local in range(per_stage):
        glob = pp_rank * per_stage + local
        for rule in layer_rules(cfg):
            name = TE_RENAMES.get(rule.megatron, rule.megatron) if te_names else rule.megatron
            hf = tuple(f"b:layers.{glob}.{n}" for n in rule.hf)
            out.append((f"decoder.layers.{local}.{name}", hf, rule.kind))
    if pp_rank == pp - 1:
        out.append(
            (FINAL_NORM_RULE.megatron, tuple("b:" + n for n in FINAL_NORM_RULE.hf), "replicated")
        )
        for rule in head_rules(cfg):
            out.append((rule.megatron, tuple("h:" + n for n in rule.hf), rule.kind))
    return out


def _hf_key(tagged: str, backbone_prefix: str, head_prefix: str) -> str:
    tag, name = tagged.split(":", 1)
    return (backbone_prefix if tag == "b" else head_prefix) + name


def _transform_kwargs(cfg: EmbeddingModelConfig) -> dict:
    m = cfg.model
    return dict(
        num_heads=m.num_attention_heads,
        num_groups=m.num_query_groups,
        vocab_size=m.vocab_size,
        vocab_rows=padded_vocab_size(m.vocab_size, cfg.parallel.tensor_model_parallel_size),
    )


def stage_sources(
    cfg: EmbeddingModelConfig,
    pp_rank: int,
    *,
    backbone_prefix: str = "",
    head_prefix: str = "latent_attention_model.",
    te_names: bool = False,
    include_head: bool = True,
) -> dict[str, tuple[list[str], str]]:
    """megatron name -> (HF keys, transform kind) for every parameter of one PP stage (the
    pooling head's only with `include_head`); arguments as `hf_to_megatron`."""
    out = {}
    for mname, hf_names, kind in stage_rules(cfg, pp_rank, te_names):
        if not include_head and mname.startswith("pooling."):
            continue
        out[mname] = ([_hf_key(n, backbone_prefix, head_prefix) for n in hf_names], kind)
    return out


def hf_parameter(
    hf_state: Mapping[str, torch.Tensor],
    cfg: EmbeddingModelConfig,
    tp_rank: int,
    source: tuple[list[str], str],
) -> torch.Tensor:
    """One parameter's TP shard (`source`: an entry of `stage_sources`), read from `hf_state`
    one HF tensor at a time.

    Raises:
        KeyError: naming the missing HF key.
        ValueError: naming a key whose shape does not match the config.
    """
    keys, kind = source
    tensors = []
    for key in keys:
        if key not in hf_state:
            raise KeyError(f"missing key {key!r} in the source state dict")
        tensors.append(hf_state[key])
    tp = cfg.parallel.tensor_model_parallel_size
    return shard(kind, tensors, tp_rank, tp, **_transform_kwargs(cfg))


def hf_to_megatron(
    hf_state: Mapping[str, torch.Tensor],
    cfg: EmbeddingModelConfig,
    tp_rank: int,
    pp_rank: int,
    *,
    backbone_prefix: str = "",
    head_prefix: str = "latent_attention_model.",
    te_names: bool = False,
    include_head: bool = True,
) -> dict[str, torch.Tensor]:
    """The state dict of one (TP rank, PP stage) shard of `NVEmbedModel` from HF tensors (all
    of them at once; conversions take one parameter at a time with `stage_sources` and
    `hf_parameter`).

    Args:
        hf_state: HF-named tensors (any mapping with `__getitem__`, e.g. a lazy safetensors view).
        cfg: model config; its parallel section gives the TP and PP sizes.
        tp_rank, pp_rank: the shard to build.
        backbone_prefix: `""` (MistralModel), `"model."` (*ForCausalLM), `"embedding_model."`
            (NV-Embed).
        head_prefix: prefix of the pooling head's keys.
        te_names: produce Transformer Engine parameter names (fused norms).
        include_head: map the pooling head too (False when the source has none).

    Returns:
        megatron-side name -> tensor (contiguous clones, safe to load).

    Raises:
        KeyError: naming the missing HF key.
        ValueError: naming a key whose shape does not match the config.
    """
    sources = stage_sources(
        cfg,
        pp_rank,
        backbone_prefix=backbone_prefix,
        head_prefix=head_prefix,
        te_names=te_names,
        include_head=include_head,
    )
    return {
        mname: hf_parameter(hf_state, cfg, tp_rank, source).contiguous().clone()
        for mname, source in sources.items()
    }


def hf_sources(
    cfg: EmbeddingModelConfig,
    *,
    backbone_prefix: str = "",
    head_prefix: str = "latent_attention_model.",
) -> dict[str, tuple[str, str, int, int]]:
    """HF key -> (megatron name, kind, n, i) for a model at TP = PP = 1: the key is the i-th
    of the n HF tensors that megatron parameter splits into (`hf_tensors_of`). Export reads
    one parameter at a time with it."""
    if cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size != 1:
        raise ValueError("hf_sources maps a model at TP = PP = 1")
    out = {}
    for mname, hf_names, kind in stage_rules(cfg, 0):
        for i, tagged in enumerate(hf_names):
            out[_hf_key(tagged, backbone_prefix, head_prefix)] = (mname, kind, len(hf_names), i)
    return out


def hf_tensors_of(
    parts: list[torch.Tensor], cfg: EmbeddingModelConfig, kind: str, count: int
) -> tuple[torch.Tensor, ...]:
    """The `count` full HF tensors of one megatron parameter from its TP shards `parts`."""
    return unshard(kind, parts, count, **_transform_kwargs(cfg))


def megatron_to_hf(
    shards: list[list[Mapping[str, torch.Tensor]]],
    cfg: EmbeddingModelConfig,
    *,
    backbone_prefix: str = "",
    head_prefix: str = "latent_attention_model.",
    te_names: bool = False,
) -> dict[str, torch.Tensor]:
    """HF-named full tensors from every shard, `shards[pp_rank][tp_rank]` = that state dict.

    Raises:
        ValueError: when the number of shards does not match the config's TP x PP.
        KeyError: naming a parameter missing from a shard.
    """
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    if len(shards) != pp or any(len(s) != tp for s in shards):
        raise ValueError(f"expected {pp} pipeline stages x {tp} tensor-parallel shards")
    out = {}
    for p in range(pp):
        for mname, hf_names, kind in stage_rules(cfg, p, te_names):
            parts = []
            for r in range(tp):
                if mname not in shards[p][r]:
                    raise KeyError(f"missing {mname!r} in shard (pp={p}, tp={r})")
                parts.append(shards[p][r][mname])
            full = hf_tensors_of(parts, cfg, kind, len(hf_names))
            for tagged, tensor in zip(hf_names, full):
                out[_hf_key(tagged, backbone_prefix, head_prefix)] = tensor.contiguous().clone()
    return out


def load_hf_into_model(
    model: torch.nn.Module,
    hf_state: Mapping[str, torch.Tensor],
    cfg: EmbeddingModelConfig,
    tp_rank: int,
    pp_rank: int,
    **prefixes,
) -> None:
    """Copies HF tensors into this rank's model stage, checking every name and shape.

    Raises:
        KeyError / ValueError: naming the missing, unexpected or mis-shaped parameter.
    """
    include_head = prefixes.pop("include_head", True)
    mapped = hf_to_megatron(
        hf_state,
        cfg,
        tp_rank,
        pp_rank,
        te_names=uses_te_names(model),
        include_head=include_head,
        **prefixes,
    )
    params = dict(model.named_parameters())
    for name, tensor in mapped.items():
        if name not in params:
            raise KeyError(f"model has no parameter {name!r}")
        if params[name].shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {name!r}: model {tuple(params[name].shape)}, "
                f"checkpoint gives {tuple(tensor.shape)}"
            )
    missing = [
        n for n in params if n not in mapped and (include_head or not n.startswith("pooling."))
    ]
    if missing:
        raise KeyError(f"no source tensor for model parameter(s): {missing}")
    with torch.no_grad():
        for name, tensor in mapped.items():
            params[name].copy_(tensor)


def model_to_hf_shard(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters (megatron names), detached, for `megatron_to_hf`."""
    return {n: p.detach() for n, p in model.named_parameters()}
