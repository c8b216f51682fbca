"""`NVEmbedModel` at TP=2 and at PP=2 (2 gloo processes each) equals the single-device reference.

For latent, mean and self-attention pooling, on padded mixed-length batches with and without
instructions, in fp32:
- embeddings match transformers' MistralModel + the plain-torch head: max |diff| <= 1e-5;
- at TP=2, the gradients of every (sharded) parameter match the reference's gradients sharded
  the same way: max |diff| <= 1e-5;
- HF -> Megatron shards -> HF is bit-exact (shards gathered from both ranks).
PP=2 runs two micro-batches through megatron-core's pipeline schedule.

Qwen2 (Q/K/V biases), Qwen3 (per-head Q/K RMSNorm, head_dim 24 != 64 / 4 heads, GQA) and Llama 3.x
(rope_scaling llama3) backbones imported from tiny random transformers `Qwen2Model` /
`Qwen3Model` / `LlamaModel`: at TP=2 and at PP=2 the final hidden states (causal mask,
right-padded batch up to 40 tokens, real positions) equal transformers' `last_hidden_state`:
max |diff| <= 1e-5; HF -> shards -> HF is bit-exact (biases and norms included).

Run alone: pytest tests/distributed/test_model_parallel_parity.py
"""

import pytest
import torch
import torch.distributed as dist

from megatron_nvembed.testing import hf_hidden_states, run_distributed

TOL = 1e-5
POOLINGS = ("latent", "mean", "self-attention")


def _check_tp2(rank, world_size):
    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.model.build import build_model
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
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.inference import embed_microbatches
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


def _hf_backbone_pair(kind, pg, tp_rank, pp_rank, tp=1, pp=1):
    """A tiny transformers backbone and this rank's megatron stage loaded from it."""
    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.conversion.hf_config import model_config_from_hf
    from megatron_nvembed.core.config import EmbeddingModelConfig, ParallelConfig, PoolingConfig
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.testing import tiny_hf_backbone

    hf = tiny_hf_backbone(kind, num_layers=2 * pp)
    m = model_config_from_hf(hf.config.to_dict(), f"tiny {kind} config")
    m.mask_type = "causal"
    cfg = EmbeddingModelConfig(model=m, pooling=PoolingConfig(type="mean"))
    cfg.parallel = ParallelConfig(tp, pp)
    model = build_model(cfg, pg).eval()
    src = hf.state_dict()
    hm.load_hf_into_model(model, src, cfg, tp_rank, pp_rank, include_head=False)
    return hf, cfg, model, src


HF_BACKBONE_BATCH = dict(lengths=[13, 40, 9, 2], seed=4)


def _check_hf_backbones_tp2(rank, world_size):
    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.testing import TINY_HF_KINDS, random_padded_batch

    pg = initialize_model_parallel(2, 1, seed=7)
    batch = random_padded_batch(**HF_BACKBONE_BATCH)
    real = batch["attention_mask"].bool()
    for kind in TINY_HF_KINDS:
        hf, cfg, model, src = _hf_backbone_pair(kind, pg, rank, 0, tp=2)
        with torch.no_grad():
            got = model.encode_hidden(batch["input_ids"], batch["attention_mask"]).transpose(0, 1)
        diff = (got - hf_hidden_states(hf, batch))[real].abs().max().item()
        assert diff <= TOL, f"{kind}: TP=2 hidden states differ by {diff} on rank {rank}"

        shards = [None, None]
        dist.all_gather_object(shards, hm.model_to_hf_shard(model))
        back = hm.megatron_to_hf([shards], cfg)
        assert set(back) == set(src)
        for k in src:
            assert torch.equal(back[k], src[k]), f"{kind}: round trip changed {k}"


def _check_hf_backbones_pp2(rank, world_size):
    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.testing import TINY_HF_KINDS, random_padded_batch

    pg = initialize_model_parallel(1, 2, seed=7)
    batch = random_padded_batch(**HF_BACKBONE_BATCH)
    real = batch["attention_mask"].bool()
    for kind in TINY_HF_KINDS:
        hf, cfg, model, src = _hf_backbone_pair(kind, pg, 0, rank, pp=2)
        assert model.pre_process == (rank == 0) and model.post_process == (rank == 1)
        # Stage 0's output goes to stage 1 by hand: this checks the hidden states themselves
        # (the pipeline schedule is exercised by the pooled checks above).
        shape = (batch["input_ids"].shape[1], batch["input_ids"].shape[0], 64)
        with torch.no_grad():
            if rank == 0:
                dist.send(model.encode_hidden(batch["input_ids"], batch["attention_mask"]), 1)
            else:
                received = torch.empty(shape)
                dist.recv(received, 0)
                model.set_input_tensor(received)
                got = model.encode_hidden(batch["input_ids"], batch["attention_mask"])
                diff = (got.transpose(0, 1) - hf_hidden_states(hf, batch))[real].abs().max().item()
                assert diff <= TOL, f"{kind}: PP=2 hidden states differ by {diff}"

        stages = [None, None]
        dist.all_gather_object(stages, hm.model_to_hf_shard(model))
        back = hm.megatron_to_hf([[stages[0]], [stages[1]]], cfg)
        assert set(back) == set(src)
        for k in src:
            assert torch.equal(back[k], src[k]), f"{kind}: round trip changed {k}"


def _check_tp2_then_pp2(rank, world_size):
    # One process group for both layouts: importing megatron-core dominates a process's cost,
    # and each check builds its own model-parallel groups.
    _check_tp2(rank, world_size)
    _check_hf_backbones_tp2(rank, world_size)
    _check_pp2(rank, world_size)
    _check_hf_backbones_pp2(rank, world_size)


@pytest.mark.distributed
def test_tensor_parallel_2_and_pipeline_parallel_2_match_reference():
    run_distributed(_check_tp2_then_pp2, 2)
