"""Tiny models for tests, examples and benchmarks: configs, transformers backbones of each supported
family, random batches, the plain-torch reference, a one-process megatron-core set-up, the tiny
training config, hidden-state helpers for parity tests."""

from __future__ import annotations

import torch


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
    from megatron_nvembed.core.config import (
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
        max_position_embeddings=4096,
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
    from megatron_nvembed.testing.reference import ReferenceEmbedder

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
    from megatron_nvembed.core.parallel import initialize_model_parallel

    return initialize_model_parallel(tp, pp, seed=seed)


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
        from megatron_nvembed.checkpoint.store import copy_tokenizer_files

        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


def backbone_hidden_states(model, batch: dict):
    """Final hidden states [b, s, h] of our model's decoder (no pooling head), without grad."""
    with torch.no_grad():
        return model.encode_hidden(batch["input_ids"], batch["attention_mask"]).transpose(0, 1)


def hf_hidden_states(hf, batch: dict):
    """transformers' `last_hidden_state` [b, s, h] of the same batch, without grad."""
    with torch.no_grad():
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state


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
    from megatron_nvembed.training.config import TrainingConfig
    from megatron_nvembed.training.recipes import get_recipe
    from megatron_nvembed.utils.options import option_of, walk_options

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
