"""Contrastive loss, cross-rank gather with exact gradients, and GradCache (no megatron imports)."""

from megatron_nvembed.hashing import sequence_hash  # re-exported: the loss's candidate ids
from megatron_nvembed.loss.contrastive import (
    ContrastiveLoss,
    ContrastiveLossConfig,
    ContrastiveStats,
    contrastive_loss,
)
from megatron_nvembed.loss.gather import all_gather_no_grad, all_gather_with_grad
from megatron_nvembed.loss.grad_cache import (
    GradCacheResult,
    RngReplay,
    embedding_gradients,
    grad_cache_step,
    run_in_order,
    surrogate_loss,
)
from megatron_nvembed.loss.matryoshka import Matryoshka

__all__ = [
    "ContrastiveLoss",
    "ContrastiveLossConfig",
    "ContrastiveStats",
    "GradCacheResult",
    "Matryoshka",
    "RngReplay",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "contrastive_loss",
    "embedding_gradients",
    "grad_cache_step",
    "run_in_order",
    "sequence_hash",
    "surrogate_loss",
]
