#!/usr/bin/env python3
"""Corpus encoding and corpus-scale mining / evaluation: throughput and memory.

  python bench/encode.py throughput [--passages 4000] [--rounds 3] [--device cpu]
        [--model EXPORT | model-size flags] [--output bench/results/encode-cpu.json]
  python bench/encode.py memory [--sizes 10000 100000 1000000] [--queries 1000]
        [--shard-size 100000] [--output bench/results/encode-memory-cpu.json]

throughput: passages/s of the project's corpus encoder (`retrieval.shards.encode_corpus` with
`evaluation.encoder.HFEmbedder`: length-sorted batches under a token budget) against
sentence-transformers' `encode` on the same exported NV-Embed-format model and the same texts,
both in one process and (on CPU) through sentence-transformers' multi-process pool. Methods
alternate within each round, so machine load hits all of them; wall time and CPU time
(this process and the pool's workers) are reported per method, with the median over rounds.
Outputs are compared (max |difference|) to show the same model computes.

memory: peak resident memory (RSS, from the kernel's accounting of each child process) and
time of `tools/mine_hard_negatives.py` and of `tools/evaluate_mteb.py --beir-dir` on synthetic
corpora of growing size, with a tiny exported model as the encoder; growth per passage is
reported between sizes.

Without `--model` a random-weight Mistral-layout decoder with the given sizes and a word-level
tokenizer is built, imported (latent-attention head of the given size) and exported in fp32.
"""

# Over 400 lines: two benchmarks (throughput against sentence-transformers, memory of mining and
# evaluation against corpus size) that share their set-up and reporting.

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS = 3000


# ------------------------------------------------------------------------------ synthetic data


def vocabulary() -> list[str]:
    rng = np.random.default_rng(1)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = set()
    while len(out) < WORDS:
        out.add("".join(rng.choice(letters, size=int(rng.integers(2, 9)))))
    return sorted(out)


def passages(n: int, seed: int, mean_words: float, words: list[str]) -> list[str]:
    """`n` texts of Zipf-distributed words, lengths log-normal around `mean_words`."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(mean_words), 0.6, size=n).astype(int), 2, 400)
    ranks = np.minimum(rng.zipf(1.2, size=int(lengths.sum())), len(words)) - 1
    out, pos = [], 0
    vocab = np.asarray(words)
    for n_words in lengths:
        out.append(" ".join(vocab[ranks[pos : pos + n_words]]))
        pos += n_words
    return out


def build_export(folder: Path, args) -> Path:
    """Random Mistral-layout decoder -> import-hf (latent head of the given size) -> export."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.testing import build_word_tokenizer

    tok = build_word_tokenizer([" ".join(vocabulary())])
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or 3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        head_dim=args.hidden_size // args.heads,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    MistralForCausalLM(cfg).save_pretrained(folder / "src")
    tok.save_pretrained(folder / "src")
    import_hf(
        folder / "src",
        folder / "ckpt",
        num_latents=args.num_latents,
        num_heads=args.pooling_heads,
        head_dim=args.pooling_head_dim,
    )
    initialize_model_parallel(1, 1)
    export_hf(folder / "ckpt", folder / "hf", dtype="float32")
    return folder / "hf"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="an exported NV-Embed-format folder (default: build one)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=0, help="0: 3 x hidden")
    p.add_argument("--num-latents", type=int, default=512, help="latent-attention head size")
    p.add_argument("--pooling-heads", type=int, default=8)
    p.add_argument("--pooling-head-dim", type=int, default=None, help="default: hidden size")


def _machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------------- throughput


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = sum(os.times()[:2])
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def throughput(args) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from megatron_nvembed.evaluation.encoder import load_embedder
    from megatron_nvembed.retrieval.corpus import JsonlCorpus, mining_row
    from megatron_nvembed.retrieval.shards import encode_corpus

    work = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    model_dir = Path(args.model) if args.model else build_export(work, args)
    texts = passages(args.passages, seed=0, mean_words=args.mean_words, words=vocabulary())
    corpus_file = work / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    corpus = JsonlCorpus(corpus_file, mining_row)

    ours = load_embedder(
        model_dir,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_tokens=args.max_tokens,
        show_progress=False,
    )
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    import transformers

    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    st = SentenceTransformer(
        str(model_dir), device=args.device, trust_remote_code=True, model_kwargs={dtype_key: dtype}
    )
    st.max_seq_length = args.max_length
    pool = None
    if args.device == "cpu" and args.st_pool_processes > 0:
        pool = st.start_multi_process_pool(["cpu"] * args.st_pool_processes)
    pool_pids = [p.pid for p in pool["processes"]] if pool else []

    def run_ours(r: int):
        out = work / f"ours_{r}"
        shards = encode_corpus(ours, corpus, out, shard_size=args.shard_size)
        return np.concatenate([e for _, e in shards])

    def run_st(batch_size: int, use_pool: bool):
        def run(r: int):
            return st.encode(
                texts,
                batch_size=batch_size,
                pool=pool if use_pool else None,
                show_progress_bar=False,
            )

        return run

    # sentence-transformers at its default batch size (32, first) and any others asked for
    methods = {"ours": run_ours}
    for bs in args.st_batch_sizes:
        methods[f"sentence_transformers_bs{bs}"] = run_st(bs, False)
    if pool:
        methods[f"sentence_transformers_pool_bs{args.st_batch_sizes[0]}"] = run_st(
            args.st_batch_sizes[0], True
        )
    # warm-up (first-call allocations, pool workers' model copies)
    run_ours(-1)
    for name, fn in methods.items():
        if name != "ours":
            fn(-1)
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    outputs = {}
    for r in range(args.rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            pids = pool_pids if "_pool_" in name else []
            c0, t0 = _cpu_seconds(pids), time.perf_counter()
            outputs[name] = methods[name](r)
            wall = time.perf_counter() - t0
            times[name].append((wall, _cpu_seconds(pids) - c0))
            print(f"round {r} {name}: {args.passages / wall:.1f} passages/s ({wall:.2f} s)")
    if pool:
        st.stop_multi_process_pool(pool)
    result = {"methods": {}}
    for name, ts in times.items():
        wall = statistics.median(t[0] for t in ts)
        result["methods"][name] = {
            "passages_per_second": round(args.passages / wall, 2),
            "wall_seconds": [round(t[0], 3) for t in ts],
            "cpu_seconds": [round(t[1], 3) for t in ts],
            "max_abs_diff_vs_ours": float(np.abs(outputs[name] - outputs["ours"]).max()),
        }
    best_st = max(v["passages_per_second"] for k, v in result["methods"].items() if k != "ours")
    ours_pps = result["methods"]["ours"]["passages_per_second"]
    result["speedup_vs_best_sentence_transformers"] = round(ours_pps / best_st, 3)
    result["speedup_vs"] = {
        k: round(ours_pps / v["passages_per_second"], 3)
        for k, v in result["methods"].items()
        if k != "ours"
    }
    lengths = [min(n, args.max_length) for n in ours._lengths(texts, [""] * len(texts))]
    result["setup"] = {
        "model": str(model_dir) if args.model else "built (see model_sizes)",
        "model_sizes": {
            k: getattr(args, k)
            for k in (
                "hidden_size",
                "layers",
                "heads",
                "kv_heads",
                "num_latents",
                "pooling_heads",
                "pooling_head_dim",
            )
        },
        "passages": args.passages,
        "tokens_mean": round(float(np.mean(lengths)), 1),
        "tokens_max": int(max(lengths)),
        "rounds": args.rounds,
        "device": args.device,
        "ours": {"max_tokens": ours.token_budget, "batch_size": args.batch_size},
        "sentence_transformers": {
            "batch_sizes": args.st_batch_sizes,
            "pool_processes": args.st_pool_processes if pool else 0,
        },
    }
    return result


# ------------------------------------------------------------------------------------- memory


def _peak_rss(cmd: list[str], env: dict) -> tuple[int, float, int, str]:
    """Runs `cmd`; returns (peak RSS bytes of that child, seconds, return code, stderr tail)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, proc.returncode, tail


def memory(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    model_dir = Path(args.model) if args.model else build_export(work, args)
    words = vocabulary()
    queries = passages(args.queries, seed=1, mean_words=8, words=words)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for n in args.sizes:
        folder = work / f"n{n}"
        (folder / "beir" / "qrels").mkdir(parents=True)
        corpus = folder / "corpus.jsonl"
        with open(corpus, "w") as f, open(folder / "beir" / "corpus.jsonl", "w") as g:
            for start in range(0, n, 100_000):
                for i, t in enumerate(
                    passages(min(100_000, n - start), start + 7, args.mean_words, words)
                ):
                    f.write(json.dumps({"text": t, "id": f"d{start + i}"}) + "\n")
                    g.write(json.dumps({"_id": f"d{start + i}", "text": t}) + "\n")
        # each query's positive: the first passages (so they exist at every size)
        first = [json.loads(line)["text"] for _, line in zip(range(args.queries), open(corpus))]
        with open(folder / "q.jsonl", "w") as f:
            for q, pos in zip(queries, first):
                f.write(json.dumps({"query": q, "pos": [pos], "neg": []}) + "\n")
        with open(folder / "beir" / "queries.jsonl", "w") as f:
            for i, q in enumerate(queries):
                f.write(json.dumps({"_id": f"q{i}", "text": q}) + "\n")
        with open(folder / "beir" / "qrels" / "test.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for i in range(len(first)):
                f.write(f"q{i}\td{i}\t1\n")
        common = ["--shard-size", str(args.shard_size)]
        if args.max_tokens is not None:
            common += ["--max-tokens", str(args.max_tokens)]
        mine = [
            sys.executable,
            "tools/mine_hard_negatives.py",
            "--input",
            str(folder / "q.jsonl"),
            "--corpus",
            str(corpus),
            "--model",
            str(model_dir),
            "--output",
            str(folder / "mined.jsonl"),
            "--no-instruction",
            *common,
        ]
        evaluate = [
            sys.executable,
            "tools/evaluate_mteb.py",
            "--model",
            str(model_dir),
            "--beir-dir",
            str(folder / "beir"),
            "--instruction",
            "",
            "--output",
            str(folder / "eval"),
            *common,
        ]
        row = {"passages": n, "corpus_mib": round(corpus.stat().st_size / 2**20, 1)}
        for name, cmd in (("mining", mine), ("evaluation", evaluate)):
            rss, seconds, rc, tail = _peak_rss(cmd, env)
            if rc != 0:
                raise RuntimeError(f"{name} at {n} passages failed (rc {rc}):\n{tail}")
            row[name] = {
                "peak_rss_mib": round(rss / 2**20, 1),
                "seconds": round(seconds, 1),
                "passages_per_second": round(n / seconds, 1),
            }
            print(f"{n} passages, {name}: peak RSS {rss / 2**20:.0f} MiB, {seconds:.1f} s")
        rows.append(row)
    growth = []
    for a, b in zip(rows, rows[1:]):
        d = b["passages"] - a["passages"]
        growth.append(
            {
                "from": a["passages"],
                "to": b["passages"],
                **{
                    f"{k}_bytes_per_passage": round(
                        (b[k]["peak_rss_mib"] - a[k]["peak_rss_mib"]) * 2**20 / d, 1
                    )
                    for k in ("mining", "evaluation")
                },
            }
        )
    return {
        "rows": rows,
        "growth": growth,
        "setup": {
            "queries": args.queries,
            "shard_size": args.shard_size,
            "max_tokens": args.max_tokens,
            "mean_words": args.mean_words,
            "model_sizes": {
                k: getattr(args, k)
                for k in ("hidden_size", "layers", "heads", "num_latents", "pooling_heads")
            },
        },
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput", help="ours vs sentence-transformers, paired")
    _model_args(t)
    t.add_argument("--passages", type=int, default=4000)
    t.add_argument("--mean-words", type=float, default=60.0, help="passage length (words)")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    t.add_argument("--max-length", type=int, default=512)
    t.add_argument("--max-tokens", type=int, default=None, help="ours (default: the device's)")
    t.add_argument("--batch-size", type=int, default=256, help="ours: rows per call, at most")
    t.add_argument("--shard-size", type=int, default=100_000)
    t.add_argument(
        "--st-batch-sizes",
        type=int,
        nargs="+",
        default=[32, 8],
        help="sentence-transformers batch sizes (the first, its default 32, also for the pool)",
    )
    t.add_argument("--st-pool-processes", type=int, default=2, help="0: no pool")
    t.add_argument("--output")
    m = sub.add_parser("memory", help="peak memory of mining and evaluation vs corpus size")
    _model_args(m)
    m.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    m.add_argument("--queries", type=int, default=1000)
    m.add_argument("--mean-words", type=float, default=12.0)
    m.add_argument("--shard-size", type=int, default=100_000)
    m.add_argument("--max-tokens", type=int, default=None, help="default: the device's")
    m.add_argument("--output")
    # a model small enough that a 1M-passage corpus encodes in minutes on 2 CPU cores
    m.set_defaults(
        hidden_size=32,
        layers=1,
        heads=2,
        kv_heads=1,
        num_latents=16,
        pooling_heads=2,
        pooling_head_dim=16,
    )
    args = p.parse_args(argv)
    start = time.perf_counter()
    result = throughput(args) if args.mode == "throughput" else memory(args)
    result.update(
        {
            "benchmark": f"encode-{args.mode}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": _machine(),
            "seconds": round(time.perf_counter() - start, 1),
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        }
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        from megatron_nvembed.utils.fileio import write_atomic

        write_atomic(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
