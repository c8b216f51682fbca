"""Renders bench/train_step.py result files as markdown (a results table + the machine).

python bench/render_results.py bench/results/cpu-tiny-*.json > bench/results/cpu-tiny.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HEADER = (
    "| result | mode | device | threads | ours tok/s | baseline tok/s | speedup | "
    "median step ratio | CPU-time speedup | ours / baseline padded tok/s | "
    "ours / baseline model TFLOP/s | MFU | ours / baseline padding | "
    "ours / baseline peak memory (MiB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def row(path: Path, report: dict) -> str:
    o, b, c, m = report["ours"], report["baseline"], report["config"], report["machine"]
    mode = "paired" if c.get("mode", "").startswith("paired") else "separate"
    mfu = "n/a" if o.get("mfu") is None else f"{o['mfu']:.1%} / {b['mfu']:.1%}"
    return (
        f"| `{path.name}` | {mode} x{c['repeats']} | {m['device_name']} | {c['threads']} | "
        f"{o['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
        f"**{report['speedup']:.2f}x** | "
        f"{_fmt(report.get('speedup_median_of_step_ratios'), '.2f')}x | "
        f"{_fmt(report.get('speedup_cpu_time'), '.2f')}x | "
        f"{o['padded_tokens_per_s']:,.0f} / {b['padded_tokens_per_s']:,.0f} | "
        f"{o['model_tflops_per_s']:.3f} / {b['model_tflops_per_s']:.3f} | {mfu} | "
        f"{o['padding_fraction']:.0%} / {b['padding_fraction']:.0%} | "
        f"{_mib(o['peak_memory_bytes'])} / {_mib(b['peak_memory_bytes'])} |"
    )


def machine(report: dict) -> str:
    m, c = report["machine"], report["config"]
    s = c["flop_shape"]
    lines = [
        f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, megatron-core {m['megatron.core']}; device {m['device_name']}",
        f"- model: preset `{c['preset']}`: d={s['hidden']}, ffn={s['ffn']}, "
        f"layers={s['layers']}, heads={s['heads']}/{s['groups']} groups (dh {s['head_dim']}), "
        f"vocab {c['model']['vocab_size']}; latent head {s['pool_latents']} latents, "
        f"{s['pool_heads']} heads x {s['pool_head_dim']}, GEGLU x{s['pool_ff_mult']}; "
        f"LoRA r={c['lora_rank']} alpha={c['lora_alpha']:g} dropout={c['lora_dropout']:g}; "
        f"{c['dtype']}",
        f"- batch: B={c['batch_size']} queries x (1 + {c['negatives']}) passages; lengths "
        f"queries {c['query_len'][0]}-{c['query_len'][1]}, passages "
        f"{c['passage_len'][0]}-{c['passage_len'][1]} (paper ranges x {c['length_scale']:g}), "
        f"cap {c['max_length']}; ours: buckets of {c['bucket_size']} rows, widths rounded to "
        f"{c['pad_multiple']}",
        f"- steps: {c['warmup']} warm-up + {c['steps']} timed per round, {c['repeats']} round(s); "
        f"weights {c['weights']} (parity max |ours - baseline| = "
        f"{_fmt(c.get('parity_max_abs_diff'), '.1e')})",
        f"- 1-minute load average before / after: "
        f"{' / '.join(f'{x:.1f}' for x in m.get('load_average_1min_before_after', []))}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path)
    args = p.parse_args(argv)
    reports = []
    for path in args.results:
        report = json.loads(path.read_text())
        if "ours" not in report:  # --compare-layouts writes its own table (the .md next to it)
            print(f"skipping {path}: not an ours-vs-baseline result", file=sys.stderr)
            continue
        reports.append((path, report))
    print(HEADER)
    for path, report in reports:
        print(row(path, report))
    for path, report in reports:
        print(f"\n`{path.name}`: `{report['config']['command']}`\n")
        print(machine(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
