"""`NVEmbedModel` (one process, TP=PP=1) against the plain-torch/transformers reference.

Proves, in fp32 on CPU:
- parity with transformers' MistralModel (padding-only 4-D mask) + a plain-torch head in NV-Embed's
  key layout, for every pooling type and both attention backends (sdpa, megatron-core local), on
  padded batches of mixed lengths with and without instructions: max |diff| <= 1e-5;
- the bidirectional model sees the future (changing a later token changes an earlier position's
  output); the causal one does not;
- an embedding does not depend on the rest of its batch or on how much padding surrounds it;
- HF -> model -> HF weights are bit-exact; configuration errors raise ValueError naming the setting.

Run alone: pytest tests/unit/test_model_parity.py
"""

import pytest
import torch

from megatron_nvembed.conversion import hf_mapping as hm
from megatron_nvembed.core.config import ModelConfig
from megatron_nvembed.testing import (
    init_single_process_megatron,
    random_padded_batch,
    randomized_reference,
    tiny_model_config,
)

TOL = 1e-5  # fp32; observed differences are ~1e-7 (different summation orders only)


@pytest.fixture(scope="module")
def pg():
    return init_single_process_megatron()


def _pair(cfg, pg):
    from megatron_nvembed.model.build import build_model

    ref = randomized_reference(cfg)
    model = build_model(cfg, pg)
    hm.load_hf_into_model(model, ref.hf_state_dict(), cfg, 0, 0, backbone_prefix="embedding_model.")
    return ref, model.eval()


BATCH = dict(lengths=[12, 5, 9, 3], instruction_lengths=[4, 0, 6, 0])


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@pytest.mark.parametrize("pooling", ["latent", "mean", "eos", "self-attention"])
@pytest.mark.parametrize("mask_type", ["bidirectional", "causal"])
def test_parity_with_transformers_reference(pg, backend, pooling, mask_type):
    cfg = tiny_model_config(pooling=pooling, mask_type=mask_type, backend=backend)
    ref, model = _pair(cfg, pg)
    batch = random_padded_batch(**BATCH, pad_to=16)
    with torch.no_grad():
        want = ref(**batch)
        got = model(**batch)
    assert got.shape == (4, 64)
    assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert (got - want).abs().max().item() <= TOL


def _position_outputs(model, ids, mask):
    with torch.no_grad():
        return model.encode_hidden(ids, mask).transpose(0, 1)  # [b, s, h]


@pytest.mark.parametrize("backend", ["sdpa", "local"])
def test_bidirectional_sees_the_future_causal_does_not(pg, backend):
    from megatron_nvembed.model.build import build_model

    batch = random_padded_batch([10], seed=3)
    changed = batch["input_ids"].clone()
    changed[0, 8] = (changed[0, 8] + 7) % 100 + 3  # a later token
    for mask_type, expect_change in (("bidirectional", True), ("causal", False)):
        model = build_model(tiny_model_config(mask_type=mask_type, backend=backend), pg).eval()
        a = _position_outputs(model, batch["input_ids"], batch["attention_mask"])
        b = _position_outputs(model, changed, batch["attention_mask"])
        diff = (a[0, :8] - b[0, :8]).abs().max().item()  # positions before the change
        if expect_change:
            assert diff > 1e-3, f"{mask_type}: earlier positions ignored a later token"
        else:
            assert diff <= 1e-6, f"{mask_type}: earlier positions saw a later token ({diff})"


@pytest.mark.parametrize("pooling", ["latent", "self-attention", "mean", "eos"])
def test_embedding_independent_of_batch_and_padding(pg, pooling):
    from megatron_nvembed.model.build import build_model

    model = build_model(tiny_model_config(pooling=pooling), pg).eval()
    batch = random_padded_batch([7, 11, 4], instruction_lengths=[3, 0, 2], seed=5)
    with torch.no_grad():
        together = model(**batch)
        for i, n in enumerate([7, 11, 4]):
            for width in (n, n + 9):  # alone, without and with extra padding
                row = {k: v[i : i + 1, :n] for k, v in batch.items()}
                pad = width - n
                row = {
                    "input_ids": torch.nn.functional.pad(row["input_ids"], (0, pad), value=2),
                    "attention_mask": torch.nn.functional.pad(row["attention_mask"], (0, pad)),
                    "pool_mask": torch.nn.functional.pad(row["pool_mask"], (0, pad)),
                }
                alone = model(**row)
                assert (alone[0] - together[i]).abs().max().item() <= TOL


def test_instruction_tokens_are_out_of_pooling_only(pg):
    """The pool mask changes the embedding; attention still sees the instruction tokens."""
    from megatron_nvembed.model.build import build_model

    model = build_model(tiny_model_config(pooling="mean"), pg).eval()
    batch = random_padded_batch([9], instruction_lengths=[4], seed=1)
    with torch.no_grad():
        masked = model(**batch)
        unmasked = model(batch["input_ids"], batch["attention_mask"], batch["attention_mask"])
        hidden = _position_outputs(model, batch["input_ids"], batch["attention_mask"])[0]
    expected = torch.nn.functional.normalize(hidden[4:9].mean(0), dim=-1)
    assert (masked[0] - expected).abs().max().item() <= TOL
    assert (masked - unmasked).abs().max().item() > 1e-4


def test_hf_model_hf_round_trip_bit_exact(pg):
    cfg = tiny_model_config()
    ref, model = _pair(cfg, pg)
    back = hm.megatron_to_hf(
        [[hm.model_to_hf_shard(model)]], cfg, backbone_prefix="embedding_model."
    )
    src = ref.hf_state_dict()
    assert set(back) == set(src)
    assert all(torch.equal(back[k], src[k]) for k in src)


def test_latent_kv_is_input_independent(pg):
    """The latents' K/V are computed once per forward, from parameters alone."""
    from megatron_nvembed.model.build import build_model

    model = build_model(tiny_model_config(), pg).eval()
    calls = []
    model.pooling.to_kv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    batch = random_padded_batch([6, 9, 3, 8, 5])
    with torch.no_grad():
        model(**batch)
    assert calls == [torch.Size([16, 1, 64])]  # one call, on the 16 latents, not per sample


@pytest.mark.parametrize(
    "change,match",
    [
        (
            dict(num_attention_heads=6, num_query_groups=3),
            "num_query_groups.*tensor-model-parallel-size",
        ),
        (dict(num_layers=3), "num_layers.*pipeline-model-parallel-size"),
        (
            dict(num_attention_heads=5, num_query_groups=5),
            "num_attention_heads.*tensor-model-parallel-size",
        ),
        (dict(mask_type="sliding"), "mask_type"),
        (dict(attention_backend="flash"), "--attention-backend must be one of"),
    ],
)
def test_config_errors_name_the_setting(change, match):
    cfg = tiny_model_config(tp=2, pp=2, num_layers=4)
    for k, v in change.items():
        setattr(cfg.model, k, v)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_pooling_config_errors():
    cfg = tiny_model_config(tp=2)
    cfg.pooling.num_heads = 3
    with pytest.raises(ValueError, match="pooling num_heads"):
        cfg.validate()
    cfg = tiny_model_config()
    cfg.pooling.type = "max"
    with pytest.raises(ValueError, match="pooling type"):
        cfg.validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_te_backend_without_cuda_is_an_error():
    from megatron_nvembed.model.specs import resolve_backend

    with pytest.raises(ValueError, match="attention_backend='te'.*CUDA"):
        resolve_backend(ModelConfig(attention_backend="te"))
    assert resolve_backend(ModelConfig(attention_backend="auto")) == "sdpa"
