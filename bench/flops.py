"""Analytic FLOP count of one NV-Embed LoRA training step (forward + backward).

Conventions (one multiply-add = 2 FLOPs; only matrix products are counted: norms, activations,
softmax, RoPE, the embedding lookup, masked mean and the optimizer are left out):

* Frozen decoder linears (QKV, attention output, SwiGLU fc1, fc2): forward, plus the input
  (activation) gradient in the backward; no weight gradient. The very first linear of the stack
  (layer 0's QKV) gets no input gradient either: its input is the frozen token embedding, so
  nothing upstream needs a gradient.
* LoRA adapters (A: in -> r, B: r -> out) on those four linears: full cost, forward + input
  gradient + weight gradient (3x forward), except that layer 0's QKV adapter, like its base,
  needs no input gradient (2x forward for that A).
* Decoder self-attention scores (Q K^T) and context (P V): the full bidirectional s x s square per
  head, forward + backward (3x forward: dQ, dK from dS; dP, dV from dO).
* The pooling head is trainable: every matrix product at full cost (3x forward). The latent
  array's K/V projection is input-independent: it is counted once per forward call.
* The loss' similarity products (each query against its own candidates and the in-batch pool):
  3x forward. (Tiny; counted for completeness.)

A "call" is one forward of the model on a [rows, width] batch; the executed count of a step uses
the padded widths that ran, the model ("useful") count uses every sequence alone at its real
length with one latent K/V projection per step.

Imports nothing but the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FlopShape:
    """The sizes the count depends on (a Mistral-style backbone + NV-Embed's latent head)."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    groups: int
    head_dim: int
    lora_rank: int
    pool_latents: int
    pool_heads: int
    pool_head_dim: int
    pool_ff_mult: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of a step, split by pass."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(self.forward + other.forward, self.backward + other.backward)


ZERO = FlopCount(0, 0)


def _mm(tokens: int, fan_in: int, fan_out: int) -> int:
    """Forward FLOPs of a [tokens, fan_in] x [fan_in, fan_out] product."""
    return 2 * tokens * fan_in * fan_out


def decoder_linears(shape: FlopShape) -> list[tuple[str, int, int]]:
    """(name, fan_in, fan_out) of one decoder layer's four linears, QKV first."""
    d, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.groups * shape.head_dim
    return [
        ("qkv", d, q + 2 * kv),
        ("proj", q, d),
        ("fc1", d, 2 * shape.ffn),
        ("fc2", shape.ffn, d),
    ]


def decoder_flops(shape: FlopShape, rows: int, width: int) -> FlopCount:
    """The decoder stack on a [rows, width] batch (every position computed, padding included)."""
    t = rows * width
    fwd = bwd = 0
    r = shape.lora_rank
    for layer in range(shape.layers):
        for name, fan_in, fan_out in decoder_linears(shape):
            first = layer == 0 and name == "qkv"
            base = _mm(t, fan_in, fan_out)
            fwd += base
            bwd += 0 if first else base  # input gradient only (frozen weight)
            if r:
                a, b = _mm(t, fan_in, r), _mm(t, r, fan_out)
                fwd += a + b
                bwd += 2 * b  # dX and dW of B
                bwd += a if first else 2 * a  # dW of A (+ dX unless the input is frozen)
        attn = 2 * _mm(rows * width * width, shape.head_dim, 1) * shape.heads  # QK^T and PV
        fwd += attn
        bwd += 2 * attn
    return FlopCount(fwd, bwd)


def latent_kv_flops(shape: FlopShape) -> FlopCount:
    """The latent array's K/V projection (once per forward call), trainable."""
    f = _mm(shape.pool_latents, shape.hidden, 2 * shape.pool_heads * shape.pool_head_dim)
    return FlopCount(f, 2 * f)


def head_flops(shape: FlopShape, rows: int, width: int) -> FlopCount:
    """The latent-attention head on [rows, width] token states, without the latent K/V."""
    t, d = rows * width, shape.hidden
    inner = shape.pool_heads * shape.pool_head_dim
    ff = shape.pool_ff_mult * d
    f = _mm(t, d, inner)  # to_q
    f += 2 * _mm(t, shape.pool_head_dim, shape.pool_latents) * shape.pool_heads  # scores, context
    f += _mm(t, inner, d)  # to_out
    f += _mm(t, d, 2 * ff) + _mm(t, ff, d)  # GEGLU in, out
    return FlopCount(f, 2 * f)


def loss_flops(shape: FlopShape, queries: int, candidates_per_query: int) -> FlopCount:
    """Cosine scores of every query against its own candidates and the whole in-batch pool."""
    f = _mm(queries, shape.hidden, candidates_per_query)  # own
    f += _mm(queries, shape.hidden, queries * candidates_per_query)  # in-batch pool
    return FlopCount(f, 2 * f)


def train_step_flops(
    shape: FlopShape,
    calls: Iterable[tuple[int, int]],
    queries: int,
    candidates_per_query: int,
    latent_kv_calls: int | None = None,
) -> FlopCount:
    """FLOPs of one training step.

    Args:
        shape: model sizes.
        calls: the (rows, width) of every forward call of the step.
        queries: queries in the loss; candidates_per_query: 1 + hard negatives.
        latent_kv_calls: how many times the latent K/V is projected (default: once per call).

    Returns:
        FlopCount (forward, backward).
    """
    calls = list(calls)
    total = ZERO
    for rows, width in calls:
        total = total + decoder_flops(shape, rows, width) + head_flops(shape, rows, width)
    n_kv = len(calls) if latent_kv_calls is None else latent_kv_calls
    kv = latent_kv_flops(shape)
    total = total + FlopCount(n_kv * kv.forward, n_kv * kv.backward)
    return total + loss_flops(shape, queries, candidates_per_query)


def model_step_flops(
    shape: FlopShape, lengths: Sequence[int], queries: int, candidates_per_query: int
) -> FlopCount:
    """Useful FLOPs: every sequence at its real length, one latent K/V projection per step."""
    return train_step_flops(
        shape, ((1, n) for n in lengths), queries, candidates_per_query, latent_kv_calls=1
    )


def attention_flops(
    shape: FlopShape, calls: Iterable[tuple[int, int]], decoder: bool = True, head: bool = True
) -> FlopCount:
    """The score / context products alone inside `train_step_flops(shape, calls, ...)`: the
    decoder's self-attention and / or the head's attention to the latents (the parts that may
    run inside scaled_dot_product_attention kernels)."""
    total = ZERO
    for rows, width in calls:
        f = 0
        if decoder:
            f += 2 * _mm(rows * width * width, shape.head_dim, 1) * shape.heads * shape.layers
        if head:
            f += 2 * _mm(rows * width, shape.pool_head_dim, shape.pool_latents) * shape.pool_heads
        total = total + FlopCount(f, 2 * f)
    return total


def split_adapter_flops(shape: FlopShape, calls: Iterable[tuple[int, int]]) -> FlopCount:
    """Extra FLOPs when q / k / v and gate / up get one LoRA A each (peft on a transformers
    model) instead of one A per fused QKV and per fused gate/up (this project): 2 + 1 more
    [t, d] x [d, r] products per layer, each forward + weight gradient + input gradient (layer
    0's q / k / v: no input gradient)."""
    fwd = bwd = 0
    for rows, width in calls:
        a = _mm(rows * width, shape.hidden, shape.lora_rank)
        fwd += 3 * a * shape.layers
        bwd += 6 * a * shape.layers - 2 * a  # layer 0: the two extra QKV A's skip dX
    return FlopCount(fwd, bwd)
