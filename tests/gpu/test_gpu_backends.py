"""GPU paths: the sdpa backend on CUDA and the Transformer Engine backend match the reference.

Skipped without CUDA (and the TE test without Transformer Engine). On a GPU machine:
`pytest tests/gpu -q`. fp32 parity tolerance 1e-4 (TF32 is disabled for the comparison; CUDA
kernels sum in other orders than CPU ones); bf16 checks cosine similarity >= 0.999.

Run alone: pytest tests/gpu/test_gpu_backends.py
"""

import pytest
import torch

from megatron_nvembed.conversion import hf_mapping as hm
from megatron_nvembed.testing import (
    init_single_process_megatron,
    random_padded_batch,
    randomized_reference,
    tiny_model_config,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _te_available():
    from megatron_nvembed.model.specs import te_available

    return te_available()


@pytest.fixture(scope="module")
def pg():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return init_single_process_megatron()


def _compare(pg, backend, pooling, mask_type, dtype):
    from megatron_nvembed.model.build import build_model

    cfg = tiny_model_config(pooling=pooling, mask_type=mask_type, backend=backend)
    ref = randomized_reference(cfg).cuda()
    model = build_model(cfg, pg)
    hm.load_hf_into_model(model, ref.hf_state_dict(), cfg, 0, 0, backbone_prefix="embedding_model.")
    model = model.to(dtype).eval()
    batch = {
        k: v.cuda() for k, v in random_padded_batch([12, 5, 9, 3], [4, 0, 6, 0], pad_to=16).items()
    }
    with torch.no_grad():
        want = ref(**batch)
        got = model(**batch).float()
    if dtype == torch.float32:
        assert (got - want).abs().max().item() <= 1e-4
    else:
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cos.min().item() >= 0.999


@pytest.mark.parametrize("pooling", ["latent", "mean"])
@pytest.mark.parametrize("mask_type", ["bidirectional", "causal"])
def test_sdpa_on_cuda_matches_reference(pg, pooling, mask_type):
    _compare(pg, "sdpa", pooling, mask_type, torch.float32)
    _compare(pg, "sdpa", pooling, mask_type, torch.bfloat16)


@pytest.mark.skipif(not _te_available(), reason="needs Transformer Engine")
@pytest.mark.parametrize("pooling", ["latent", "mean"])
@pytest.mark.parametrize("mask_type", ["bidirectional", "causal"])
def test_transformer_engine_matches_reference(pg, pooling, mask_type):
    _compare(pg, "te", pooling, mask_type, torch.float32)


def _packed_vs_unpacked(pg, backend, mask_type, dtype, expect_varlen):
    """Packed rows (THD layout) equal the unpacked batch on CUDA; with `expect_varlen` the sdpa
    backend must have used torch's varlen flash kernel (no per-text fallback)."""
    import megatron_nvembed.model.attention as attention
    from megatron_nvembed.data.packing import pack_batch
    from megatron_nvembed.model.build import build_model

    cfg = tiny_model_config(pooling="latent", mask_type=mask_type, backend=backend)
    torch.manual_seed(0)
    model = build_model(cfg, pg).to(dtype).eval()
    batch = random_padded_batch([12, 5, 9, 3, 17, 2, 7, 11], [4, 0, 6, 0, 3, 0, 1, 2], pad_to=20)
    packed = pack_batch(batch, 24).to("cuda")
    batch = {k: v.cuda() for k, v in batch.items()}
    used = []
    if expect_varlen:
        original = attention._varlen_attn

        def counting(*args, **kwargs):
            used.append(args[0].shape)
            return original(*args, **kwargs)

        attention._varlen_attn = counting
    try:
        with torch.no_grad():
            want = model(**batch).float()
            got = model(**packed.model_inputs())[packed.restore].float()
    finally:
        if expect_varlen:
            attention._varlen_attn = original
    if expect_varlen:
        assert len(used) == cfg.model.num_layers
    if dtype == torch.float32:
        assert (got - want).abs().max().item() <= 1e-4
    else:
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cos.min().item() >= 0.999


@pytest.mark.parametrize("mask_type", ["bidirectional", "causal"])
def test_sdpa_packing_on_cuda(pg, mask_type):
    """fp32: the per-text SDPA path; bf16: torch's varlen flash-attention kernel (when this torch
    build has `torch.nn.attention.varlen`)."""
    import megatron_nvembed.model.attention as attention

    _packed_vs_unpacked(pg, "sdpa", mask_type, torch.float32, expect_varlen=False)
    _packed_vs_unpacked(
        pg, "sdpa", mask_type, torch.bfloat16, expect_varlen=attention._varlen_attn is not None
    )


@pytest.mark.skipif(not _te_available(), reason="needs Transformer Engine")
@pytest.mark.parametrize("mask_type", ["bidirectional", "causal"])
def test_transformer_engine_packing_thd(pg, mask_type):
    _packed_vs_unpacked(pg, "te", mask_type, torch.bfloat16, expect_varlen=False)
