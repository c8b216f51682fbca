"""The HF <-> Megatron weight map is bit-exact; its fused layouts are the ones megatron-core uses.

Pure tensor tests (no process group): HF -> shards -> HF for every TP x PP split in
{1, 2, 4} x {1, 2}, for the Mistral (no prefix), *ForCausalLM (`model.`) and NV-Embed
(`embedding_model.` + `latent_attention_model.`) layouts; and hand-checked QKV / gate-up /
vocabulary-padding layouts of `megatron_nvembed.utils.sharding`, the transforms the map applies.

Run alone: pytest tests/unit/test_weight_mapping.py
"""

import itertools

import pytest
import torch

from megatron_nvembed.conversion import hf_mapping as hm
from megatron_nvembed.testing import tiny_model_config
from megatron_nvembed.utils import sharding


def _random_hf_state(cfg, backbone_prefix, head_prefix, seed=0):
    """Random tensors for every HF key the map expects (shapes from the stage rules at TP=1)."""
    g = torch.Generator().manual_seed(seed)
    m, p = cfg.model, cfg.pooling
    d, dh, inner = m.hidden_size, m.head_dim, p.num_heads * (p.head_dim or m.hidden_size)
    shapes = {
        "embed_tokens.weight": (m.vocab_size, d),
        "norm.weight": (d,),
    }
    for i in range(m.num_layers):
        shapes.update(
            {
                f"layers.{i}.input_layernorm.weight": (d,),
                f"layers.{i}.post_attention_layernorm.weight": (d,),
                f"layers.{i}.self_attn.q_proj.weight": (m.num_attention_heads * dh, d),
                f"layers.{i}.self_attn.k_proj.weight": (m.num_query_groups * dh, d),
                f"layers.{i}.self_attn.v_proj.weight": (m.num_query_groups * dh, d),
                f"layers.{i}.self_attn.o_proj.weight": (d, m.num_attention_heads * dh),
                f"layers.{i}.mlp.gate_proj.weight": (m.ffn_hidden_size, d),
                f"layers.{i}.mlp.up_proj.weight": (m.ffn_hidden_size, d),
                f"layers.{i}.mlp.down_proj.weight": (d, m.ffn_hidden_size),
            }
        )
    state = {backbone_prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}
    head = {
        "latents": (p.num_latents, d),
        "cross_attend_blocks.0.norm.weight": (d,),
        "cross_attend_blocks.0.norm.bias": (d,),
        "cross_attend_blocks.0.norm_context.weight": (d,),
        "cross_attend_blocks.0.norm_context.bias": (d,),
        "cross_attend_blocks.0.fn.to_q.weight": (inner, d),
        "cross_attend_blocks.0.fn.to_kv.weight": (2 * inner, d),
        "cross_attend_blocks.0.fn.to_out.weight": (d, inner),
        "cross_attend_blocks.1.norm.weight": (d,),
        "cross_attend_blocks.1.norm.bias": (d,),
        "cross_attend_blocks.1.fn.net.0.weight": (2 * p.ff_mult * d, d),
        "cross_attend_blocks.1.fn.net.0.bias": (2 * p.ff_mult * d,),
        "cross_attend_blocks.1.fn.net.2.weight": (d, p.ff_mult * d),
        "cross_attend_blocks.1.fn.net.2.bias": (d,),
    }
    state.update({head_prefix + k: torch.randn(s, generator=g) for k, s in head.items()})
    return state


LAYOUTS = [
    ("", "latent_attention_model."),  # MistralModel / LlamaModel
    ("model.", "latent_attention_model."),  # *ForCausalLM (lm_head ignored)
    ("embedding_model.", "latent_attention_model."),  # NV-Embed
]


@pytest.mark.parametrize("tp,pp", list(itertools.product([1, 2, 4], [1, 2])))
@pytest.mark.parametrize("prefixes", LAYOUTS, ids=["mistral", "causal_lm", "nvembed"])
def test_round_trip_is_bit_exact(tp, pp, prefixes):
    cfg = tiny_model_config(tp=tp, pp=pp, num_layers=4)
    cfg.pooling.num_heads = 4
    bp, hp = prefixes
    hf = _random_hf_state(cfg, bp, hp)
    shards = [
        [hm.hf_to_megatron(hf, cfg, r, p, backbone_prefix=bp, head_prefix=hp) for r in range(tp)]
        for p in range(pp)
    ]
    back = hm.megatron_to_hf(shards, cfg, backbone_prefix=bp, head_prefix=hp)
    assert set(back) == set(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    # 101 vocabulary rows are padded to 128 (TP-independent, so checkpoints reshard).
    emb = shards[0][0]["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 128 // tp


def test_te_names_round_trip():
    cfg = tiny_model_config(tp=2)
    hf = _random_hf_state(cfg, "", "latent_attention_model.")
    shards = [[hm.hf_to_megatron(hf, cfg, r, 0, te_names=True) for r in range(2)]]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in shards[0][0]
    assert "decoder.layers.0.input_layernorm.weight" not in shards[0][0]
    back = hm.megatron_to_hf(shards, cfg, te_names=True)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_qkv_layout_is_per_query_group():
    # 4 query heads in 2 groups, head width 1, hidden 1: rows are labelled by their origin.
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])  # heads 0..3
    k = torch.tensor([[20.0], [21.0]])  # groups 0, 1
    v = torch.tensor([[30.0], [31.0]])
    qkv = sharding.interleave_qkv(q, k, v, num_heads=4, num_groups=2)
    assert qkv.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    # TP=2: each rank holds whole query groups.
    rank1 = sharding.shard("qkv", [q, k, v], 1, 2, num_heads=4, num_groups=2)
    assert rank1.flatten().tolist() == [12, 13, 21, 31]


def test_pair_layout_splits_each_half():
    gate = torch.arange(4.0).view(4, 1)
    up = torch.arange(10.0, 14.0).view(4, 1)
    assert sharding.shard("pair", [gate, up], 0, 2).flatten().tolist() == [0, 1, 10, 11]
    assert sharding.shard("pair", [gate, up], 1, 2).flatten().tolist() == [2, 3, 12, 13]
    stacked = torch.cat([gate, up])  # NV-Embed stores [K ; V] and [value ; gate] stacked
    assert torch.equal(
        sharding.shard("pair", [stacked], 1, 2), sharding.shard("pair", [gate, up], 1, 2)
    )


def test_vocab_rows_are_padded_then_split_and_stripped_back():
    full = torch.arange(5.0).view(5, 1)
    parts = [sharding.shard("vocab", [full], r, 2, vocab_rows=8) for r in range(2)]
    assert [p.flatten().tolist() for p in parts] == [[0, 1, 2, 3], [4, 0, 0, 0]]
    assert torch.equal(sharding.unshard("vocab", parts, 1, vocab_size=5)[0], full)
    with pytest.raises(ValueError, match="exceeds the 4 allocated"):
        sharding.shard("vocab", [full], 0, 2, vocab_rows=4)


def test_missing_key_is_named():
    cfg = tiny_model_config()
    hf = _random_hf_state(cfg, "", "latent_attention_model.")
    del hf["layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj.weight"):
        hm.hf_to_megatron(hf, cfg, 0, 0)
