"""Helpers for tests, examples and benchmarks, built locally (no hub): tiny configs and models
(`models`), local data and tokenizers (`data`), a tiny sentence-transformers folder
(`st_folders`), the plain transformers + torch NV-Embed reference (`reference`), and the
local multi-process launcher (`core.launch`).

Nothing of the runtime package imports this package (`tests/unit/test_layering.py`).
"""

from megatron_nvembed.core.launch import free_port, run_distributed
from megatron_nvembed.testing.data import build_word_tokenizer, write_synthetic_retrieval
from megatron_nvembed.testing.models import (
    LLAMA3_TINY_ROPE,
    QWEN_KINDS,
    TINY_HF_KINDS,
    backbone_hidden_states,
    hf_hidden_states,
    init_single_process_megatron,
    random_padded_batch,
    randomized_reference,
    save_tiny_hf_decoder,
    tiny_hf_backbone,
    tiny_model_config,
    tiny_training_config,
)
from megatron_nvembed.testing.st_folders import (
    QWEN2_SPLIT_PATTERN,
    QWEN3_EMBEDDING_QUERY_PROMPT,
    build_qwen3_embedding_tokenizer,
    save_tiny_qwen3_embedding,
    save_tiny_qwen3_embedding_st5,
)

__all__ = [
    "LLAMA3_TINY_ROPE",
    "QWEN2_SPLIT_PATTERN",
    "QWEN3_EMBEDDING_QUERY_PROMPT",
    "QWEN_KINDS",
    "TINY_HF_KINDS",
    "backbone_hidden_states",
    "build_qwen3_embedding_tokenizer",
    "build_word_tokenizer",
    "free_port",
    "hf_hidden_states",
    "init_single_process_megatron",
    "random_padded_batch",
    "randomized_reference",
    "run_distributed",
    "save_tiny_hf_decoder",
    "save_tiny_qwen3_embedding",
    "save_tiny_qwen3_embedding_st5",
    "tiny_hf_backbone",
    "tiny_model_config",
    "tiny_training_config",
    "write_synthetic_retrieval",
]
