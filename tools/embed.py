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

import numpy as np


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

    from megatron_nvembed.evaluation.encoder import MegatronEmbedder

    texts, instructions = read_inputs(args.input)
    embedder = MegatronEmbedder(
        args.load,
        args.tensor_model_parallel_size,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    result = embedder.embed(texts, instructions)
    if embedder.is_main:
        tmp = args.output + ".tmp.npy"
        np.save(tmp, result)
        os.replace(tmp, args.output)
        st = embedder.stats
        print(
            f"embedded {len(texts)} texts in {st.seconds:.1f}s "
            f"({st.texts_per_second:.1f} texts/s, {embedder.dp_size} data-parallel ranks); "
            f"{st.truncated} truncated to {args.max_length} tokens; wrote {args.output}"
        )
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
