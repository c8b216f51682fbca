"""Qwen2 / Qwen2.5, Qwen3 and Llama 3.x (rope_scaling llama3) backbones against transformers
(one process, TP=PP=1, fp32, CPU).

Proves:
- the megatron backbone loaded from a tiny random transformers `Qwen2Model` (Q/K/V biases),
  `Qwen3Model` (per-head Q/K RMSNorm, head_dim 24 != 64 / 4 heads, GQA 4 / 2) or `LlamaModel`
  with `rope_type: llama3` scaling (frequencies in all three bands) gives the final hidden states
  transformers computes (causal mask, right-padded mixed-length batch up to 40 tokens, real
  positions), with the sdpa and megatron-core local attention backends: max |diff| <= 1e-5,
  and without the feature (biases, Q/K norm weights, scaling) the states differ by > 1e-2;
- the weight map round-trips bit-exactly (biases fused per query group and split over TP, the
  Q/K norm weights replicated) for TP in {1, 2, 4} x PP in {1, 2};
- `model_config_from_hf` reads each config key that matters (bias, qk-norm, head_dim,
  rope_theta old and new style) and refuses each unsupported feature with an error naming the
  file and key; `text_config_dict` gives a config transformers builds as the same architecture
  (strict state-dict load, same hidden states);
- `ModelConfig`'s new fields are validated and stored; configs saved before them still load;
TP=2 and PP=2 parity: tests/distributed/test_model_parallel_parity.py; import_hf / export_hf of
Qwen and Llama 3 folders: tests/functional/test_hf_backbone_conversion.py.

Run alone: pytest tests/unit/test_hf_backbones.py
"""

import itertools
import json

import pytest
import torch

from megatron_nvembed.conversion import hf_mapping as hm
from megatron_nvembed.conversion.hf_config import model_config_from_hf, text_config_dict
from megatron_nvembed.core.config import (
    EmbeddingModelConfig,
    ModelConfig,
    ParallelConfig,
    PoolingConfig,
)
from megatron_nvembed.testing import (
    QWEN_KINDS,
    TINY_HF_KINDS,
    backbone_hidden_states,
    hf_hidden_states,
    init_single_process_megatron,
    random_padded_batch,
    tiny_hf_backbone,
)

TOL = 1e-5  # fp32, as the Mistral/Llama parity tests; observed ~2e-6
BATCH = dict(lengths=[40, 5, 23, 3], seed=2)


@pytest.fixture(scope="module")
def pg():
    return init_single_process_megatron()


def _cfg(hf, mask_type="causal", backend="sdpa", tp=1, pp=1) -> EmbeddingModelConfig:
    m = model_config_from_hf(hf.config.to_dict(), "tiny config")
    m.mask_type, m.attention_backend = mask_type, backend
    return EmbeddingModelConfig(
        model=m, pooling=PoolingConfig(type="mean"), parallel=ParallelConfig(tp, pp)
    )


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@pytest.mark.parametrize("kind", TINY_HF_KINDS)
def test_hidden_states_match_transformers(pg, kind, backend):
    from megatron_nvembed.model.build import build_model

    hf = tiny_hf_backbone(kind)
    cfg = _cfg(hf, backend=backend)
    model = build_model(cfg, pg).eval()
    hm.load_hf_into_model(model, hf.state_dict(), cfg, 0, 0, include_head=False)
    params = dict(model.named_parameters())
    if kind == "qwen2":
        assert "decoder.layers.0.self_attention.linear_qkv.bias" in params
        assert not any("q_layernorm" in n for n in params)
    elif kind == "qwen3":
        assert params["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (24,)
        assert params["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (8 * 24, 64)
        assert not any(n.endswith("linear_qkv.bias") for n in params)
    batch = random_padded_batch(**BATCH)
    real = batch["attention_mask"].bool()
    want = hf_hidden_states(hf, batch)
    diff = (backbone_hidden_states(model, batch) - want)[real].abs().max().item()
    assert diff <= TOL, f"{kind}/{backend}: hidden states differ by {diff}"
    # The feature under test is live: without the Q/K/V biases (Qwen2), with other Q/K norm
    # weights (Qwen3; doubled: the attention scores x4) or without the scaling (Llama 3), the
    # states differ.
    state = {
        k: torch.zeros_like(v) if k.endswith("_proj.bias") else 2.0 * v if "_norm." in k else v
        for k, v in hf.state_dict().items()
    }
    if kind == "llama3":
        cfg.model.rope_scaling_factor = None
        cfg.model.rope_scaling_original_max_position_embeddings = 8192
        model = build_model(cfg, pg).eval()
    hm.load_hf_into_model(model, state, cfg, 0, 0, include_head=False)
    assert (backbone_hidden_states(model, batch) - want)[real].abs().max().item() > 1e-2


@pytest.mark.parametrize("tp,pp", list(itertools.product([1, 2, 4], [1, 2])))
@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_weight_map_round_trip_is_bit_exact(kind, tp, pp):
    hf = tiny_hf_backbone(kind, num_layers=4, num_key_value_heads=4 if tp == 4 else 2)
    src = {("model." + k): v for k, v in hf.state_dict().items()}  # *ForCausalLM layout
    cfg = _cfg(hf, tp=tp, pp=pp)
    shards = [
        [
            hm.hf_to_megatron(src, cfg, r, p, backbone_prefix="model.", include_head=False)
            for r in range(tp)
        ]
        for p in range(pp)
    ]
    back = hm.megatron_to_hf(shards, cfg, backbone_prefix="model.")
    assert set(back) == set(src)
    for k in src:
        assert torch.equal(back[k], src[k]), k
    m = cfg.model
    layer = "decoder.layers.0.self_attention."
    if kind == "qwen2":
        # Each rank's bias holds its query groups as [q heads of g ; k_g ; v_g], like the weight.
        q, k, v = (src[f"model.layers.0.self_attn.{n}_proj.bias"] for n in "qkv")
        groups, dh = m.num_query_groups, m.head_dim
        qw = (m.num_attention_heads // groups) * dh
        for r in range(tp):
            mine = range(r * groups // tp, (r + 1) * groups // tp)
            want = torch.cat(
                [
                    torch.cat(
                        [
                            q[g * qw : (g + 1) * qw],
                            k[g * dh : (g + 1) * dh],
                            v[g * dh : (g + 1) * dh],
                        ]
                    )
                    for g in mine
                ]
            )
            assert torch.equal(shards[0][r][layer + "linear_qkv.bias"], want)
    else:
        for r in range(tp):
            for n in "qk":
                assert torch.equal(
                    shards[0][r][layer + f"{n}_layernorm.weight"],
                    src[f"model.layers.0.self_attn.{n}_norm.weight"],
                )


def test_config_keys_are_read():
    from transformers import Qwen2Config, Qwen3Config

    q2 = model_config_from_hf(
        Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to_dict(), "c"
    )
    assert (q2.add_qkv_bias, q2.qk_layernorm, q2.kv_channels) == (True, False, 16)
    q3 = tiny_hf_backbone("qwen3").config.to_dict()
    assert "rope_theta" not in q3 and q3["rope_parameters"]["rope_theta"] == 1e6  # transformers 5
    m = model_config_from_hf(q3, "c")
    assert (m.add_qkv_bias, m.qk_layernorm, m.kv_channels, m.head_dim) == (False, True, 24, 24)
    assert (m.rotary_base, m.norm_epsilon, m.num_query_groups) == (1e6, 1e-6, 2)
    # A config.json written by transformers 4.x: rope_theta at the top level.
    old = {k: v for k, v in q3.items() if k != "rope_parameters"}
    assert model_config_from_hf({**old, "rope_theta": 5e5}, "c").rotary_base == 5e5
    # Qwen2.5 ships use_sliding_window false with a sliding_window size: full attention, read.
    assert model_config_from_hf({**q3, "sliding_window": 4096}, "c").qk_layernorm
    assert Qwen3Config(**{k: v for k, v in q3.items() if k != "model_type"}).head_dim == 24
    # Llama 3.x scaling, as transformers 5 writes it (rope_parameters) and as 4.x did.
    l3 = tiny_hf_backbone("llama3").config.to_dict()
    m = model_config_from_hf(l3, "c")
    got = (
        m.rope_scaling_factor,
        m.rope_scaling_low_freq_factor,
        m.rope_scaling_high_freq_factor,
        m.rope_scaling_original_max_position_embeddings,
        m.rotary_base,
    )
    assert got == (8.0, 1.0, 4.0, 64, 1e6)
    legacy = {k: v for k, v in l3.items() if k != "rope_parameters"}
    legacy.update(rope_theta=1e6, rope_scaling=dict(l3["rope_parameters"], rope_theta=None))
    del legacy["rope_scaling"]["rope_theta"]
    assert model_config_from_hf(legacy, "c") == m


@pytest.mark.parametrize(
    "kind,change,match",
    [
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
        ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ("qwen3", {"attention_bias": True}, "attention_bias"),
        ("qwen2", {"hidden_act": "gelu"}, "hidden_act"),
        ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            "rope_parameters.low_freq_factor",
        ),
        ("qwen2", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
        (
            "llama",
            {"rope_scaling": {"rope_type": "llama3", "truncate": True}},
            r"rope_scaling has key\(s\) \['truncate'\]",
        ),
        ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ("qwen2", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("llama", {"mlp_bias": True}, "mlp_bias"),
        ("gemma", {}, "unsupported model_type 'gemma'"),
    ],
)
def test_unsupported_features_are_refused_naming_the_key(kind, change, match):
    from transformers import LlamaConfig

    base = (
        LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict()
        if kind in ("llama", "gemma")
        else tiny_hf_backbone(kind).config.to_dict()
    )
    text = {**base, **change, "model_type": kind}
    with pytest.raises(ValueError, match=f"some/config.json: .*{match}"):
        model_config_from_hf(text, "some/config.json")


def test_new_fields_validated_stored_and_old_configs_load():
    cfg = EmbeddingModelConfig(model=ModelConfig(add_qkv_bias=True, qk_layernorm=True))
    d = cfg.validate().to_dict()
    assert d["model"]["add_qkv_bias"] is True and d["model"]["qk_layernorm"] is True
    assert EmbeddingModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    old = json.loads(json.dumps(d))
    del old["model"]["add_qkv_bias"], old["model"]["qk_layernorm"]  # saved before the fields
    loaded = EmbeddingModelConfig.from_dict(old).validate()
    assert (loaded.model.add_qkv_bias, loaded.model.qk_layernorm) == (False, False)
    for change, match in (
        ({"add_qkv_bias": "yes"}, "add_qkv_bias"),
        ({"qk_layernorm": 1}, "qk_layernorm"),
        ({"kv_channels": 0}, "kv_channels"),
        ({"rope_scaling_factor": 0.0}, "rope_scaling_factor must be a number > 0"),
        (
            {"rope_scaling_factor": 8.0, "rope_scaling_high_freq_factor": 1.0},
            "rope_scaling_high_freq_factor must be a number > rope_scaling_low_freq_factor",
        ),
        (
            {"rope_scaling_factor": 8.0, "rope_scaling_original_max_position_embeddings": 0},
            "rope_scaling_original_max_position_embeddings must be an integer >= 1",
        ),
        (
            {"rope_scaling_low_freq_factor": 2.0},
            r"rope_scaling_low_freq_factor is set \(2.0\) but rope_scaling_factor is None",
        ),
    ):
        bad = EmbeddingModelConfig(model=ModelConfig(**change))
        with pytest.raises(ValueError, match=match):
            bad.validate()
    # No transformers architecture has both; exporting such a backbone is refused.
    with pytest.raises(ValueError, match="add_qkv_bias together with qk_layernorm"):
        text_config_dict(cfg)


@pytest.mark.parametrize("kind", TINY_HF_KINDS)
def test_text_config_is_the_same_architecture_for_transformers(kind):
    from transformers import AutoConfig, AutoModel

    hf = tiny_hf_backbone(kind)
    cfg = _cfg(hf, mask_type="causal")
    text = text_config_dict(cfg)
    # A Llama backbone is written as Mistral, the same layer (state-dict names included).
    arch = "mistral" if kind == "llama3" else kind
    assert text["model_type"] == arch
    conf = AutoConfig.for_model(**text)
    conf._attn_implementation = "eager"
    rebuilt = AutoModel.from_config(conf).eval()
    assert text["architectures"] == [type(rebuilt).__name__]
    if kind != "llama3":
        assert type(rebuilt) is type(hf)
    rebuilt.load_state_dict(hf.state_dict(), strict=True)
    batch = random_padded_batch(**BATCH)
    real = batch["attention_mask"].bool()
    assert (hf_hidden_states(rebuilt, batch) - hf_hidden_states(hf, batch))[
        real
    ].abs().max().item() <= TOL
    # Read back, the written config gives the same backbone.
    assert model_config_from_hf(text, "text_config") == cfg.model.__class__(
        **{**cfg.model.__dict__, "mask_type": "bidirectional", "attention_backend": "auto"}
    )
    bidir = text_config_dict(_cfg(hf, mask_type="bidirectional"))
    assert bidir["model_type"] == f"bidir_{arch}"


@pytest.mark.parametrize(
    "change",
    [{"add_qkv_bias": True}, {"qk_layernorm": True}, {"rope_scaling_factor": 8.0}],
    ids=lambda c: next(iter(c)),
)
def test_mistral_reference_refuses_features_it_lacks(change):
    from megatron_nvembed.testing import tiny_model_config
    from megatron_nvembed.testing.reference import mistral_config

    cfg = tiny_model_config()
    for k, v in change.items():
        setattr(cfg.model, k, v)
    with pytest.raises(ValueError, match=f"the Mistral reference has no {next(iter(change))}"):
        mistral_config(cfg)
