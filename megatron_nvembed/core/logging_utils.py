"""Logging helpers: one logger namespace for the project, a rank-0 shortcut, and the console
set-up of every entry point (`setup_logging`: one rank speaks, known third-party noise filtered).

Nothing here imports torch at module level: entry points call `setup_logging` before their heavy
imports, and `--help` never imports torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings


def get_logger(name: str) -> logging.Logger:
    """Returns a logger under the `megatron_nvembed` namespace."""
    if not name.startswith("megatron_nvembed"):
        name = f"megatron_nvembed.{name}"
    return logging.getLogger(name)


def is_rank0() -> bool:
    """True on global rank 0, or when no process group is initialised (then `RANK`, as set by
    torchrun, decides; a plain process is rank 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_rank() == 0


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


SPEAKER = {"speaker": True}
"""`extra=` of a message that one chosen rank other than 0 logs on purpose (the training log
line comes from the last pipeline stage's last rank, as Megatron's `print_rank_last`):
`setup_logging` lets it through there."""


class _OneRankSpeaks(logging.Filter):
    """On ranks other than 0: errors, and `SPEAKER` messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or getattr(record, "speaker", False)


def log_rank0(logger: logging.Logger, msg: str, *args, level: int = logging.INFO) -> None:
    """Logs `msg` on global rank 0 only."""
    if is_rank0():
        logger.log(level, msg, *args)


# (category, message regex, module regex) of the warnings that megatron-core and torch emit in a
# tiny CPU training / embedding / conversion run and that say nothing the user can act on (any
# other warning still shows); `kernel_note` states the missing-kernel ones once instead. Matched
# with `warnings.filterwarnings` (message: case-insensitive, from its start).
_KNOWN_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    # megatron-core, once per importing module: "Transformer Engine and Apex are not installed.
    # Falling back to ...", "Apex is not installed. Falling back to Torch Norm".
    (UserWarning, r"(transformer engine|apex)\b.* not installed", r"megatron\.core"),
    # megatron-core's TransformerConfig default cuda_graph_scope, not a setting of ours.
    (UserWarning, r"full scope is deprecated", r"megatron\.core"),
    # megatron-core's optimizer probes `param.grad` with hasattr on every parameter.
    (UserWarning, r"the \.grad attribute of a tensor that is not a leaf", r"megatron\.core"),
    # megatron-core calls torch.distributed's *_tensor collectives (renamed *_single in torch).
    (FutureWarning, r".* is deprecated\. please use `torch\.distributed\.", r"torch\.distributed"),
    # torch's ShardedTensor deprecation, raised inside megatron-core's checkpoint loading.
    (FutureWarning, r"please use dtensor instead and we are deprecating shardedtensor", r""),
)


def quiet_known_noise() -> None:
    """Filters `_KNOWN_NOISE` (other warnings still show). Idempotent."""
    for category, message, module in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def kernel_note() -> str | None:
    """One line naming the optional kernel packages that are missing and what runs instead, or
    None when both are installed. Looks the packages up without importing them."""
    missing = [
        (name, instead)
        for module, name, instead in (
            ("transformer_engine", "Transformer Engine", "torch SDPA kernels"),
            ("apex", "Apex", "torch norms and optimizers"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if not missing:
        return None
    return "; ".join(f"{name} not installed: {instead}" for name, instead in missing)


def setup_logging(level: int = logging.INFO, *, note_kernels: bool = False) -> None:
    """Console logging for entry points (tools/*.py, examples/pretrain_nvembed.py); library code
    never calls this.

    One rank speaks: global rank 0 (`RANK`, as set by torchrun; a plain process is rank 0) logs
    at `level`; other ranks only errors and `SPEAKER` messages, so a message logged by every rank
    appears once. Known megatron-core / torch noise is filtered (`quiet_known_noise`).

    Args:
        level: rank 0's level.
        note_kernels: entry points that build a model: rank 0 logs `kernel_note()` once (the
            filtered per-module warnings said it many times).
    """
    quiet_known_noise()
    rank0 = _env_rank() == 0
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if not rank0:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_OneRankSpeaks())
    # megatron-core logs every parameter name at INFO when it builds the DDP buffers.
    logging.getLogger("megatron.core").setLevel(max(level, logging.WARNING))
    # FAISS's loader logs which SIMD build it found, at INFO, on every import.
    logging.getLogger("faiss").setLevel(max(level, logging.WARNING))
    if note_kernels and rank0:
        note = kernel_note()
        if note:
            get_logger("megatron_nvembed").info(note)
