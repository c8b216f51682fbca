"""`latent_kv_once_per_step` (one process, TP=PP=1, fp32 unless said, CPU).

Proves:
- inside the context, three grad-enabled forward+backward calls project the latents through
  `to_kv` once, and every parameter's gradient equals the one without the context (1e-6 rel.);
- the K/V backward runs inside `config.finalize_model_grads_func` (before the data-parallel
  reduction), and the original function is restored afterwards;
- through megatron-core's DDP wrapper and forward-backward schedule (gloo, one rank), the main
  gradients after `finalize_model_grads` equal those without the context;
- under `torch.no_grad` the head projects per call and the output is unchanged;
- with bf16 parameters the step's K/V gradient accumulates in an fp32 leaf and the head's
  gradients match the per-call ones within bf16 rounding.

Run alone: pytest tests/unit/test_latent_kv_step.py
"""

import pytest
import torch

from megatron_nvembed.model.pooling import latent_kv_once_per_step
from megatron_nvembed.testing import (
    init_single_process_megatron,
    random_padded_batch,
    tiny_model_config,
)

REL = 1e-6
MICRO_BATCHES = [
    random_padded_batch([6, 9, 3], seed=1),
    random_padded_batch([4, 7], seed=2),
    random_padded_batch([8, 5, 2, 6], seed=3),
]


@pytest.fixture(scope="module")
def pg():
    return init_single_process_megatron()


@pytest.fixture()
def model(pg):
    from megatron_nvembed.model.build import build_model

    torch.manual_seed(0)
    return build_model(tiny_model_config(), pg).eval()  # eval: no dropout, grads still flow


def _loss(emb: torch.Tensor, i: int) -> torch.Tensor:
    """A fixed, micro-batch-specific scalar of the embeddings [b, d]."""
    w = torch.randn(emb.shape, generator=torch.Generator().manual_seed(100 + i))
    return (emb * w).sum()


def _grads(model, use_context: bool, calls: list | None = None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if calls is not None:
        hook = model.pooling.to_kv.register_forward_hook(lambda m, i, o: calls.append(1))
    if use_context:
        with latent_kv_once_per_step([model]):
            for i, mb in enumerate(MICRO_BATCHES):
                _loss(model(**mb), i).backward()
    else:
        for i, mb in enumerate(MICRO_BATCHES):
            _loss(model(**mb), i).backward()
    if calls is not None:
        hook.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        err = (got[name] - ref).abs().max() / ref.abs().max().clamp(min=1e-30)
        assert err <= REL, f"{name}: relative error {err:.2e}"


def test_to_kv_runs_once_and_gradients_match(model):
    plain_calls, step_calls = [], []
    want = _grads(model, use_context=False, calls=plain_calls)
    got = _grads(model, use_context=True, calls=step_calls)
    assert len(plain_calls) == len(MICRO_BATCHES)
    assert len(step_calls) == 1
    assert any(n.startswith("pooling.latents") for n in got)
    _assert_close(got, want)
    assert model.pooling._step_kv is None  # context left no state behind


def test_kv_backward_runs_in_finalize_before_original(model):
    want = _grads(model, use_context=False)
    model.zero_grad(set_to_none=True)
    seen = {}

    def finalize(chunks, num_tokens=None, **kwargs):
        seen["grad"] = chunks[0].pooling.latents.grad.clone()

    model.config.finalize_model_grads_func = finalize
    try:
        with latent_kv_once_per_step([model]):
            for i, mb in enumerate(MICRO_BATCHES):
                _loss(model(**mb), i).backward()
            assert model.pooling.latents.grad is None  # not yet sent through the projection
            model.config.finalize_model_grads_func([model], None)
        assert model.config.finalize_model_grads_func is finalize
    finally:
        model.config.finalize_model_grads_func = None
    _assert_close({"latents": seen["grad"]}, {"latents": want["pooling.latents"]})


def test_unused_head_and_no_grad(model):
    batch = MICRO_BATCHES[0]
    with torch.no_grad():
        want = model(**batch)
    calls = []
    hook = model.pooling.to_kv.register_forward_hook(lambda m, i, o: calls.append(1))
    with latent_kv_once_per_step([model]):
        with torch.no_grad():
            got = [model(**batch), model(**batch)]
    with latent_kv_once_per_step([model]):
        pass  # K/V never computed: nothing to send back
    hook.remove()
    assert len(calls) == 2  # no-grad calls project per call, as without the context
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    assert model.pooling.latents.grad is None


def test_through_megatron_ddp_and_schedule(model):
    """The trainer's path: DDP main grads after the schedule's `finalize_model_grads`."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    from megatron_nvembed.core.cpu_support import cuda_allocations_on_cpu

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, check_for_nan_in_grad=False
    )
    with cuda_allocations_on_cpu():
        ddp = DistributedDataParallel(model.config, ddp_cfg, model)
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    schedule = get_forward_backward_func()

    def step_fn(it, m):
        i, mb = next(it)
        return m(**mb), lambda out: (_loss(out, i), {})

    def run(use_context: bool) -> dict[str, torch.Tensor]:
        ddp.zero_grad_buffer()
        calls = []
        hook = model.pooling.to_kv.register_forward_hook(lambda m, i, o: calls.append(1))
        ctx = latent_kv_once_per_step([ddp]) if use_context else torch.enable_grad()
        with ctx, cuda_allocations_on_cpu():
            schedule(
                forward_step_func=step_fn,
                data_iterator=iter(list(enumerate(MICRO_BATCHES))),
                model=[ddp],
                num_microbatches=len(MICRO_BATCHES),
                seq_length=9,
                micro_batch_size=4,
                forward_only=False,
            )
        hook.remove()
        assert len(calls) == (1 if use_context else len(MICRO_BATCHES))
        return {n: p.main_grad.clone() for n, p in model.named_parameters()}

    try:
        want = run(use_context=False)
        got = run(use_context=True)
        assert model.config.finalize_model_grads_func is finalize_model_grads
    finally:
        model.config.finalize_model_grads_func = None
        model.config.no_sync_func = None
    assert want["pooling.latents"].abs().max() > 0
    _assert_close(got, want)


def test_bf16_parameters_accumulate_the_kv_gradient_in_fp32(pg):
    """bf16 parameters (the GPU recipe's dtype, here on CPU): the step's K/V leaf is fp32 while
    the forward sees bf16 K/V; the head's gradients equal the per-call ones within bf16 rounding
    (3e-2 of each tensor's largest entry: 3 micro-batches, 8-bit mantissa)."""
    from megatron_nvembed.model.build import build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_config(), pg, params_dtype=torch.bfloat16).eval()
    assert model.pooling.latents.dtype == torch.bfloat16
    want = _grads(model, use_context=False)
    model.zero_grad(set_to_none=True)
    with latent_kv_once_per_step([model]):
        for i, mb in enumerate(MICRO_BATCHES):
            out = model(**mb)
            assert out.dtype == torch.bfloat16
            assert model.pooling._step_kv.leaf.dtype == torch.float32
            _loss(out.float(), i).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name in (n for n in want if n.startswith("pooling.")):
        ref = want[name].float()
        err = (got[name].float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)
        assert err <= 3e-2, f"{name}: relative error {err:.2e}"
    assert want["pooling.latents"].abs().max() > 0
