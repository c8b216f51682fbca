"""Contrastive loss, cross-rank gather with exact gradients, and GradCache (no megatron imports).

The loss (`contrastive.py`) in its parts: settings (`config.py`), the gathered in-batch pool
(`pool.py`, over `gather.py`), the exclusion masks (`masks.py`), the per-width InfoNCE and the
distillation term (`contrastive.py`, widths from `matryoshka.py`), statistics (`stats.py`). Its
per-batch inputs are one `LossInputs` (`megatron_nvembed/core/loss_inputs.py`, re-exported here).

The names below load their module on first use, so `megatron_nvembed.loss.config` (the loss's
flags, read by `--help` and `--check-args`) imports without torch.
"""

import importlib

_WHERE = {
    "sequence_hash": "megatron_nvembed.utils.hashing",  # the loss's candidate ids
    "LossInputs": "megatron_nvembed.core.loss_inputs",  # built by collation
    "ContrastiveLossConfig": "megatron_nvembed.loss.config",
    "ContrastiveLoss": "megatron_nvembed.loss.contrastive",
    "contrastive_loss": "megatron_nvembed.loss.contrastive",
    "ContrastiveStats": "megatron_nvembed.loss.stats",
    "all_gather_no_grad": "megatron_nvembed.loss.gather",
    "all_gather_with_grad": "megatron_nvembed.loss.gather",
    "GradCacheResult": "megatron_nvembed.loss.grad_cache",
    "RngReplay": "megatron_nvembed.loss.grad_cache",
    "embedding_gradients": "megatron_nvembed.loss.grad_cache",
    "grad_cache_step": "megatron_nvembed.loss.grad_cache",
    "run_in_order": "megatron_nvembed.loss.grad_cache",
    "surrogate_loss": "megatron_nvembed.loss.grad_cache",
    "Matryoshka": "megatron_nvembed.loss.matryoshka",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
