"""Layer specs for the embedding backbone: bidirectional (padding mask) or causal, per backend.

`get_layer_spec(backend, mask_type, qk_layernorm)` is the one place that turns megatron-core's GPT
layer spec into an embedding layer spec. It always builds a fresh spec (megatron-core's spec functions
return new objects; we deep-copy anyway so no shared spec is ever mutated).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_nvembed.core.config import ModelConfig


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is available."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def resolve_backend(cfg: ModelConfig) -> str:
    """Picks the concrete attention backend for `cfg.attention_backend`.

    `auto` is `te` on CUDA with Transformer Engine installed, else `sdpa`.

    Raises:
        ValueError: `te` asked for without CUDA or without Transformer Engine.
    """
    if cfg.attention_backend == "auto":
        return "te" if te_available() else "sdpa"
    if cfg.attention_backend == "te" and not te_available():
        why = "CUDA is not available" if not torch.cuda.is_available() else "it does not import"
        raise ValueError(
            f"attention_backend='te' needs Transformer Engine on CUDA, but {why}; "
            "install the `gpu` extra on a CUDA machine or use attention_backend='sdpa'"
        )
    return cfg.attention_backend


def attn_mask_type_for(backend: str, mask_type: str) -> AttnMaskType:
    """The megatron-core mask type that the attention module is built with."""
    if mask_type == "bidirectional":
        return AttnMaskType.padding
    # TE builds the causal part itself from a padding mask; local/sdpa get the full mask.
    return AttnMaskType.padding_causal if backend == "te" else AttnMaskType.causal


class TorchRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm as a megatron-core norm module, usable with sequence parallelism.

    megatron-core's own torch norm (`WrappedTorchNorm`, what its local spec uses without Apex)
    refuses `sequence_parallel`. Under sequence parallelism each tensor-parallel rank normalises
    a slice of the sequence, so the weight's gradient is a partial sum: the weight is marked
    `sequence_parallel`, and megatron-core's `finalize_model_grads` sums such gradients over the
    tensor-parallel group (as it does for Transformer Engine's norms)."""

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,  # noqa: ARG002 - megatron-core's norm signature
        zero_centered_gamma: bool = False,  # noqa: ARG002
        normalization: str = "RMSNorm",  # noqa: ARG002
    ):
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"TorchRMSNorm needs normalization='RMSNorm', got {config.normalization!r}"
            )
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def get_layer_spec(backend: str, mask_type: str, qk_layernorm: bool = False) -> ModuleSpec:
    """A Mistral/Llama/Qwen decoder layer spec (RMSNorm, SwiGLU, GQA, RoPE) for embedding models.

    Args:
        backend: `te`, `sdpa` or `local` (use `resolve_backend` first).
        mask_type: `bidirectional` (padding mask only: every token sees every real token) or
            `causal` (ablations).
        qk_layernorm: per-head RMSNorm modules on the queries and keys (Qwen3): Transformer
            Engine's norm on `te`, `torch.nn.RMSNorm` (megatron-core's `WrappedTorchNorm`) on
            `sdpa` / `local`. The TransformerConfig must set `qk_layernorm` to match.

    Returns:
        A new `ModuleSpec` for `TransformerBlock`.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if backend == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    elif backend in ("sdpa", "local"):
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            normalization="RMSNorm", qk_layernorm=qk_layernorm
        )
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params, attn_mask_type=attn_mask_type_for(backend, mask_type))
    if backend != "te":
        # Norms that work with and without --sequence-parallel (see TorchRMSNorm).
        spec.submodules.input_layernorm = TorchRMSNorm
        spec.submodules.pre_mlp_layernorm = TorchRMSNorm
        if qk_layernorm:
            attn.submodules.q_layernorm = TorchRMSNorm
            attn.submodules.k_layernorm = TorchRMSNorm
    if backend == "sdpa":
        from megatron_nvembed.model.attention import SDPAttention

        attn.submodules.core_attention = SDPAttention
    return spec


def get_block_spec(
    config, backend: str, mask_type: str, qk_layernorm: bool, pp_rank: int
) -> TransformerBlockSubmodules:
    """This pipeline stage's block: its layers (`get_layer_spec`) and the final norm (Transformer
    Engine's on `te`, `TorchRMSNorm` elsewhere; both support sequence parallelism)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = TorchRMSNorm
    layer = get_layer_spec(backend, mask_type, qk_layernorm=qk_layernorm)
    layers = get_num_layers_to_build(config, vp_stage=None, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=final_norm)


def build_attention_mask(
    attention_mask: torch.Tensor, backend: str, mask_type: str
) -> torch.Tensor:
    """Turns a [b, s] token mask (1 = real token) into megatron-core's boolean mask.

    Returns:
        bool tensor, True = masked out: [b, 1, 1, s] (padding only; TE also for causal, where the
        causal part comes from the mask type) or [b, 1, s, s] (causal + padding, local/sdpa).
    """
    pad = ~attention_mask.bool()  # [b, s], True at padding
    mask = pad[:, None, None, :]  # [b, 1, 1, s]
    if mask_type == "causal" and backend != "te":
        s = attention_mask.shape[1]
        future = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).triu(1)
        mask = mask | future[None, None]  # [b, 1, s, s]
    return mask


def build_packed_attention_mask(segment_ids: torch.Tensor, mask_type: str) -> torch.Tensor:
    """Block-diagonal mask for packed rows (see `megatron_nvembed.data.packing`).

    Args:
        segment_ids: [rows, L] int, 0 = padding, 1..k = the k-th text of the row.
        mask_type: `bidirectional` or `causal` (causal within each text).

    Returns:
        bool [rows, 1, L, L], True = masked out: a token sees only tokens of its own text. Padding
        positions form one more block of their own, so no query row is fully masked (no NaN from
        the softmax) and no real token ever sees padding.
    """
    mask = segment_ids[:, None, :, None] != segment_ids[:, None, None, :]  # [rows, 1, L, L]
    if mask_type == "causal":
        s = segment_ids.shape[1]
        future = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).triu(1)
        mask = mask | future[None, None]
    return mask


def packed_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """[rows, L] RoPE positions restarting at 0 where each text starts (padding: its offset
    from the end of the last text, unused)."""
    s = segment_ids.shape[1]
    idx = torch.arange(s, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first
