#!/usr/bin/env python3
"""Evaluate a megatron_nvembed checkpoint, an exported NV-Embed HF directory or a
sentence-transformers folder: mteb 2.x tasks, and local BEIR folders scored at corpus scale.

  [torchrun --nproc_per_node N] tools/evaluate_mteb.py --model DIR --output OUT
      [--tasks NAME ...] [--benchmark NAME] [--beir-dir DIR ...] [--beir-split test]
      [--work-dir OUT/embeddings] [--shard-size 100000] [--index exact] [--search-params P]
      [--instruction TEXT] [--batch-size 32] [--max-length 512] [--max-tokens T]
      [--tensor-model-parallel-size T] [--name NAME] [--resume]

DIR: a checkpoint (latest_checkpointed_iteration.txt; loaded at --tensor-model-parallel-size,
any saved layout), an NV-Embed-format folder (config.json with model_type nvembed: our exports
or NVIDIA's released NV-Embed-v2 folder, read natively; no remote code runs) or a
sentence-transformers folder (an `export-hf --format sentence-transformers` output, a released
Qwen3-Embedding model; no remote code).
Queries (and every text of symmetric tasks) get the task's Table 7 definition in the model's
query template (the checkpoint's, or the folder's `query` prompt form); documents none.
Under torchrun the ranks split each encode call's batches (N / T data-parallel ranks) and gather.
--instruction also covers mteb tasks that Table 7 lacks ("" = no instruction).

--beir-dir: local BEIR folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) scored as
retrieval tasks named after the folder, without mteb and without holding the corpus: it is
scanned once (its texts stay on disk), encoded in shards of --shard-size passages into
--work-dir/<name>/ (the shards split over the data-parallel ranks; each shard written
atomically), searched top-k by inner product of L2-normalised embeddings (--index exact, or a
FAISS index factory string with --search-params), and nDCG / recall / MRR at 1, 3, 5, 10, 20,
100, 1000 and the score margins computed from the hits. Their instruction is --instruction,
else Table 7 by folder name.

Writes mteb's result files under OUT/results/, each BEIR folder's OUT/beir/<name>.json,
OUT/summary.json and OUT/summary.md. --resume keeps finished results (mteb tasks, readable BEIR
result files) and the finished corpus shards (a run killed while encoding computes only the
missing shards); without it everything is recomputed.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    from megatron_nvembed.evaluation.encoder_flags import add_encoder_flags

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", required=True, help="checkpoint, NV-Embed-format or sentence-transformers folder"
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--tasks", nargs="+", default=[], metavar="NAME", help="mteb task names")
    p.add_argument("--benchmark", default=None, help='mteb benchmark, e.g. "MTEB(eng, v1)"')
    p.add_argument(
        "--beir-dir",
        nargs="+",
        default=[],
        action="extend",
        metavar="DIR",
        help="local BEIR folders scored as retrieval tasks named after the folder (see above)",
    )
    p.add_argument("--beir-split", default="test", help="qrels/<split>.tsv of --beir-dir folders")
    p.add_argument(
        "--work-dir",
        default=None,
        metavar="DIR",
        help="corpus embedding shards of each --beir-dir folder go to DIR/<name>/ "
        "(default: OUT/embeddings); the tool's own files, replaced when the model or corpus "
        "changes",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=100_000,
        help="--beir-dir corpus passages per shard (the unit of resumption and of the split "
        "over data-parallel ranks)",
    )
    p.add_argument(
        "--index",
        default="exact",
        help='--beir-dir search: "exact" (inner product over every passage, shard by shard) or '
        'a FAISS index factory string, e.g. "IVF4096,PQ64" or "HNSW32"',
    )
    p.add_argument(
        "--search-params",
        default="",
        help='FAISS search parameters of an --index factory string, e.g. "nprobe=64"',
    )
    p.add_argument("--instruction", default=None, help="query instruction, see above")
    add_encoder_flags(p, batch_size=32)
    p.add_argument("--name", default=None, help="model name in mteb's results (default: DIR)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep finished tasks and corpus shards found under OUT (and --work-dir)",
    )
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    from megatron_nvembed.core.logging_utils import setup_logging

    setup_logging(note_kernels=True)
    logging.getLogger("mteb").setLevel(logging.WARNING)
    from megatron_nvembed.evaluation.encoder_flags import FlagError
    from megatron_nvembed.evaluation.mteb_run import run_evaluation
    from megatron_nvembed.utils.diskspace import DISK_FULL_EXIT, DiskFullError

    try:
        return run_evaluation(args)
    except FlagError as err:  # bad flags and paths, as argparse reports them (exit 2)
        p.error(str(err))
    except DiskFullError as err:
        print(f"error: {err}", file=sys.stderr)
        return DISK_FULL_EXIT


if __name__ == "__main__":
    sys.exit(main())
