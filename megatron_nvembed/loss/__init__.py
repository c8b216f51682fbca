"""Contrastive loss, cross-rank gather with exact gradients, and GradCache."""

from megatron_nvembed.loss.contrastive import (
    ContrastiveLoss,
    ContrastiveLossConfig,
    ContrastiveStats,
    contrastive_loss,
    sequence_hash,
)
from megatron_nvembed.loss.gather import all_gather_no_grad, all_gather_with_grad
from megatron_nvembed.loss.grad_cache import grad_cache_step

__all__ = [
    "ContrastiveLoss",
    "ContrastiveLossConfig",
    "ContrastiveStats",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "contrastive_loss",
    "grad_cache_step",
    "sequence_hash",
]
