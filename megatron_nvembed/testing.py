"""Helpers for multi-process tests on CPU (gloo).

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initialises a gloo
process group in each (rank, world size, a free localhost port), calls `fn(rank, world_size,
*args)` and re-raises the first failure in the parent. `fn` must be a module-level function so
that it can be pickled by `torch.multiprocessing.spawn`.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    # Two cores are shared by all ranks; more threads per rank only adds contention.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        # Importing megatron-core costs ~10 s; only clean it up where the test used it.
        if "megatron.core.parallel_state" in sys.modules:
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Runs `fn(rank, world_size, *args)` in `world_size` gloo processes on this machine.

    Raises:
        torch.multiprocessing.ProcessRaisedException: when any rank raises; the message holds
        that rank's traceback.
    """
    mp.spawn(_worker, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


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
    Saveable with `save_pretrained` and reloadable offline with `AutoTokenizer`.
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
    """Saves a tiny random `MistralForCausalLM` (kind="mistral") or bare `LlamaModel`
    (kind="llama") with `tokenizer` into `out_dir`, as transformers would publish it."""
    from transformers import LlamaConfig, LlamaModel, MistralConfig, MistralForCausalLM

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
    else:
        raise ValueError(f"kind must be 'mistral' or 'llama', got {kind!r}")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
