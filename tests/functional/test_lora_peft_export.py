"""Adapters saved in PEFT's format apply to the exported model and give our LoRA model's outputs.

A tiny Mistral is imported, exported (fp32), then loaded at TP=1 with random non-zero adapters;
`save_peft_adapters` writes adapter_config.json + adapter_model.safetensors with the exported
model's module names; `PeftModel.from_pretrained(AutoModel.from_pretrained(export), adapters)`
must reproduce our embeddings (max |diff| <= 1e-5), and differ from the bare export.

Run alone: pytest tests/functional/test_lora_peft_export.py
"""

import pytest
import torch

from megatron_nvembed.testing import (
    build_word_tokenizer,
    init_single_process_megatron,
    save_tiny_hf_decoder,
)

TEXTS = ["how do plants make food", "the sky is blue"]


@pytest.mark.functional
def test_peft_adapters_reproduce_lora_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from megatron_nvembed.checkpoint import load_checkpoint, read_config
    from megatron_nvembed.conversion.convert import export_hf, import_hf
    from megatron_nvembed.data.tokenization import tokenize_for_embedding
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import LoRAParallelLinear, apply_lora, save_peft_adapters

    tok = build_word_tokenizer(TEXTS)
    src = save_tiny_hf_decoder(tmp_path / "src", tok)
    import_hf(src, tmp_path / "ckpt")
    pg = init_single_process_megatron()
    export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="float32")

    cfg = read_config(tmp_path / "ckpt")
    model = build_model(cfg, pg)
    load_checkpoint(model, tmp_path / "ckpt")
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for i, m in enumerate(x for x in model.modules() if isinstance(x, LoRAParallelLinear)):
            m.lora_B.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(i))
    model.eval()
    batch, _ = tokenize_for_embedding(tok, TEXTS, pad_to_multiple_of=None)
    with torch.no_grad():
        ours = model(**batch)
    save_peft_adapters(model, cfg, tmp_path / "adapters", rank=4, alpha=8.0)

    base = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    bare = base.encode(TEXTS)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapters")).eval()
    with torch.no_grad():
        theirs = peft_model.base_model.model.encode(TEXTS)
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert (bare - ours).abs().max().item() > 1e-3
