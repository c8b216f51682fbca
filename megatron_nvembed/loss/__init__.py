"""Contrastive loss, cross-rank gather with exact gradients, and GradCache (no megatron imports).

The loss (`contrastive.py`) in its parts: settings (`config.py`), the gathered in-batch pool
(`pool.py`, over `gather.py`), the exclusion masks (`masks.py`), the per-width InfoNCE and the
distillation term (`contrastive.py`, widths from `matryoshka.py`), statistics (`stats.py`). Its
per-batch inputs are one `LossInputs` (`megatron_nvembed/loss_inputs.py`, re-exported here).
"""

from megatron_nvembed.hashing import sequence_hash  # re-exported: the loss's candidate ids
from megatron_nvembed.loss.config import ContrastiveLossConfig
from megatron_nvembed.loss.contrastive import ContrastiveLoss, contrastive_loss
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
from megatron_nvembed.loss.stats import ContrastiveStats
from megatron_nvembed.loss_inputs import LossInputs  # re-exported: built by collation

__all__ = [
    "ContrastiveLoss",
    "ContrastiveLossConfig",
    "ContrastiveStats",
    "GradCacheResult",
    "LossInputs",
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
