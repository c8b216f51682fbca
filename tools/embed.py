#!/usr/bin/env python3
"""Embed a corpus with a megatron_nvembed checkpoint (any saved TP/PP layout; resharded on load),
an NV-Embed-format folder (our exports, or NVIDIA's released NV-Embed-v2 layout, read natively)
or a sentence-transformers folder (e.g. an `export-hf --format sentence-transformers` output, no
remote code), in resumable shards, data-parallel under torchrun.

  [torchrun --nproc_per_node N] tools/embed.py --load MODEL --input TEXTS.jsonl
        (--output EMB.npy | --output-dir DIR) [--shard-size 100000]
        [--tensor-model-parallel-size T] [--max-length 512] [--max-tokens T]
        [--batch-size 128]

Input lines: {"text": ..., "instruction"?: ..., "id"?: ...}. "instruction" follows the project's
one convention (docs/data.md, "Instructions"): a task definition, put into the model's query
template (NV-Embed's "Instruct: {definition}\\nQuery: ", or the model's own, e.g.
Qwen3-Embedding's "...\\nQuery:") exactly as training records and `evaluate_mteb.py
--instruction` are, or a complete prefix starting with "Instruct:", kept as given. Documents
have none. The file is checked line by line before the model loads (errors name file:line).

The texts are cut into shards of --shard-size lines; the data-parallel ranks (N / T) take whole
shards, sort each by token length and run it in batches of at most --max-tokens padded tokens
(and --batch-size rows; default 1024 tokens on CPU, 16384 on GPUs). Every finished shard is on
disk (written atomically), so a rerun of the same command after a kill computes only the
missing ones. Each shard's record (emb_00000.json) holds the size and XXH3-128 checksum of its
files and the fingerprint of the model's weights: a rerun verifies every finished shard and
recomputes a damaged one (named in the log); shards of another model than meta.json says are
refused (exit 2), as is a rerun with another model (other weights at the same path too).

--output EMB.npy: one float32 [n, d] array in input order (shards staged in EMB.npy.shards/,
removed when the array is written) and its record EMB.npy.json (size, checksum, the model's
fingerprint, what it embeds). --output-dir DIR: the shards themselves (emb_00000.npy ...,
ids_00000.npy when every line has an "id", their records emb_00000.json ..., meta.json);
memory-mapped by `megatron_nvembed.retrieval.shards.ShardedEmbeddings`, which verifies each
shard's bytes before its first use and refuses a damaged one naming the file.

Exit codes: 0 done; 2 a bad flag, input or model folder (one `error:` line naming it); 3 the
disk is full (one `error:` line: the path, the bytes needed, the bytes free; refused before any
text is embedded when the embeddings cannot fit; shards already written are kept for the rerun).
"""

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from megatron_nvembed.evaluation.encoder_flags import add_encoder_flags

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--load", required=True, help="checkpoint, NV-Embed-format or sentence-transformers folder"
    )
    p.add_argument("--input", required=True, help='JSONL: {"text", "instruction"?, "id"?} per line')
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", help=".npy file, float32 [n, d] in input order")
    out.add_argument("--output-dir", help="folder of embedding shards (see above)")
    p.add_argument("--shard-size", type=int, default=100_000, help="lines per shard")
    add_encoder_flags(p, batch_size=128)
    return p


def _check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`p.error` (exit 2) naming the flag, before anything is loaded."""
    from megatron_nvembed.evaluation.encoder_flags import check_encoder_flags

    check_encoder_flags(p, args)
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.output and not args.output.endswith(".npy"):
        p.error(f"--output {args.output}: must end in .npy (or use --output-dir)")


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_flags(p, args)
    from megatron_nvembed.core.logging_utils import setup_logging

    setup_logging(note_kernels=True)
    from megatron_nvembed.evaluation.embed_run import embed_texts
    from megatron_nvembed.evaluation.encoder_flags import FlagError
    from megatron_nvembed.utils.diskspace import DISK_FULL_EXIT, DiskFullError

    try:
        embed_texts(args)
    except FlagError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DiskFullError as err:
        print(f"error: {err}", file=sys.stderr)
        return DISK_FULL_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
