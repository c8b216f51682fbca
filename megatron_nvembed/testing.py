"""Helpers for tests, examples and the quickstart: tiny configs, tokenizers, checkpoints and
references built locally (no hub), plus `run_distributed` (see `megatron_nvembed.launch`)."""

from __future__ import annotations

import torch

from megatron_nvembed.launch import free_port, run_distributed  # noqa: F401 - re-exported


def tiny_model_config(
    pooling: str = "latent",
    mask_type: str = "bidirectional",
    tp: int = 1,
    pp: int = 1,
    backend: str = "sdpa",
    num_layers: int = 2,
    vocab_size: int = 101,
):
    """A tiny Mistral-shaped config (GQA 4 heads / 2 groups, width 64) for tests and the quickstart.

    The vocabulary size is deliberately not a multiple of the TP size, to exercise vocab padding.
    """
    from megatron_nvembed.config import (
        EmbeddingModelConfig,
        ModelConfig,
        ParallelConfig,
        PoolingConfig,
    )

    return EmbeddingModelConfig(
        model=ModelConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            ffn_hidden_size=96,
            num_layers=num_layers,
            num_attention_heads=4,
            num_query_groups=2,
            mask_type=mask_type,
            attention_backend=backend,
        ),
        pooling=PoolingConfig(type=pooling, num_latents=16, num_heads=2, head_dim=32),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
    )


QWEN_KINDS = ("qwen2", "qwen3")
TINY_HF_KINDS = ("qwen2", "qwen3", "llama3")
"""Backbones of `tiny_hf_backbone`: Qwen2, Qwen3 and Llama 3.x (RoPE scaling of type llama3)."""
LLAMA3_TINY_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
"""`tiny_hf_backbone("llama3")`'s scaling: with head width 16 and theta 1e6, the frequencies
fall in all three of the scaling's bands (kept, interpolated, divided by the factor)."""


def tiny_hf_backbone(
    kind: str,
    num_layers: int = 2,
    vocab_size: int = 101,
    seed: int = 0,
    num_key_value_heads: int = 2,
):
    """A tiny random transformers `Qwen2Model` (Q/K/V biases), `Qwen3Model` (per-head Q/K
    RMSNorm, head_dim 24 != hidden 64 / 4 heads) or `LlamaModel` with Llama 3.x RoPE scaling
    (`LLAMA3_TINY_ROPE`); 4 heads (GQA with the default 2 key/value heads), RoPE theta 1e6,
    eager attention, fp32, in eval mode.

    Every parameter is random (weights ~ 0.15 N(0, 1), biases ~ 0.2 N(0, 1), norm weights
    ~ 1 + 0.1 N(0, 1)), so that parity tests exercise each of them.
    """
    from transformers import (
        LlamaConfig,
        LlamaModel,
        Qwen2Config,
        Qwen2Model,
        Qwen3Config,
        Qwen3Model,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    if kind == "qwen2":
        model = Qwen2Model(Qwen2Config(**common))
    elif kind == "qwen3":
        model = Qwen3Model(Qwen3Config(**common, head_dim=24))
    elif kind == "llama3":
        model = LlamaModel(LlamaConfig(**common, rope_scaling=dict(LLAMA3_TINY_ROPE)))
    else:
        raise ValueError(f"kind must be one of {TINY_HF_KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(".bias"):
                p.copy_(0.2 * noise)
            elif p.dim() == 1:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.float().eval()


def random_padded_batch(
    lengths: list[int],
    instruction_lengths: list[int] | None = None,
    vocab_size: int = 101,
    seed: int = 0,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """A right-padded batch of random token ids with NV-Embed's pool-mask convention.

    Args:
        lengths: real tokens per row (BOS included).
        instruction_lengths: per row, `len(tokenizer.tokenize(instruction))`; the pool mask zeroes
            the first that many positions (BOS and all but the last instruction token), exactly as
            NV-Embed does. None: no instructions.
        pad_to: total width (default: the longest row).

    Returns:
        `input_ids` [b, s] int64 (pad id 2 = EOS), `attention_mask` [b, s] int64,
        `pool_mask` [b, s] int64.
    """
    g = torch.Generator().manual_seed(seed)
    width = pad_to or max(lengths)
    ids = torch.full((len(lengths), width), 2, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab_size, (n,), generator=g)
        ids[i, 0] = 1  # BOS
        mask[i, :n] = 1
    pool = mask.clone()
    for i, n in enumerate(instruction_lengths or []):
        pool[i, :n] = 0
    return {"input_ids": ids, "attention_mask": mask, "pool_mask": pool}


def randomized_reference(cfg, seed: int = 0):
    """A `ReferenceEmbedder` whose every weight is random (not the near-identity default init),
    so that parity tests exercise every parameter."""
    from megatron_nvembed.reference import ReferenceEmbedder

    torch.manual_seed(seed)
    ref = ReferenceEmbedder(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(ref.named_parameters()):
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return ref.eval()


def init_single_process_megatron(tp: int = 1, pp: int = 1, seed: int = 1234):
    """Initialises a one-process gloo group and megatron-core's parallel state in this process."""
    from megatron_nvembed.parallel import initialize_model_parallel

    return initialize_model_parallel(tp, pp, seed=seed)


def build_word_tokenizer(texts: list[str]):
    """A whitespace word-level `PreTrainedTokenizerFast` over `texts`, adding BOS like Mistral's.

    Special tokens: `<unk>` 0, `<s>` 1 (BOS), `</s>` 2 (EOS, also the pad token); right padding.
    Saveable with `save_pretrained` and reloadable offline with `load_tokenizer`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.replace("\n", " ").split()} | {":"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        padding_side="right",
    )


def save_tiny_hf_decoder(out_dir, tokenizer, kind: str = "mistral", seed: int = 0):
    """Saves a tiny random `MistralForCausalLM` (kind="mistral"), bare `LlamaModel`
    (kind="llama") or bare `Qwen2Model` / `Qwen3Model` / Llama 3.x `LlamaModel` (kind="qwen2" /
    "qwen3" / "llama3", see `tiny_hf_backbone`) with a tokenizer into `out_dir`, as transformers
    would publish it.

    Args:
        tokenizer: a tokenizer object (saved with `save_pretrained`) or a tokenizer folder
            (its files copied unchanged, e.g. a real model's tokenizer).
    """
    import os

    from transformers import LlamaConfig, LlamaModel, MistralConfig, MistralForCausalLM

    tokenizer_dir = None
    if isinstance(tokenizer, (str, os.PathLike)):
        from megatron_nvembed.data.tokenization import load_tokenizer

        tokenizer_dir, tokenizer = tokenizer, load_tokenizer(tokenizer)
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif kind == "llama":
        model = LlamaModel(LlamaConfig(**common))
    elif kind in TINY_HF_KINDS:
        model = tiny_hf_backbone(kind, vocab_size=len(tokenizer), seed=seed)
    else:
        raise ValueError(f"kind must be 'mistral', 'llama' or one of {TINY_HF_KINDS}, got {kind!r}")
    if kind not in TINY_HF_KINDS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    if tokenizer_dir is None:
        tokenizer.save_pretrained(out_dir)
    else:
        from megatron_nvembed.checkpoint import copy_tokenizer_files

        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


def _write_beir_split(folder, corpus: list[dict], queries: list[dict], qrels: list[tuple]):
    """`corpus.jsonl`, `queries.jsonl` and `qrels/test.tsv` (relevance 1 per (query id, document
    id) pair) in `folder`, as BEIR lays them out."""
    from pathlib import Path

    from megatron_nvembed.data.records import write_jsonl_atomic

    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(folder / "corpus.jsonl", corpus)
    write_jsonl_atomic(folder / "queries.jsonl", queries)
    with open(folder / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, d in qrels:
            f.write(f"{q}\t{d}\t1\n")


def write_synthetic_retrieval(
    out_dir,
    num_topics: int = 16,
    train_per_topic: int = 24,
    eval_queries_per_topic: int = 2,
    eval_docs_per_topic: int = 2,
    num_negatives: int = 3,
    seed: int = 0,
) -> dict:
    """Writes a learnable synthetic retrieval task, its held-out BEIR split and a tokenizer.

    Each topic has its own query words and its own, disjoint, document words, plus filler words
    shared by all topics: a query and its relevant documents share no word, so an untrained
    model ranks near chance and a trained one has to learn the topic association.

    Files: `train.jsonl` (stage-1 records with an instruction and hard negatives from other
    topics), `train_pairs.jsonl` (stage-2 style: same task, no in-batch negatives),
    `eval/{corpus,queries}.jsonl` + `eval/qrels/test.tsv`, `tokenizer/`.

    Returns:
        {"train": path, "train_pairs": path, "eval": path, "tokenizer": path, "instruction": str}
    """
    import random
    from pathlib import Path

    from megatron_nvembed.data.records import write_jsonl_atomic

    rng = random.Random(seed)
    out = Path(out_dir)
    qwords = [[f"q{t}x{j}" for j in range(6)] for t in range(num_topics)]
    dwords = [[f"d{t}y{j}" for j in range(8)] for t in range(num_topics)]
    filler = [f"w{j}" for j in range(30)]
    instruction = "Given a question retrieve passages that answer it"

    def query(t):
        words = rng.sample(qwords[t], 3) + rng.sample(filler, 2)
        rng.shuffle(words)
        return " ".join(words)

    def doc(t):
        words = rng.sample(dwords[t], 4) + rng.sample(filler, 4)
        rng.shuffle(words)
        return " ".join(words)

    train, pairs = [], []
    for t in range(num_topics):
        for _ in range(train_per_topic):
            others = rng.sample([u for u in range(num_topics) if u != t], num_negatives)
            train.append(
                {
                    "query": query(t),
                    "pos": [doc(t)],
                    "neg": [doc(u) for u in others],
                    "task": "SyntheticQA",
                    "instruction": instruction,
                }
            )
            pairs.append(
                {
                    "query": query(t),
                    "pos": [doc(t)],
                    "neg": [doc(others[0])],
                    "task": "SyntheticQA",
                    "instruction": instruction,
                    "in_batch_negatives": False,
                }
            )
    rng.shuffle(train)
    rng.shuffle(pairs)
    write_jsonl_atomic(out / "train.jsonl", train)
    write_jsonl_atomic(out / "train_pairs.jsonl", pairs)
    corpus, queries, qrels = [], [], []
    for t in range(num_topics):
        for j in range(eval_docs_per_topic):
            corpus.append({"_id": f"d{t}-{j}", "text": doc(t)})
        for j in range(eval_queries_per_topic):
            queries.append({"_id": f"q{t}-{j}", "text": query(t)})
            qrels += [(f"q{t}-{j}", f"d{t}-{k}") for k in range(eval_docs_per_topic)]
    _write_beir_split(out / "eval", corpus, queries, qrels)
    texts = [instruction, "Instruct: Query:"] + [" ".join(w) for w in qwords + dwords] + filler
    tok = build_word_tokenizer(texts)
    tok.save_pretrained(str(out / "tokenizer"))
    return {
        "train": str(out / "train.jsonl"),
        "train_pairs": str(out / "train_pairs.jsonl"),
        "eval": str(out / "eval"),
        "tokenizer": str(out / "tokenizer"),
        "instruction": instruction,
    }


def tiny_training_config(data: dict, **overrides):
    """The `tiny` recipe on `write_synthetic_retrieval` data, sized for tests: global batch 8,
    micro-batch 2, 6 iterations, 1 warm-up step, a log line per iteration.

    Args:
        data: `write_synthetic_retrieval`'s return value.
        overrides: settings by their flag's name (`train_iters=3` for `--train-iters`,
            `save=...`) or by their attribute path in `TrainingConfig` ("lora.rank",
            "model.parallel.tensor_model_parallel_size", ...), and their values.

    Raises:
        AttributeError: a name that is neither.
    """
    from megatron_nvembed.options import option_of, walk_options
    from megatron_nvembed.training.config import TrainingConfig
    from megatron_nvembed.training.recipes import get_recipe

    cfg = get_recipe("tiny")
    cfg.data.train_data, cfg.data.tokenizer = [data["train"]], data["tokenizer"]
    cfg.data.global_batch_size, cfg.data.micro_batch_size = 8, 2
    cfg.optimizer.train_iters, cfg.optimizer.lr_warmup_iters, cfg.logging.log_interval = 6, 1, 1
    by_flag = {
        option_of(f).flag.lstrip("-").replace("-", "_"): path
        for path, _, f in walk_options(TrainingConfig)
    }
    for key, value in overrides.items():
        obj, path = cfg, by_flag.get(key, key)
        *parents, leaf = path.split(".")
        for name in parents:
            obj = getattr(obj, name)
        if not hasattr(obj, leaf):
            raise AttributeError(f"TrainingConfig has no setting {key!r}")
        setattr(obj, leaf, value)
    return cfg


def backbone_hidden_states(model, batch: dict):
    """Final hidden states [b, s, h] of our model's decoder (no pooling head), without grad."""
    with torch.no_grad():
        return model.encode_hidden(batch["input_ids"], batch["attention_mask"]).transpose(0, 1)


def hf_hidden_states(hf, batch: dict):
    """transformers' `last_hidden_state` [b, s, h] of the same batch, without grad."""
    with torch.no_grad():
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state


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

    from megatron_nvembed.checkpoint import copy_tokenizer_files
    from megatron_nvembed.data.tokenization import load_tokenizer

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
