#!/usr/bin/env python3
"""Embed texts with a megatron_nvembed checkpoint (any saved TP/PP layout; resharded on load).

  torchrun --nproc_per_node N tools/embed.py --load CKPT --input TEXTS.jsonl --output EMB.npy
           [--tensor-model-parallel-size T] [--max-length 512] [--batch-size 32]

Input lines: {"text": ..., "instruction": ...} (instruction optional; NV-Embed's template and pool
mask apply when present). Output: float32 [n, d] in input order. Texts are grouped by length into
batches; data-parallel ranks (N / T) split the batches.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch


def read_inputs(path: str) -> tuple[list[str], list[str]]:
    """Texts and instructions of a JSONL file; errors name the file and line."""
    from megatron_nvembed.data.records import iter_jsonl_lines

    texts, instructions = [], []
    for lineno, rec in iter_jsonl_lines(path):
        if not isinstance(rec.get("text"), str):
            raise ValueError(f'{path}:{lineno}: expected an object with a string "text"')
        texts.append(rec["text"])
        instructions.append(rec.get("instruction") or "")
    return texts, instructions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_nvembed.checkpoint import TOKENIZER_DIR, load_checkpoint, read_config
    from megatron_nvembed.config import ParallelConfig
    from megatron_nvembed.data.tokenization import tokenize_for_embedding
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.parallel import initialize_model_parallel

    texts, instructions = read_inputs(args.input)
    pg = initialize_model_parallel(args.tensor_model_parallel_size, 1)
    dp_rank, dp_size = pg.dp.rank(), pg.dp.size()
    cfg = read_config(args.load)
    cfg.parallel = ParallelConfig(args.tensor_model_parallel_size, 1)
    model = build_model(cfg, pg)
    load_checkpoint(model, args.load)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.load, TOKENIZER_DIR))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device

    # Group by token length so each batch pads little; deal batches to DP ranks round robin.
    lengths = [len(tokenizer.tokenize(i + t)) for t, i in zip(texts, instructions)]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    mine = batches[dp_rank::dp_size]
    show = dist.get_rank() == 0
    from tqdm import tqdm

    out_idx, out_emb, truncated, start = [], [], 0, time.perf_counter()
    with torch.no_grad():
        for idx in tqdm(mine, disable=not show, desc="embedding", unit="batch"):
            batch, cut = tokenize_for_embedding(
                tokenizer,
                [texts[i] for i in idx],
                [instructions[i] for i in idx],
                max_length=args.max_length,
            )
            truncated += cut
            emb = model(**{k: v.to(device) for k, v in batch.items()})
            out_idx.extend(idx)
            out_emb.append(emb.float().cpu())
    d = cfg.model.hidden_size
    local = (
        out_idx,
        torch.cat(out_emb).numpy() if out_emb else np.zeros((0, d), np.float32),
        truncated,
    )
    gathered = [None] * dp_size
    dist.all_gather_object(gathered, local, group=pg.dp)
    if show:
        result = np.zeros((len(texts), d), dtype=np.float32)
        for idx, emb, _ in gathered:
            result[idx] = emb
        truncated = sum(g[2] for g in gathered)
        tmp = args.output + ".tmp.npy"
        np.save(tmp, result)
        os.replace(tmp, args.output)
        seconds = time.perf_counter() - start
        print(
            f"embedded {len(texts)} texts in {seconds:.1f}s "
            f"({len(texts) / max(seconds, 1e-9):.1f} texts/s, {dp_size} data-parallel ranks); "
            f"{truncated} truncated to {args.max_length} tokens; wrote {args.output}"
        )
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
