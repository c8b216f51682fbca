"""Long-input benchmark: peak memory per rank and tokens/s of one training step at 2k-32k tokens,
without sequence parallelism, with it, and with it plus full activation recompute.

    python bench/long_context.py --output bench/results/long-context-cpu-20261207.json
    python bench/long_context.py --device cuda --tp 1 --hidden-size 4096 --ffn-hidden-size 14336 \
        --heads 32 --kv-heads 8 --layers 4 --bf16 --modes none recompute --output r.json

The step: forward and backward of the embedding model (this project's `NVEmbedModel`: backbone,
bidirectional mask, latent-attention head) on one document of N tokens and a 64-token query, the
loss their scaled cosine similarity. No optimizer step: its memory does not depend on N. Each cell
(length x mode) runs in fresh processes (`--tp` ranks, gloo on CPU), after a warm-up step at 256
tokens. What is measured, per rank:
- CPU: the peak resident memory during the step above the resident memory just before it
  (Linux's VmHWM, reset through /proc/self/clear_refs before the step);
- GPU: `torch.cuda.max_memory_allocated` during the step above the allocation before it.
That difference is the step's memory (activations, their gradients and transient buffers, as
the allocator holds them); on CPU it moves with the allocator's reuse of freed blocks. The
activations themselves are counted exactly too: the bytes of the tensors the forward kept for
the backward (`torch.autograd.graph.saved_tensors_hooks`, distinct storages, parameters left
out; with recompute, what the checkpointed forward kept). Each divided by N is per token.
tokens/s counts the document's and the query's tokens per second of
wall time. Modes: `none`, `sp` (`--sequence-parallel`), `sp-recompute` (SP and
`--recompute-granularity full`, one layer per chunk), `recompute` (full recompute alone, for TP=1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent)]  # the package without an install

import torch  # noqa: E402

from megatron_nvembed.utils.fileio import write_atomic  # noqa: E402

MODES = {
    "none": dict(sequence_parallel=False, recompute=False),
    "sp": dict(sequence_parallel=True, recompute=False),
    "sp-recompute": dict(sequence_parallel=True, recompute=True),
    "recompute": dict(sequence_parallel=False, recompute=True),
}
QUERY_TOKENS = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--modes", nargs="+", default=["none", "sp", "sp-recompute"], choices=MODES)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (processes)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--latents", type=int, default=64, help="latent-head rows")
    p.add_argument("--pool-heads", type=int, default=2, help="latent-head heads (NV-Embed: 8)")
    p.add_argument("--repeats", type=int, default=1, help="measured steps per cell")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 parameters and compute (GPU)")
    p.add_argument("--output", required=True, help="JSON results file")
    args = p.parse_args(argv)
    for name in (
        "tp",
        "hidden_size",
        "layers",
        "heads",
        "kv_heads",
        "repeats",
        "latents",
        "pool_heads",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(n < QUERY_TOKENS for n in args.lengths):
        p.error(f"--lengths must be >= {QUERY_TOKENS}")
    if args.tp == 1 and any(MODES[m]["sequence_parallel"] for m in args.modes):
        p.error("--modes sp / sp-recompute need --tp > 1 (sequence parallelism splits over TP)")
    if args.device == "cuda" and torch.cuda.device_count() < args.tp:
        p.error(f"--tp {args.tp} needs {args.tp} CUDA devices")
    return args


def _model_config(args, mode: str):
    from megatron_nvembed.core.config import (
        EmbeddingModelConfig,
        ModelConfig,
        ParallelConfig,
        PoolingConfig,
    )

    m = MODES[mode]
    model = ModelConfig(
        vocab_size=32000, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_layers=args.layers, num_attention_heads=args.heads, num_query_groups=args.kv_heads,
        bf16=args.bf16, attention_backend="sdpa" if args.device == "cpu" else "auto",
        recompute_granularity="full" if m["recompute"] else None,
    )  # fmt: skip
    pooling = PoolingConfig(type="latent", num_latents=args.latents, num_heads=args.pool_heads)
    parallel = ParallelConfig(args.tp, 1, sequence_parallel=m["sequence_parallel"])
    return EmbeddingModelConfig(model=model, pooling=pooling, parallel=parallel)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _step(model, doc_len: int, device) -> int:
    """One step; returns the bytes of the activations its forward kept for the backward."""
    g = torch.Generator().manual_seed(doc_len)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    embs = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for n in (QUERY_TOKENS, doc_len):
            ids = torch.randint(3, 32000, (1, n), generator=g).to(device)
            embs.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    (-(embs[0] * embs[1]).sum() / 0.02).backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def _cell(rank, world, args, mode, length, out_dir):
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.model.build import build_model

    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    pg = initialize_model_parallel(args.tp, 1, seed=1)
    model = build_model(_model_config(args, mode), pg).train()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    _step(model, 256, device)  # warm-up
    peaks, times, kept = [], [], 0
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident size (VmHWM) to the current size
            base = _status_mib("VmRSS")
        start = time.perf_counter()
        kept = _step(model, length, device)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mib("VmHWM")
        peaks.append(peak - base)
    result = {
        "rank": rank,
        "step_mib": max(peaks),
        "saved_mib": kept / 2**20,
        "step_s": statistics.median(times),
    }
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


def run_cell(args, mode: str, length: int) -> dict:
    from megatron_nvembed.core.launch import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if args.device == "cuda" else "gloo"
        run_distributed(_cell, args.tp, args, mode, length, tmp, backend=backend)
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(args.tp)]
    step_mib = max(r["step_mib"] for r in ranks)
    saved_mib = max(r["saved_mib"] for r in ranks)
    step_s = max(r["step_s"] for r in ranks)
    return {
        "mode": mode,
        "tokens": length,
        "step_mib_per_rank": step_mib,
        "step_mib_each_rank": [round(r["step_mib"], 1) for r in ranks],
        "step_bytes_per_token_per_rank": step_mib * 2**20 / length,
        "saved_mib_per_rank": saved_mib,
        "saved_bytes_per_token_per_rank": saved_mib * 2**20 / length,
        "step_s": step_s,
        "tokens_per_s": (length + QUERY_TOKENS) / step_s,
    }


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    cells = []
    total = len(args.lengths) * len(args.modes)
    started = time.perf_counter()
    for length in args.lengths:
        for mode in args.modes:
            cell = run_cell(args, mode, length)
            cells.append(cell)
            print(
                f"[{len(cells)}/{total}] {length} tokens, {mode}: "
                f"step peak {cell['step_mib_per_rank']:.0f} MiB per rank, "
                f"activations kept {cell['saved_mib_per_rank']:.0f} MiB per rank "
                f"({cell['saved_bytes_per_token_per_rank'] / 1024:.1f} KiB/token), "
                f"{cell['tokens_per_s']:.0f} tokens/s ({time.perf_counter() - started:.0f} s "
                "so far)",
                flush=True,
            )
    by = {(c["tokens"], c["mode"]): c for c in cells}
    savings = {}
    for length in args.lengths:
        base = by.get((length, "none"))
        for mode in args.modes:
            if base and mode != "none":
                cell = by[(length, mode)]
                savings[f"{length}/{mode}"] = {
                    key: round(1.0 - cell[key] / base[key], 4)
                    for key in ("step_mib_per_rank", "saved_mib_per_rank")
                }
    report = {
        "benchmark": "long_context",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "machine": machine_info(args.device),
        "cells": cells,
        "memory_saved_vs_none": savings,
    }
    write_atomic(Path(args.output), json.dumps(report, indent=2) + "\n")
    print(json.dumps(savings, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
