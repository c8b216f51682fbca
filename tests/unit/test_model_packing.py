"""Sequence packing in `NVEmbedModel` (one process, TP=PP=1, fp32 on CPU): several texts per row
with `segment_ids`, each attending only to itself (bidirectionally, or causally), RoPE positions
restarting per text, final states unpacked per text before pooling.

Proves: packed embeddings equal the unpacked model's within 1e-5 for latent / mean / eos /
self-attention pooling, bidirectional and causal, sdpa and local backends, on a batch of mixed
lengths with instructions; gradients of every parameter equal within 1e-5 relative; texts of a
row do not see each other; the sdpa backend runs packed rows in the THD layout (the decoder sees
only the real tokens, attention runs per text) and `local` with a block-diagonal mask; with bf16
parameters packed and unpacked embeddings agree within bf16 rounding (2e-2 of the largest entry;
measured 0.5%).

Run alone: pytest tests/unit/test_model_packing.py
"""

import pytest
import torch

from megatron_nvembed.data.packing import pack_batch
from megatron_nvembed.model.specs import build_packed_attention_mask, packed_position_ids
from megatron_nvembed.testing import (
    init_single_process_megatron,
    random_padded_batch,
    tiny_model_config,
)

TOL = 1e-5

LENGTHS = [12, 5, 9, 3, 17, 2, 7, 11]
INSTR = [4, 0, 6, 0, 3, 0, 1, 2]


@pytest.fixture(scope="module")
def pg():
    return init_single_process_megatron()


def _batch(seed=1):
    return random_padded_batch(LENGTHS, INSTR, pad_to=20, seed=seed)


def _model(pg, **kw):
    from megatron_nvembed.model.build import build_model

    torch.manual_seed(0)
    return build_model(tiny_model_config(**kw), pg).eval()


def test_mask_and_positions():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    assert packed_position_ids(seg).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]
    m = build_packed_attention_mask(seg, "bidirectional")  # True = masked
    assert m.shape == (2, 1, 6, 6)
    allowed = ~m[0, 0]
    assert allowed[0].tolist() == [True, True, False, False, False, False]
    assert allowed[3].tolist() == [False, False, True, True, True, False]
    assert allowed[5].tolist() == [False] * 5 + [True]  # padding sees itself only: no NaN
    causal = ~build_packed_attention_mask(seg, "causal")[0, 0]
    assert causal[3].tolist() == [False, False, True, True, False, False]


@pytest.mark.parametrize(
    "backend,pooling",
    [
        ("sdpa", "latent"),
        ("sdpa", "mean"),
        ("sdpa", "eos"),
        ("sdpa", "self-attention"),
        ("local", "latent"),
    ],
)
@pytest.mark.parametrize("mask_type", ["bidirectional", "causal"])
def test_packed_embeddings_equal_unpacked(pg, backend, pooling, mask_type):
    model = _model(pg, pooling=pooling, mask_type=mask_type, backend=backend)
    batch = _batch()
    packed = pack_batch(batch, 24)
    assert packed.segment_ids.shape[0] < len(LENGTHS)  # several texts share rows
    with torch.no_grad():
        want = model(**batch)
        got = model(**packed.model_inputs())
    assert got.shape == want.shape
    assert (got[packed.restore] - want).abs().max().item() <= TOL


@pytest.mark.parametrize("mask_type", ["bidirectional", "causal"])
@pytest.mark.parametrize(
    "backend,pooling", [("sdpa", "latent"), ("sdpa", "mean"), ("sdpa", "eos"), ("local", "latent")]
)
def test_packed_gradients_equal_unpacked(pg, backend, pooling, mask_type):
    model = _model(pg, pooling=pooling, mask_type=mask_type, backend=backend)
    batch = _batch(seed=2)
    packed = pack_batch(batch, 32)
    weights = torch.randn(len(LENGTHS), 64, generator=torch.Generator().manual_seed(3))

    def grads(emb):
        model.zero_grad(set_to_none=True)
        (emb * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads(model(**batch))
    got = grads(model(**packed.model_inputs())[packed.restore])
    assert set(got) == set(want)
    assert set(want) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in want.items():
        rel = (got[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert rel.item() <= TOL, (name, rel.item())


@pytest.mark.parametrize("backend", ["sdpa", "local"])
def test_packed_texts_are_isolated(pg, backend):
    """Changing one text of a packed row leaves the other texts' embeddings unchanged."""
    model = _model(pg, pooling="mean", backend=backend)
    batch = _batch()
    packed = pack_batch(batch, 48)
    inputs = packed.model_inputs()
    changed = {k: v.clone() for k, v in inputs.items()}
    row = inputs["segment_ids"][0]
    changed["input_ids"][0, row == 1] = (changed["input_ids"][0, row == 1] + 5) % 90 + 3
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
    assert (a[0] - b[0]).abs().max().item() > 1e-3
    assert (a[1:] - b[1:]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("backend,thd", [("sdpa", True), ("local", False)])
def test_sdpa_runs_thd_without_padding(pg, backend, thd):
    """sdpa: the decoder runs on the t real tokens as [t, 1, h] and attention runs once per text
    (the CPU path of `SDPAttention`); local: the decoder runs on the padded rows [L, rows, h]."""
    import torch.nn.functional as F

    model = _model(pg, pooling="mean", backend=backend)  # the latent head calls SDPA too
    packed = pack_batch(_batch(), 24)
    real = int(packed.attention_mask.sum())
    rows, width = packed.segment_ids.shape
    assert real < rows * width  # the rows have padding
    shapes = []
    model.decoder.register_forward_hook(
        lambda m, a, k, out: shapes.append(tuple(out.shape)), with_kwargs=True
    )
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return original(*args, **kwargs)

    import megatron_nvembed.model.attention as attention

    attention.F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            model(**packed.model_inputs())
    finally:
        attention.F.scaled_dot_product_attention = original
    layers = model.config.num_layers
    if thd:
        assert shapes == [(real, 1, model.config.hidden_size)]
        assert len(calls) == layers * len(LENGTHS)  # one per text per layer
        assert sorted(c[2] for c in calls[: len(LENGTHS)]) == sorted(LENGTHS)
    else:
        assert shapes == [(width, rows, model.config.hidden_size)]
        assert not calls  # megatron-core's own attention


@pytest.mark.parametrize(
    "backend,pooling,unpacks",
    [
        ("sdpa", "latent", False),
        ("sdpa", "mean", False),
        ("sdpa", "eos", False),
        ("sdpa", "self-attention", True),
        ("local", "latent", True),
    ],
)
def test_token_wise_heads_pool_thd_tokens_without_unpacking(pg, backend, pooling, unpacks):
    """On THD (sdpa) the latent / mean / EOS heads run on the t real tokens ([t, 1, h]: no
    padding computed in the head either); self-attention pooling and the local backend's padded
    rows go through `unpack_hidden` (one right-padded row per text). The embeddings equal the
    unpacked model's either way (test_packed_embeddings_equal_unpacked)."""
    import megatron_nvembed.model.nvembed_model as nvembed_model

    model = _model(pg, pooling=pooling, backend=backend)
    packed = pack_batch(_batch(), 24)
    real = int(packed.attention_mask.sum())
    seen = []
    original = nvembed_model.unpack_hidden
    nvembed_model.unpack_hidden = lambda *a: seen.append(1) or original(*a)
    head_inputs = []
    if pooling == "latent":
        model.pooling.to_q.register_forward_hook(
            lambda m, a, out: head_inputs.append(tuple(a[0].shape[:2]))
        )
    try:
        with torch.no_grad():
            out = model(**packed.model_inputs())
    finally:
        nvembed_model.unpack_hidden = original
    assert out.shape[0] == len(LENGTHS)
    assert bool(seen) == unpacks
    if pooling == "latent":
        want = (max(LENGTHS), len(LENGTHS)) if unpacks else (real, 1)
        assert head_inputs == [want]


@pytest.mark.parametrize("pooling", ["latent", "mean"])
def test_bf16_packed_embeddings_match_unpacked(pg, pooling):
    """bf16 parameters (the GPU dtype; on CPU the THD path runs one SDPA per text in bf16): packed
    embeddings equal the unpacked ones within bf16 rounding, 2e-2 of the largest entry (the
    packed and padded calls sum in different orders; 8-bit mantissa)."""
    from megatron_nvembed.model.build import build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_config(pooling=pooling), pg, params_dtype=torch.bfloat16)
    model.eval()
    batch = _batch(seed=4)
    packed = pack_batch(batch, 24)
    with torch.no_grad():
        want = model(**batch).float()
        got = model(**packed.model_inputs())[packed.restore].float()
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got - want).abs().max() / want.abs().max()
    assert err.item() <= 2e-2, err.item()
