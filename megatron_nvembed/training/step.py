"""One training step's forward and backward: the one step runner, for every layout.

- GradCache on (`--grad-cache`, the recipes' default): `loss.grad_cache_step` with
  megatron-core's schedules as its driver. Phase 1 embeds every micro-batch of this rank through
  the forward-only schedule (no activations kept, RNG recorded); the last pipeline stage computes
  the loss over the whole global batch (candidates gathered over the DP group) and its gradient
  with respect to every embedding; phase 2 replays each micro-batch through the training schedule
  with `surrogate_loss`, which delivers exactly those gradients. In-batch negatives span the whole
  global batch.
- GradCache off: each micro-batch's loss is computed on its own inside the training schedule;
  in-batch negatives span one micro-batch per rank x the DP ranks (the log says so).

Every micro-batch is laid out on the host once (`plan_micro_batch`: packed rows, length buckets,
or queries and candidates as they come; the loss inputs collation built carried whole) and moved
to the device in one transfer; both GradCache
passes and every pipeline stage reuse it, and nothing in the step reads a device value back.
With pipeline parallelism a micro-batch travels as one tensor: queries and candidates are padded
to a common width and stacked (rows [b queries; b x (1 + K) candidates]), or packed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from megatron_nvembed.core.cpu_support import cuda_allocations_on_cpu
from megatron_nvembed.data.buckets import bucket_width, length_grouped_batches
from megatron_nvembed.data.collate import EmbeddingBatch
from megatron_nvembed.loss import ContrastiveLoss, LossInputs, grad_cache_step
from megatron_nvembed.loss.grad_cache import StepFunction

KEYS = ("input_ids", "attention_mask", "pool_mask")


@dataclass
class ModelBatch:
    """One micro-batch as the step runs it: its forward calls, planned on the host."""

    calls: list[dict]
    """Keyword arguments of each model call (tensors, and a packed call's `PackedLayout`); the
    outputs are concatenated in this order."""
    restore: torch.Tensor | None
    """[b + b*n]: `torch.cat(outputs)[restore]` is [queries; candidates] (None: already so)."""
    loss_inputs: LossInputs
    """The micro-batch's loss inputs as collation built them ([b, n] / [b] fields)."""
    positions: int
    """Token positions the decoder computes in one pass (padding included; THD: real tokens)."""
    lengths: list[int]
    """Real tokens of each non-empty text, queries and candidates (statistics)."""

    def to(self, device) -> ModelBatch:
        """The same batch on `device` (one copy of every tensor)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(
            self,
            calls=[
                {k: move(v) if torch.is_tensor(v) else v.to(device) for k, v in call.items()}
                for call in self.calls
            ],
            restore=move(self.restore),
            loss_inputs=self.loss_inputs.to(device, non_blocking=True),
        )


def stacked(mb: EmbeddingBatch) -> dict[str, torch.Tensor]:
    """Queries and candidates as one right-padded batch [b + b*(1+K), s] (pipeline transport)."""
    q, c = mb.query, mb.candidates
    width = max(q["input_ids"].shape[1], c["input_ids"].shape[1])
    out = {}
    for key in KEYS:
        pad_value = int(q["input_ids"][0, -1]) if key == "input_ids" else 0
        parts = []
        for part in (q[key], c[key]):
            extra = width - part.shape[1]
            if extra:
                part = torch.nn.functional.pad(part, (0, extra), value=pad_value)
            parts.append(part)
        out[key] = torch.cat(parts)
    return out


def bucket_calls(
    part: dict[str, torch.Tensor], bucket_size: int, multiple: int = 8
) -> tuple[list[dict[str, torch.Tensor]], list[int] | None]:
    """A right-padded batch as model calls: one call or, with `bucket_size` > 0, calls of
    `bucket_size` length-sorted rows (`data.buckets`), each cut to its own longest row rounded
    up to `multiple`.

    Args:
        part: `input_ids`, `attention_mask`, `pool_mask`, each [n, s], right-padded.

    Returns:
        (calls, the batch rows in the order of the concatenated call outputs, or None when that
        is the batch's own order).
    """
    n, width = part["input_ids"].shape
    if not bucket_size or n <= bucket_size:
        return [part], None
    lengths = part["attention_mask"].sum(dim=1).tolist()
    buckets = length_grouped_batches(lengths, bucket_size)
    calls = []
    for rows in buckets:
        cut = bucket_width(max(lengths[i] for i in rows), multiple, width)
        index = torch.tensor(rows)
        calls.append({k: v[index, :cut] for k, v in part.items()})
    return calls, [i for rows in buckets for i in rows]


def plan_micro_batch(
    mb: EmbeddingBatch, *, pack_length: int, bucket_size: int, pipeline: bool, thd: bool
) -> ModelBatch:
    """Lays one host-side micro-batch out for the model (see the module docstring).

    Args:
        pack_length: `--seq-length` when packing (`--pack-sequences`), else 0.
        bucket_size: `--length-bucket-size` (0: off); not with a pipeline.
        pipeline: the model has more than one pipeline stage (one call per micro-batch).
        thd: packed rows run as the THD layout (only real tokens are computed).
    """
    lengths = [
        n for part in (mb.query, mb.candidates) for n in part["attention_mask"].sum(1).tolist()
    ]
    restore, calls = None, None
    if pack_length:
        # Deterministic: every pipeline stage and the GradCache replay see the same rows.
        from megatron_nvembed.data.packing import pack_batch
        from megatron_nvembed.model.nvembed_model import packed_layout

        packed = pack_batch(stacked(mb), pack_length)
        # The token layout the model needs (text of each token, cu_seqlens, longest text) is
        # worked out here, on the host, so the model never reads it back from the device.
        layout = packed_layout(packed.segment_ids)
        calls, restore = [{**packed.model_inputs(), "layout": layout}], packed.restore
        positions = sum(lengths) if thd else packed.input_ids.numel()
    elif pipeline:
        calls = [stacked(mb)]
        positions = calls[0]["input_ids"].numel()
    else:
        b = mb.query["input_ids"].shape[0]
        q_calls, q_order = bucket_calls(mb.query, bucket_size)
        c_calls, c_order = bucket_calls(mb.candidates, bucket_size)
        calls = q_calls + c_calls
        if q_order is not None or c_order is not None:
            order = (q_order or list(range(b))) + [
                b + i for i in (c_order or range(mb.candidates["input_ids"].shape[0]))
            ]
            restore = torch.argsort(torch.tensor(order))
        positions = sum(call["input_ids"].numel() for call in calls)
    return ModelBatch(
        calls=calls,
        restore=restore,
        loss_inputs=mb.loss_inputs,
        positions=positions,
        lengths=[n for n in lengths if n],
    )


class ScheduleDriver:
    """A `Driver` (loss/grad_cache.py) over megatron-core's forward-backward schedules: the step
    function's micro-batches go through the pipeline (or the no-pipeline schedule), with the
    model config's `no_sync_func` / `finalize_model_grads_func` / `grad_scale_func` applied."""

    def __init__(self, model_chunks: list, pp_size: int | None = None):
        from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

        self.model = model_chunks
        self.schedule = get_forward_backward_func(pp_size=pp_size)

    def __call__(self, step_fn: StepFunction, micro_batches, forward_only: bool) -> list:
        def forward_step(data_iterator, model):
            i, mb = next(data_iterator)
            return step_fn(i, mb)

        first = micro_batches[0]
        # The model config's variable_seq_lengths makes the stages exchange the real shapes;
        # these two are megatron-core's required hints.
        ids = first.calls[0]["input_ids"] if isinstance(first, ModelBatch) else first["input_ids"]
        with cuda_allocations_on_cpu():
            return self.schedule(
                forward_step_func=forward_step,
                data_iterator=iter(list(enumerate(micro_batches))),
                model=self.model,
                num_microbatches=len(micro_batches),
                seq_length=ids.shape[1],
                micro_batch_size=ids.shape[0],
                forward_only=forward_only,
            )


class StepRunner:
    """Runs one global batch's forward and backward on this rank (`run`)."""

    def __init__(self, ddp, loss_fn: ContrastiveLoss, pg, *, grad_cache: bool, plan, device):
        """
        Args:
            plan: host `EmbeddingBatch` -> `ModelBatch` (`plan_micro_batch` with the run's
                layout settings bound).
        """
        self.ddp, self.loss_fn, self.grad_cache = ddp, loss_fn, grad_cache
        self.plan, self.device = plan, device
        self.last_stage = pg.pp.rank() == pg.pp.size() - 1
        self.contributes = self.last_stage and pg.tp.rank() == 0 and pg.cp.rank() == 0
        """This rank counts the batch in the step's statistics (one per model replica)."""
        self.drive = ScheduleDriver([ddp])

    def prepare(self, micro_batches: list[EmbeddingBatch]) -> list[ModelBatch]:
        """This rank's host-side micro-batches laid out, then moved to the device (one copy)."""
        return [self.plan(mb).to(self.device) for mb in micro_batches]

    def forward(self, i: int, mb: ModelBatch) -> torch.Tensor:
        """Micro-batch `mb`'s rows [b queries; b*n candidates] (other stages: activations)."""
        outs = [self.ddp(**call) for call in mb.calls]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if self.last_stage and mb.restore is not None:
            out = out[mb.restore]
        return out

    @staticmethod
    def loss_inputs(mb: ModelBatch) -> LossInputs:
        """The micro-batch's loss inputs (`grad_cache_step` concatenates them)."""
        return mb.loss_inputs

    def run(self, micro_batches: list[ModelBatch]) -> torch.Tensor | None:
        """Forward and backward of this rank's micro-batches (gradients in DDP's buffers).

        Returns:
            This rank's loss on the last pipeline stage (a device tensor), else None.
        """
        from megatron_nvembed.model.pooling import latent_kv_once_per_step

        with latent_kv_once_per_step([self.ddp]):
            # With one micro-batch the direct path's in-batch pool is already this rank's whole
            # share of the global batch: GradCache would compute the same loss and gradients
            # (and leave the generators in the same state) at the cost of a second forward.
            if self.grad_cache and len(micro_batches) > 1:
                return self._grad_cache(micro_batches)
            return self._direct(micro_batches)

    def _direct(self, micro_batches: list[ModelBatch]) -> torch.Tensor | None:
        def loss_of(mb: ModelBatch, out: torch.Tensor):
            b, n = mb.loss_inputs.shape
            loss = self.loss_fn(out[:b], out[b:].reshape(b, n, -1), mb.loss_inputs)
            # A copy: megatron-core's schedule divides the returned loss by the micro-batch
            # count in place, which a detached view would share.
            return loss, {"loss": loss.detach().clone()}

        def step_fn(i: int, mb: ModelBatch):
            return self.forward(i, mb), lambda out: loss_of(mb, out)

        infos = self.drive(step_fn, micro_batches, False)
        return torch.stack([o["loss"] for o in infos]).mean() if self.last_stage else None

    def _grad_cache(self, micro_batches: list[ModelBatch]) -> torch.Tensor | None:
        result = grad_cache_step(
            self.forward,
            micro_batches,
            self.loss_fn,
            self.loss_inputs,
            drive=self.drive,
            last_stage=self.last_stage,
        )
        return result.loss
