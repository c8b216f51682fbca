"""Configs between this project (`EmbeddingModelConfig`) and transformers / NV-Embed config.json."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_nvembed.conversion.st_layout import read_st_layout
from megatron_nvembed.core.config import EmbeddingModelConfig, ModelConfig, PoolingConfig

BACKBONE_TYPES = (
    "mistral",
    "llama",
    "bidir_mistral",
    "qwen2",
    "qwen3",
    "bidir_qwen2",
    "bidir_qwen3",
)
"""model_type values read as a backbone (`bidir_*`: the text_config of this project's NV-Embed
exports, the same architecture run with a padding-only mask)."""

# The architecture behind each backbone model_type, and what it adds to the Mistral/Llama layer.
_ARCHITECTURE = {
    "mistral": "mistral",
    "bidir_mistral": "mistral",
    "llama": "llama",
    "qwen2": "qwen2",
    "bidir_qwen2": "qwen2",
    "qwen3": "qwen3",
    "bidir_qwen3": "qwen3",
}


LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def _rope_settings(text: dict, where: str) -> dict:
    """`ModelConfig` RoPE fields: theta from `rope_theta` or transformers 5's `rope_parameters`,
    and Llama 3.x frequency scaling (`rope_type: llama3`, in `rope_scaling` or
    `rope_parameters`; transformers applies it the same way in each of these architectures, and
    an exported Llama 3 backbone is written as Mistral). Any other RoPE variant (linear, dynamic,
    yarn, ... scaling; partial rotary) is refused, naming the key."""
    params = text.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: rope_parameters must be an object, got {params!r}")
    scaling, key = params, "rope_parameters"
    legacy = text.get("rope_scaling")
    if legacy is not None:
        if not isinstance(legacy, dict):
            raise ValueError(f"{where}: rope_scaling must be an object or null, got {legacy!r}")
        scaling, key = legacy, "rope_scaling"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    for name, value in (
        ("partial_rotary_factor", text.get("partial_rotary_factor")),
        (f"{key}.partial_rotary_factor", scaling.get("partial_rotary_factor")),
    ):
        if value not in (None, 1, 1.0):
            raise ValueError(f"{where}: {name} {value!r} is not supported (RoPE on the whole head)")
    out = {"rotary_base": float(text.get("rope_theta", params.get("rope_theta", 10000.0)))}
    if kind == "default":
        return out
    if kind != "llama3":
        raise ValueError(
            f"{where}: {key}.rope_type {kind!r} is not supported (only plain RoPE, 'default', "
            "and Llama 3.x's 'llama3' scaling)"
        )
    extra = set(scaling) - set(LLAMA3_ROPE_KEYS) - {"rope_type", "type", "rope_theta"}
    if extra:
        raise ValueError(f"{where}: {key} has key(s) {sorted(extra)} that llama3 scaling lacks")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"{where}: {key} (rope_type 'llama3') lacks {key}.{missing[0]}")
    out.update(
        rope_scaling_factor=float(scaling["factor"]),
        rope_scaling_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_scaling_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_scaling_original_max_position_embeddings=scaling["original_max_position_embeddings"],
    )
    return out


def _refuse_unsupported(text: dict, arch: str, where: str) -> None:
    """Raises ValueError naming the first config key whose feature the backbone does not have."""
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with 'silu' only)")
    if arch in ("llama", "qwen3") and text.get("attention_bias"):
        raise ValueError(
            f"{where}: attention_bias true is not supported (it adds a bias to the output "
            "projection too; only Qwen2's Q/K/V biases are)"
        )
    if arch == "llama" and text.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias true is not supported (bias-free MLP only)")
    if arch in ("qwen2", "qwen3"):
        if text.get("use_sliding_window"):
            raise ValueError(
                f"{where}: use_sliding_window true is not supported (full attention only)"
            )
        layer_types = text.get("layer_types") or []
        sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
        if sliding:
            raise ValueError(
                f"{where}: layer_types has {layer_types[sliding[0]]!r} at layer {sliding[0]}; "
                "only 'full_attention' is supported"
            )


def model_config_from_hf(text: dict, where: str) -> ModelConfig:
    """Backbone sizes from a Mistral / Llama / Qwen2 (Qwen2.5) / Qwen3 config dict.

    Qwen2 sets `add_qkv_bias`, Qwen3 `qk_layernorm` (and its `head_dim`, which need not be
    hidden_size / num_attention_heads, becomes `kv_channels`); Llama 3.x's `llama3` RoPE
    scaling sets the `rope_scaling_*` fields.

    Raises:
        ValueError: naming `where` (the config file) and the unsupported model_type or key
            (RoPE scaling other than Llama's llama3, sliding-window attention, biases other than
            Qwen2's Q/K/V, another activation).
    """
    mtype = text.get("model_type")
    if mtype not in BACKBONE_TYPES:
        raise ValueError(
            f"{where}: unsupported model_type {mtype!r}; supported: {BACKBONE_TYPES} and 'nvembed'"
        )
    arch = _ARCHITECTURE[mtype]
    _refuse_unsupported(text, arch, where)
    for key in _REQUIRED_SIZES:
        if key not in text:
            raise ValueError(f"{where}: missing key {key!r}")
    check_sizes(text, _REQUIRED_SIZES + _OPTIONAL_SIZES, where)
    heads, hidden = text["num_attention_heads"], text["hidden_size"]
    groups = text.get("num_key_value_heads") or heads
    if not text.get("head_dim") and hidden % heads:
        raise ValueError(
            f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
            "(and no head_dim is given)"
        )
    if heads % groups:
        raise ValueError(
            f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {groups}"
        )
    return ModelConfig(
        vocab_size=text["vocab_size"],
        hidden_size=hidden,
        ffn_hidden_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=text.get("head_dim") or hidden // heads,
        **_rope_settings(text, where),
        norm_epsilon=text.get("rms_norm_eps", 1e-5),
        add_qkv_bias=arch == "qwen2",
        qk_layernorm=arch == "qwen3",
        **(
            {"max_position_embeddings": text["max_position_embeddings"]}
            if text.get("max_position_embeddings")
            else {}
        ),
    )


_REQUIRED_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
"""Absent or null: derived (positions: `ModelConfig`'s default)."""
_HEAD_SIZES = ("num_latents_value", "num_cross_heads", "cross_dim_head", "ff_mult")


def check_sizes(section: dict, keys: tuple[str, ...], where: str) -> None:
    """Each of `keys` present in `section` (and not null) is a positive integer.

    Raises:
        ValueError: one line naming `where` (the file) and the key.
    """
    for key in keys:
        value = section.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")


def config_from_hf_dir(hf_dir: str | Path) -> tuple[EmbeddingModelConfig, bool, str]:
    """Reads `hf_dir/config.json`, and for a sentence-transformers folder of a plain decoder
    (Qwen3-Embedding's layout) its pooling, normalisation and query prompt (`st_layout`): the
    model is then causal with the matching head and query template.

    Returns:
        (config, has_pooling_head, backbone key prefix).
    """
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if raw.get("model_type") == "nvembed":
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{path}: nvembed config without a text_config")
        text = dict(text, model_type=text.get("model_type", "mistral"))
        model = model_config_from_hf(text, f"{path} (text_config)")
        la = raw.get("latent_attention_config") or {}
        if not isinstance(la, dict):
            raise ValueError(f"{path}: latent_attention_config must be an object, got {la!r}")
        check_sizes(la, _HEAD_SIZES, f"{path} (latent_attention_config)")
        d = model.hidden_size
        pooling = PoolingConfig(
            type=la.get("pooling_type", "latent"),
            num_latents=la.get("num_latents_value", 512),
            num_heads=la.get("num_cross_heads", 8),
            head_dim=la.get("cross_dim_head", d),
            ff_mult=la.get("ff_mult", 4),
            layernorm_eps=la.get("layernorm_eps", 1e-5),
            normalize=la.get("output_normalize", True),
        )
        if raw.get("mask_type", "b") == "c" or text["model_type"] in ("mistral", "qwen2", "qwen3"):
            model.mask_type = "causal"
        return EmbeddingModelConfig(model=model, pooling=pooling), True, "embedding_model."
    cfg = EmbeddingModelConfig(model=model_config_from_hf(raw, str(path)))
    st = read_st_layout(hf_dir)
    if st is not None:  # a sentence-transformers embedding model (e.g. Qwen3-Embedding)
        cfg.pooling.type = st["pooling"]
        cfg.pooling.normalize = st["normalize"]
        cfg.model.mask_type = "causal"  # a plain transformers decoder runs causal
        if st["query_template"] is not None:
            cfg.prompts.query_template = st["query_template"]
    return cfg, False, ""


def latent_attention_config_dict(cfg: EmbeddingModelConfig) -> dict:
    """NV-Embed's `latent_attention_config`, every size written explicitly."""
    d, p = cfg.model.hidden_size, cfg.pooling
    return {
        # NV-Embed's own head type only for its own head: its model code then refuses any other.
        "model_type": "latent_attention" if p.type == "latent" else "nvembed_pooling",
        "num_latents_value": p.num_latents,
        "num_cross_heads": p.num_heads,
        "cross_dim_head": p.head_dim or d,
        "hidden_dim": d,
        "latent_dim": d,
        "output_normalize": p.normalize,
        "ff_mult": p.ff_mult,
        "layernorm_eps": p.layernorm_eps,
        "pooling_type": p.type,
    }


def backbone_architecture(m: ModelConfig) -> str:
    """The transformers architecture of a backbone: `mistral` (also Llama's layout), `qwen2`
    (Q/K/V biases) or `qwen3` (per-head Q/K RMSNorm).

    Raises:
        ValueError: `add_qkv_bias` together with `qk_layernorm`, which no supported
            transformers architecture has.
    """
    if m.add_qkv_bias and m.qk_layernorm:
        raise ValueError(
            "add_qkv_bias together with qk_layernorm has no transformers architecture to export "
            "to (Qwen2 has the biases, Qwen3 the Q/K norms)"
        )
    return "qwen2" if m.add_qkv_bias else "qwen3" if m.qk_layernorm else "mistral"


def text_config_dict(cfg: EmbeddingModelConfig) -> dict:
    """The `text_config` of an NV-Embed config: the backbone's transformers config.

    A Mistral/Llama-layout backbone is a `bidir_mistral` (padding-only mask) or, for a causal
    model, a plain `mistral`, which every loader builds as a causal MistralModel. A Qwen2 / Qwen3
    backbone is `bidir_qwen2` / `bidir_qwen3` (the exported model files build transformers'
    Qwen2Model / Qwen3Model and run it with a padding-only mask) or, causal, a plain `qwen2` /
    `qwen3` config that transformers itself builds as the same architecture. Llama 3.x RoPE
    scaling is written as `rope_scaling` of type `llama3` (transformers >= 4.43 reads it).

    `_name_or_path` is "." (this folder): NV-Embed's released code loads the tokenizer from that
    string, relative to the working directory; our model files ignore it and read the folder
    `from_pretrained` was given. No absolute path is written, so the folder can move.

    Raises:
        ValueError: a backbone with no transformers architecture (`backbone_architecture`).
    """
    m = cfg.model
    arch = backbone_architecture(m)
    names = {"mistral": "MistralModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model"}
    out = {
        "model_type": f"bidir_{arch}" if m.mask_type == "bidirectional" else arch,
        "architectures": [names[arch]],
        "_name_or_path": ".",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.head_dim,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
    }
    if arch != "mistral":
        out.update(use_sliding_window=False, max_window_layers=m.num_layers)
    if arch == "qwen3":
        out["attention_bias"] = False
    if m.rope_scaling_factor is not None:
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": m.rope_scaling_factor,
            "low_freq_factor": m.rope_scaling_low_freq_factor,
            "high_freq_factor": m.rope_scaling_high_freq_factor,
            "original_max_position_embeddings": m.rope_scaling_original_max_position_embeddings,
        }
    return out
