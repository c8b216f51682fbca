"""Analytic FLOP count of one NV-Embed training step (forward + backward).

Used by the training log (TFLOP/s per GPU and MFU from the real token lengths of every step) and
by `bench/train_step.py` (through the trainer's step statistics).

Conventions (one multiply-add = 2 FLOPs; only matrix products are counted: norms, activations,
softmax, RoPE, the embedding lookup, masked mean and the optimizer are left out):

* Frozen decoder linears (QKV, attention output, SwiGLU fc1, fc2): forward, plus the input
  (activation) gradient in the backward; no weight gradient. The very first linear of the stack
  (layer 0's QKV) gets no input gradient either: its input is the frozen token embedding, so
  nothing upstream needs a gradient. With `FlopShape.base_trainable` (full fine-tuning, no LoRA)
  every decoder linear also gets its weight gradient, and layer 0's QKV its input gradient (the
  embedding trains).
* LoRA adapters (A: in -> r, B: r -> out) on those four linears: full cost, forward + input
  gradient + weight gradient (3x forward), except that layer 0's QKV adapter, like its base,
  needs no input gradient (2x forward for that A).
* Decoder self-attention scores (Q K^T) and context (P V): the full bidirectional s x s square per
  head, forward + backward (3x forward: dQ, dK from dS; dP, dV from dO).
* The pooling head is trainable: every matrix product at full cost (3x forward). The latent
  array's K/V projection is input-independent: it is counted once per forward call.
* The loss' similarity products (each query against its own candidates and the in-batch pool):
  3x forward. (Tiny; counted for completeness.)

A "call" is one forward of the model: a dense [rows, width] batch (a `(rows, width)` tuple), or a
`Call` with its own token and attention-pair counts (packed rows: `packed_call`). The executed
count of a step uses what ran (padding included); the model ("useful") count uses every sequence
alone at its real length with one latent K/V projection per step, so the two differ by exactly
the padding, the masked attention pairs and the repeated latent K/V.

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
    base_trainable: bool = False
    """Full fine-tuning: the decoder's weights get gradients (and layer 0 its input gradient)."""
    pool: str = "latent"
    """The pooling head: latent, self-attention, or mean / eos (no matrix products)."""

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


def flop_shape(config, lora_rank: int) -> FlopShape:
    """The count's sizes of an `EmbeddingModelConfig` (LoRA rank 0: full fine-tuning of the decoder)."""
    m, p = config.model, config.pooling
    return FlopShape(
        hidden=m.hidden_size,
        ffn=m.ffn_hidden_size,
        layers=m.num_layers,
        heads=m.num_attention_heads,
        groups=m.num_query_groups,
        head_dim=m.head_dim,
        lora_rank=lora_rank,
        pool_latents=p.num_latents,
        pool_heads=p.num_heads,
        pool_head_dim=p.head_dim or m.hidden_size,
        pool_ff_mult=p.ff_mult,
        base_trainable=lora_rank == 0,
        pool=p.type,
    )


@dataclass(frozen=True)
class Call:
    """One forward call in the terms the count needs."""

    tokens: int
    """Positions the decoder's linears run on (padding included)."""
    attention_pairs: int
    """(query, key) position pairs the decoder's attention computes, per layer and head."""
    head_tokens: int
    """Positions the pooling head runs on."""
    head_pairs: int
    """(query, key) pairs of a self-attention pooling head (unused by the other heads)."""


def dense_call(rows: int, width: int) -> Call:
    """A right-padded [rows, width] batch: every pair of a row is computed."""
    return Call(rows * width, rows * width * width, rows * width, rows * width * width)


def packed_call(
    lengths: Sequence[int], rows: int, width: int, thd: bool, pool: str = "latent"
) -> Call:
    """Texts packed into [rows, width] rows, as `NVEmbedModel` runs them.

    Args:
        lengths: the real length of every text in the call.
        rows, width: the packed batch.
        thd: the THD layout (te / sdpa backends): the decoder runs the real tokens only and
            attention each text's own square, and the token-wise heads (latent, mean, eos) pool
            the real tokens as they are; else (local backend) the whole padded rows and their
            full squares under a block-diagonal mask.
        pool: the pooling head. The self-attention head (and every head on the `local` layout)
            runs on the texts unpacked one per row, right-padded to the longest.
    """
    lengths = list(lengths)
    longest = max(lengths, default=0)
    head, head_pairs = len(lengths) * longest, len(lengths) * longest * longest
    if thd:
        if pool != "self-attention":
            head = sum(lengths)
        return Call(sum(lengths), sum(n * n for n in lengths), head, head_pairs)
    return Call(rows * width, rows * width * width, head, head_pairs)


def _as_call(call) -> Call:
    return call if isinstance(call, Call) else dense_call(*call)


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
    return call_decoder_flops(shape, dense_call(rows, width))


def call_decoder_flops(shape: FlopShape, call: Call) -> FlopCount:
    """The decoder stack on one call."""
    t = call.tokens
    fwd = bwd = 0
    r = shape.lora_rank
    for layer in range(shape.layers):
        for name, fan_in, fan_out in decoder_linears(shape):
            first = layer == 0 and name == "qkv"
            base = _mm(t, fan_in, fan_out)
            fwd += base
            if shape.base_trainable:
                bwd += 2 * base  # weight and input gradients (the embedding trains too)
            else:
                bwd += 0 if first else base  # input gradient only (frozen weight)
            if r:
                a, b = _mm(t, fan_in, r), _mm(t, r, fan_out)
                fwd += a + b
                bwd += 2 * b  # dX and dW of B
                frozen_input = first and not shape.base_trainable
                bwd += a if frozen_input else 2 * a  # dW of A (+ dX unless the input is frozen)
        attn = 2 * _mm(call.attention_pairs, shape.head_dim, 1) * shape.heads  # QK^T and PV
        fwd += attn
        bwd += 2 * attn
    return FlopCount(fwd, bwd)


def latent_kv_flops(shape: FlopShape) -> FlopCount:
    """The latent array's K/V projection (once per forward call), trainable."""
    if shape.pool != "latent":
        return ZERO
    f = _mm(shape.pool_latents, shape.hidden, 2 * shape.pool_heads * shape.pool_head_dim)
    return FlopCount(f, 2 * f)


def head_flops(shape: FlopShape, rows: int, width: int) -> FlopCount:
    """The latent-attention head on [rows, width] token states, without the latent K/V."""
    return call_head_flops(shape, dense_call(rows, width))


def call_head_flops(shape: FlopShape, call: Call) -> FlopCount:
    """The pooling head on one call's token states (the latent K/V apart)."""
    if shape.pool in ("mean", "eos"):
        return ZERO
    if shape.pool not in ("latent", "self-attention"):
        raise ValueError(f"unknown pooling type {shape.pool!r}")
    t, d = call.head_tokens, shape.hidden
    inner = shape.pool_heads * shape.pool_head_dim
    ff = shape.pool_ff_mult * d
    f = _mm(t, d, inner)  # to_q
    if shape.pool == "latent":  # every token against the latents
        f += 2 * _mm(t, shape.pool_head_dim, shape.pool_latents) * shape.pool_heads
    else:  # K/V of the tokens themselves, every pair of a row
        f += _mm(t, d, 2 * inner)
        f += 2 * _mm(call.head_pairs, shape.pool_head_dim, 1) * shape.pool_heads
    f += _mm(t, inner, d)  # to_out
    f += _mm(t, d, 2 * ff) + _mm(t, ff, d)  # GEGLU in, out
    return FlopCount(f, 2 * f)


def loss_flops(
    shape: FlopShape, queries: int, candidates_per_query: int, in_batch: bool = True
) -> FlopCount:
    """Cosine scores of every query against its own candidates and (with in-batch negatives) the
    whole in-batch pool."""
    f = _mm(queries, shape.hidden, candidates_per_query)  # own
    if in_batch:
        f += _mm(queries, shape.hidden, queries * candidates_per_query)  # in-batch pool
    return FlopCount(f, 2 * f)


def train_step_flops(
    shape: FlopShape,
    calls: Iterable,
    queries: int,
    candidates_per_query: int,
    latent_kv_calls: int | None = None,
    in_batch: bool = True,
) -> FlopCount:
    """FLOPs of one training step.

    Args:
        shape: model sizes.
        calls: every forward call of the step: `(rows, width)` dense batches or `Call`s.
        queries: queries in the loss; candidates_per_query: 1 + hard negatives.
        latent_kv_calls: how many times the latent K/V is projected (default: once per call).
        in_batch: the loss scores the in-batch pool too.

    Returns:
        FlopCount (forward, backward).
    """
    calls = [_as_call(c) for c in calls]
    total = ZERO
    for call in calls:
        total = total + call_decoder_flops(shape, call) + call_head_flops(shape, call)
    n_kv = len(calls) if latent_kv_calls is None else latent_kv_calls
    kv = latent_kv_flops(shape)
    total = total + FlopCount(n_kv * kv.forward, n_kv * kv.backward)
    return total + loss_flops(shape, queries, candidates_per_query, in_batch)


def model_step_flops(
    shape: FlopShape,
    lengths: Sequence[int],
    queries: int,
    candidates_per_query: int,
    in_batch: bool = True,
) -> FlopCount:
    """Useful FLOPs: every sequence at its real length, one latent K/V projection per step
    (closed form: the count is linear in the tokens and in the sum of squared lengths)."""
    lengths = list(lengths)
    tokens, squares = sum(lengths), sum(n * n for n in lengths)
    useful = Call(tokens, squares, tokens, squares)
    return train_step_flops(
        shape, [useful], queries, candidates_per_query, latent_kv_calls=1, in_batch=in_batch
    )


def attention_flops(
    shape: FlopShape, calls: Iterable, decoder: bool = True, head: bool = True
) -> FlopCount:
    """The score / context products alone inside `train_step_flops(shape, calls, ...)`: the
    decoder's self-attention and / or the head's attention to the latents (the parts that may
    run inside scaled_dot_product_attention kernels)."""
    total = ZERO
    for call in map(_as_call, calls):
        f = 0
        if decoder:
            f += 2 * _mm(call.attention_pairs, shape.head_dim, 1) * shape.heads * shape.layers
        if head and shape.pool == "latent":
            f += (
                2
                * _mm(call.head_tokens, shape.pool_head_dim, shape.pool_latents)
                * shape.pool_heads
            )
        elif head and shape.pool == "self-attention":
            f += 2 * _mm(call.head_pairs, shape.pool_head_dim, 1) * shape.pool_heads
        total = total + FlopCount(f, 2 * f)
    return total


def split_adapter_flops(shape: FlopShape, calls: Iterable[tuple[int, int]]) -> FlopCount:
    """Extra FLOPs when q / k / v and gate / up get one LoRA A each (peft on a transformers
    model) instead of one A per fused QKV and per fused gate/up (this project): 2 + 1 more
    [t, d] x [d, r] products per layer, each forward + weight gradient + input gradient (layer
    0's q / k / v: no input gradient)."""
    fwd = bwd = 0
    for call in map(_as_call, calls):
        a = _mm(call.tokens, shape.hidden, shape.lora_rank)
        fwd += 3 * a * shape.layers
        bwd += 6 * a * shape.layers - 2 * a  # layer 0: the two extra QKV A's skip dX
    return FlopCount(fwd, bwd)
