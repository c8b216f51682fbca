"""NV-Embed-format embedding model for transformers, written by megatron_nvembed.

Self-contained (torch + transformers, and the two files beside it): it is copied next to exported
weights and loaded with `AutoModel.from_pretrained(path, trust_remote_code=True)` under
transformers 4.42 and 5 (a Qwen3 backbone needs 4.51 or later). State-dict keys follow NV-Embed's
layout: `embedding_model.*` (a Mistral, Qwen2 or Qwen3 backbone run with a padding-only mask, i.e.
bidirectionally, or causally when the config's `mask_type` is "c") and `latent_attention_model.*`
(the pooling head; none for mean / EOS).

`encode(texts, instruction="", max_length=512)` follows NV-Embed's conventions: text =
instruction + text + EOS, BOS added by the tokenizer, right padding, and the first
`len(tokenizer.tokenize(instruction))` positions left out of pooling. `instruction` is the
complete prefix, e.g. "Instruct: Given a question, retrieve passages that answer the
question\\nQuery: ". The tokenizer is read from the folder the model was loaded from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MistralModel, PreTrainedModel, Qwen2Config, Qwen2Model

from .configuration_nvembed import LatentAttentionConfig, NVEmbedConfig, Qwen3Config
from .tokenization_nvembed import load_tokenizer


class GEGLU(nn.Module):
    """[value ; gate] -> value * gelu(gate) (exact GELU)."""

    def forward(self, x):
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class CrossAttention(nn.Module):
    """Multi-head attention from token queries to a context (latents or the tokens themselves)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)  # rows [K ; V]
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, context, key_mask=None):
        b = x.shape[0]
        q = self.to_q(x).view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # [b, H, s, dh]
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.view(k.shape[0], -1, self.heads, self.dim_head).transpose(1, 2)  # [b|1, H, r, dh]
        v = v.view(v.shape[0], -1, self.heads, self.dim_head).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / self.dim_head**0.5  # [b, H, s, r]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
        o = scores.softmax(dim=-1) @ v  # [b, H, s, dh]
        return self.to_out(o.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, context: bool, eps: float):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim, eps=eps)
        if context:
            self.norm_context = nn.LayerNorm(dim, eps=eps)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, 2 * mult * dim), GEGLU(), nn.Linear(mult * dim, dim)
        )

    def forward(self, x):
        return self.net(x)


class LatentAttentionModel(nn.Module):
    """The pooling head named by `config.pooling_type`:
    - "latent" (NV-Embed): attention to a trainable latent array, GEGLU feed-forward, masked mean;
    - "self-attention" (the paper's ablation): the same block attending to the tokens;
    - "mean": masked mean of the backbone's states (no parameters);
    - "eos": the state of the last real token (no parameters; the EOS with right padding).
    Then an L2 norm when `output_normalize`."""

    def __init__(self, config: LatentAttentionConfig):
        super().__init__()
        d = config.latent_dim
        # Read with NV-Embed's defaults: in a process that also imported NV-Embed's released
        # config code, transformers 5 builds the config with that code's registered classes,
        # which keep only NV-Embed's own keys (a latent head; weights of another size fail to
        # load, and other heads are a head type that code refuses).
        self.pooling_type = getattr(config, "pooling_type", "latent")
        self.normalize = config.output_normalize
        ff_mult = getattr(config, "ff_mult", 4)
        eps = getattr(config, "layernorm_eps", 1e-5)
        if self.pooling_type not in ("latent", "self-attention", "mean", "eos"):
            raise ValueError(f"unknown pooling_type {self.pooling_type!r} in the model config")
        if self.pooling_type in ("mean", "eos"):
            return
        self_attention = self.pooling_type == "self-attention"
        if not self_attention:
            self.latents = nn.Parameter(torch.randn(config.num_latents_value, d))
        self.cross_attend_blocks = nn.ModuleList(
            [
                PreNorm(
                    d,
                    CrossAttention(d, config.num_cross_heads, config.cross_dim_head),
                    not self_attention,
                    eps,
                ),
                PreNorm(d, FeedForward(d, ff_mult), False, eps),
            ]
        )

    def forward(self, hidden, attention_mask, pool_mask):
        """hidden [b, s, d]; attention_mask, pool_mask [b, s] -> [b, d]."""
        if self.pooling_type == "eos":
            last = attention_mask.long().sum(1) - 1  # [b]
            emb = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            return F.normalize(emb, dim=-1) if self.normalize else emb
        if self.pooling_type == "mean":
            x2 = hidden
        else:
            attn, ff = self.cross_attend_blocks
            x = attn.norm(hidden)
            if self.pooling_type == "self-attention":
                x1 = hidden + attn.fn(x, x, key_mask=attention_mask)
            else:
                ctx = attn.norm_context(self.latents).unsqueeze(0)  # [1, r, d]
                x1 = hidden + attn.fn(x, ctx)
            x2 = x1 + ff.fn(ff.norm(x1))
        m = pool_mask.to(x2.dtype).unsqueeze(-1)
        emb = (x2 * m).sum(1) / m.sum(1).clamp(min=1.0)
        return F.normalize(emb, dim=-1) if self.normalize else emb


def padding_mask_4d(attention_mask, causal: bool, dtype):
    """Additive [b, 1, s, s] mask: 0 where a query may attend a key, dtype-min elsewhere."""
    s = attention_mask.shape[1]
    keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, s, -1)
    if causal:
        keep = keep & torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    out = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return out.masked_fill(~keep, torch.finfo(dtype).min)


def backbone_model(text) -> nn.Module:
    """transformers' model for the backbone config: Qwen3Model, Qwen2Model or MistralModel."""
    if Qwen3Config is not None and isinstance(text, Qwen3Config):
        from transformers import Qwen3Model

        return Qwen3Model(text)
    if isinstance(text, Qwen2Config):
        return Qwen2Model(text)
    return MistralModel(text)


class NVEmbedModel(PreTrainedModel):
    """Mistral / Qwen2 / Qwen3 backbone (bidirectional, or causal for mask_type "c") + pooling
    head."""

    config_class = NVEmbedConfig
    base_model_prefix = ""
    _no_split_modules = [
        "MistralDecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen3DecoderLayer",
        "LatentAttentionModel",
    ]

    def __init__(self, config: NVEmbedConfig):
        super().__init__(config)
        text = config.text_config
        text._attn_implementation = (
            "eager" if text._attn_implementation is None else text._attn_implementation
        )
        self.embedding_model = backbone_model(text)
        self.latent_attention_model = LatentAttentionModel(config.latent_attention_config)
        self.tokenizer = None
        self.post_init()

    def _init_weights(self, module):  # weights always come from the checkpoint
        pass

    def forward(self, input_ids, attention_mask, pool_mask=None, **kwargs):
        """input_ids, attention_mask, pool_mask [b, s] -> {"sentence_embeddings": [b, d]}."""
        if pool_mask is None:
            pool_mask = attention_mask
        dtype = self.embedding_model.embed_tokens.weight.dtype
        mask = padding_mask_4d(attention_mask, self.config.mask_type == "c", dtype)
        hidden = self.embedding_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        emb = self.latent_attention_model(hidden, attention_mask, pool_mask)
        return {"sentence_embeddings": emb}

    def load_tokenizer(self):
        """The tokenizer stored beside the weights (the folder `from_pretrained` read)."""
        if self.tokenizer is None:
            folder = self.config.name_or_path
            if not folder:
                raise ValueError(
                    "no tokenizer: load the model with from_pretrained(folder), or set "
                    "model.tokenizer"
                )
            self.tokenizer = load_tokenizer(folder)
        return self.tokenizer

    def prepare_kwargs_from_batch(self, texts, instruction: str = "", max_length: int = 512):
        """Tokenises like NV-Embed: instruction + text + EOS, BOS, right padding, pool mask."""
        tok = self.load_tokenizer()
        batch = tok(
            [instruction + t + tok.eos_token for t in texts],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        pool = batch["attention_mask"].clone()
        if instruction and self.config.is_mask_instruction:
            pool[:, : len(tok.tokenize(instruction))] = 0
        device = self.embedding_model.embed_tokens.weight.device
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
            "pool_mask": pool.to(device),
        }

    @torch.no_grad()
    def encode(self, texts, instruction: str = "", max_length: int = 512, **kwargs):
        """Embeddings [n, d] of `texts` (queries get an instruction prefix, documents none)."""
        return self(**self.prepare_kwargs_from_batch(list(texts), instruction, max_length))[
            "sentence_embeddings"
        ]
