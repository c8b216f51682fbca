"""Configuration of NV-Embed-format models exported by megatron_nvembed.

Self-contained (depends on transformers only): it is copied next to exported weights and loaded
with `trust_remote_code=True`.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

try:
    from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
except ImportError:  # transformers before 4.51: no Qwen3 backbones
    Qwen3Config = None


class LatentAttentionConfig(PretrainedConfig):
    """Sizes of the latent-attention pooling head (every size written explicitly)."""

    model_type = "latent_attention"

    def __init__(
        self,
        num_latents_value: int = 512,
        num_cross_heads: int = 8,
        cross_dim_head: int = 4096,
        hidden_dim: int = 4096,
        latent_dim: int = 4096,
        output_normalize: bool = True,
        ff_mult: int = 4,
        layernorm_eps: float = 1e-5,
        pooling_type: str = "latent",
        **kwargs,
    ):
        self.num_latents_value = num_latents_value
        self.num_cross_heads = num_cross_heads
        self.cross_dim_head = cross_dim_head
        self.hidden_dim = hidden_dim
        self.latent_dim = latent_dim
        self.output_normalize = output_normalize
        self.ff_mult = ff_mult
        self.layernorm_eps = layernorm_eps
        # "latent" (NV-Embed), "self-attention" (the paper's ablation head), "mean" or "eos".
        self.pooling_type = pooling_type
        super().__init__(**kwargs)


class PoolingHeadConfig(LatentAttentionConfig):
    """A pooling head that NV-Embed's own model code does not implement (self-attention, mean,
    EOS). Its own model_type makes that code refuse such an export when loading it, instead of
    computing a latent-attention head that was never trained."""

    model_type = "nvembed_pooling"


class BidirectionalMistralConfig(MistralConfig):
    """A Mistral config whose model runs with a padding-only (bidirectional) mask."""

    model_type = "bidir_mistral"


class BidirectionalQwen2Config(Qwen2Config):
    """A Qwen2 config whose model runs with a padding-only (bidirectional) mask."""

    model_type = "bidir_qwen2"


if Qwen3Config is not None:

    class BidirectionalQwen3Config(Qwen3Config):
        """A Qwen3 config whose model runs with a padding-only (bidirectional) mask."""

        model_type = "bidir_qwen3"

else:
    BidirectionalQwen3Config = None


def head_config(values: dict) -> LatentAttentionConfig:
    """The head's config class for its pooling type (latent: NV-Embed's own)."""
    values = {k: v for k, v in values.items() if k != "model_type"}
    if values.get("pooling_type", "latent") == "latent":
        return LatentAttentionConfig(**values)
    return PoolingHeadConfig(**values)


def backbone_config(values: dict) -> PretrainedConfig:
    """The backbone's config: `bidir_mistral` / `bidir_qwen2` / `bidir_qwen3` (padding-only
    mask) or `mistral` / `qwen2` / `qwen3` (causal), so that any loader that builds the backbone
    from its model_type applies the right mask."""
    values = dict(values)
    kind = values.pop("model_type", "bidir_mistral")
    classes = {
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "bidir_qwen2": BidirectionalQwen2Config,
        "qwen3": Qwen3Config,
        "bidir_qwen3": BidirectionalQwen3Config,
    }
    if kind in ("qwen3", "bidir_qwen3") and Qwen3Config is None:
        raise ValueError(f"text_config model_type {kind!r} needs transformers >= 4.51 (Qwen3)")
    return classes.get(kind, BidirectionalMistralConfig)(**values)


class NVEmbedConfig(PretrainedConfig):
    """Top-level config: a Mistral, Qwen2 or Qwen3 backbone (`mask_type` "b": bidirectional,
    "c": causal) plus the pooling head."""

    model_type = "nvembed"
    is_composition = False

    def __init__(
        self,
        latent_attention_config: dict | LatentAttentionConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        padding_side: str = "right",
        add_pad_token: bool = True,
        is_mask_instruction: bool = True,
        add_eos: bool = True,
        mask_type: str = "b",
        **kwargs,
    ):
        if isinstance(latent_attention_config, dict):
            latent_attention_config = head_config(latent_attention_config)
        self.latent_attention_config = latent_attention_config or LatentAttentionConfig()
        if isinstance(text_config, dict):
            text_config = backbone_config(text_config)
        self.text_config = text_config or BidirectionalMistralConfig()
        self.padding_side = padding_side
        self.add_pad_token = add_pad_token
        self.is_mask_instruction = is_mask_instruction
        self.add_eos = add_eos
        self.mask_type = mask_type
        kwargs.setdefault("hidden_size", self.text_config.hidden_size)
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["latent_attention_config"] = self.latent_attention_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out
