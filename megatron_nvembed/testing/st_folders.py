"""A tiny Qwen3-Embedding-style sentence-transformers folder (byte-level BPE tokenizer, Qwen3Model,
last-token pooling, Normalize, prompts), built locally and saved by the installed
sentence-transformers itself; the same folder in the layout sentence-transformers 5 wrote."""

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


def save_tiny_qwen3_embedding(
    out_dir,
    tokenizer_dir,
    seed: int = 0,
    max_seq_length: int = 64,
    pooling_mode: str = "lasttoken",
    include_prompt: bool = True,
):
    """A tiny random Qwen3-Embedding-style folder, written by the installed sentence-transformers'
    own `save()`: a `Transformer` module over a `Qwen3Model` (`tiny_hf_backbone("qwen3")`) and the
    tokenizer of `tokenizer_dir` (see `build_qwen3_embedding_tokenizer`), a `Pooling` module
    (`pooling_mode`, default last-token as Qwen3-Embedding's; `include_prompt`), `Normalize`, and
    the `query` / `document` prompts with cosine similarity. The layout is thus the installed
    version's (sentence-transformers 6: full class paths as module types, `"pooling_mode":
    "<mode>"`); `save_tiny_qwen3_embedding_st5` rewrites it into the form version 5 wrote.

    Returns:
        `out_dir`.
    """
    import tempfile
    from pathlib import Path

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from megatron_nvembed.checkpoint.store import copy_tokenizer_files
    from megatron_nvembed.data.tokenization import load_tokenizer
    from megatron_nvembed.testing.models import tiny_hf_backbone

    vocab = len(load_tokenizer(tokenizer_dir))
    with tempfile.TemporaryDirectory() as tmp:  # the backbone as a plain transformers folder
        tiny_hf_backbone("qwen3", vocab_size=vocab, seed=seed).save_pretrained(tmp)
        copy_tokenizer_files(tokenizer_dir, tmp)
        backbone = Transformer(tmp, max_seq_length=max_seq_length)
        dim = backbone.get_embedding_dimension()
        model = SentenceTransformer(
            modules=[backbone, Pooling(dim, pooling_mode, include_prompt), Normalize()],
            prompts={"query": QWEN3_EMBEDDING_QUERY_PROMPT, "document": ""},
            similarity_fn_name="cosine",
            device="cpu",
        )
        model.save(str(Path(out_dir)))
    return out_dir


ST5_MODE_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
"""sentence-transformers 6's `pooling_mode` values and the boolean key of each in version 5's
Pooling config (in its order)."""


def rewrite_as_st5_layout(folder, max_seq_length: int = 64) -> None:
    """Turns a folder saved by sentence-transformers 6 into the form version 5 wrote (and
    released models such as all-MiniLM-L6-v2 carry): module types `sentence_transformers.models.
    <Class>`, the Pooling config as `word_embedding_dimension` + one boolean per mode +
    `include_prompt`, and `sentence_bert_config.json` as `max_seq_length` / `do_lower_case`. The
    weights, tokenizer and prompts are left as saved."""
    import json
    from pathlib import Path

    folder = Path(folder)
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    for module in modules:
        module["type"] = "sentence_transformers.models." + module["type"].rsplit(".", 1)[-1]
        if module["type"].endswith(".Pooling"):
            path = folder / module["path"] / "config.json"
            cfg = json.loads(path.read_text(encoding="utf-8"))
            st5 = {"word_embedding_dimension": cfg["embedding_dimension"]}
            st5.update({k: m == cfg["pooling_mode"] for m, k in ST5_MODE_KEYS.items()})
            st5["include_prompt"] = cfg["include_prompt"]
            path.write_text(json.dumps(st5, indent=2), encoding="utf-8")
    (folder / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    bert = {"max_seq_length": max_seq_length, "do_lower_case": False}
    (folder / "sentence_bert_config.json").write_text(json.dumps(bert, indent=2), encoding="utf-8")


def save_tiny_qwen3_embedding_st5(
    out_dir,
    tokenizer_dir,
    seed: int = 0,
    max_seq_length: int = 64,
    pooling_mode: str = "lasttoken",
    include_prompt: bool = True,
):
    """`save_tiny_qwen3_embedding` in the layout sentence-transformers 5 wrote
    (`rewrite_as_st5_layout`): the same model, tokenizer and prompts.

    Returns:
        `out_dir`.
    """
    save_tiny_qwen3_embedding(
        out_dir, tokenizer_dir, seed, max_seq_length, pooling_mode, include_prompt
    )
    rewrite_as_st5_layout(out_dir, max_seq_length)
    return out_dir
