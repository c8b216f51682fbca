"""Core attention on `torch.nn.functional.scaled_dot_product_attention`.

A drop-in `core_attention` module for megatron-core's `SelfAttention` (same constructor and
forward contract as megatron-core's `DotProductAttention`): on GPU, SDPA dispatches to fused
memory-efficient / cuDNN kernels; on CPU it runs the math kernel. The attention mask follows
megatron-core's convention: boolean, True = masked out, broadcastable to [b, heads, s_q, s_k]
(this project passes [b, 1, 1, s] for padding-only masks and [b, 1, s, s] for causal+padding).

Packed sequences arrive in megatron-core's THD layout (`PackedSeqParams(qkv_format="thd")`:
q/k/v [t, heads, dh], texts delimited by `cu_seqlens`). Each text attends only to itself:
`torch.nn.attention.varlen.varlen_attn` (flash-attention kernel) on CUDA in fp16/bf16 without
attention dropout; otherwise one SDPA call per text. Either way the attention costs
sum(len_i^2) per head, not a padded square.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

try:  # torch >= 2.9 on CUDA builds; absent or CUDA-only elsewhere
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _varlen_attn = None


def _varlen_kernel_usable(q: torch.Tensor, dropout_p: float) -> bool:
    return (
        _varlen_attn is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and dropout_p == 0.0
    )


def _varlen_causal_kwargs(causal: bool) -> dict:
    """Causal masking for `varlen_attn` across torch versions (`window_size` in newer releases,
    `is_causal` in the first ones)."""
    import inspect

    params = inspect.signature(_varlen_attn).parameters
    if "window_size" in params:
        return {"window_size": (-1, 0) if causal else (-1, -1)}
    return {"is_causal": causal}


class SDPAttention(MegatronModule):
    """Scaled dot-product attention with GQA, for tensor-parallel shards of heads.

    Shapes: query [s_q, b, heads/tp, dh], key/value [s_k, b, groups/tp, dh]; returns
    [s_q, b, heads/tp * dh].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs the Transformer Engine backend")
        if config.window_size is not None:
            # A sliding window would make megatron-core build a causal window mask.
            raise ValueError("window_size must be None for embedding models")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the sdpa backend")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(
                    f"packed sequences must use qkv_format='thd', got "
                    f"{packed_seq_params.qkv_format!r}"
                )
            return self._forward_thd(query, key, value, packed_seq_params, mask_type)
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, dh] -> [b, n, s, dh]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal
        # SDPA's boolean mask is True = attend, the inverse of megatron-core's convention.
        sdpa_mask = None if attention_mask is None else ~attention_mask
        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(
            attn_mask=sdpa_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=self.groups_per_partition != self.heads_per_partition,
        )
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Same RNG stream as megatron-core's attention dropout: distinct per TP rank.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        # [b, n, s, dh] -> [s, b, n*dh]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _forward_thd(self, query, key, value, params, mask_type: AttnMaskType) -> torch.Tensor:
        """Packed texts: query [t, heads/tp, dh], key/value [t, groups/tp, dh] -> [t, heads/tp*dh]."""
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = self.groups_per_partition != self.heads_per_partition
        cu_q, cu_k = params.cu_seqlens_q, params.cu_seqlens_kv
        if cu_k is None:
            cu_k = cu_q
        if cu_k is not cu_q and not torch.equal(cu_q, cu_k):
            raise ValueError("SDPAttention's THD path needs cu_seqlens_q == cu_seqlens_kv")
        t = query.shape[0]
        if _varlen_kernel_usable(query, dropout_p):
            max_len = params.max_seqlen_q
            if max_len is None:
                max_len = int((cu_q[1:] - cu_q[:-1]).max())
            out = _varlen_attn(
                query,
                key,
                value,
                cu_q.to(device=query.device, dtype=torch.int32),
                cu_k.to(device=query.device, dtype=torch.int32),
                max_len,
                max_len,
                scale=self.softmax_scale,
                enable_gqa=gqa,
                **_varlen_causal_kwargs(causal),
            )
            return out.reshape(t, -1)

        def per_text():
            bounds = cu_q.tolist()
            outs = []
            for start, end in zip(bounds[:-1], bounds[1:]):
                # [len, n, dh] -> [1, n, len, dh]
                q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
                o = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    dropout_p=dropout_p,
                    is_causal=causal,
                    scale=self.softmax_scale,
                    enable_gqa=gqa,
                )
                outs.append(o[0].transpose(0, 1))  # [len, n, dh]
            return torch.cat(outs).reshape(t, -1)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return per_text()
        return per_text()
