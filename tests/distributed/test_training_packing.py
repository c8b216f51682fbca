"""`--pack-sequences` and `--length-bucket-size` in the training loop (CPU, gloo): packed and
length-bucketed micro-batches train exactly as padded ones, on both CPU attention backends
(sdpa's THD rows, local's block-diagonal mask; which module ran on which layout is observed inside
the processes); and `train()` with GradCache equals `train()`
without it where the two must agree (in-batch negatives off), losses and updated weights; each
imported backbone (Qwen2 with the self-attention head, Qwen3 with the EOS head and a causal mask,
Llama 3.x with the latent head, and with the mean head and a causal mask) trains with LoRA,
packing, GradCache and the optional loss terms as it does padded on the direct path.

Run alone: pytest tests/distributed/test_training_packing.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest

from megatron_nvembed.testing import (
    run_distributed,
    tiny_training_config,
    write_synthetic_retrieval,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_retrieval(
        tmp_path_factory.mktemp("syn"), num_topics=8, train_per_topic=12
    )


BACKBONE_HEADS = {
    "qwen2": ("qwen2", {"pooling": "self-attention", "mask_type": "bidirectional", "num_heads": 2}),
    "qwen3": ("qwen3", {"pooling": "eos", "mask_type": "causal"}),  # as Qwen3-Embedding
    "llama3": ("llama3", {"pooling": "latent", "mask_type": "bidirectional", "num_latents": 16,
                          "num_heads": 2}),
    "llama3_mean_causal": ("llama3", {"pooling": "mean", "mask_type": "causal"}),
}  # fmt: skip
"""Run name -> (backbone, import settings): every head and both masks over the imported backbones,
each backbone with one head at least and Llama 3.x with both masks (the heads' own parameters
are sharded, packed and cached like the backbone's)."""
BACKBONE_MODULES = {
    "qwen2": ["self-attention", "bidirectional", True, False, None],
    "qwen3": ["eos", "causal", False, True, None],
    "llama3": ["latent", "bidirectional", False, False, 8.0],
    "llama3_mean_causal": ["mean", "causal", False, False, 8.0],
}
"""Run name -> what its model's forward executed (`_Executed.model`): head, mask, Q/K/V biases,
per-head Q/K norms, Llama 3.x RoPE scaling factor (`LLAMA3_TINY_ROPE`)."""


class _Executed:
    """Records what each training run executed, observed inside the processes: which core
    attention module ran each forward and on which layout (`thd`: packed THD tokens; `row mask`:
    a [b, 1, s, s] mask, one row per query; `padding mask`: [b, 1, 1, s]), and per forward of the
    embedding model the head, mask and backbone features of the modules that ran. `run(key)`
    names the `train()` call that the records belong to; `install()` / `remove()` wrap and
    restore the classes' `forward`."""

    def __init__(self):
        self.attention: dict = defaultdict(set)
        self.model: dict = defaultdict(set)
        self.key = None
        self._restore = []

    @contextmanager
    def run(self, key: str):
        self.key = key
        try:
            yield
        finally:
            self.key = None

    def _wrap(self, cls, record):
        original = cls.forward

        def forward(module, *args, **kwargs):
            if self.key is not None:
                record(module, *args, **kwargs)
            return original(module, *args, **kwargs)

        cls.forward = forward
        self._restore.append((cls, original))

    def install(self):
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        from megatron_nvembed.model.attention import SDPAttention
        from megatron_nvembed.model.nvembed_model import NVEmbedModel

        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            params = kwargs.get("packed_seq_params", args[2] if len(args) > 2 else None)
            if params is not None:
                layout = params.qkv_format  # megatron-core's name of the token layout
            elif attention_mask is None:
                layout = "no mask"
            else:
                layout = "row mask" if attention_mask.shape[-2] > 1 else "padding mask"
            self.attention[self.key].add((type(module).__name__, layout))

        def model(module, *args, **kwargs):
            if not module.post_process:
                return
            head = type(module.pooling).__name__
            if head == "AttentionPooling":
                head = {"latent": "latent", "self": "self-attention"}[module.pooling.kind]
            attn = module.decoder.layers[0].self_attention
            qkv = getattr(attn.linear_qkv, "base", attn.linear_qkv)  # under LoRA: the wrapped one
            self.model[self.key].add(
                (
                    {"MeanPooling": "mean", "EOSPooling": "eos"}.get(head, head),
                    module.mask_type,
                    qkv.bias is not None,  # Q/K/V biases (Qwen2)
                    type(attn.q_layernorm).__name__ not in ("NoneType", "IdentityOp"),  # Qwen3
                    module.model_config.model.rope_scaling_factor,  # Llama 3.x RoPE scaling
                )
            )

        self._wrap(SDPAttention, attention)
        self._wrap(DotProductAttention, attention)
        self._wrap(NVEmbedModel, model)

    def remove(self):
        for cls, original in reversed(self._restore):
            cls.forward = original
        self._restore = []

    def as_json(self) -> dict:
        return {
            "attention": {k: sorted(map(list, v)) for k, v in self.attention.items()},
            "model": {k: sorted(map(list, v)) for k, v in self.model.items()},
        }


def _cfg(data, **overrides):
    # Short rows: several texts per row, several rows per micro-batch.
    return tiny_training_config(data, **{"train_iters": 3, "seq_length": 24, **overrides})


def _backbones(data, backbones: dict, executed: _Executed) -> dict:
    """Per imported backbone (Qwen2, Qwen3, Llama 3.x): LoRA + packing + GradCache over 2
    micro-batches per rank, and LoRA on the direct path with one padded micro-batch per rank (the
    same in-batch pool); both with every Matryoshka / query-query / document-document term."""
    from megatron_nvembed.training.trainer import train

    out = {}
    for kind, ckpt in backbones.items():
        common = {
            "pretrained_checkpoint": ckpt,
            "tokenizer": None,
            "lora.rank": 4,
            "lora.dropout": 0.0,
            "matryoshka_dims": [64, 16],
            "query_query_negatives": True,
            "document_document_negatives": True,
        }
        for name, extra in (
            ("gc_packed", {"grad_cache": True, "micro_batch_size": 2, "pack_sequences": True}),
            ("direct_padded", {"grad_cache": False, "micro_batch_size": 4}),
        ):
            with executed.run(f"{kind}_{name}"):
                out[f"{kind}_{name}"] = train(_cfg(data, **common, **extra)).losses
    return out


def _packing_worker(rank, world, data, tmp, backbones):
    from megatron_nvembed.data import packing
    from megatron_nvembed.training.trainer import train

    original, seen = packing.pack_batch, []

    def counting(batch, pack_length, **kwargs):
        packed = original(batch, pack_length, **kwargs)
        seen.append((batch["input_ids"].shape[0], packed.input_ids.shape[0], pack_length))
        return packed

    packing.pack_batch = counting
    executed = _Executed()
    executed.install()
    out = {}
    layouts = {
        "dp2_gradcache": {},
        "dp2_direct": {"grad_cache": False},
        "pp2": {"model.parallel.pipeline_model_parallel_size": 2},
    }
    for name, extra in layouts.items():
        for pack in (False, True):
            key = f"{name}_{'packed' if pack else 'padded'}"
            log = Path(tmp) / f"{key}.jsonl"
            with executed.run(key):
                result = train(_cfg(data, pack_sequences=pack, log_json=str(log), **extra))
            out[key] = result.losses
    packing.pack_batch = original
    # The local backend (a block-diagonal mask instead of THD rows), packed and padded.
    for pack in (False, True):
        key = f"local_{'packed' if pack else 'padded'}"
        cfg = _cfg(data, pack_sequences=pack, **{"model.model.attention_backend": "local"})
        with executed.run(key):
            out[key] = train(cfg).losses
    out.update(_grad_cache_and_direct(data))
    out.update(_backbones(data, backbones, executed))
    log = Path(tmp) / "dp2_direct_buckets.jsonl"
    result = train(_cfg(data, grad_cache=False, length_bucket_size=3, log_json=str(log)))
    out["dp2_direct_buckets"] = result.losses
    out["seen"] = seen
    executed.remove()
    out["executed"] = executed.as_json()
    if rank == world - 1:
        (Path(tmp) / "packing.json").write_text(json.dumps(out))


def _grad_cache_and_direct(data) -> dict:
    """Stage 2 (in-batch negatives off, so both paths score each query against the same
    candidates) at DP=2 with 2 micro-batches per rank, trained with GradCache and without:
    the losses of each run, and how far the updated weights of the two runs are apart."""
    from megatron_nvembed.training import setup
    from megatron_nvembed.training.trainer import train

    real_build, runs, out = setup.build, {}, {}

    def keeping(cfg):  # the run's model, and its weights before the first step
        run = real_build(cfg)
        runs[cfg.grad_cache] = (run, [p.detach().clone() for p in run.model.parameters()])
        return run

    setup.build = keeping
    try:
        for grad_cache in (True, False):
            cfg = _cfg(data, grad_cache=grad_cache, in_batch_negatives=False)
            assert cfg.data.global_batch_size // (cfg.data.micro_batch_size * 2) >= 2
            out[f"stage2_grad_cache_{grad_cache}"] = train(cfg).losses
    finally:
        setup.build = real_build
    (cached, start), (direct, _) = runs[True], runs[False]
    pairs = list(zip(cached.model.parameters(), direct.model.parameters(), start))
    out["stage2_weight_rel_diff"] = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b, _ in pairs
    )
    # how far training moved the least-moved tensor, relative to its trained size (the
    # comparison is of trained weights)
    out["stage2_weight_rel_move"] = min(
        float((b - w0).abs().max() / b.abs().max().clamp(min=1e-30)) for _, b, w0 in pairs
    )
    return out


@pytest.fixture(scope="module")
def runs(synthetic, tmp_path_factory):
    """Every layout trained packed and padded once (2 processes); the tests read the outputs."""
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.testing import TINY_HF_KINDS, save_tiny_hf_decoder

    tmp = tmp_path_factory.mktemp("packing")
    backbones = {}
    for kind in TINY_HF_KINDS:  # tiny random Qwen2, Qwen3, Llama 3.x folders
        save_tiny_hf_decoder(tmp / f"hf_{kind}", synthetic["tokenizer"], kind)
    for name, (kind, settings) in BACKBONE_HEADS.items():  # imported with their heads
        backbones[name] = str(tmp / f"ckpt_{name}")
        import_hf(tmp / f"hf_{kind}", backbones[name], **settings)
    run_distributed(_packing_worker, 2, synthetic, str(tmp), backbones)
    return tmp


def test_pack_sequences_trains_like_padding(runs):
    """DP=2 with GradCache, DP=2 without it, and PP=2: 3 steps with --pack-sequences log the same
    losses as without it, within 1e-5 relative (the losses after the first step depend on the
    gradients, so those match as well)."""
    out = json.loads((runs / "packing.json").read_text())
    # Packing ran (3 layouts x 3 steps x 2 micro-batches per rank, GradCache and PP stages
    # packing more than once) and put several texts per row: 2 queries + 2 x 4 candidates.
    assert len(out["seen"]) >= 18
    assert all(texts == 10 and 1 < rows < texts and cap == 24 for texts, rows, cap in out["seen"])
    executed = out["executed"]["attention"]  # observed in the processes
    for name in ("dp2_gradcache", "dp2_direct", "pp2"):
        assert executed[f"{name}_packed"] == [["SDPAttention", "thd"]], name
        assert executed[f"{name}_padded"] == [["SDPAttention", "padding mask"]], name
        padded, packed = out[f"{name}_padded"], out[f"{name}_packed"]
        assert sorted(padded) == ["1", "2", "3"]
        for it in ("1", "2", "3"):
            assert packed[it] == pytest.approx(padded[it], rel=1e-5), (name, it)


def test_every_backbone_trains_with_lora_packing_and_grad_cache(runs):
    """Qwen2 (Q/K/V biases; self-attention head, bidirectional), Qwen3 (Q/K norms, head width
    24 != 64 / 4; EOS head, causal, as Qwen3-Embedding) and Llama 3.x (RoPE scaling; latent head,
    bidirectional, and mean head, causal), imported from transformers folders, at DP=2 with LoRA
    and every Matryoshka /
    query-query / document-document term: packed rows with
    GradCache over 2 micro-batches per rank log the same losses over 3 steps as padded rows on
    the direct path with one micro-batch per rank (rel 1e-5); each run executed its own
    backbone and head (observed in the processes: the head, the mask, Q/K/V biases, Q/K norms
    and RoPE scaling of the modules that ran)."""
    out = json.loads((runs / "packing.json").read_text())
    executed = out["executed"]["model"]
    for name in BACKBONE_HEADS:
        for run in ("gc_packed", "direct_padded"):
            assert executed[f"{name}_{run}"] == [BACKBONE_MODULES[name]], (name, run)
        cached, direct = out[f"{name}_gc_packed"], out[f"{name}_direct_padded"]
        assert sorted(direct) == ["1", "2", "3"]
        for it in ("1", "2", "3"):
            assert cached[it] == pytest.approx(direct[it], rel=1e-5), (name, it)


def test_length_buckets_train_like_one_call_and_compute_less_padding(runs):
    """`--length-bucket-size 3` (each micro-batch's 10 candidates in 4 length-sorted calls, each
    padded to its own longest text) at DP=2: the same losses as one call per kind (rel 1e-5),
    the same real tokens and model FLOPs (rel 1e-9), no more positions computed (rel 1e-9; the
    synthetic texts are of near-equal length; tests/unit/test_length_buckets.py checks the
    saving on mixed lengths)."""
    out = json.loads((runs / "packing.json").read_text())
    for it in ("1", "2", "3"):
        want = out["dp2_direct_padded"][it]
        assert out["dp2_direct_buckets"][it] == pytest.approx(want, rel=1e-5), it

    def records(key):
        return [json.loads(x) for x in (runs / f"{key}.jsonl").read_text().splitlines()]

    def per_iteration(r, key):
        return r[key] * r["iteration_time_s"]

    bucketed, padded = records("dp2_direct_buckets"), records("dp2_direct_padded")
    for a, b in zip(bucketed, padded):
        for key in ("tokens_per_s", "tflops"):  # the same real tokens and model FLOPs
            assert per_iteration(a, key) == pytest.approx(per_iteration(b, key), rel=1e-9)
        # counts recovered as rate x time: equal counts may differ in the last float bit
        computed, padded_computed = (per_iteration(r, "padded_tokens_per_s") for r in (a, b))
        assert computed <= padded_computed * (1 + 1e-9)


def test_pack_sequences_logs_executed_tokens_and_the_same_model_flops(runs):
    """The log of the runs above (one record per iteration): packed rows run as THD (sdpa), so
    the decoder computes exactly the real tokens (`padded_tokens_per_s == tokens_per_s`, rel
    1e-9), while the padded layout computes more; the model FLOPs behind TFLOP/s and MFU come
    from the real lengths, so packed and padded runs log the same FLOPs per iteration (rel
    1e-9)."""

    def records(key):
        lines = (runs / f"{key}.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def flops_per_iteration(r):  # per GPU x world size (2)
        return r["tflops"] * 1e12 * r["iteration_time_s"] * 2

    for name in ("dp2_gradcache", "dp2_direct", "pp2"):
        packed, padded = records(f"{name}_packed"), records(f"{name}_padded")
        assert len(packed) == len(padded) == 3
        for a, b in zip(packed, padded):
            assert a["padded_tokens_per_s"] == pytest.approx(a["tokens_per_s"], rel=1e-9), name
            assert b["padded_tokens_per_s"] > 1.05 * b["tokens_per_s"], name
            assert flops_per_iteration(a) == pytest.approx(flops_per_iteration(b), rel=1e-9)
            assert flops_per_iteration(a) > 0


def test_pack_sequences_trains_like_padding_on_each_cpu_backend(runs):
    """The local backend (block-diagonal mask, padded rows; the runs above use sdpa's THD
    rows) at DP=2 with GradCache: packed training logs the losses of padded training within
    1e-5 relative over 3 steps. Which backend ran is observed in the processes, not inferred
    from the losses (the backends compute the same function, so equal losses are expected):
    megatron-core's DotProductAttention on a [rows, 1, L, L] mask for the packed rows and on a
    padding mask for the padded ones, never SDPAttention."""
    out = json.loads((runs / "packing.json").read_text())
    executed = out["executed"]["attention"]
    assert executed["local_packed"] == [["DotProductAttention", "row mask"]]
    assert executed["local_padded"] == [["DotProductAttention", "padding mask"]]
    for it in ("1", "2", "3"):
        assert out["local_packed"][it] == pytest.approx(out["local_padded"][it], rel=1e-5), it


def test_train_with_grad_cache_equals_direct_at_dp2_with_two_micro_batches(runs):
    """`train()` itself, GradCache on and off, DP=2, 2 micro-batches per rank, in-batch
    negatives off (stage 2: each query sees its own candidates on both paths): the same loss at
    each of 3 steps (rel 1e-6) and the same updated weights (max |diff| / max |w| <= 1e-5 per
    tensor; float32, the two paths sum in different orders)."""
    out = json.loads((runs / "packing.json").read_text())
    cached, direct = out["stage2_grad_cache_True"], out["stage2_grad_cache_False"]
    assert sorted(cached) == ["1", "2", "3"]
    for it in ("1", "2", "3"):
        assert cached[it] == pytest.approx(direct[it], rel=1e-6), it
    # Training moved every tensor 10x further than the paths may differ: 3 Adam steps at lr up
    # to 2e-3 move each by ~1e-3 of its size or more (the norm weights, 1.0, least); float noise
    # is ~1e-7. So the comparison is of trained weights.
    assert out["stage2_weight_rel_move"] > 10 * 1e-5
    assert out["stage2_weight_rel_diff"] <= 1e-5
