"""`NVEmbedModel`: megatron-core decoder blocks + a pooling head -> one embedding per sequence.

The backbone is composed from megatron-core parts (vocab-parallel embedding, RoPE,
`TransformerBlock` with the final RMSNorm) and allocates no output layer. The first pipeline stage
owns the embedding, the last owns the final norm and the pooling head and returns embeddings.

Layouts: inputs are [b, s]; megatron-core's hidden states are [s, b, h]; embeddings are [b, d].
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nvembed.config import EmbeddingModelConfig, padded_vocab_size
from megatron_nvembed.model.pooling import build_pooling
from megatron_nvembed.model.specs import build_attention_mask, get_layer_spec, resolve_backend


class NVEmbedModel(MegatronModule):
    """Bidirectional (or causal) decoder + pooling head.

    Args:
        config: megatron-core TransformerConfig (see `build.transformer_config`).
        model_config: the project's `EmbeddingModelConfig` (backbone, pooling, parallel).
        pg_collection: megatron-core `ProcessGroupCollection` with `tp`, `pp`, `cp` groups.
        pre_process: this rank holds the first pipeline stage (token embedding).
        post_process: this rank holds the last pipeline stage (final norm + pooling head).
    """

    def __init__(
        self,
        config: TransformerConfig,
        model_config: EmbeddingModelConfig,
        pg_collection,
        pre_process: bool = True,
        post_process: bool = True,
    ):
        super().__init__(config=config)
        from megatron.core.enums import ModelType

        # megatron-core's pipeline schedules read this attribute.
        self.model_type = ModelType.encoder_or_decoder
        # ... and megatron-core's gradient finalisation this one (no output layer to tie).
        self.share_embeddings_and_output_weights = False
        self.model_config = model_config
        m = model_config.model
        self.backend = resolve_backend(m)
        self.mask_type = m.mask_type
        self.pre_process = pre_process
        self.post_process = post_process
        self.pg_collection = pg_collection
        tp = pg_collection.tp.size()
        self.vocab_size = m.vocab_size
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=padded_vocab_size(m.vocab_size, tp),
                max_sequence_length=1,  # unused with RoPE (no learned positions)
                position_embedding_type="rope",
                tp_group=pg_collection.tp,
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=m.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
            cp_group=pg_collection.cp,
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=get_layer_spec(self.backend, m.mask_type),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
        )
        self.pooling = (
            build_pooling(m.hidden_size, model_config.pooling, config, pg_collection.tp)
            if post_process
            else None
        )

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline hook: the activations received from the previous stage."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0] if input_tensor else None
        self.decoder.set_input_tensor(input_tensor)

    def encode_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Backbone only (this stage's layers).

        Args:
            input_ids: [b, s] token ids (used on the first stage only).
            attention_mask: [b, s], 1 for real tokens, 0 for padding.

        Returns:
            [s, b, h]: this stage's output (after the final norm on the last stage).
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        seq_len = attention_mask.shape[1]
        rotary = self.rotary_pos_emb(seq_len)
        if rotary.device != attention_mask.device:
            rotary = rotary.to(attention_mask.device)
        mask = build_attention_mask(attention_mask, self.backend, self.mask_type)
        return self.decoder(hidden_states=decoder_input, attention_mask=mask, rotary_pos_emb=rotary)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeds a batch.

        Args:
            input_ids: [b, s] token ids, right-padded.
            attention_mask: [b, s], 1 for real tokens.
            pool_mask: [b, s], 1 for tokens that enter pooling (instruction tokens are 0);
                defaults to `attention_mask`.

        Returns:
            [b, d] embeddings on the last pipeline stage; [s, b, h] activations elsewhere.
        """
        hidden = self.encode_hidden(input_ids, attention_mask)
        if not self.post_process:
            return hidden
        if pool_mask is None:
            pool_mask = attention_mask
        return self.pooling(hidden, attention_mask, pool_mask)
