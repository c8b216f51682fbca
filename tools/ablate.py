#!/usr/bin/env python3
"""Ablation grid of the NV-Embed paper (Tables 2-4): pooling x attention mask x training schedule
(x objective).

  python tools/ablate.py (--base-hf DIR | --base-checkpoint DIR)
      --stage1-data D [D ...] [--stage2-data D [D ...]]
      [--eval-beir DIR ...] [--tasks NAME ...] [--instruction TEXT]
      [--grid pooling=eos,mean,latent,self-attention mask=bidirectional,causal
              schedule=two-stage,single-stage-inbatch,single-stage-no-inbatch
              objective=infonce,qq-dd,homogeneous]
      [--objective NAME="TRAINING FLAGS" ...]
      [--recipe tiny] --out OUT [--run local|slurm] [--nproc N] [--collect]
      [-- extra training flags, e.g. --train-iters 4 --lr-warmup-iters 1]

Per cell (OUT/cells/<schedule>_<pooling>_<mask>[_<objective>]/): a base checkpoint with the
cell's pooling and mask (tools/convert_checkpoint.py import-hf once per pooling, shared by the
cells of every schedule and objective; the other mask is the same checkpoint with its config's
mask changed), training with examples/pretrain_nvembed.sh (NPROC_PER_NODE=--nproc) under the
schedule with the objective's training flags (before the `--` flags), evaluation of the final
checkpoint with tools/evaluate_mteb.py, then done.json (atomic). Run again, finished cells are
skipped and unfinished ones continue (finished steps skipped, training resumed through --load).
--run slurm writes OUT/slurm/{bases.sbatch,<cell>.sbatch,submit_all.sh} and runs nothing: each
cell job trains through examples/slurm_train.sh (a job stopped by its --signal saves and
requeues itself) and finishes a cell only once its checkpoints reached their last iteration.
--collect only gathers. Every run ends by writing OUT/ablation.{md,csv,png} from the finished
cells (incomplete ones listed with the iteration they reached). Data flags take paths or
weight/path pairs like --train-data; single-stage schedules train on both stages' data. The
objective axis is not swept unless named: a grid without `objective=` trains the default
objective (infonce: the recipe's loss, no extra flags) and names its cells as before.
Objectives: infonce, qq-dd (--query-query-negatives --document-document-negatives),
homogeneous (--batch-composition homogeneous), and those of --objective, e.g.
--objective matryoshka="--matryoshka-dims 2048 1024 512" (widths up to the model's hidden size).
Layout and details: docs/ablations.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    base = p.add_mutually_exclusive_group()
    base.add_argument("--base-hf", help="transformers decoder (or NV-Embed) folder to import")
    base.add_argument("--base-checkpoint", help="megatron_nvembed checkpoint (fixed pooling)")
    p.add_argument(
        "--stage1-data",
        nargs="+",
        default=[],
        metavar="D",
        help="stage-1 training data: paths or weight/path pairs, as --train-data",
    )
    p.add_argument(
        "--stage2-data",
        nargs="+",
        default=[],
        metavar="D",
        help="stage-2 training data (two-stage schedule), as --train-data",
    )
    p.add_argument(
        "--eval-beir",
        nargs="+",
        default=[],
        action="extend",
        metavar="DIR",
        help="local BEIR folders every cell is evaluated on (evaluate_mteb.py --beir-dir)",
    )
    p.add_argument("--tasks", nargs="+", default=[], metavar="NAME", help="mteb task names")
    p.add_argument("--instruction", default=None, help="evaluate_mteb.py --instruction")
    p.add_argument(
        "--grid",
        nargs="+",
        default=[],
        metavar="AXIS=V1,V2",
        help="restrict an axis (pooling, mask, schedule, objective) to these values; an axis "
        "not named keeps all, except objective, which keeps infonce only",
    )
    p.add_argument(
        "--objective",
        nargs="+",
        default=[],
        action="extend",
        metavar="NAME=FLAGS",
        help="define an objective for --grid objective=: its training flags, split like a shell "
        "command line, e.g. matryoshka='--matryoshka-dims 2048 1024 512' (built in: infonce, "
        "qq-dd, homogeneous)",
    )
    p.add_argument("--recipe", default="tiny", help="training recipe (stage suffix optional)")
    p.add_argument("--out", required=True, help="output folder: cells/, slurm/, ablation.*")
    p.add_argument(
        "--run",
        choices=["local", "slurm"],
        default="local",
        help="local: run the cells here; slurm: write sbatch scripts only",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes per node of training and evaluation (default 1); --run slurm: on CPU "
        "nodes (--slurm-gpus-per-node 0), else the GPU count per node",
    )
    p.add_argument("--collect", action="store_true", help="only gather finished cells")
    p.add_argument(
        "--eval-subprocess",
        action="store_true",
        help="--nproc 1: run evaluate_mteb.py as a subprocess (default: in the ablate process)",
    )
    s = p.add_argument_group("--run slurm")
    s.add_argument("--slurm-nodes", type=int, default=1, help="nodes per training job")
    s.add_argument(
        "--slurm-gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node, one process each (default: --nproc if given, else 8); 0: CPU "
        "nodes, --nproc processes each",
    )
    s.add_argument("--slurm-time", default="24:00:00", help="time limit per job (#SBATCH --time)")
    s.add_argument(
        "--slurm-signal-lead",
        type=int,
        default=300,
        metavar="SECONDS",
        help="SIGTERM this long before the time limit (#SBATCH --signal=TERM@N): training saves "
        "and the job requeues itself",
    )
    s.add_argument("--sbatch", action="append", default=[], help='extra "#SBATCH" line content')
    # helpers used by the generated scripts
    p.add_argument("--derive-mask", nargs=3, metavar=("SRC", "DST", "MASK"), help=argparse.SUPPRESS)
    p.add_argument("--finish-cell", nargs=2, metavar=("OUT", "CELL"), help=argparse.SUPPRESS)
    p.add_argument(
        "--check-trained", nargs=3, metavar=("OUT", "CELL", "STEP"), help=argparse.SUPPRESS
    )
    return p


def _evaluate_mteb_main():
    """tools/evaluate_mteb.py's `main`, loaded from the file beside this one (for the in-process
    evaluations of --nproc 1)."""
    path = Path(__file__).resolve().with_name("evaluate_mteb.py")
    spec = importlib.util.spec_from_file_location("evaluate_mteb", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: its classes can find their module
    spec.loader.exec_module(module)
    return module.main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = _parser()
    if argv[:1] in (["--derive-mask"], ["--finish-cell"], ["--check-trained"]):  # no --out
        argv = [*argv, "--out", "."]
    args = p.parse_args(argv)

    from megatron_nvembed.ablation.run import run_ablation
    from megatron_nvembed.core.logging_utils import setup_logging

    setup_logging()
    return run_ablation(args, extra, _evaluate_mteb_main, usage_error=p.error)


if __name__ == "__main__":
    sys.exit(main())
