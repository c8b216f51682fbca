"""A tiny Qwen3-Embedding-style sentence-transformers folder (byte-level BPE tokenizer, Qwen3Model,
last-token pooling, Normalize, prompts), built locally."""

from __future__ import annotations

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The pre-tokeniser split of Qwen2 / Qwen3 tokenizers (a regex, then byte-level BPE)."""


def build_qwen3_embedding_tokenizer(texts, save_dir, vocab_size: int = 400):
    """A small byte-level BPE tokenizer shaped like Qwen3-Embedding's, trained on `texts` and
    saved to `save_dir` as that model publishes it.

    Qwen3-Embedding's conventions: no BOS; the post-processor appends `<|endoftext|>` (id 0 here)
    to every text; `eos_token` is `<|im_end|>` (not what is appended), `pad_token`
    `<|endoftext|>`; left padding; `tokenizer_class` Qwen2Tokenizer (so transformers'
    `AutoTokenizer` loads it with its Qwen2 class, as it does the real model).

    Returns:
        `save_dir`.
    """
    import json
    from pathlib import Path

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    end = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A:0 <|endoftext|>:0",
        pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", end)],
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
    )
    out.save_pretrained(str(save_dir))
    path = Path(save_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return save_dir


QWEN3_EMBEDDING_QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)
"""The `query` prompt Qwen3-Embedding ships in `config_sentence_transformers.json`."""


def save_tiny_qwen3_embedding(out_dir, tokenizer_dir, seed: int = 0, max_seq_length: int = 64):
    """A tiny random Qwen3-Embedding-style folder, laid out as that model is published: a
    `Qwen3Model` (`tiny_hf_backbone("qwen3")`), the tokenizer files of `tokenizer_dir` (see
    `build_qwen3_embedding_tokenizer`), and sentence-transformers modules: Transformer, Pooling
    with `pooling_mode_lasttoken`, Normalize, and the `query` / `document` prompts.

    Returns:
        `out_dir`.
    """
    import json
    from pathlib import Path

    from megatron_nvembed.checkpoint.store import copy_tokenizer_files
    from megatron_nvembed.data.tokenization import load_tokenizer
    from megatron_nvembed.testing.models import tiny_hf_backbone

    out = Path(out_dir)
    vocab = len(load_tokenizer(tokenizer_dir))
    tiny_hf_backbone("qwen3", vocab_size=vocab, seed=seed).save_pretrained(out)
    copy_tokenizer_files(tokenizer_dir, out)
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": {"query": QWEN3_EMBEDDING_QUERY_PROMPT, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
        "1_Pooling/config.json": {
            "word_embedding_dimension": 64,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
    }
    for name, value in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(value, indent=2), encoding="utf-8")
    (out / "2_Normalize").mkdir(exist_ok=True)
    return out_dir
