#!/usr/bin/env python3
"""Positive-aware hard-negative mining (NV-Embed paper: keep candidates scoring below
0.95 x the positive's teacher score), resumable, data-parallel under torchrun.

  [torchrun --nproc_per_node N] mine_hard_negatives.py --input Q.jsonl --corpus C.jsonl
        --model MODEL --output OUT.jsonl [--num-negatives 7] [--margin 0.95] [--candidates 50]
        [--instruction TEXT | --no-instruction] [--corpus-embeddings DIR]
        [--index exact | --index FACTORY --search-params P] [--shard-size 100000]
        [--chunk-size 1024] [--batch-size 64] [--max-length 512] [--max-tokens T]
        [--tensor-model-parallel-size T]

MODEL: a folder: a megatron_nvembed checkpoint, an NV-Embed-format model (our exports, NVIDIA's
release; read natively, no remote code) or a sentence-transformers model (no remote code).
Input: training records (JSONL or Parquet; "neg" may be empty). Queries get --instruction, else
the record's "instruction", else its "task"'s template; so a record needs "task" or
"instruction" unless --instruction or --no-instruction is given.
Corpus lines: {"text": ..., "id"?: ...}; when every line has an "id", records get "neg_ids".
Output: the input records with "neg" filled. Rerunning the same command resumes an interrupted
run (finished corpus shards, verified, and query chunks are kept); a rerun with another teacher
(other weights, even at the same path) is refused. The printed summary names the teacher's
fingerprint.

The corpus is embedded once, in shards of --shard-size texts: into OUT.cache/ (removed after a
successful run), or into --corpus-embeddings DIR, kept and reused by later runs with the same
teacher and corpus (e.g. on other query files). Search is exact by default; --index takes a
FAISS factory string (e.g. "IVF4096,PQ64", "HNSW32") and --search-params its search-time
parameters (e.g. "nprobe=64") for corpora whose embeddings do not fit in memory.
Bad input is one "error: ..." line and exit code 2, before the model loads where possible.
"""

import argparse
import dataclasses
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    from megatron_nvembed.evaluation.encoder_flags import add_encoder_flags

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="training records (JSONL or Parquet)")
    p.add_argument("--corpus", required=True, help='JSONL, {"text": ..., "id"?: ...} per line')
    p.add_argument(
        "--model",
        required=True,
        help="teacher folder: checkpoint, NV-Embed-format model or sentence-transformers model",
    )
    p.add_argument("--output", required=True, help='records with "neg" filled (JSONL)')
    p.add_argument("--num-negatives", type=int, default=7, help="hard negatives per query")
    p.add_argument(
        "--margin",
        type=float,
        default=0.95,
        help="keep candidates scoring below this fraction of the positive's teacher score",
    )
    p.add_argument(
        "--candidates", type=int, default=50, help="retrieved per query before filtering"
    )
    p.add_argument(
        "--corpus-embeddings",
        metavar="DIR",
        help="keep the corpus embeddings in DIR and reuse them in later runs (same teacher and "
        "corpus); default: OUT.cache/, removed after the run",
    )
    p.add_argument(
        "--index",
        default="exact",
        help='"exact" (default) or a FAISS index factory string, e.g. "IVF4096,PQ64"',
    )
    p.add_argument(
        "--search-params", default="", help='search parameters of --index, e.g. "nprobe=64"'
    )
    p.add_argument(
        "--shard-size", type=int, default=100_000, help="corpus texts per embedding shard"
    )
    p.add_argument("--chunk-size", type=int, default=1024, help="queries per resumable chunk")
    add_encoder_flags(p, batch_size=64)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--instruction",
        help="one query instruction for all records (default: each record's own, else its "
        "task's; records then need no task)",
    )
    g.add_argument(
        "--no-instruction",
        action="store_true",
        help="encode queries without instruction (a teacher that takes none)",
    )
    p.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip (and count) malformed input lines instead of stopping",
    )
    p.add_argument("--stop-after-chunks", type=int, help=argparse.SUPPRESS)
    return p


def _error(message: str, code: int = 2) -> int:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: said once
        print(f"error: {message}", file=sys.stderr)
    return code


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked (a bad one: usage and exit code 2, before anything is read)."""
    from megatron_nvembed.evaluation.encoder_flags import check_encoder_flags

    p = _parser()
    args = p.parse_args(argv)
    check_encoder_flags(p, args)
    args.options = _options(args)
    try:
        args.options.check()
    except ValueError as err:
        p.error(str(err))
    return args


def _options(args: argparse.Namespace):
    from megatron_nvembed.curation.mining import MiningOptions

    return MiningOptions(
        num_negatives=args.num_negatives,
        margin=args.margin,
        candidates=args.candidates,
        shard_size=args.shard_size,
        chunk_size=args.chunk_size,
        instruction=args.instruction,
        use_instruction=not args.no_instruction,
        corpus_embeddings=args.corpus_embeddings,
        index=args.index,
        search_params=args.search_params,
        stop_after_chunks=args.stop_after_chunks,
        skip_bad_records=args.skip_bad_records,
    )


def _teacher(args: argparse.Namespace):
    """The teacher's loader, called by the mining once the inputs are checked."""
    from megatron_nvembed.evaluation.encoder_flags import embedder_kwargs

    def load():
        from megatron_nvembed.evaluation.encoder import load_embedder

        return load_embedder(args.model, show_progress=False, **embedder_kwargs(args))

    return load


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_nvembed.core.logging_utils import setup_logging
    from megatron_nvembed.curation.mining import mine_hard_negatives
    from megatron_nvembed.utils.diskspace import DISK_FULL_EXIT, DiskFullError

    setup_logging()
    try:
        summary = mine_hard_negatives(
            args.input, args.corpus, _teacher(args), args.output, args.options
        )
    except (FileNotFoundError, ValueError) as err:
        return _error(str(err))
    except DiskFullError as err:
        return _error(str(err), DISK_FULL_EXIT)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(dataclasses.asdict(summary)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
