"""`--context-parallel-size 2` on Transformer Engine equals the reference (2 GPUs, NCCL).

Skipped without 2 CUDA devices or without Transformer Engine (context parallelism is TE's
attention; the layout and gather it builds on are tested on CPU in
tests/distributed/test_context_parallel_layout.py). On a machine with 2 GPUs:
`pytest tests/gpu/test_context_parallel.py`.

At CP=2 (texts of odd lengths, so each is padded to a multiple of 4 and split in 4 chunks), fp32
with TF32 off, for the latent and mean heads and both masks: embeddings equal transformers'
MistralModel + the plain-torch head within 1e-4, and every parameter's gradient, after the sum
over the CP group that DDP's average over data x context ranks amounts to (`gather_context_parallel`
scales by CP), within 1e-4. The CP split of the padded stream equals Transformer Engine's own
`thd_get_partitioned_indices`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_nvembed.testing import run_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]
TOL = 1e-4


def _te_available():
    from megatron_nvembed.model.specs import te_available

    return te_available()


def _check_cp2(rank, world):
    import transformer_engine_torch as tex

    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.context_parallel import cp_token_positions
    from megatron_nvembed.testing import (
        random_padded_batch,
        randomized_reference,
        tiny_model_config,
    )

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pg = initialize_model_parallel(1, 1, seed=7, context_parallel_size=2)
    cu = torch.tensor([0, 16, 28, 32], dtype=torch.int32, device="cuda")
    want_idx = tex.thd_get_partitioned_indices(cu, 32, 2, rank)
    assert torch.equal(cp_token_positions(cu, 2, rank), want_idx.long()), rank
    batch = random_padded_batch([13, 6, 9, 3], instruction_lengths=[5, 0, 3, 0], pad_to=15)
    batch = {k: v.cuda() for k, v in batch.items()}
    probe = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).cuda()
    for pooling in ("latent", "mean"):
        for mask_type in ("bidirectional", "causal"):
            cfg = tiny_model_config(pooling=pooling, mask_type=mask_type, backend="te")
            cfg.parallel.context_parallel_size = 2
            ref = randomized_reference(cfg).cuda()
            model = build_model(cfg, pg)
            hm.load_hf_into_model(
                model, ref.hf_state_dict(), cfg, 0, 0, backbone_prefix="embedding_model."
            )
            want = ref(**batch)
            got = model(**batch)
            diff = (got - want).abs().max().item()
            assert diff <= TOL, f"{pooling}/{mask_type}: CP=2 embeddings differ by {diff}"
            (want * probe).sum().backward()
            (got * probe).sum().backward()
            ref_grads = {k: p.grad for k, p in ref.named_parameters()}
            sharded = hm.hf_to_megatron(ref_grads, cfg, 0, 0, backbone_prefix="embedding_model.")
            for name, p in model.named_parameters():
                g = p.grad.clone()
                dist.all_reduce(g, group=pg.cp)  # DDP averages over CP ranks; the gather scaled
                g /= 2
                gdiff = (g - sharded[name]).abs().max().item()
                assert gdiff <= TOL, f"{pooling}/{mask_type}: grad of {name} differs by {gdiff}"


@pytest.mark.skipif(not _te_available(), reason="needs Transformer Engine")
def test_context_parallel_2_on_te_matches_reference():
    run_distributed(_check_cp2, 2, backend="nccl")
