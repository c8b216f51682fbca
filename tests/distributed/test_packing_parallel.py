"""Sequence packing at TP=2 and at PP=2 (2 gloo processes each), fp32 on CPU.

- TP=2: packed embeddings equal the same model's unpacked embeddings (max |diff| <= 1e-5) and
  every (sharded) parameter's gradient is equal within 1e-5 relative, bidirectional and causal.
- PP=2: packed micro-batches of different shapes go through megatron-core's forward-only
  pipeline schedule (`embed_microbatches`; every stage gets `segment_ids`, the last unpacks) and
  equal the unpacked micro-batches' embeddings within 1e-5.

Run alone: pytest tests/distributed/test_packing_parallel.py
"""

import pytest
import torch

from megatron_nvembed.testing import run_distributed

TOL = 1e-5


def _check_tp2(rank, world_size):
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.data.packing import pack_batch
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.testing import random_padded_batch, tiny_model_config

    pg = initialize_model_parallel(2, 1, seed=7)
    batch = random_padded_batch(
        [13, 6, 9, 2, 15, 4], instruction_lengths=[5, 0, 3, 0, 2, 1], pad_to=16
    )
    packed = pack_batch(batch, 24)
    assert packed.segment_ids.shape[0] < 6
    probe = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    for pooling, mask_type in (("latent", "bidirectional"), ("mean", "causal")):
        model = build_model(tiny_model_config(pooling=pooling, mask_type=mask_type, tp=2), pg)

        def run(inputs, restore=None, model=model):
            model.zero_grad(set_to_none=True)
            emb = model(**inputs)
            if restore is not None:
                emb = emb[restore]
            (emb * probe).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            return emb.detach(), grads

        want, want_g = run(batch)
        got, got_g = run(packed.model_inputs(), packed.restore)
        diff = (got - want).abs().max().item()
        assert diff <= TOL, f"{pooling}/{mask_type}: TP=2 packed embeddings differ by {diff}"
        for name, g in want_g.items():
            rel = ((got_g[name] - g).norm() / g.norm().clamp(min=1e-12)).item()
            assert rel <= TOL, f"{pooling}/{mask_type}: grad of {name} differs ({rel}), rank {rank}"


def _check_pp2(rank, world_size):
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.data.packing import pack_batch
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.inference import embed_microbatches
    from megatron_nvembed.testing import random_padded_batch, tiny_model_config

    pg = initialize_model_parallel(1, 2, seed=7)
    microbatches = [
        random_padded_batch([13, 6, 9, 3], instruction_lengths=[5, 0, 3, 0], seed=1),
        random_padded_batch([4, 11, 7], instruction_lengths=[0, 2, 0], seed=2, pad_to=16),
    ]
    packs = [pack_batch(mb, 20) for mb in microbatches]
    for pooling in ("latent", "eos"):
        model = build_model(tiny_model_config(pooling=pooling, pp=2, num_layers=4), pg)
        want = embed_microbatches(model, microbatches, pg)
        got = embed_microbatches(model, [p.model_inputs() for p in packs], pg)
        if rank == 1:
            for w, g, p in zip(want, got, packs):
                diff = (g[p.restore] - w).abs().max().item()
                assert diff <= TOL, f"{pooling}: PP=2 packed embeddings differ by {diff}"
        else:
            assert want is None and got is None


def _check_tp2_then_pp2(rank, world_size):
    # One process group for both layouts: importing megatron-core dominates a process's cost,
    # and each check builds its own model-parallel groups.
    _check_tp2(rank, world_size)
    _check_pp2(rank, world_size)


@pytest.mark.distributed
def test_packing_tensor_parallel_2_and_pipeline_parallel_2():
    run_distributed(_check_tp2_then_pp2, 2)
