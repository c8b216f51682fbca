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

# Over 400 lines: the command line of every evaluation mode (mteb tasks, local BEIR folders,
# checkpoint / HF / sentence-transformers models, data-parallel) with the checks of its flags
# before any model is loaded; the work itself is the library's.

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger("evaluate_mteb")


BEIR_KS = (1, 3, 5, 10, 20, 100, 1000)  # mteb's retrieval cut-offs


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


def _finished_beir(path: Path, expected: dict, is_main: bool) -> dict | None:
    """A finished BEIR result file made with the `expected` settings (split, model, revision,
    instruction); None when missing, truncated, unreadable or made otherwise."""
    import json

    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        differs = sorted(k for k, v in expected.items() if saved[k] != v)
        if not differs and isinstance(saved["task"]["main_score"], float | int):
            return saved
        reason = f"made with another {', '.join(differs)}" if differs else "no score"
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = f"unreadable ({type(err).__name__}: {err})"
    if is_main:
        logger.warning("%s: %s; evaluating again", path, reason)
    return None


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    from megatron_nvembed.logging_utils import setup_logging

    setup_logging(note_kernels=True)
    logging.getLogger("mteb").setLevel(logging.WARNING)

    import json
    import shutil

    from megatron_nvembed.evaluation import mteb_eval as me
    from megatron_nvembed.evaluation.beir import open_beir
    from megatron_nvembed.evaluation.encoder import detect_model_format

    # Cheap checks first: bad paths and flags fail before any model or mteb import.
    if not (args.tasks or args.benchmark or args.beir_dir):
        p.error("nothing to evaluate: give --tasks, --benchmark and/or --beir-dir")
    from megatron_nvembed.evaluation.encoder_flags import check_encoder_flags, embedder_kwargs

    check_encoder_flags(p, args)
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.index == "exact" and args.search_params:
        p.error(
            f"--search-params {args.search_params!r}: the exact search takes none (see --index)"
        )
    try:
        fmt = detect_model_format(args.model)
    except FileNotFoundError as err:
        p.error(f"--model: {err}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        p.error(f"--output {out}: exists and is not a directory")
    work = Path(args.work_dir) if args.work_dir else out / "embeddings"
    if args.beir_dir and work.exists() and not work.is_dir():
        p.error(f"--work-dir {work}: exists and is not a directory")
    if fmt == "megatron":
        from megatron_nvembed.checkpoint import latest_iteration

        try:
            revision = f"iter_{latest_iteration(args.model):07d}"
        except (FileNotFoundError, ValueError) as err:
            p.error(f"--model: {err}")
    else:
        revision = "hf"
    from megatron_nvembed.evaluation.encoder import query_template_of

    try:  # task definitions go into the model's own query template
        template = query_template_of(args.model)
    except (FileNotFoundError, ValueError) as err:
        p.error(f"--model: {err}")
    is_main = int(os.environ.get("RANK", "0")) == 0
    beir: dict[str, dict] = {}
    for folder in args.beir_dir:
        name = Path(folder).resolve().name
        if name in beir:
            p.error(f"--beir-dir {folder}: a second folder named {name!r}")
        if not Path(folder).is_dir():
            p.error(f"--beir-dir {folder}: not a directory")
        instruction_error = None
        try:
            instruction = me.resolve_instruction(
                name, args.instruction, prefer_override=True, template=template
            )
        except ValueError as err:  # reported after the folder's own errors
            instruction, instruction_error = None, str(err)
        result_file = out / "beir" / f"{name}.json"
        expected = {
            "split": args.beir_split,
            "model": str(Path(args.model).resolve()),
            "revision": revision,
            "instruction": instruction,
        }
        done = _finished_beir(result_file, expected, is_main) if args.resume else None
        data = None
        if done is None:
            try:
                data = open_beir(folder, args.beir_split)
            except (FileNotFoundError, ValueError) as err:
                p.error(f"--beir-dir {folder}: {err}")
            if not data.query_ids:
                p.error(
                    f"--beir-dir {folder}: {data.qrels_path}: no judged query is in queries.jsonl"
                )
            if len(data.corpus) == 0:
                p.error(f"--beir-dir {folder}: {data.corpus.path}: no document")
            wd = work / name
            if wd.is_dir() and any(wd.iterdir()) and not (wd / "meta.json").is_file():
                p.error(
                    f"--work-dir {work}: {wd} exists and is not a corpus embedding folder "
                    "(no meta.json); choose another --work-dir"
                )
        if instruction_error:
            p.error(instruction_error)
        beir[name] = {"folder": folder, "result": result_file, "done": done, "data": data}
        beir[name]["instruction"] = instruction
    mteb = None
    tasks, by_name, instructions = [], {}, {}
    if args.tasks or args.benchmark:
        import mteb

        tasks = _resolve_mteb_tasks(p, args.tasks, args.benchmark)
    for t in tasks:
        n = t.metadata.name
        if n in by_name or n in beir:
            p.error(f"task {n!r} selected twice (check --tasks, --benchmark and --beir-dir names)")
        if t.metadata.modalities != ["text"]:
            p.error(f"task {n!r} is not a text task (modalities {t.metadata.modalities})")
        by_name[n] = t
    for t in me.leaf_tasks(tasks):
        n = t.metadata.name
        try:
            instructions[n] = me.resolve_instruction(
                n, args.instruction, prefer_override=False, template=template
            )
        except ValueError as err:
            p.error(str(err))

    from megatron_nvembed.evaluation.encoder import load_embedder
    from megatron_nvembed.retrieval.search import check_index

    try:
        embedder = load_embedder(args.model, **embedder_kwargs(args))
    except (FileNotFoundError, ValueError) as err:
        p.error(f"--model: {err}")
    if any(b["done"] is None for b in beir.values()):
        try:
            check_index(args.index, args.search_params, embedder.dim)
        except ValueError as err:
            p.error(str(err))
    name = args.name or f"megatron_nvembed/{Path(args.model).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    if embedder.is_main:
        logger.info(
            "%s model %s (%d-d), %d mteb tasks and %d BEIR folders, %d data-parallel ranks, "
            "results in %s",
            fmt,
            args.model,
            embedder.dim,
            len(tasks),
            len(beir),
            embedder.dp_size,
            out,
        )
    start = time.perf_counter()
    per_task: dict[str, dict] = {}
    results_dir = None
    if tasks:
        meta = me.model_meta(name, revision, embedder.dim, args.max_length)

        def fallback(task_name: str) -> str:
            return me.resolve_instruction(
                task_name, args.instruction, prefer_override=False, template=template
            )

        encoder = me.MtebEncoder(embedder, meta, instructions, fallback)

        class ReadOnlyCache(mteb.ResultCache):
            """Other ranks read OUT (for --resume) but never write it."""

            def save_to_cache(self, *a, **k):
                return None

        cache = (mteb.ResultCache if embedder.is_main else ReadOnlyCache)(out)
        result = mteb.evaluate(
            encoder,
            tasks,
            cache=cache,
            overwrite_strategy="only-missing" if args.resume else "always",
            encode_kwargs={"batch_size": args.batch_size},
            show_progress_bar=embedder.is_main,
            raise_error=True,
        )
        instructions = encoder.instructions
        results_dir = str(cache.get_task_result_path("x", meta).parent)
        for r in result.task_results:
            t = by_name[r.task_name]
            per_task[r.task_name] = me.summarize_task(
                r.scores, t.metadata.type, t.metadata.main_score
            )

    from megatron_nvembed.evaluation.beir import evaluate_beir_sharded
    from megatron_nvembed.fileio import write_atomic
    from megatron_nvembed.retrieval.search import describe

    for task_name, b in beir.items():
        instructions[task_name] = b["instruction"]
        if b["done"] is not None:
            per_task[task_name] = b["done"]["task"]
            if embedder.is_main:
                logger.info("%s: finished earlier, kept %s", task_name, b["result"])
            continue
        wd = work / task_name
        if not args.resume and embedder.is_main and (wd / "meta.json").is_file():
            shutil.rmtree(wd)  # without --resume every shard is computed again
        t0 = time.perf_counter()
        try:
            metrics = evaluate_beir_sharded(
                embedder,
                b["data"],
                wd,
                instruction=b["instruction"],
                ks=BEIR_KS,
                shard_size=args.shard_size,
                index=args.index,
                params=args.search_params,
                on_mismatch="clear",
            )
        except ValueError as err:
            p.error(f"--beir-dir {b['folder']}: {err}")
        entry = me.retrieval_task_entry(metrics, args.beir_split)
        per_task[task_name] = entry
        if embedder.is_main:
            enc = embedder.last_encode
            saved = {
                "task_name": task_name,
                "folder": str(Path(b["folder"]).resolve()),
                "split": args.beir_split,
                "instruction": b["instruction"],
                "model": str(Path(args.model).resolve()),
                "model_name": name,
                "revision": revision,
                "num_queries": len(b["data"].query_ids),
                "num_documents": len(b["data"].corpus),
                "search": describe(args.index, args.search_params),
                "work_dir": str(wd.resolve()),
                "corpus_encoding": {
                    "shards": enc.shards,
                    "shard_size": args.shard_size,
                    "computed_shards": enc.computed_shards,
                    "computed_rows": enc.computed_rows,
                    "seconds": round(enc.seconds, 3),
                    "passages_per_second": round(enc.passages_per_second, 2),
                },
                "evaluation_seconds": round(time.perf_counter() - t0, 3),
                "task": entry,
            }
            write_atomic(b["result"], json.dumps(saved, indent=1, allow_nan=False))
            logger.info(
                "%s: nDCG@10 %.4f | recall@10 %.4f | MRR@10 %.4f | %d queries, %d passages "
                "(%d shards computed, %d kept) | %s | wrote %s",
                task_name,
                metrics["ndcg_at_10"],
                metrics["recall_at_10"],
                metrics["mrr_at_10"],
                saved["num_queries"],
                saved["num_documents"],
                enc.computed_shards,
                enc.shards - enc.computed_shards,
                saved["search"],
                b["result"],
            )
    seconds = time.perf_counter() - start
    if embedder.is_main:
        summary = me.summarize(per_task)
        st = embedder.stats
        summary.update(
            {
                "model": str(Path(args.model).resolve()),
                "model_format": fmt,
                "model_name": name,
                "revision": revision,
                "mteb_version": mteb.__version__ if mteb is not None else None,
                "results_dir": results_dir,
                "beir_results": {n: str(b["result"]) for n, b in beir.items()},
                "instructions": dict(sorted(instructions.items())),
                "encoding": {
                    "texts": st.texts,
                    "seconds": round(st.seconds, 3),
                    "texts_per_second": round(st.texts_per_second, 2),
                    "truncated": st.truncated,
                    "max_length": args.max_length,
                    "max_tokens": embedder.token_budget,
                    "batch_size": args.batch_size,
                    "data_parallel_ranks": embedder.dp_size,
                    "tensor_model_parallel_size": args.tensor_model_parallel_size,
                },
                "evaluation_seconds": round(seconds, 3),
            }
        )
        if beir:
            summary["beir_search"] = {
                "index": args.index,
                "search_params": args.search_params,
                "shard_size": args.shard_size,
                "work_dir": str(work.resolve()),
            }
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
