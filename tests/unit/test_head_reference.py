"""The latent-attention pooling head against an independent plain-torch reference.

The reference below (`reference_latent_pool`) is written from the NV-Embed paper (Section 3.2:
token states are the queries, a trainable latent array gives keys and values, multi-head
cross-attention, an MLP with GELU, mean pooling) and the released format's exact math
(shared/reference/nvembed-format.md beside the checkout, "Forward math": LayerNorms with bias and eps 1e-5,
Q from LN_0(X), [K ; V] rows of `to_kv` from LN_ctx(latents), softmax(Q K^T / sqrt(dh)) per
head, `to_out`, residual on the un-normalised X, GEGLU feed-forward with rows [value ; gate] and
exact erf GELU, second residual, masked mean, L2 normalisation). It takes its weights by the
released checkpoint's key names and uses no project code, no `torch.nn.functional` and no
`torch.nn` layer: LayerNorm, softmax, GELU and the mean are spelled out.

Proves, in float64 on CPU (the head is built in float64 by megatron-core, TP=1, one process):
- the project's `AttentionPooling(kind="latent")` (via `build_pooling`), given seeded random
  weights in every parameter, equals the reference on a ragged batch whose pool masks drop
  leading instruction tokens in some rows and padding in others: max |diff| <= 1e-10 without
  the output L2 normalisation (so a wrong pooling count or a global scale error cannot hide
  behind it), for heads narrower than the model width and for NV-Embed's heads as wide as the
  model (inner width != model width, so `to_out` orientation matters);
- with the output L2 normalisation too: max |diff| <= 1e-10;
- the project's parameters map one-to-one onto the released key names (no parameter left over);
- tokens the pool mask drops do not contribute: perturbing every such token (instruction
  tokens and padding) leaves the embedding bit-identical, while perturbing one pooled token
  changes it; the attention mask does not enter the latent head at all (no mask in the
  format's latent attention), so passing a different attention mask changes nothing.

Tolerance 1e-10: both sides compute the same float64 function with different summation orders
(BLAS blocking, SDPA vs an explicit softmax); measured max |diff| is ~9e-15, so
1e-10 has ample margin, while formula differences move the unnormalised output by far more
(measured: no 1/sqrt(dh) 4.5, swapped [value ; gate] halves 9.6, tanh-approximated GELU 1.4e-3).

Not covered here: the tensor-parallel split. `RowParallelLinear` all-reduces over a real
TP process group in its forward, so TP=2 cannot run in-process without a 2-rank init; it is
covered by tests/distributed/test_model_parallel_parity.py.

Run alone: pytest -q -p no:cacheprovider tests/unit/test_head_reference.py
"""

import math

import pytest
import torch

from megatron_nvembed.core.config import PoolingConfig
from megatron_nvembed.testing import init_single_process_megatron, tiny_model_config

TOL = 1e-10
D = 64  # model width of `tiny_model_config`
EPS = 1e-5  # the format's LayerNorm eps

# project parameter name -> released checkpoint key (prefix `latent_attention_model.` omitted)
NAMES = {
    "latents": "latents",
    "norm.weight": "cross_attend_blocks.0.norm.weight",
    "norm.bias": "cross_attend_blocks.0.norm.bias",
    "norm_context.weight": "cross_attend_blocks.0.norm_context.weight",
    "norm_context.bias": "cross_attend_blocks.0.norm_context.bias",
    "to_q.weight": "cross_attend_blocks.0.fn.to_q.weight",
    "to_kv.weight": "cross_attend_blocks.0.fn.to_kv.weight",
    "to_out.weight": "cross_attend_blocks.0.fn.to_out.weight",
    "ff_norm.weight": "cross_attend_blocks.1.norm.weight",
    "ff_norm.bias": "cross_attend_blocks.1.norm.bias",
    "ff_in.weight": "cross_attend_blocks.1.fn.net.0.weight",
    "ff_in.bias": "cross_attend_blocks.1.fn.net.0.bias",
    "ff_out.weight": "cross_attend_blocks.1.fn.net.2.weight",
    "ff_out.bias": "cross_attend_blocks.1.fn.net.2.bias",
}


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def reference_latent_pool(sd, x, pool_mask, heads, normalize):
    """NV-Embed latent pooling. sd: released key -> tensor; x [b, s, d]; pool_mask [b, s].
    Returns [b, d]."""
    c = "cross_attend_blocks."
    q = (
        _layer_norm(x, sd[c + "0.norm.weight"], sd[c + "0.norm.bias"])
        @ sd[c + "0.fn.to_q.weight"].T
    )
    z = _layer_norm(sd["latents"], sd[c + "0.norm_context.weight"], sd[c + "0.norm_context.bias"])
    kv = z @ sd[c + "0.fn.to_kv.weight"].T  # [r, 2*inner]: K columns, then V columns
    inner = q.shape[-1]
    k, v = kv[:, :inner], kv[:, inner:]
    dh = inner // heads
    outs = []
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        logits = q[..., cols] @ k[:, cols].T / math.sqrt(dh)  # [b, s, r]
        p = torch.exp(logits - logits.max(-1, keepdim=True).values)
        outs.append((p / p.sum(-1, keepdim=True)) @ v[:, cols])  # [b, s, dh]
    x1 = x + torch.cat(outs, -1) @ sd[c + "0.fn.to_out.weight"].T
    ln1 = _layer_norm(x1, sd[c + "1.norm.weight"], sd[c + "1.norm.bias"])
    ag = ln1 @ sd[c + "1.fn.net.0.weight"].T + sd[c + "1.fn.net.0.bias"]
    a, g = ag[..., : ag.shape[-1] // 2], ag[..., ag.shape[-1] // 2 :]
    gelu = 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0)))
    x2 = x1 + (a * gelu) @ sd[c + "1.fn.net.2.weight"].T + sd[c + "1.fn.net.2.bias"]
    m = pool_mask.to(x.dtype)[..., None]  # [b, s, 1]
    e = (x2 * m).sum(1) / m.sum(1)
    return e / torch.sqrt((e * e).sum(-1, keepdim=True)) if normalize else e


@pytest.fixture(scope="module")
def pg():
    return init_single_process_megatron()


def _head_and_weights(pg, heads, head_dim, normalize, seed=0):
    """The project's head in float64 with seeded random weights, and the same weights by the
    released key names."""
    from megatron_nvembed.model.build import transformer_config
    from megatron_nvembed.model.pooling import build_pooling

    cfg = PoolingConfig(
        type="latent", num_latents=7, num_heads=heads, head_dim=head_dim, normalize=normalize
    )
    tcfg = transformer_config(tiny_model_config(), params_dtype=torch.float64)
    head = build_pooling(D, cfg, tcfg, pg.tp).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(head.named_parameters()):
            assert p.dtype == torch.float64, name
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name == "latents":
                p.copy_(noise)
            elif name.endswith("norm.weight") or name.endswith("norm_context.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)
    params = dict(head.named_parameters())
    assert set(params) == set(NAMES), "project head parameters and released keys differ"
    sd = {NAMES[n]: p.detach().clone() for n, p in params.items()}
    return head, sd


LENGTHS = [9, 6, 4, 1, 7]
INSTRUCTION = [3, 0, 2, 0, 6]  # pool_mask[:, :n] = 0 (BOS + n-1 instruction tokens)
SEQ = 10


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENGTHS), SEQ, D, generator=g, dtype=torch.float64)  # [b, s, d]
    attn = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        attn[i, :n] = 1
    pool = attn.clone()
    for i, n in enumerate(INSTRUCTION):
        pool[i, :n] = 0
    return x, attn, pool


def _project(head, x_bsd, attn, pool):
    with torch.no_grad():
        return head(x_bsd.transpose(0, 1).contiguous(), attn, pool)  # head takes [s, b, d]


HEAD_SHAPES = pytest.mark.parametrize("heads,head_dim", [(2, 32), (2, None)], ids=["dh32", "dh=d"])


def _compare(pg, heads, head_dim, normalize) -> float:
    head, sd = _head_and_weights(pg, heads, head_dim, normalize)
    x, attn, pool = _batch()
    got = _project(head, x, attn, pool)
    want = reference_latent_pool(sd, x, pool, heads, normalize)
    assert got.dtype == torch.float64 and got.shape == (len(LENGTHS), D)
    # the comparison is not vacuous: embeddings are far from zero and differ between rows
    assert want.abs().max().item() > 0.1
    assert (want[0] - want[1]).abs().max().item() > 1e-2
    return (got - want).abs().max().item()


@HEAD_SHAPES
def test_head_matches_paper_reference(pg, heads, head_dim):
    """Unnormalised embeddings (the head's whole math but the final L2 step): float64, 1e-10."""
    diff = _compare(pg, heads, head_dim, normalize=False)
    assert diff <= TOL, f"max |diff| {diff:.3e} > {TOL}"


@HEAD_SHAPES
def test_normalised_head_matches_in_float64(pg, heads, head_dim):
    """With the output L2 normalisation: float64, 1e-10 (the head normalises in float64 for a
    float64 model; it rounded through float32 before, ~2e-8 off)."""
    diff = _compare(pg, heads, head_dim, normalize=True)
    assert diff <= TOL, f"max |diff| {diff:.3e} > {TOL}"


def test_pool_mask_excluded_tokens_do_not_contribute(pg):
    head, sd = _head_and_weights(pg, 2, 32, normalize=False, seed=3)
    x, attn, pool = _batch(seed=4)
    assert (pool != attn).any()  # instruction tokens: attended, not pooled
    base = _project(head, x, attn, pool)
    ref_base = reference_latent_pool(sd, x, pool, 2, False)
    assert (base - ref_base).abs().max().item() <= TOL

    noise = 50.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    dropped = (pool == 0)[..., None]  # instruction tokens and padding
    x_perturbed = torch.where(dropped, x + noise, x)
    assert torch.equal(_project(head, x_perturbed, attn, pool), base)
    assert torch.equal(reference_latent_pool(sd, x_perturbed, pool, 2, False), ref_base)

    # the latent head takes no attention mask: attending "everything" changes nothing
    assert torch.equal(_project(head, x, torch.ones_like(attn), pool), base)

    # control: one pooled token moved does change the embedding of its row only
    x_pooled = x.clone()
    x_pooled[0, INSTRUCTION[0]] += 1.0
    moved = _project(head, x_pooled, attn, pool)
    assert (moved[0] - base[0]).abs().max().item() > 1e-3
    assert torch.equal(moved[1:], base[1:])
