"""LoRA on tensor-parallel layers (TP=2, 2 gloo processes) against single-device math.

With random non-zero adapters on every `linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`:
- the TP=2 model's embeddings equal transformers' reference loaded with the merged weights
  W + (alpha/r) B A (gathered from both ranks): max |diff| <= 1e-5;
- adapter gradients satisfy the exact identities with the reference's weight gradients dW:
  column layers dB_r = s dW_r A^T, dA = s sum_r B_r^T dW_r; row layers dA_r = s B^T dW_r,
  dB = s sum_r dW_r A_r^T (max |diff| <= 1e-5);
- the frozen backbone gets no gradient; the pooling head does;
- merge_lora leaves the embeddings unchanged (<= 1e-5) and removes every adapter.

Run alone: pytest tests/distributed/test_lora_tp.py
"""

import pytest
import torch
import torch.distributed as dist

from megatron_nvembed.testing import run_distributed

TOL = 1e-5


def _check(rank, world_size):
    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import LoRAParallelLinear, apply_lora, merge_lora
    from megatron_nvembed.testing import (
        random_padded_batch,
        randomized_reference,
        tiny_model_config,
    )

    pg = initialize_model_parallel(2, 1, seed=7)
    cfg = tiny_model_config(tp=2)
    ref = randomized_reference(cfg)
    model = build_model(cfg, pg)
    hm.load_hf_into_model(
        model, ref.hf_state_dict(), cfg, rank, 0, backbone_prefix="embedding_model."
    )
    apply_lora(model, rank=4, alpha=8.0)
    loras = {n: m for n, m in model.named_modules() if isinstance(m, LoRAParallelLinear)}
    assert len(loras) == 4 * cfg.model.num_layers
    with torch.no_grad():
        for i, (_name, m) in enumerate(sorted(loras.items())):
            own = rank if m.parallel == "column" else 0  # replicated B must agree across ranks
            g = torch.Generator().manual_seed(100 * i + own)
            m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=g))

    batch = random_padded_batch([11, 6, 9], instruction_lengths=[4, 0, 2], pad_to=16)
    probe = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    emb = model(**batch)
    (emb * probe).sum().backward()

    # merged weights, gathered and loaded into the single-device reference
    merged = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        key = name.replace(".base.", ".")
        merged[key] = p.detach().clone()
    for name, m in loras.items():
        merged[name + ".weight"] = (m.base.weight + m.scale * m.lora_B @ m.lora_A).detach()
    shards = [None, None]
    dist.all_gather_object(shards, merged)
    ref2 = randomized_reference(cfg)
    ref2.load_state_dict(hm.megatron_to_hf([shards], cfg, backbone_prefix="embedding_model."))
    want = ref2(**batch)
    assert (emb - want).abs().max().item() <= TOL
    (want * probe).sum().backward()
    grads = {k: p.grad for k, p in ref2.named_parameters()}
    dw = hm.hf_to_megatron(grads, cfg, rank, 0, backbone_prefix="embedding_model.")

    group = pg.tp
    for name, m in loras.items():
        d = dw[name + ".weight"]
        A, B, s = m.lora_A.detach(), m.lora_B.detach(), m.scale
        if m.parallel == "column":
            want_b = s * d @ A.T
            want_a = s * B.T @ d
            dist.all_reduce(want_a, group=group)
        else:
            want_a = s * B.T @ d
            want_b = s * d @ A.T
            dist.all_reduce(want_b, group=group)
        assert (m.lora_B.grad - want_b).abs().max().item() <= TOL, name
        assert (m.lora_A.grad - want_a).abs().max().item() <= TOL, name

    for name, p in model.named_parameters():
        if name.startswith("pooling."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif ".lora_" not in name:
            assert p.grad is None and not p.requires_grad, name

    with torch.no_grad():
        assert merge_lora(model) == len(loras)
        after = model(**batch)
    assert not any(isinstance(m, LoRAParallelLinear) for m in model.modules())
    assert (after - emb).abs().max().item() <= TOL


@pytest.mark.distributed
def test_lora_tp2_matches_merged_single_device_math():
    run_distributed(_check, 2)
