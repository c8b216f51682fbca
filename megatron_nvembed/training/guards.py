"""What stops or protects a run: non-finite losses and gradients (the step is skipped; too many
in a row abort), non-finite weights (never saved), SIGTERM, `--exit-duration-in-mins` and
`--exit-interval` (save and exit at the end of the step, every rank at the same iteration)."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.training.config import CheckpointConfig

logger = get_logger(__name__)


class NonFiniteGuard:
    """Counts consecutive non-finite losses: each skips its step; too many in a row abort."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.skipped = 0

    def update(self, finite: bool, iteration: int) -> bool:
        """Returns True when the step may be applied.

        Raises:
            RuntimeError: after `max_in_row` non-finite losses in a row.
        """
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        logger.warning(
            "iteration %d: non-finite loss, optimizer step skipped (%d in a row, limit %d; "
            "--max-nonfinite-steps)",
            iteration,
            self.in_row,
            self.max_in_row,
        )
        if self.in_row >= self.max_in_row:
            raise RuntimeError(
                f"iteration {iteration}: {self.in_row} non-finite losses in a row "
                f"(--max-nonfinite-steps {self.max_in_row}); aborting. Check the data, or "
                "resume from the last checkpoint with a lower --lr and "
                "--override-opt-param-scheduler (the schedule of the flags then applies)."
            )
        return False


class SigtermFlag:
    """Set by SIGTERM (cluster preemption); the loop saves and exits at the end of the step."""

    def __init__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        # A SIGTERM that arrived while the run was being set up (`cli.EarlyTerm`) counts: the
        # first iteration ends with a save and the exit.
        self.raised = bool(getattr(self._previous, "raised", False))

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def nonfinite_grads(ddp) -> torch.Tensor:
    """1.0 when this rank's gradient buffers hold a non-finite value, else 0.0 (a device tensor:
    no host sync; it joins the step's statistics reduction)."""
    buffers = ddp.buffers + ddp.expert_parallel_buffers
    if not buffers:
        return torch.zeros((), dtype=torch.float64)
    finite = torch.stack([torch.isfinite(b.grad_data).all() for b in buffers]).all()
    return (~finite).to(torch.float64)


def latest_or_none(root) -> str:
    from megatron_nvembed.checkpoint.store import is_checkpoint_dir, latest_iteration

    if root and is_checkpoint_dir(root):
        return f"iteration {latest_iteration(root)} in {root}"
    return "none (nothing saved yet)"


def require_finite_weights(model, iteration: int, root) -> None:
    """Refuses to save non-finite weights (every rank checks its own shard; all agree)."""
    bad = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        bad += (~torch.isfinite(p.detach())).any().to(torch.float64)
    dist.all_reduce(bad)
    if bad.item() > 0:
        raise RuntimeError(
            f"iteration {iteration}: the model's weights hold non-finite values; not saving "
            f"them. The latest checkpoint stays {latest_or_none(root)}: resume from it with a "
            "lower --lr and --override-opt-param-scheduler."
        )


def exit_reason(
    ck: CheckpointConfig, iteration: int, sigterm: bool, over_time: bool, minutes: float
) -> tuple[str, str] | None:
    """Whether the loop stops after `iteration`, as (exit_reason, log message), or None.

    `sigterm` and `over_time` are any rank's (they travel in the step's one statistics
    all-reduce), so every rank stops at the same iteration even when only one got the signal or
    crossed `--exit-duration-in-mins` on its own clock first; `--exit-interval` depends on the
    iteration only.
    """
    if sigterm:
        return "sigterm", "SIGTERM received"
    if over_time:
        return (
            "exit_duration",
            f"--exit-duration-in-mins {ck.exit_duration_in_mins}: {minutes:.2f} min since training "
            "started",
        )
    if ck.exit_interval and iteration % ck.exit_interval == 0:
        return "exit_interval", f"--exit-interval {ck.exit_interval} reached"
    return None
