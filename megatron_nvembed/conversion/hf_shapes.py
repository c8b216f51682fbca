"""A source's tensor shapes against its config, checked before anything is allocated.

`hf_shapes` gives every HF tensor's expected shape (each dimension with the config field that
sizes it) from the same rules as the mapping (`hf_mapping`); `check_hf_shapes` compares the
shapes of a source's weight-file headers with them, so a config and weights that disagree are
refused in one line naming the file and the field before a model is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from megatron_nvembed.conversion.hf_mapping import (
    EMBEDDING_RULE,
    FINAL_NORM_RULE,
    HEAD_RULES,
    head_rules,
    layer_rules,
)
from megatron_nvembed.core.config import EmbeddingModelConfig


def hf_shapes(cfg: EmbeddingModelConfig) -> dict[str, tuple[tuple[int, str], ...]]:
    """HF name (without prefix; layer names without `layers.N.`) -> the full tensor's expected
    shape, each dimension with the config field(s) that size it, for every name `stage_rules`
    can give for this config."""
    m, p = cfg.model, cfg.pooling
    vocab, hidden = (m.vocab_size, "vocab_size"), (m.hidden_size, "hidden_size")
    ffn = (m.ffn_hidden_size, "intermediate_size")
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    q = (m.num_attention_heads * kv, "num_attention_heads x head_dim")
    k = (m.num_query_groups * kv, "num_key_value_heads x head_dim")
    out = {
        "embed_tokens.weight": (vocab, hidden),
        "norm.weight": (hidden,),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.k_proj.weight": (k, hidden),
        "self_attn.v_proj.weight": (k, hidden),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (k,),
        "self_attn.v_proj.bias": (k,),
        "self_attn.q_norm.weight": ((kv, "head_dim"),),
        "self_attn.k_norm.weight": ((kv, "head_dim"),),
        "self_attn.o_proj.weight": (hidden, q),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    inner_n = p.num_heads * (p.head_dim or m.hidden_size)
    inner = (inner_n, "num_cross_heads x cross_dim_head")
    ff = (p.ff_mult * m.hidden_size, "ff_mult x hidden_size")
    head = {
        "latents": ((p.num_latents, "num_latents_value"), hidden),
        "norm_context.weight": (hidden,),
        "norm_context.bias": (hidden,),
        "norm.weight": (hidden,),
        "norm.bias": (hidden,),
        "to_q": (inner, hidden),
        "to_kv": ((2 * inner_n, "2 x " + inner[1]), hidden),
        "to_out": (hidden, inner),
        "ff_norm.weight": (hidden,),
        "ff_norm.bias": (hidden,),
        "ff_in.weight": ((2 * ff[0], "2 x " + ff[1]), hidden),
        "ff_in.bias": ((2 * ff[0], "2 x " + ff[1]),),
        "ff_out.weight": (hidden, ff),
        "ff_out.bias": (hidden,),
    }
    out.update({"h:" + HEAD_RULES[k].hf[0]: shape for k, shape in head.items()})
    return out


def check_hf_shapes(
    cfg: EmbeddingModelConfig,
    shapes: Mapping[str, tuple[tuple[int, ...], object]],
    *,
    config_file: object,
    weights_file: object,
    backbone_prefix: str = "",
    head_prefix: str = "latent_attention_model.",
    include_head: bool = True,
) -> None:
    """Checks the source's tensors against its config before anything is allocated: the
    decoder layers present (`{prefix}layers.N.`) are exactly 0 .. num_hidden_layers - 1, and every
    key the import reads is present with the shape the config gives (the embedding's rows are
    vocab_size, ...). Only `shapes` (from the weight files' headers) is read.

    Args:
        shapes: HF key -> (shape, the file holding it) (`LazyHFState.shapes`).
        config_file, weights_file: named in the messages (config.json; the weights file or
            index).

    Raises:
        ValueError: one line naming the file and the config field or key at fault.
    """
    m = cfg.model
    layer_key = re.compile(re.escape(backbone_prefix) + r"layers\.(\d+)\.")
    present = sorted({int(x.group(1)) for k in shapes if (x := layer_key.match(k))})
    beyond = bool(present) and present[-1] >= m.num_layers
    if not beyond and present != list(range(len(present))):
        gap = next(i for i in range(m.num_layers) if i not in present)
        raise ValueError(
            f"{weights_file}: no {backbone_prefix}layers.{gap}.* keys, a layer that "
            f"{config_file}'s num_hidden_layers {m.num_layers} needs"
        )
    if beyond or len(present) != m.num_layers:
        span = f"{backbone_prefix}layers.N keys up to N = {present[-1]}" if present else "none"
        raise ValueError(
            f"{config_file}: num_hidden_layers is {m.num_layers}, but {weights_file} holds "
            f"{len(present)} decoder layer(s) ({span})"
        )
    expected = hf_shapes(cfg)
    checks = [(backbone_prefix + n, n) for n in (*EMBEDDING_RULE.hf, *FINAL_NORM_RULE.hf)]
    for i in range(m.num_layers):
        checks += [
            (f"{backbone_prefix}layers.{i}.{n}", n) for rule in layer_rules(cfg) for n in rule.hf
        ]
    if include_head:
        checks += [(head_prefix + n, "h:" + n) for rule in head_rules(cfg) for n in rule.hf]
    for key, name in checks:
        want = tuple(d for d, _ in expected[name])
        if key not in shapes:
            raise ValueError(f"{weights_file}: missing key {key!r} (expected shape {want})")
        shape, where = shapes[key]
        if tuple(shape) != want:
            fields = " x ".join(f for _, f in expected[name])
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(shape)}; {config_file} gives {want} ({fields})"
            )
