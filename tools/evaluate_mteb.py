#!/usr/bin/env python3
"""Evaluate a megatron_nvembed checkpoint or an exported NV-Embed HF directory with mteb 2.x.

  [torchrun --nproc_per_node N] tools/evaluate_mteb.py --model DIR --output OUT
      [--tasks NAME ...] [--benchmark NAME] [--beir-dir DIR ...] [--beir-split test]
      [--instruction TEXT] [--batch-size 32] [--max-length 512]
      [--tensor-model-parallel-size T] [--name NAME] [--resume]

DIR: a checkpoint (latest_checkpointed_iteration.txt; loaded at --tensor-model-parallel-size,
any saved layout) or an NV-Embed-format folder (config.json with model_type nvembed: our exports
or NVIDIA's released NV-Embed-v2 folder, read natively; no remote code runs).
Queries (and every text of symmetric tasks) get the task's Table 7 instruction; documents none.
Under torchrun the ranks split each encode call's batches (N / T data-parallel ranks) and gather.
--beir-dir: local BEIR folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) run as retrieval
tasks named after the folder; their instruction is --instruction, else Table 7 by folder name.
--instruction also covers mteb tasks that Table 7 lacks ("" = no instruction).
Writes mteb's result files under OUT/results/, OUT/summary.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("evaluate_mteb")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="checkpoint or HF directory")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--tasks", nargs="+", default=[], metavar="NAME", help="mteb task names")
    p.add_argument("--benchmark", default=None, help='mteb benchmark, e.g. "MTEB(eng, v1)"')
    p.add_argument(
        "--beir-dir",
        nargs="+",
        default=[],
        action="extend",
        metavar="DIR",
        help="local BEIR folders run as retrieval tasks named after the folder (see above)",
    )
    p.add_argument("--beir-split", default="test", help="qrels/<split>.tsv of --beir-dir folders")
    p.add_argument("--instruction", default=None, help="query instruction, see above")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward call")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text (BOS, EOS incl.)")
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP of a checkpoint --model (resharded on load)",
    )
    p.add_argument("--name", default=None, help="model name in mteb's results (default: DIR)")
    p.add_argument("--resume", action="store_true", help="keep finished tasks found under OUT")
    return p


def _resolve_mteb_tasks(p, names: list[str], benchmark: str | None) -> list:
    import mteb

    tasks = []
    if benchmark:
        try:
            tasks.extend(mteb.get_benchmark(benchmark).tasks)
        except (KeyError, ValueError) as err:
            p.error(f"--benchmark {benchmark!r}: {err}")
    for name in names:
        try:
            tasks.append(mteb.get_task(name))
        except KeyError as err:
            from mteb.mocks import MOCK_TASK_REGISTRY  # mteb's offline test tasks

            if name not in MOCK_TASK_REGISTRY:
                p.error(f"--tasks {name}: {err.args[0] if err.args else err}")
            tasks.append(MOCK_TASK_REGISTRY[name]())
    return tasks


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    from megatron_nvembed.logging_utils import setup_logging

    setup_logging(note_kernels=True)
    logging.getLogger("mteb").setLevel(logging.WARNING)

    from megatron_nvembed.evaluation.beir import load_beir
    from megatron_nvembed.evaluation.encoder import detect_model_format

    # Cheap checks first: bad paths and flags fail before any model or mteb import.
    if not (args.tasks or args.benchmark or args.beir_dir):
        p.error("nothing to evaluate: give --tasks, --benchmark and/or --beir-dir")
    for flag, v in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    try:
        fmt = detect_model_format(args.model)
    except FileNotFoundError as err:
        p.error(f"--model: {err}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        p.error(f"--output {out}: exists and is not a directory")
    beir = {}
    for folder in args.beir_dir:
        name = Path(folder).resolve().name
        if name in beir:
            p.error(f"--beir-dir {folder}: a second folder named {name!r}")
        if not Path(folder).is_dir():
            p.error(f"--beir-dir {folder}: not a directory")
        try:
            beir[name] = (folder, load_beir(folder, args.beir_split))
        except (FileNotFoundError, ValueError) as err:
            p.error(f"--beir-dir {folder}: {err}")

    import mteb

    from megatron_nvembed.evaluation import mteb_eval as me

    tasks = _resolve_mteb_tasks(p, args.tasks, args.benchmark)
    for name, (folder, data) in beir.items():
        try:
            tasks.append(me.local_beir_task(data, folder, name, args.beir_split))
        except ValueError as err:
            p.error(f"--beir-dir {folder}: {err}")
    by_name = {}
    for t in tasks:
        n = t.metadata.name
        if n in by_name:
            p.error(f"task {n!r} selected twice (check --tasks, --benchmark and --beir-dir names)")
        if t.metadata.modalities != ["text"]:
            p.error(f"task {n!r} is not a text task (modalities {t.metadata.modalities})")
        by_name[n] = t
    instructions = {}
    for t in me.leaf_tasks(tasks):
        n = t.metadata.name
        try:
            instructions[n] = me.resolve_instruction(n, args.instruction, prefer_override=n in beir)
        except ValueError as err:
            p.error(str(err))

    from megatron_nvembed.evaluation.encoder import load_embedder

    try:
        embedder = load_embedder(
            args.model,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except (FileNotFoundError, ValueError) as err:
        p.error(f"--model: {err}")
    revision = f"iter_{embedder.iteration:07d}" if fmt == "megatron" else "hf"
    name = args.name or f"megatron_nvembed/{Path(args.model).resolve().name}"
    meta = me.model_meta(name, revision, embedder.dim, args.max_length)

    def fallback(task_name: str) -> str:
        return me.resolve_instruction(task_name, args.instruction, prefer_override=False)

    encoder = me.MtebEncoder(embedder, meta, instructions, fallback)

    class ReadOnlyCache(mteb.ResultCache):
        """Other ranks read OUT (for --resume) but never write it."""

        def save_to_cache(self, *a, **k):
            return None

    out.mkdir(parents=True, exist_ok=True)
    cache = (mteb.ResultCache if embedder.is_main else ReadOnlyCache)(out)
    if embedder.is_main:
        logger.info(
            "%s model %s (%d-d), %d tasks, %d data-parallel ranks, results in %s",
            fmt,
            args.model,
            embedder.dim,
            len(tasks),
            embedder.dp_size,
            out,
        )
    start = time.perf_counter()
    result = mteb.evaluate(
        encoder,
        tasks,
        cache=cache,
        overwrite_strategy="only-missing" if args.resume else "always",
        encode_kwargs={"batch_size": args.batch_size},
        show_progress_bar=embedder.is_main,
        raise_error=True,
    )
    seconds = time.perf_counter() - start
    if embedder.is_main:
        per_task = {}
        for r in result.task_results:
            t = by_name[r.task_name]
            per_task[r.task_name] = me.summarize_task(
                r.scores, t.metadata.type, t.metadata.main_score
            )
        summary = me.summarize(per_task)
        st = embedder.stats
        summary.update(
            {
                "model": str(Path(args.model).resolve()),
                "model_format": fmt,
                "model_name": name,
                "revision": revision,
                "mteb_version": mteb.__version__,
                "results_dir": str(cache.get_task_result_path("x", meta).parent),
                "instructions": dict(sorted(encoder.instructions.items())),
                "encoding": {
                    "texts": st.texts,
                    "seconds": round(st.seconds, 3),
                    "texts_per_second": round(st.texts_per_second, 2),
                    "truncated": st.truncated,
                    "max_length": args.max_length,
                    "batch_size": args.batch_size,
                    "data_parallel_ranks": embedder.dp_size,
                    "tensor_model_parallel_size": args.tensor_model_parallel_size,
                },
                "evaluation_seconds": round(seconds, 3),
            }
        )
        me.write_summary(out, summary, name)
        print(me.render_markdown(summary, name))
        logger.info(
            "embedded %d texts in %.1fs (%.1f texts/s); evaluation %.1fs; wrote %s",
            st.texts,
            st.seconds,
            st.texts_per_second,
            seconds,
            out / "summary.json",
        )
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
