#!/usr/bin/env python3
"""Embed texts with a megatron_nvembed checkpoint (any saved TP/PP layout; resharded on load) or an
NV-Embed-format folder (our exports, or NVIDIA's released NV-Embed-v2 layout, read natively).

  torchrun --nproc_per_node N tools/embed.py --load MODEL --input TEXTS.jsonl --output EMB.npy
           [--tensor-model-parallel-size T] [--max-length 512] [--batch-size 32]

Input lines: {"text": ..., "instruction": ...}. "instruction" is optional and follows the
project's one convention (docs/data.md, "Instructions"): a task definition, wrapped as
"Instruct: {definition}\\nQuery: " exactly as training records and `evaluate_mteb.py
--instruction` are, or a complete prefix starting with "Instruct:", kept as given. Documents
have none. Output: float32 [n, d] in input order. Texts are grouped by length into batches;
data-parallel ranks (N / T) split the batches.
"""

import argparse
import os
import sys


def read_inputs(path: str) -> tuple[list[str], list[str]]:
    """Texts and their query prefixes (see the module docstring); errors name the file and line."""
    from megatron_nvembed.data.records import iter_jsonl_lines
    from megatron_nvembed.data.templates import query_instruction

    texts, prefixes = [], []
    for lineno, rec in iter_jsonl_lines(path):
        if "text" not in rec:
            raise ValueError(f'{path}:{lineno}: missing key "text"')
        if not isinstance(rec["text"], str):
            raise ValueError(f'{path}:{lineno}: "text" must be a string')
        instruction = rec.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise ValueError(f'{path}:{lineno}: "instruction" must be a string')
        texts.append(rec["text"])
        prefixes.append(query_instruction("", instruction) if instruction else "")
    return texts, prefixes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", required=True, help="checkpoint or NV-Embed-format folder")
    p.add_argument("--input", required=True, help='JSONL: {"text", "instruction"?} per line')
    p.add_argument("--output", required=True, help=".npy file, float32 [n, d]")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="checkpoints only")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text (BOS, EOS incl.)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward call")
    args = p.parse_args(argv)

    from megatron_nvembed.logging_utils import setup_logging

    setup_logging(note_kernels=True)
    import numpy as np
    import torch.distributed as dist

    from megatron_nvembed.evaluation.encoder import load_embedder

    texts, prefixes = read_inputs(args.input)
    embedder = load_embedder(
        args.load,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    result = embedder.embed(texts, prefixes)
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
    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
