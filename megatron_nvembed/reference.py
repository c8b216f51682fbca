"""A plain-torch NV-Embed reference: transformers' MistralModel with a padding-only mask plus the
latent-attention head in NV-Embed's own key layout.

It shares no code with `NVEmbedModel` (no megatron-core, no tensor parallelism), so parity
between the two checks the backbone, the mask, the head and the weight map at once. It is also
the reference of the HF-side parity checks in benchmarks and conversion tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_nvembed.config import EmbeddingModelConfig


class _GEGLU(nn.Module):
    def forward(self, x):
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class _CrossAttention(nn.Module):
    def __init__(self, d: int, heads: int, dh: int):
        super().__init__()
        self.heads, self.dh = heads, dh
        self.to_q = nn.Linear(d, heads * dh, bias=False)
        self.to_kv = nn.Linear(d, 2 * heads * dh, bias=False)
        self.to_out = nn.Linear(heads * dh, d, bias=False)

    def forward(self, x, context, key_mask=None):
        b = x.shape[0]
        q = self.to_q(x).view(b, -1, self.heads, self.dh).transpose(1, 2)  # [b, H, s, dh]
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.view(k.shape[0], -1, self.heads, self.dh).transpose(1, 2)  # [b|1, H, r, dh]
        v = v.view(v.shape[0], -1, self.heads, self.dh).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / self.dh**0.5  # [b, H, s, r]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
        o = scores.softmax(dim=-1) @ v  # [b, H, s, dh]
        return self.to_out(o.transpose(1, 2).reshape(b, -1, self.heads * self.dh))


class _PreNorm(nn.Module):
    def __init__(self, d: int, fn: nn.Module, context: bool, eps: float):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(d, eps=eps)
        if context:
            self.norm_context = nn.LayerNorm(d, eps=eps)


class _FeedForward(nn.Module):
    def __init__(self, d: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 2 * mult * d), _GEGLU(), nn.Linear(mult * d, d))

    def forward(self, x):
        return self.net(x)


class ReferenceAttentionHead(nn.Module):
    """NV-Embed's latent-attention head (kind="latent") or the self-attention variant, plain torch.

    State-dict keys match NV-Embed's `latent_attention_model.*` layout.
    """

    def __init__(self, cfg: EmbeddingModelConfig, kind: str = "latent"):
        super().__init__()
        d, p = cfg.model.hidden_size, cfg.pooling
        dh = p.head_dim or d
        self.kind, self.normalize = kind, p.normalize
        if kind == "latent":
            self.latents = nn.Parameter(torch.randn(p.num_latents, d))
        self.cross_attend_blocks = nn.ModuleList(
            [
                _PreNorm(d, _CrossAttention(d, p.num_heads, dh), kind == "latent", p.layernorm_eps),
                _PreNorm(d, _FeedForward(d, p.ff_mult), False, p.layernorm_eps),
            ]
        )

    def forward(self, hidden_bsh, attention_mask, pool_mask):
        attn, ff = self.cross_attend_blocks
        x = attn.norm(hidden_bsh)
        if self.kind == "latent":
            ctx = attn.norm_context(self.latents).unsqueeze(0)  # [1, r, d]
            x1 = hidden_bsh + attn.fn(x, ctx)
        else:
            x1 = hidden_bsh + attn.fn(x, x, key_mask=attention_mask)
        x2 = x1 + ff.fn(ff.norm(x1))
        m = pool_mask.to(x2.dtype).unsqueeze(-1)
        emb = (x2 * m).sum(1) / m.sum(1)
        return F.normalize(emb, dim=-1) if self.normalize else emb


def mistral_config(cfg: EmbeddingModelConfig):
    """A transformers `MistralConfig` with the backbone sizes of `cfg`."""
    from transformers import MistralConfig

    m = cfg.model
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


def padding_mask_4d(attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive [b, 1, s, s] mask: 0 where a query may attend a key, dtype-min elsewhere."""
    keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)
    if causal:
        s = attention_mask.shape[1]
        keep = keep & torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    out = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return out.masked_fill(~keep, torch.finfo(dtype).min)


class ReferenceEmbedder(nn.Module):
    """transformers MistralModel (bidirectional via a padding-only 4-D mask) + reference head."""

    def __init__(self, cfg: EmbeddingModelConfig):
        super().__init__()
        from transformers import MistralModel

        self.cfg = cfg
        self.embedding_model = MistralModel(mistral_config(cfg))
        kind = {"latent": "latent", "self-attention": "self"}.get(cfg.pooling.type)
        self.latent_attention_model = ReferenceAttentionHead(cfg, kind) if kind else None

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
