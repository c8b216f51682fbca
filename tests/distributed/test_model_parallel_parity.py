"""`NVEmbedModel` at TP=2 and at PP=2 (2 gloo processes each) equals the single-device reference.

For latent, mean and self-attention pooling, on padded mixed-length batches with and without
instructions, in fp32:
- embeddings match transformers' MistralModel + the plain-torch head: max |diff| <= 1e-5;
- at TP=2, the gradients of every (sharded) parameter match the reference's gradients sharded
  the same way: max |diff| <= 1e-5;
- HF -> Megatron shards -> HF is bit-exact (shards gathered from both ranks).
PP=2 runs two micro-batches through megatron-core's pipeline schedule.

Run alone: pytest tests/distributed/test_model_parallel_parity.py
"""

import pytest
import torch
import torch.distributed as dist

from megatron_nvembed.testing import run_distributed

TOL = 1e-5
POOLINGS = ("latent", "mean", "self-attention")


def _check_tp2(rank, world_size):
    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.parallel import initialize_model_parallel
    from megatron_nvembed.testing import (
        random_padded_batch,
        randomized_reference,
        tiny_model_config,
    )

    pg = initialize_model_parallel(2, 1, seed=7)
    batch = random_padded_batch([13, 6, 9, 2], instruction_lengths=[5, 0, 3, 0], pad_to=16)
    probe = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    for pooling in POOLINGS:
        cfg = tiny_model_config(pooling=pooling, tp=2)
        ref = randomized_reference(cfg)
        model = build_model(cfg, pg)
        src = ref.hf_state_dict()
        hm.load_hf_into_model(model, src, cfg, rank, 0, backbone_prefix="embedding_model.")

        want = ref(**batch)
        got = model(**batch)
        diff = (got - want).abs().max().item()
        assert diff <= TOL, f"{pooling}: TP=2 embeddings differ by {diff}"

        (want * probe).sum().backward()
        (got * probe).sum().backward()
        ref_grads = {k: p.grad for k, p in ref.named_parameters()}
        sharded = hm.hf_to_megatron(ref_grads, cfg, rank, 0, backbone_prefix="embedding_model.")
        for name, p in model.named_parameters():
            gdiff = (p.grad - sharded[name]).abs().max().item()
            assert gdiff <= TOL, f"{pooling}: grad of {name} differs by {gdiff} on rank {rank}"

        shards = [None, None]
        dist.all_gather_object(shards, hm.model_to_hf_shard(model))
        back = hm.megatron_to_hf([shards], cfg, backbone_prefix="embedding_model.")
        assert set(back) == set(src)
        for k in src:
            assert torch.equal(back[k], src[k].detach()), f"{pooling}: round trip changed {k}"


def _check_pp2(rank, world_size):
    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.inference import embed_microbatches
    from megatron_nvembed.parallel import initialize_model_parallel
    from megatron_nvembed.testing import (
        random_padded_batch,
        randomized_reference,
        tiny_model_config,
    )

    pg = initialize_model_parallel(1, 2, seed=7)
    microbatches = [
        random_padded_batch([13, 6, 9], instruction_lengths=[5, 0, 3], seed=1),
        random_padded_batch([4, 11, 7], instruction_lengths=[0, 2, 0], seed=2, pad_to=16),
    ]
    for pooling in POOLINGS:
        cfg = tiny_model_config(pooling=pooling, pp=2, num_layers=4)
        ref = randomized_reference(cfg)
        model = build_model(cfg, pg)
        assert model.pre_process == (rank == 0) and model.post_process == (rank == 1)
        src = ref.hf_state_dict()
        hm.load_hf_into_model(model, src, cfg, 0, rank, backbone_prefix="embedding_model.")
        out = embed_microbatches(model, microbatches, pg)
        if rank == 1:
            assert len(out) == 2
            for mb, got in zip(microbatches, out):
                with torch.no_grad():
                    want = ref(**mb)
                diff = (got - want).abs().max().item()
                assert diff <= TOL, f"{pooling}: PP=2 embeddings differ by {diff}"
        else:
            assert out is None

        stages = [None, None]
        dist.all_gather_object(stages, hm.model_to_hf_shard(model))
        back = hm.megatron_to_hf(
            [[stages[0]], [stages[1]]], cfg, backbone_prefix="embedding_model."
        )
        assert set(back) == set(src)
        for k in src:
            assert torch.equal(back[k], src[k]), f"{pooling}: round trip changed {k}"


def _check_tp2_then_pp2(rank, world_size):
    # One process group for both layouts: importing megatron-core dominates a process's cost,
    # and each check builds its own model-parallel groups.
    _check_tp2(rank, world_size)
    _check_pp2(rank, world_size)


@pytest.mark.distributed
def test_tensor_parallel_2_and_pipeline_parallel_2_match_reference():
    run_distributed(_check_tp2_then_pp2, 2)
