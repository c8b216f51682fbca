"""Renders bench/train_step.py result files as markdown: per file, a table of the
implementations, a table of the paired ratios, and the machine and batch.

python bench/render_results.py bench/results/cpu-tiny-trainer-step.json

Result files written before the trainer-step rework (2026-12-01: one process per implementation,
no `results` key) are skipped; their tables are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMPLS = (
    "| implementation | layout | GradCache | wall s/step | CPU s/step | tok/s | tok/CPU-s | "
    "padded tok/s | padding | model TFLOP/s | MFU | step peak memory (MiB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)
RATIOS = (
    "| pair | tok/s ratio, paired (median of per-step ratios) | ratio of median tok/s | "
    "tok/CPU-s ratio, paired | embeddings max abs diff |\n|---|---|---|---|---|"
)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def tables(report: dict) -> str:
    """The implementations' medians, then one row per compared pair."""
    rows = [IMPLS]
    for name, r in report["results"].items():
        peak = r["step_peak_memory_bytes"]
        rows.append(
            f"| {name} | {r['layout']} | {'on' if r['grad_cache'] else 'off'} | "
            f"{r['step_seconds_median']:.3f} | {r['step_cpu_seconds_median']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} | "
            f"{r['padded_tokens_per_s']:,.0f} | {r['padding_fraction']:.0%} | "
            f"{r['model_tflops_per_s']:.3f} | {_fmt(r['mfu'], '.1%')} | "
            f"{_fmt(None if peak is None else peak / 2**20, ',.0f')} |"
        )
    rows += ["", RATIOS]
    for pair, q in report["ratios"].items():
        rows.append(
            f"| {pair} | **{q['tokens_per_s_paired']:.2f}x** | {q['tokens_per_s_of_medians']:.2f}x"
            f" | {q['tokens_per_cpu_s_paired']:.2f}x | {_fmt(q['parity_max_abs'], '.1e')} |"
        )
    return "\n".join(rows)


def machine(report: dict) -> str:
    m, c = report["machine"], report["config"]
    s, b = c["flop_shape"], c["shape"]
    load = " / ".join(", ".join(f"{x:.2f}" for x in v) for v in m["load_average_before_after"])
    return "\n".join(
        [
            f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['torch_threads']} torch "
            f"threads), {m['platform']}, Python {m['python']}, torch {m['torch']}, transformers "
            f"{m['transformers']}, peft {m['peft']}, megatron-core {m['megatron.core']}; device "
            f"{m['device_name']}; load average (1, 5, 15 min) before / after: {load}",
            f"- model: preset `{c['preset']}`: d={s['hidden']}, ffn={s['ffn']}, "
            f"layers={s['layers']}, heads={s['heads']}/{s['groups']} groups (dh {s['head_dim']}); "
            f"latent head {s['pool_latents']} latents, {s['pool_heads']} heads x "
            f"{s['pool_head_dim']}, GEGLU x{s['pool_ff_mult']}; LoRA r={c['lora_rank']} "
            f"alpha={c['lora_alpha']:g} dropout={c['lora_dropout']:g}; "
            f"{'bf16' if c['cuda'] else 'fp32'}; weights {c['weights']}",
            f"- step: {b['micro_batches']} micro-batch(es) of B={b['batch_size']} queries x "
            f"(1 + {b['negatives']}) passages; lengths queries {b['query_len'][0]}-"
            f"{b['query_len'][1]}, passages {b['passage_len'][0]}-{b['passage_len'][1]}, cap "
            f"{b['max_length']}; {c['warmup']} warm-up + {c['steps']} timed batches x "
            f"{c['repeats']} round(s), {c['mode']}",
            f"- memory: {c['memory_method']}"
            + ("" if c["cuda"] else f" ({m['max_rss_bytes'] / 2**20:,.0f} MiB)"),
        ]
    )


def render(path: Path, report: dict) -> str:
    """Markdown of one result file: its command, the two tables and the machine."""
    return (
        f"`{path.name}`: `{report['config']['command']}`\n\n{tables(report)}\n\n{machine(report)}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path)
    args = p.parse_args(argv)
    for path in args.results:
        report = json.loads(path.read_text())
        if "results" not in report:
            print(f"skipping {path}: written before the trainer-step bench", file=sys.stderr)
            continue
        print(render(path, report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
