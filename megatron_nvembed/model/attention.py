"""Core attention on `torch.nn.functional.scaled_dot_product_attention`.

A drop-in `core_attention` module for megatron-core's `SelfAttention` (same constructor and
forward contract as megatron-core's `DotProductAttention`): on GPU, SDPA dispatches to fused
memory-efficient / cuDNN kernels; on CPU it runs the math kernel. The attention mask follows
megatron-core's convention: boolean, True = masked out, broadcastable to [b, heads, s_q, s_k]
(this project passes [b, 1, 1, s] for padding-only masks and [b, 1, s, s] for causal+padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


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
        if packed_seq_params is not None:
            raise ValueError("packed sequences need the Transformer Engine backend")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the sdpa backend")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, dh] -> [b, n, s, dh]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
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
