"""A plain-torch NV-Embed reference: transformers' MistralModel with a padding-only mask plus the
latent-attention head of the exported HF model files (`hf_model/modeling_nvembed.py`),
in NV-Embed's own key layout.

It shares no code with `NVEmbedModel` (no megatron-core, no tensor parallelism), so parity
between the two checks the backbone, the mask, the head and the weight map at once. It is also
the reference of the HF-side parity checks in benchmarks and conversion tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_nvembed.conversion.hf_config import latent_attention_config_dict
from megatron_nvembed.core.config import EmbeddingModelConfig
from megatron_nvembed.hf_model.configuration_nvembed import LatentAttentionConfig
from megatron_nvembed.hf_model.modeling_nvembed import (
    LatentAttentionModel,
    padding_mask_4d,
)


def mistral_config(cfg: EmbeddingModelConfig):
    """A transformers `MistralConfig` with the backbone sizes of `cfg`.

    Raises:
        ValueError: a backbone feature MistralModel lacks (`add_qkv_bias`, `qk_layernorm`,
            `rope_scaling_factor`); such backbones are compared with transformers' own
            Qwen2Model / Qwen3Model / LlamaModel (`testing.tiny_hf_backbone`).
    """
    from transformers import MistralConfig

    m = cfg.model
    for name in ("add_qkv_bias", "qk_layernorm", "rope_scaling_factor"):
        if getattr(m, name) not in (False, None):
            raise ValueError(f"the Mistral reference has no {name} (set to {getattr(m, name)!r})")
    return MistralConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.head_dim,
        rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rotary_base,
        sliding_window=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


class ReferenceEmbedder(nn.Module):
    """transformers MistralModel (bidirectional via a padding-only 4-D mask) + reference head."""

    def __init__(self, cfg: EmbeddingModelConfig):
        super().__init__()
        from transformers import MistralModel

        self.cfg = cfg
        self.embedding_model = MistralModel(mistral_config(cfg))
        self.latent_attention_model = None
        if cfg.pooling.type in ("latent", "self-attention"):
            head_cfg = LatentAttentionConfig(**latent_attention_config_dict(cfg))
            self.latent_attention_model = LatentAttentionModel(head_cfg)

    def forward(self, input_ids, attention_mask, pool_mask=None):
        if pool_mask is None:
            pool_mask = attention_mask
        causal = self.cfg.model.mask_type == "causal"
        mask = padding_mask_4d(attention_mask, causal, self.embedding_model.dtype)
        hidden = self.embedding_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self.latent_attention_model is not None:
            return self.latent_attention_model(hidden, attention_mask, pool_mask)
        if self.cfg.pooling.type == "mean":
            m = pool_mask.to(hidden.dtype).unsqueeze(-1)
            emb = (hidden * m).sum(1) / m.sum(1)
        else:  # eos
            last = attention_mask.long().sum(1) - 1
            emb = hidden[torch.arange(hidden.shape[0]), last]
        return F.normalize(emb, dim=-1) if self.cfg.pooling.normalize else emb

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """NV-Embed-layout keys: `embedding_model.*` and `latent_attention_model.*`."""
        return {k: v for k, v in self.state_dict().items() if not k.endswith("inv_freq")}
