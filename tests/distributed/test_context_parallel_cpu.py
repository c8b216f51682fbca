"""`--context-parallel-size 2` on CPU (2 gloo processes), everything but Transformer Engine's kernel.

Context parallelism needs Transformer Engine's attention, which has no CPU build. Here the model's
own CP path (each text padded and split over the CP ranks, megatron-core's RoPE for THD per CP
rank, the gather before pooling and its gradient scale, the step's statistics, megatron-core's
DDP over data x context ranks) runs with a stand-in for that kernel: `_GatherKVAttention`,
written for this test, gathers every CP rank's keys and values into the whole padded stream and
attends from this rank's queries to the real tokens of their own text (causally with a causal
mask), which is what a context-parallel attention computes. The stand-in replaces the `te` layer
spec's core attention; nothing else of the model is replaced.

- Model level, against the independent reference (transformers' MistralModel + a plain-torch
  head): latent, mean, EOS and self-attention heads x both masks, padded rows (each a text of
  odd length, padded to a multiple of 4 for the split) and packed rows: embeddings within 1e-5,
  and every parameter's gradient averaged over the CP ranks (what DDP does) within 1e-5.
- Training level: `train()` at CP=2 logs the losses of `train()` at TP=2 on the same data (DP=1
  both, so the same batches), GradCache on, 2 steps, within 1e-5 relative.

The kernel itself is checked against the reference on GPUs: tests/gpu/test_context_parallel.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_nvembed.testing import (
    run_distributed,
    tiny_training_config,
    write_synthetic_retrieval,
)

TOL = 1e-5


class _GatherStream(torch.autograd.Function):
    """Forward: every CP rank's [n_local, ...] tokens into the whole stream [total, ...].
    Backward: the stream's gradient summed over the CP ranks (every rank's queries reach every
    rank's keys), this rank's positions of it."""

    @staticmethod
    def forward(ctx, local, ranks, mine, total, group):
        chunks = [torch.empty_like(local) for _ in ranks]
        dist.all_gather(chunks, local.contiguous(), group=group)
        full = local.new_zeros((total, *local.shape[1:]))
        for where, chunk in zip(ranks, chunks):
            full[where] = chunk
        ctx.mine, ctx.group = mine, group
        return full

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.mine], None, None, None, None


def _gather_kv_attention():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule

    from megatron_nvembed.model.context_parallel import cp_token_positions

    class _GatherKVAttention(MegatronModule):
        """Context-parallel attention by gathering K/V (THD tokens, CP ranks' layout)."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
            super().__init__(config=config)
            from megatron.core import parallel_state

            self.group = parallel_state.get_context_parallel_group()
            self.causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
            self.scale = kwargs.get("softmax_scale")

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):  # fmt: skip
            p = packed_seq_params
            cu_pad, cu = p.cu_seqlens_q_padded.long(), p.cu_seqlens_q.long()
            size, rank = self.group.size(), self.group.rank()
            ranks = [cp_token_positions(cu_pad, size, r) for r in range(size)]
            total = int(cu_pad[-1])
            k = _GatherStream.apply(key, ranks, ranks[rank], total, self.group)
            v = _GatherStream.apply(value, ranks, ranks[rank], total, self.group)
            text = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu_pad[1:] - cu_pad[:-1])
            pos = torch.arange(total) - cu_pad[text]
            real = pos < (cu[1:] - cu[:-1])[text]
            q_text, q_pos = text[ranks[rank]], pos[ranks[rank]]
            allowed = (q_text[:, None] == text[None]) & real[None]
            if self.causal:
                allowed &= pos[None] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(
                query.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=allowed[None, None], scale=self.scale,
                enable_gqa=query.shape[1] != key.shape[1],
            )  # fmt: skip
            return out[0].transpose(0, 1).reshape(query.shape[0], -1)

    return _GatherKVAttention


def _use_the_stand_in():
    """The `te` backend with the stand-in kernel: layer specs of sdpa (torch modules) whose core
    attention is `_GatherKVAttention`. Returns a function that undoes it."""
    from megatron_nvembed.model import nvembed_model, specs

    attention, block_spec = _gather_kv_attention(), specs.get_block_spec
    saved = (specs.resolve_backend, nvembed_model.resolve_backend, nvembed_model.get_block_spec)

    def restore():
        specs.resolve_backend, nvembed_model.resolve_backend, nvembed_model.get_block_spec = saved

    def stand_in_block(config, backend, mask_type, qk_layernorm, pp_rank):
        assert backend == "te"
        block = block_spec(config, "sdpa", mask_type, qk_layernorm, pp_rank)
        block.layer_specs[0].submodules.self_attention.submodules.core_attention = attention
        return block

    specs.resolve_backend = nvembed_model.resolve_backend = lambda m: "te"
    nvembed_model.get_block_spec = stand_in_block
    return restore


def _check_model(rank, world):
    from megatron_nvembed.conversion import hf_mapping as hm
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.data.packing import pack_batch
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.testing import (
        random_padded_batch,
        randomized_reference,
        tiny_model_config,
    )

    _use_the_stand_in()
    pg = initialize_model_parallel(1, 1, seed=7, context_parallel_size=2)
    batch = random_padded_batch([13, 6, 9, 3], instruction_lengths=[5, 0, 3, 0], pad_to=15)
    packed = pack_batch(batch, 24)
    probe = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    cases = [(p, m, False) for p in ("latent", "mean", "eos", "self-attention")
             for m in ("bidirectional", "causal")]  # fmt: skip
    cases += [("latent", "bidirectional", True), ("mean", "causal", True)]
    for pooling, mask_type, pack in cases:
        name = f"{pooling}/{mask_type}{'/packed' if pack else ''}"
        cfg = tiny_model_config(pooling=pooling, mask_type=mask_type, backend="auto")
        cfg.parallel.context_parallel_size = 2
        ref = randomized_reference(cfg)
        model = build_model(cfg, pg)
        assert model.context_parallel and model.backend == "te"
        hm.load_hf_into_model(
            model, ref.hf_state_dict(), cfg, 0, 0, backbone_prefix="embedding_model."
        )
        want = ref(**batch)
        got = model(**packed.model_inputs())[packed.restore] if pack else model(**batch)
        diff = (got - want).abs().max().item()
        assert diff <= TOL, f"{name}: CP=2 embeddings differ by {diff} on rank {rank}"
        (want * probe).sum().backward()
        (got * probe).sum().backward()
        ref_grads = {k: p.grad for k, p in ref.named_parameters()}
        sharded = hm.hf_to_megatron(ref_grads, cfg, 0, 0, backbone_prefix="embedding_model.")
        for pname, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g, group=pg.cp)
            gdiff = (g / 2 - sharded[pname]).abs().max().item()  # DDP's mean over CP ranks
            assert gdiff <= TOL, f"{name}: grad of {pname} differs by {gdiff} on rank {rank}"


@pytest.mark.distributed
def test_context_parallel_2_matches_reference_for_every_head_mask_and_packing():
    run_distributed(_check_model, 2)


def _train_worker(rank, world, data, tmp):
    from megatron_nvembed.training.trainer import train

    out = {}
    common = dict(train_iters=2, seq_length=24, grad_cache=True)
    restore = _use_the_stand_in()
    try:
        cfg = tiny_training_config(data, **common, **{"model.parallel.context_parallel_size": 2})
        out["cp2"] = train(cfg).losses
    finally:
        restore()
    cfg = tiny_training_config(data, **common, **{"model.parallel.tensor_model_parallel_size": 2})
    out["tp2"] = train(cfg).losses
    Path(tmp, f"{rank}.json").write_text(json.dumps(out))


@pytest.mark.distributed
def test_training_at_cp2_logs_the_losses_of_tp2(tmp_path):
    data = write_synthetic_retrieval(tmp_path / "syn", num_topics=8, train_per_topic=12)
    run_distributed(_train_worker, 2, data, str(tmp_path))
    for rank in range(2):
        out = json.loads((tmp_path / f"{rank}.json").read_text())
        assert out["cp2"].keys() == out["tp2"].keys() == {"1", "2"}
        for it, want in out["tp2"].items():
            got = out["cp2"][it]
            assert abs(got - want) <= TOL * abs(want), (
                f"rank {rank}, iteration {it}: {got} vs {want}"
            )
