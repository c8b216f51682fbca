"""`bench/train_step.py --layout` (ours' sequence layouts) on a very small model, in-process
(one process, TP=PP=1, fp32 on CPU; the bench's own `prepare` and `build_ours`).

Proves: the pad512 and packed layouts embed the same batch to within 1e-5 (queries and passages,
original order restored); the packed layout's executed (decoder) token count is the real token
count and its FLOP calls are THD `packed_call`s; pad512's is rows x cap per call, one call per
kind; buckets keeps today's dense (rows, width) calls; ours' step projects the latent K/V once
(torch's FLOP counter agrees with the analytic count to the FLOP).

Run alone: pytest tests/unit/test_bench_layouts.py
"""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_nvembed.flops import Call, train_step_flops

TOL = 1e-5
BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plan(bench):
    return bench.Plan(
        preset="test",
        model=dict(
            vocab_size=128,
            hidden_size=64,
            ffn_hidden_size=128,
            num_layers=2,
            num_attention_heads=4,
            num_query_groups=2,
        ),
        pooling=dict(num_latents=8, num_heads=2, head_dim=16, ff_mult=2),
        device="cpu",
        dtype="float32",
        batch_size=3,
        negatives=2,
        query_len=(4, 10),
        passage_len=(6, 24),
        instruction_len=(1, 3),
        max_length=32,
        bucket_size=4,
        pad_multiple=8,
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.0,
        lr=1e-3,
        temperature=0.05,
        warmup=0,
        steps=1,
        repeats=1,
        length_scale=1.0,
        seed=0,
        threads=1,
        weights="independent",
    )


def _prepare(bench, plan, layout):
    return bench.prepare(replace(plan, layout=layout), "ours", bench.make_batch(plan, 0), "cpu")


def test_layout_token_counts(bench, plan):
    queries, passages = bench.make_batch(plan, 0)
    real = sum(len(s.ids) for s in queries + passages)

    padded = _prepare(bench, plan, "pad512")
    assert padded.calls == [(len(queries), plan.max_length), (len(passages), plan.max_length)]
    assert padded.padded_tokens == sum(r * w for r, w in padded.calls)
    assert padded.padded_tokens == (len(queries) + len(passages)) * plan.max_length

    packed = _prepare(bench, plan, "packed")
    assert packed.real_tokens == packed.padded_tokens == real
    assert all(isinstance(c, Call) for c in packed.calls) and len(packed.calls) == 2
    assert sum(c.tokens for c in packed.calls) == real  # THD: no padding computed
    assert packed.calls[1].attention_pairs == sum(len(s.ids) ** 2 for s in passages)
    assert packed.row_padding_fraction is not None and 0 <= packed.row_padding_fraction < 1
    shape = bench.flop_shape(plan)
    b, n = plan.batch_size, 1 + plan.negatives
    assert (
        train_step_flops(shape, packed.calls, b, n).total
        < train_step_flops(shape, padded.calls, b, n).total
    )

    buckets = _prepare(bench, plan, "buckets")
    assert all(isinstance(c, tuple) for c in buckets.calls)
    assert buckets.real_tokens == real <= buckets.padded_tokens < padded.padded_tokens


def test_packed_and_pad512_embeddings_agree(bench, plan):
    embed, _, model = bench.build_ours(
        plan, bench.embedding_config(plan), torch.device("cpu"), torch.float32
    )
    model.eval()
    out = {}
    with torch.no_grad():
        for layout in ("pad512", "packed", "buckets"):
            p = _prepare(bench, plan, layout)
            out[layout] = (
                embed(p.query_calls, p.query_inverse),
                embed(p.passage_calls, p.passage_inverse),
            )
    assert out["packed"][0].shape == (plan.batch_size, plan.model["hidden_size"])
    assert out["packed"][1].shape[0] == plan.batch_size * (1 + plan.negatives)
    for other in ("packed", "buckets"):
        for a, b in zip(out["pad512"], out[other]):
            assert (a - b).abs().max().item() <= TOL, other


def test_ours_step_projects_the_latent_kv_once(bench, plan):
    """Ours' timed step runs under `latent_kv_once_per_step` (as the trainer does): torch's FLOP
    counter sees exactly the analytic count with one latent K/V projection for the whole step,
    although the step has several forward calls (the count with one projection per call would
    be off by (calls - 1) projections)."""
    bplan = replace(plan, layout="buckets")
    runner = bench.Runner(bplan, "ours", torch.device("cpu"), torch.float32)
    calls = runner.batches[bplan.warmup].calls
    assert len(calls) > 1
    check = bench.flop_check(bplan, runner)
    assert check["difference"] == 0, check
    shape = bench.flop_shape(bplan)
    b, n = plan.batch_size, 1 + plan.negatives
    per_call = train_step_flops(shape, calls, b, n).total
    once = train_step_flops(shape, calls, b, n, latent_kv_calls=1).total
    assert check["analytic_executed"] == once < per_call
