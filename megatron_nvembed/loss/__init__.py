"""Contrastive loss, cross-rank gather with exact gradients, and GradCache (no megatron imports)."""

from megatron_nvembed.loss.contrastive import (
    ContrastiveLoss,
    ContrastiveLossConfig,
    ContrastiveStats,
    contrastive_loss,
    sequence_hash,
)
from megatron_nvembed.loss.gather import all_gather_no_grad, all_gather_with_grad
from megatron_nvembed.loss.grad_cache import (
    GradCacheResult,
    RngReplay,
    capture_rng_state,
    embedding_gradients,
    grad_cache_step,
    restore_rng_state,
    surrogate_loss,
)

__all__ = [
    "ContrastiveLoss",
    "ContrastiveLossConfig",
    "ContrastiveStats",
    "GradCacheResult",
    "RngReplay",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "capture_rng_state",
    "contrastive_loss",
    "embedding_gradients",
    "grad_cache_step",
    "restore_rng_state",
    "sequence_hash",
    "surrogate_loss",
]
