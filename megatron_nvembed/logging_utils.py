"""Logging helpers: one logger namespace for the project and a rank-0 shortcut."""

from __future__ import annotations

import logging
import os

import torch.distributed as dist


def get_logger(name: str) -> logging.Logger:
    """Returns a logger under the `megatron_nvembed` namespace."""
    if not name.startswith("megatron_nvembed"):
        name = f"megatron_nvembed.{name}"
    return logging.getLogger(name)


def is_rank0() -> bool:
    """True on global rank 0, or when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def log_rank0(logger: logging.Logger, msg: str, *args, level: int = logging.INFO) -> None:
    """Logs `msg` on global rank 0 only."""
    if is_rank0():
        logger.log(level, msg, *args)


def setup_logging(level: int = logging.INFO) -> None:
    """Configures a plain console handler for CLI entry points (library code never calls this)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
