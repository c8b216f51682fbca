"""`--sequence-parallel` (2 and 4 gloo processes, fp32 on CPU).

Model level, TP=2 with sequence parallelism, against the independent reference (transformers'
MistralModel + a plain-torch head), on batches whose width (15) and packed token count do not
divide by 2, so the sequence is padded for the split and cut back:
- every pooling head (latent, mean, EOS, self-attention) x both masks (bidirectional, causal):
  embeddings within 1e-5 and every parameter's gradient within 1e-5 (norm weights after the
  sum over the TP group that `finalize_model_grads` applies to parameters marked
  `sequence_parallel`);
- packed rows (THD on sdpa, the block-diagonal mask on local): embeddings and gradients equal the
  reference on the unpacked texts within 1e-5.

Training level (`train()`): sequence parallelism changes nothing but where activations live.
With and without `--sequence-parallel`, the logged losses agree within 1e-5 relative and the
last step's gradients (megatron-core's `main_grad`, after the data- and tensor-parallel
reductions) within 1e-5 relative per tensor: at TP=2 on the direct path, with GradCache, with
packing and with LoRA; and at PP=2 x TP=2 (4 processes) with GradCache.

Run alone: pytest tests/distributed/test_sequence_parallel.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_nvembed.testing import (
    run_distributed,
    tiny_training_config,
    write_synthetic_retrieval,
)

TOL = 1e-5


def _grads_summed_like_finalize(model) -> dict:
    """Each parameter's gradient, with those of `sequence_parallel` parameters summed over the TP
    group (what megatron-core's `finalize_model_grads` does in training)."""
    from megatron.core import parallel_state

    out = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
        out[name] = g
    return out


def _check_against_reference(rank, world_size):
    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.data.packing import pack_batch
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.testing import (
        random_padded_batch,
        randomized_reference,
        tiny_model_config,
    )

    pg = initialize_model_parallel(2, 1, seed=7)
    batch = random_padded_batch([13, 6, 9, 3], instruction_lengths=[5, 0, 3, 0], pad_to=15)
    packed = pack_batch(batch, 24)
    assert int(packed.segment_ids.gt(0).sum()) % 2 == 1  # the THD split pads too
    probe = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    cases = [(p, m, "sdpa", False) for p in ("latent", "mean", "eos", "self-attention")
             for m in ("bidirectional", "causal")]  # fmt: skip
    cases += [("latent", "bidirectional", "sdpa", True), ("mean", "causal", "local", True)]
    for pooling, mask_type, backend, pack in cases:
        name = f"{pooling}/{mask_type}/{backend}{'/packed' if pack else ''}"
        cfg = tiny_model_config(pooling=pooling, mask_type=mask_type, tp=2, backend=backend)
        cfg.parallel.sequence_parallel = True
        ref = randomized_reference(cfg)
        model = build_model(cfg, pg)
        assert model.decoder.config.sequence_parallel
        hm.load_hf_into_model(
            model, ref.hf_state_dict(), cfg, rank, 0, backbone_prefix="embedding_model."
        )
        want = ref(**batch)
        got = model(**packed.model_inputs())[packed.restore] if pack else model(**batch)
        diff = (got - want).abs().max().item()
        assert diff <= TOL, f"{name}: embeddings differ by {diff} on rank {rank}"
        (want * probe).sum().backward()
        (got * probe).sum().backward()
        ref_grads = {k: p.grad for k, p in ref.named_parameters()}
        sharded = hm.hf_to_megatron(ref_grads, cfg, rank, 0, backbone_prefix="embedding_model.")
        for pname, g in _grads_summed_like_finalize(model).items():
            gdiff = (g - sharded[pname]).abs().max().item()
            assert gdiff <= TOL, f"{name}: grad of {pname} differs by {gdiff} on rank {rank}"


@pytest.mark.distributed
def test_sequence_parallel_tp2_matches_reference_for_every_head_mask_and_packing():
    run_distributed(_check_against_reference, 2)


def _train_keeping_grads(cfg) -> tuple[dict, dict]:
    """`train(cfg)`'s losses, and each parameter's `main_grad` after the last step."""
    from megatron_nvembed.training import setup
    from megatron_nvembed.training.trainer import train

    real_build, runs = setup.build, []

    def keeping(c):
        runs.append(real_build(c))
        return runs[-1]

    setup.build = keeping
    try:
        losses = train(cfg).losses
    finally:
        setup.build = real_build
    model = runs[0].model
    grads = {
        n: p.main_grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    return losses, grads


def _compare_sp(data, tmp, runs: dict, **common) -> None:
    """Trains each run of `runs` (name -> settings) with and without --sequence-parallel and
    records, per run, the largest relative loss and gradient differences (this rank)."""
    out = {}
    for name, extra in runs.items():
        results = {}
        for sp in (False, True):
            cfg = tiny_training_config(
                data, train_iters=2, seq_length=24, sequence_parallel=sp, **common, **extra
            )
            results[sp] = _train_keeping_grads(cfg)
        (loss_a, grad_a), (loss_b, grad_b) = results[False], results[True]
        assert loss_a.keys() == loss_b.keys() and grad_a.keys() == grad_b.keys()
        out[name] = {
            "loss": max(abs(loss_b[k] - loss_a[k]) / abs(loss_a[k]) for k in loss_a),
            "grad": max(
                float((grad_b[k] - grad_a[k]).norm() / grad_a[k].norm().clamp(min=1e-30))
                for k in grad_a
            ),
            "grad_tensors": len(grad_a),
        }
    rank = dist.get_rank()
    (Path(tmp) / f"sp_{dist.get_world_size()}_{rank}.json").write_text(json.dumps(out))


def _tp2_worker(rank, world, data, tmp):
    tp = {"model.parallel.tensor_model_parallel_size": 2}
    _compare_sp(
        data,
        tmp,
        {
            "direct": {"grad_cache": False, "micro_batch_size": 8},
            "grad_cache": {"grad_cache": True},
            "packed": {"grad_cache": True, "pack_sequences": True},
            "lora": {"grad_cache": True, "lora.rank": 4, "lora.dropout": 0.0},
        },
        **tp,
    )


def _pp2_tp2_worker(rank, world, data, tmp):
    _compare_sp(
        data,
        tmp,
        {"grad_cache": {"grad_cache": True}},
        **{
            "model.parallel.tensor_model_parallel_size": 2,
            "model.parallel.pipeline_model_parallel_size": 2,
            "model.model.num_layers": 2,
        },
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_retrieval(
        tmp_path_factory.mktemp("syn"), num_topics=8, train_per_topic=12
    )


def _read(tmp: Path, world: int) -> list[dict]:
    return [json.loads((tmp / f"sp_{world}_{r}.json").read_text()) for r in range(world)]


@pytest.mark.distributed
def test_sequence_parallel_trains_like_without_it_at_tp2(synthetic, tmp_path):
    """TP=2: direct path (one micro-batch), GradCache (4 micro-batches), packing and LoRA, 2
    steps each: losses within 1e-5 relative, last-step gradients within 1e-5 relative."""
    run_distributed(_tp2_worker, 2, synthetic, str(tmp_path))
    for rank, out in enumerate(_read(tmp_path, 2)):
        assert set(out) == {"direct", "grad_cache", "packed", "lora"}
        for name, got in out.items():
            assert got["grad_tensors"] > 0, name
            assert got["loss"] <= TOL, f"{name}, rank {rank}: losses differ by {got['loss']}"
            assert got["grad"] <= TOL, f"{name}, rank {rank}: gradients differ by {got['grad']}"


@pytest.mark.distributed
def test_sequence_parallel_trains_like_without_it_at_pp2_tp2(synthetic, tmp_path):
    """PP=2 x TP=2 (4 processes) with GradCache, 2 steps: losses (last stage) and every stage's
    last-step gradients within 1e-5 relative."""
    run_distributed(_pp2_tp2_worker, 4, synthetic, str(tmp_path))
    for rank, out in enumerate(_read(tmp_path, 4)):
        got = out["grad_cache"]
        assert got["grad_tensors"] > 0
        assert got["loss"] <= TOL, f"rank {rank}: losses differ by {got['loss']}"
        assert got["grad"] <= TOL, f"rank {rank}: gradients differ by {got['grad']}"
