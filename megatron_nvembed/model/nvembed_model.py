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
from megatron_nvembed.model.specs import (
    build_attention_mask,
    build_packed_attention_mask,
    get_layer_spec,
    packed_position_ids,
    resolve_backend,
)


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

    def encode_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Backbone only (this stage's layers).

        Args:
            input_ids: [b, s] token ids (used on the first stage only).
            attention_mask: [b, s], 1 for real tokens, 0 for padding.
            segment_ids: [b, s] packed rows (see `megatron_nvembed.data.packing`): 0 = padding,
                1..k = the k-th text of the row. Each text attends only to itself and its RoPE
                positions restart at 0. None: one text per row.

        Returns:
            [s, b, h]: this stage's output (after the final norm on the last stage).

        Raises:
            ValueError: `segment_ids` with the Transformer Engine backend.
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        seq_len = attention_mask.shape[1]
        rotary = self.rotary_pos_emb(seq_len)  # [s, 1, 1, d]
        if rotary.device != attention_mask.device:
            rotary = rotary.to(attention_mask.device)
        if segment_ids is None:
            mask = build_attention_mask(attention_mask, self.backend, self.mask_type)
        else:
            if self.backend == "te":
                raise ValueError(
                    "sequence packing (segment_ids) is implemented for the sdpa and local "
                    "attention backends only; the Transformer Engine path (THD layout with "
                    "cu_seqlens) is not implemented here: use --attention-backend sdpa"
                )
            if segment_ids.shape != attention_mask.shape:
                raise ValueError(
                    f"segment_ids {tuple(segment_ids.shape)} must have the shape of "
                    f"attention_mask {tuple(attention_mask.shape)}"
                )
            mask = build_packed_attention_mask(segment_ids, self.mask_type)  # [b, 1, s, s]
            positions = packed_position_ids(segment_ids)  # [b, s]
            rotary = rotary[:, 0, 0][positions.t()].unsqueeze(2)  # [s, b, 1, d]
        return self.decoder(hidden_states=decoder_input, attention_mask=mask, rotary_pos_emb=rotary)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeds a batch.

        Args:
            input_ids: [b, s] token ids, right-padded (or packed rows with `segment_ids`).
            attention_mask: [b, s], 1 for real tokens.
            pool_mask: [b, s], 1 for tokens that enter pooling (instruction tokens are 0);
                defaults to `attention_mask`.
            segment_ids: [b, s] packed rows (see `megatron_nvembed.data.packing.pack_batch`):
                0 = padding, 1..k = the k-th text of the row, each text contiguous. None: one
                text per row.

        Returns:
            [b, d] embeddings on the last pipeline stage ([n_texts, d] with `segment_ids`, in
            packed order: row-major by (row, segment)); [s, b, h] activations elsewhere.
        """
        hidden = self.encode_hidden(input_ids, attention_mask, segment_ids)
        if not self.post_process:
            return hidden
        if pool_mask is None:
            pool_mask = attention_mask
        if segment_ids is not None:
            hidden, attention_mask, pool_mask = unpack_hidden(hidden, segment_ids, pool_mask)
        return self.pooling(hidden, attention_mask, pool_mask)


def unpack_hidden(
    hidden_sbh: torch.Tensor, segment_ids: torch.Tensor, pool_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed rows -> one right-padded row per text, for the pooling head.

    Args:
        hidden_sbh: [s, b, h] final states of packed rows.
        segment_ids: [b, s], 0 = padding, 1..k = the k-th text of the row (contiguous).
        pool_mask: [b, s] packed pool mask.

    Returns:
        hidden [max_len, n, h], attention_mask [n, max_len], pool_mask [n, max_len], with the n
        texts in packed order (row-major by (row, segment)); padding states are zero.
    """
    seg = segment_ids.long()
    per_row = seg.max(dim=1).values  # [b] texts per row
    offsets = torch.cumsum(per_row, 0) - per_row  # [b] first text index of each row
    real = seg > 0
    rows, cols = real.nonzero(as_tuple=True)  # real tokens, row-major
    text = offsets[rows] + seg[rows, cols] - 1  # [tokens] text index
    pos = packed_position_ids(seg)[rows, cols]  # [tokens] position within its text
    n = int(per_row.sum())
    lengths = torch.bincount(text, minlength=n)  # [n]
    width = int(lengths.max())
    h = hidden_sbh.shape[-1]
    out = hidden_sbh.new_zeros(n, width, h).index_put((text, pos), hidden_sbh[cols, rows])
    attn = (torch.arange(width, device=seg.device)[None, :] < lengths[:, None]).long()
    pool = pool_mask.new_zeros(n, width).index_put((text, pos), pool_mask[rows, cols])
    return out.transpose(0, 1), attn, pool
