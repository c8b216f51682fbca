"""Configs between this project (`EmbeddingModelConfig`) and transformers / NV-Embed config.json."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_nvembed.config import EmbeddingModelConfig, ModelConfig, PoolingConfig

BACKBONE_TYPES = ("mistral", "llama", "bidir_mistral")


def model_config_from_hf(text: dict, where: str) -> ModelConfig:
    """Backbone sizes from a Mistral/Llama config dict.

    Raises:
        ValueError: naming `where` (the config file) and the unsupported model_type or key.
    """
    mtype = text.get("model_type")
    if mtype not in BACKBONE_TYPES:
        raise ValueError(
            f"{where}: unsupported model_type {mtype!r}; supported: {BACKBONE_TYPES} and 'nvembed'"
        )
    try:
        heads = text["num_attention_heads"]
        hidden = text["hidden_size"]
        return ModelConfig(
            vocab_size=text["vocab_size"],
            hidden_size=hidden,
            ffn_hidden_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=text.get("num_key_value_heads") or heads,
            kv_channels=text.get("head_dim") or hidden // heads,
            rotary_base=float(
                text.get(
                    "rope_theta", (text.get("rope_parameters") or {}).get("rope_theta", 10000.0)
                )
            ),
            norm_epsilon=text.get("rms_norm_eps", 1e-5),
        )
    except KeyError as err:
        raise ValueError(f"{where}: missing key {err.args[0]!r}") from err


def config_from_hf_dir(hf_dir: str | Path) -> tuple[EmbeddingModelConfig, bool, str]:
    """Reads `hf_dir/config.json`.

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
        if raw.get("mask_type", "b") == "c" or text["model_type"] == "mistral":
            model.mask_type = "causal"
        return EmbeddingModelConfig(model=model, pooling=pooling), True, "embedding_model."
    model = model_config_from_hf(raw, str(path))
    return EmbeddingModelConfig(model=model), False, ""


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


def text_config_dict(cfg: EmbeddingModelConfig) -> dict:
    """The `text_config` of an NV-Embed config: a `bidir_mistral` (padding-only mask) or, for a
    causal model, a plain `mistral`, which every loader builds as a causal MistralModel.

    `_name_or_path` is "." (this folder): NV-Embed's released code loads the tokenizer from that
    string, relative to the working directory; our model files ignore it and read the folder
    `from_pretrained` was given. No absolute path is written, so the folder can move.
    """
    m = cfg.model
    return {
        "model_type": "bidir_mistral" if m.mask_type == "bidirectional" else "mistral",
        "architectures": ["MistralModel"],
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
        "max_position_embeddings": 32768,
    }
