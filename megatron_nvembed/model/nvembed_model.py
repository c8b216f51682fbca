"""`NVEmbedModel`: megatron-core decoder blocks + a pooling head -> one embedding per sequence.

The backbone is composed from megatron-core parts (vocab-parallel embedding, RoPE,
`TransformerBlock` with the final RMSNorm) and allocates no output layer. The first pipeline stage
owns the embedding, the last owns the final norm and the pooling head and returns embeddings.

Layouts: inputs are [b, s]; megatron-core's hidden states are [s, b, h]; embeddings are [b, d].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nvembed.core.config import EmbeddingModelConfig, padded_vocab_size
from megatron_nvembed.model.context_parallel import cp_layout, gather_context_parallel
from megatron_nvembed.model.pooling import build_pooling
from megatron_nvembed.model.specs import (
    build_attention_mask,
    build_packed_attention_mask,
    get_block_spec,
    packed_position_ids,
    resolve_backend,
)

THD_BACKENDS = ("te", "sdpa")
"""Backends that run packed rows in megatron-core's THD layout (no padding computed); `local`
(megatron-core's unfused attention) uses a block-diagonal mask over the rows instead."""


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
        if m.rope_scaling_factor is not None:
            # Llama 3.x frequency scaling with all four of the checkpoint's settings
            # (megatron-core's `rope_scaling` option fixes three of them to Llama 3.1's values).
            rope = self.rotary_pos_emb
            rope.inv_freq = rope._apply_scaling(
                rope.inv_freq,
                factor=m.rope_scaling_factor,
                low_freq_factor=m.rope_scaling_low_freq_factor,
                high_freq_factor=m.rope_scaling_high_freq_factor,
                original_max_position_embeddings=m.rope_scaling_original_max_position_embeddings,
            )
        self.decoder = TransformerBlock(
            config=config,
            spec=get_block_spec(
                config, self.backend, m.mask_type, m.qk_layernorm, pg_collection.pp.rank()
            ),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
        )
        self.sequence_parallel = config.sequence_parallel
        """The decoder's activations between layers hold 1/TP of the sequence on each TP rank
        (`--sequence-parallel`); the last stage gathers the whole sequence for the pooling head."""
        self.context_parallel = pg_collection.cp.size() > 1
        """Each text's tokens are split over the CP ranks (`--context-parallel-size`, TE only;
        see `model.context_parallel`)."""
        self.pooling = (
            # The head sees the whole sequence: its tensor-parallel layers split heads only.
            build_pooling(
                m.hidden_size, model_config.pooling, _without_sp(config), pg_collection.tp
            )
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
        layout: PackedLayout | None = None,
    ) -> torch.Tensor:
        """Backbone only (this stage's layers).

        Args:
            input_ids: [b, s] token ids (used on the first stage only).
            attention_mask: [b, s], 1 for real tokens, 0 for padding.
            segment_ids: [b, s] packed rows (see `megatron_nvembed.data.packing`): 0 = padding,
                1..k = the k-th text of the row. Each text attends only to itself and its RoPE
                positions restart at 0. None: one text per row.
            layout: `packed_layout(segment_ids)` when the caller computed it already (the
                trainer does, on the host, so the step reads nothing back from the device).

        Returns:
            [s, b, h]: this stage's output (after the final norm on the last stage). With
            `segment_ids` on the `te` and `sdpa` backends: [t, 1, h], the t real tokens of the
            rows in row-major order (THD layout, no padding); on `local`: [s, b, h] of the rows
            (block-diagonal mask).

        Raises:
            ValueError: `segment_ids` of another shape than `attention_mask`.
        """
        if segment_ids is None and self.context_parallel:
            segment_ids = attention_mask.long()  # CP runs on THD tokens: one text per row
        if segment_ids is not None:
            if segment_ids.shape != attention_mask.shape:
                raise ValueError(
                    f"segment_ids {tuple(segment_ids.shape)} must have the shape of "
                    f"attention_mask {tuple(attention_mask.shape)}"
                )
            if self.backend in THD_BACKENDS:
                return self._encode_thd(input_ids, segment_ids, layout)
        seq_len = attention_mask.shape[1]
        pad = self._sp_padding(seq_len)
        if pad:
            # Sequence parallelism splits the sequence evenly: padding columns up to a multiple
            # of TP, masked like any padding and cut off again after the last layer.
            input_ids, attention_mask = (F.pad(x, (0, pad)) for x in (input_ids, attention_mask))
            if segment_ids is not None:
                segment_ids = F.pad(segment_ids, (0, pad))
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        seq_len += pad
        rotary = self.rotary_pos_emb(seq_len)  # [s, 1, 1, d]
        if rotary.device != attention_mask.device:
            rotary = rotary.to(attention_mask.device)
        if segment_ids is None:
            mask = build_attention_mask(attention_mask, self.backend, self.mask_type)
        else:
            mask = build_packed_attention_mask(segment_ids, self.mask_type)  # [b, 1, s, s]
            positions = packed_position_ids(segment_ids)  # [b, s]
            rotary = rotary[:, 0, 0][positions.t()].unsqueeze(2)  # [s, b, 1, d]
        hidden = self.decoder(
            hidden_states=decoder_input, attention_mask=mask, rotary_pos_emb=rotary
        )
        return self._gather_sequence(hidden, seq_len - pad)

    def _sp_padding(self, tokens: int) -> int:
        """Positions to add so that `tokens` splits evenly over the TP ranks (0 without SP)."""
        return (-tokens) % self.pg_collection.tp.size() if self.sequence_parallel else 0

    def _gather_sequence(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        """The last stage's output: with sequence parallelism, the whole sequence gathered from
        the TP ranks (first `length` positions); other stages pass their slice on as it is.

        Every TP rank then runs the same pooling head and loss on the whole sequence, so each
        computes the complete gradient of these states: the gather's backward keeps this rank's
        slice of it (no reduction)."""
        if not (self.sequence_parallel and self.post_process):
            return hidden
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        full = gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False, group=self.pg_collection.tp
        )
        return full[:length]

    def _encode_thd(
        self, input_ids: torch.Tensor, segment_ids: torch.Tensor, layout: PackedLayout | None
    ) -> torch.Tensor:
        """Packed rows as megatron-core's THD layout: the micro-batch's real tokens as one
        sequence [t, 1, h] with `cu_seqlens` marking the texts; the attention kernel attends
        within each text only (Transformer Engine's fused THD kernels, or `SDPAttention`'s
        varlen path) and RoPE restarts at each text. Padding is not computed at all."""
        layout = layout or packed_layout(segment_ids)
        t = layout.rows.numel()
        tokens = input_ids[layout.rows, layout.cols] if self.pre_process else None
        cu_seqlens, max_len, padded, cp = layout.cu_seqlens, layout.max_len, {}, None
        if self.context_parallel:
            # Each text padded and cut into 2 x CP chunks; this rank runs two of them.
            split = self.pg_collection.tp.size() if self.sequence_parallel else 1
            group = self.pg_collection.cp
            cp = cp_layout(
                layout.lengths, layout.text, layout.pos, group.size(), 2 * group.size() * split
            )
            if tokens is not None:
                stream = tokens.new_zeros(cp.total).index_put((cp.real,), tokens)
                tokens = stream[cp.ranks[group.rank()]]
            max_len = cp.max_len_padded
            padded = dict(
                cu_seqlens_q_padded=cp.cu_seqlens_padded, cu_seqlens_kv_padded=cp.cu_seqlens_padded
            )
        pad = 0 if cp else self._sp_padding(t)
        if pad:
            # Sequence parallelism splits the t tokens evenly: `pad` filler tokens follow as one
            # more text of their own (attending only to themselves), cut off after the last layer.
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + pad])
            max_len = max(max_len, pad)
        decoder_input = None
        if self.pre_process:
            if pad:
                tokens = F.pad(tokens, (0, pad))
            decoder_input = self.embedding(input_ids=tokens[None], position_ids=None)  # [t, 1, h]
        # [max_len, 1, 1, d], per text from 0 (megatron-core picks each CP rank's positions)
        rotary = self.rotary_pos_emb(max_len, packed_seq=True)
        if rotary.device != segment_ids.device:
            rotary = rotary.to(segment_ids.device)
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
            **padded,
        )
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=None,
            rotary_pos_emb=rotary,
            packed_seq_params=params,
        )
        if cp is None:
            return self._gather_sequence(hidden, t)
        hidden = self._gather_sequence(hidden, cp.total // len(cp.ranks))
        if not self.post_process:
            return hidden
        return gather_context_parallel(hidden, cp, self.pg_collection.cp)[cp.real]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        layout: PackedLayout | None = None,
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
            layout: `packed_layout(segment_ids)`, if computed already (see `encode_hidden`).

        Returns:
            [b, d] embeddings on the last pipeline stage ([n_texts, d] with `segment_ids`, in
            packed order: row-major by (row, segment)); [s, b, h] activations elsewhere.
        """
        if segment_ids is None and self.context_parallel:
            # Context parallelism runs on THD tokens: each right-padded row is one text.
            segment_ids = attention_mask.long()
        hidden = self.encode_hidden(input_ids, attention_mask, segment_ids, layout)
        if not self.post_process:
            return hidden
        if pool_mask is None:
            pool_mask = attention_mask
        if segment_ids is not None:
            if self.backend in THD_BACKENDS and getattr(self.pooling, "token_wise", False):
                # Latent / mean / EOS pooling work token by token until the per-text mean:
                # they pool the THD tokens as they are, so the head computes no padding either.
                layout = layout or packed_layout(segment_ids)
                ends = layout.cu_seqlens[1:].long() - 1
                pool = pool_mask[layout.rows, layout.cols]
                return self.pooling.forward_packed(hidden, layout.text, ends, pool)
            hidden, attention_mask, pool_mask = unpack_hidden(
                hidden, segment_ids, pool_mask, layout
            )
        return self.pooling(hidden, attention_mask, pool_mask)


@dataclass
class PackedLayout:
    """Where the real tokens of packed rows are, and which text each belongs to."""

    rows: torch.Tensor
    """[t] row of each real token (row-major order)."""
    cols: torch.Tensor
    """[t] column of each real token."""
    text: torch.Tensor
    """[t] text index of each token, texts in packed order (row-major by (row, segment))."""
    pos: torch.Tensor
    """[t] position of each token within its text."""
    lengths: torch.Tensor
    """[n] tokens per text."""
    cu_seqlens: torch.Tensor
    """[n + 1] int32 offsets of the texts in the THD sequence."""
    max_len: int
    """Longest text."""

    def to(self, device) -> PackedLayout:
        """The same layout with its tensors on `device`."""
        move = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return PackedLayout(
            **{
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in move.items()
            }
        )


def packed_layout(segment_ids: torch.Tensor) -> PackedLayout:
    """The token layout of packed rows (see `megatron_nvembed.data.packing`).

    Args:
        segment_ids: [b, s], 0 = padding, 1..k = the k-th text of the row (each contiguous).
    """
    seg = segment_ids.long()
    per_row = seg.max(dim=1).values  # [b] texts per row
    offsets = torch.cumsum(per_row, 0) - per_row  # [b] first text index of each row
    rows, cols = (seg > 0).nonzero(as_tuple=True)  # real tokens, row-major
    text = offsets[rows] + seg[rows, cols] - 1
    pos = packed_position_ids(seg)[rows, cols]
    n = int(per_row.sum())
    lengths = torch.bincount(text, minlength=n)
    cu_seqlens = torch.zeros(n + 1, dtype=torch.int32, device=seg.device)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return PackedLayout(rows, cols, text, pos, lengths, cu_seqlens, int(lengths.max()))


def unpack_hidden(
    hidden: torch.Tensor,
    segment_ids: torch.Tensor,
    pool_mask: torch.Tensor,
    layout: PackedLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed final states -> one right-padded row per text, for the pooling head.

    Args:
        hidden: [s, b, h] final states of packed rows, or [t, 1, h] in the THD layout (the t
            real tokens of the rows in row-major order).
        segment_ids: [b, s], 0 = padding, 1..k = the k-th text of the row (contiguous).
        pool_mask: [b, s] packed pool mask.
        layout: `packed_layout(segment_ids)`, if computed already.

    Returns:
        hidden [max_len, n, h], attention_mask [n, max_len], pool_mask [n, max_len], with the n
        texts in packed order (row-major by (row, segment)); padding states are zero.
    """
    layout = layout or packed_layout(segment_ids)
    t = layout.rows.numel()
    if hidden.shape[:2] == (t, 1):
        tokens = hidden[:, 0]  # THD (for one full row the two layouts coincide)
    elif hidden.shape[:2] == (segment_ids.shape[1], segment_ids.shape[0]):
        tokens = hidden[layout.cols, layout.rows]
    else:
        raise ValueError(
            f"packed states {tuple(hidden.shape)} fit neither the rows {tuple(segment_ids.shape)} "
            f"nor the THD layout of their {t} real tokens"
        )
    n, width, h = layout.lengths.numel(), layout.max_len, hidden.shape[-1]
    index = (layout.text, layout.pos)
    out = hidden.new_zeros(n, width, h).index_put(index, tokens)
    arange = torch.arange(width, device=segment_ids.device)
    attn = (arange[None, :] < layout.lengths[:, None]).long()
    pool = pool_mask.new_zeros(n, width).index_put(index, pool_mask[layout.rows, layout.cols])
    return out.transpose(0, 1), attn, pool


def _without_sp(config: TransformerConfig) -> TransformerConfig:
    """`config` for the pooling head: the same, less sequence parallelism (the head's input is
    the whole sequence, gathered by the last stage)."""
    if not config.sequence_parallel:
        return config
    head = copy.copy(config)
    head.sequence_parallel = False
    return head
