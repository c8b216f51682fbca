"""Embedding batches with a (possibly pipeline-parallel) `NVEmbedModel`, without gradients.

With pipeline parallelism the micro-batches go through megatron-core's forward-only schedule;
embeddings come out on the last stage. Every rank must call `embed_microbatches` with the same
batches (stages other than the first still need the masks).
"""

from __future__ import annotations

import torch

from megatron_nvembed.core.cpu_support import cuda_allocations_on_cpu


def embed_microbatches(
    model: torch.nn.Module, microbatches: list[dict[str, torch.Tensor]], pg_collection
) -> list[torch.Tensor] | None:
    """Embeds each micro-batch.

    Args:
        model: this rank's `NVEmbedModel` stage.
        microbatches: dicts with `input_ids`, `attention_mask`, optional `pool_mask`, each [b, s],
            and optional `segment_ids` (packed rows, `PackedBatch.model_inputs()`: the outputs
            are then in packed order; index them with `PackedBatch.restore`).
        pg_collection: megatron-core process groups (`pp` decides the schedule).

    Returns:
        On the last pipeline stage, one [b, d] tensor per micro-batch; None on other stages.
    """
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    if not microbatches:
        return [] if pg_collection.pp.rank() == pg_collection.pp.size() - 1 else None
    was_training = model.training
    model.eval()

    def forward_step(data_iterator, stage):
        batch = next(data_iterator)
        packed = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
        out = stage(batch["input_ids"], batch["attention_mask"], batch.get("pool_mask"), **packed)
        return out, None  # no loss: the schedule collects the last stage's outputs

    pp = pg_collection.pp.size()
    first = microbatches[0]
    try:
        with torch.no_grad(), cuda_allocations_on_cpu():
            if pp == 1:
                outputs = [forward_step(iter([mb]), model)[0] for mb in microbatches]
            else:
                schedule = get_forward_backward_func(pp_size=pp)
                outputs = schedule(
                    forward_step_func=forward_step,
                    data_iterator=iter(microbatches),
                    model=[model],
                    num_microbatches=len(microbatches),
                    seq_length=first["input_ids"].shape[1],
                    micro_batch_size=first["input_ids"].shape[0],
                    forward_only=True,
                    # The schedule takes its groups from parallel_state unless given a p2p
                    # communicator too; the model was built from those same groups.
                )
    finally:
        model.train(was_training)
    if pg_collection.pp.rank() != pp - 1:
        return None
    return list(outputs)
