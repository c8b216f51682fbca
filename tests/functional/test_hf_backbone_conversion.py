"""import_hf / export_hf of tiny Qwen3, Qwen2 and Llama 3.x folders built locally (no hub), fp32.

Proves: `import_hf` of a tiny random transformers `Qwen3Model` folder (per-head Q/K RMSNorm,
head_dim 24 != 64 / 4 heads, GQA) or Llama 3.x `LlamaModel` folder (rope_scaling llama3), then a
forward of the saved checkpoint, gives transformers' final hidden states (causal mask, padded
batch, real positions): max |diff| <= 1e-5; the config read from the folder carries the bias /
qk-norm / head width / RoPE scaling; `export_hf` writes the source weights back bit for bit, with
a `qwen3` (causal), `bidir_qwen2` (bidirectional Qwen2 with Q/K/V biases) or `mistral` with
llama3 `rope_scaling` text_config, and the exported folder loads with
`AutoModel.from_pretrained(..., trust_remote_code=True)` into a Qwen3Model / Qwen2Model /
MistralModel backbone whose embeddings equal ours (1e-5).

Run alone: pytest tests/functional/test_hf_backbone_conversion.py
"""

import json

import pytest
import torch

from megatron_nvembed.core.config import ParallelConfig
from megatron_nvembed.testing import (
    backbone_hidden_states,
    hf_hidden_states,
    init_single_process_megatron,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def pg():
    return init_single_process_megatron()


TEXTS = ["how do plants make food", "paris is the capital of france", "the sky is blue"]


def test_import_forward_export_reload(tmp_path, pg):
    from transformers import AutoModel

    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config
    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.testing import build_word_tokenizer, save_tiny_hf_decoder

    tok = build_word_tokenizer(TEXTS)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    real = batch["attention_mask"].bool()
    cases = (("qwen3", "causal"), ("qwen2", "bidirectional"), ("llama3", "causal"))
    for kind, mask_type in cases:
        src = save_tiny_hf_decoder(tmp_path / kind, tok, kind)
        ckpt, out = tmp_path / f"{kind}_ckpt", tmp_path / f"{kind}_hf"
        import_hf(src, ckpt, pooling="mean", mask_type=mask_type)
        cfg = read_config(ckpt)
        assert cfg.model.qk_layernorm == (kind == "qwen3")
        assert cfg.model.add_qkv_bias == (kind == "qwen2")
        assert cfg.model.head_dim == (24 if kind == "qwen3" else 16)
        assert cfg.model.rope_scaling_factor == (8.0 if kind == "llama3" else None)
        cfg.parallel = ParallelConfig(1, 1)
        model = build_model(cfg, pg).eval()
        load_checkpoint(model, ckpt)
        if mask_type == "causal":
            hf = AutoModel.from_pretrained(src, attn_implementation="eager").eval()
            diff = (
                (backbone_hidden_states(model, batch) - hf_hidden_states(hf, batch))[real]
                .abs()
                .max()
                .item()
            )
            assert diff <= TOL, f"{kind}: imported checkpoint's hidden states differ by {diff}"

        export_hf(ckpt, out, dtype="float32")
        config = json.loads((out / "config.json").read_text())
        arch = "mistral" if kind == "llama3" else kind
        want_type = arch if mask_type == "causal" else f"bidir_{arch}"
        assert config["text_config"]["model_type"] == want_type
        from safetensors.torch import load_file

        got, source = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
        for k, v in source.items():
            assert torch.equal(got["embedding_model." + k], v), k
        exported = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
        assert type(exported.embedding_model).__name__ == f"{arch.capitalize()}Model"
        rope = exported.embedding_model.config.rope_parameters
        assert rope["rope_type"] == ("llama3" if kind == "llama3" else "default")
        with torch.no_grad():
            want = model(**batch)
            emb = exported(**batch)["sentence_embeddings"]
        assert (emb - want).abs().max().item() <= TOL, kind
