"""Training-step benchmark: the trainer's own step (megatron-core, this project) against a typical
transformers + peft implementation of the same model, at NV-Embed's batch shape.

    python bench/train_step.py --preset tiny --output bench/results/cpu-tiny.json
    python bench/train_step.py --preset mistral-7b-width --layers 4 --device cuda --output r.json

"Ours" is `training.step.StepRunner` with the trainer's model, optimizer and loss
(`bench/_step_impls.py`), stepped as `training.trainer.train` steps it: host layout and one
transfer, forward and backward (GradCache on and/or off, `--grad-cache`), megatron-core's
optimizer step and LR schedule. The baseline is transformers + peft with torch AdamW. Both run in
this one process, alternating step by step on the same seeded batches after the same warm-up
(who goes first rotates), so machine load hits all of them alike. Per implementation: median
wall and process CPU time per step, tokens/s; per pair, the median of the per-step ratios of
tokens/s. `--compare-layouts` pairs ours' pad512 and packed layouts instead (no baseline).
What is counted: docs/benchmarks.md.

About 430 lines: presets, flags, the trainer's configuration, the paired loop and the report;
the implementations and their batches are in `_step_impls.py`, the markdown in
`render_results.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent)]  # helpers; the package without an install

import torch  # noqa: E402
from _step_impls import (  # noqa: E402
    LAYOUT_DOC,
    LAYOUTS,
    Baseline,
    Ours,
    OursStep,
    Shape,
    hf_reference,
    micro_batch,
    synthetic_texts,
)
from render_results import render  # noqa: E402

from megatron_nvembed.core.flops import flop_shape  # noqa: E402
from megatron_nvembed.core.hardware import gpu_peak_bf16_tflops  # noqa: E402
from megatron_nvembed.utils.fileio import write_atomic  # noqa: E402

PRESETS = {
    # A small Mistral-shaped model that keeps NV-Embed's structure (GQA 4:1, SwiGLU 3x, latent
    # head with K/V from a latent array, GEGLU 4x) and runs a step in seconds on 2 CPU cores.
    "tiny": dict(
        model=dict(
            vocab_size=32000,
            hidden_size=256,
            ffn_hidden_size=768,
            num_layers=4,
            num_attention_heads=8,
            num_query_groups=2,
        ),
        pooling=dict(num_latents=64, num_heads=4, head_dim=64, ff_mult=4),
        batch_size=4,
        length_scale=0.5,
        warmup=1,
        weights="shared",
    ),
    # Mistral-7B's width (NV-Embed-v1's backbone) and NV-Embed's head (512 latents, 8 heads of
    # width 4096); --layers N cuts the depth to fit a device or a time budget.
    "mistral-7b-width": dict(
        model=dict(
            vocab_size=32000,
            hidden_size=4096,
            ffn_hidden_size=14336,
            num_layers=32,
            num_attention_heads=32,
            num_query_groups=8,
        ),
        pooling=dict(num_latents=512, num_heads=8, head_dim=4096, ff_mult=4),
        batch_size=2,
        length_scale=1.0,
        warmup=2,
        weights="independent",
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    p.add_argument("--steps", type=int, default=5, help="timed batches (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (tiny 1, else 2)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the timed batches")
    p.add_argument("--batch-size", type=int, default=None, help="queries per micro-batch")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step")
    p.add_argument("--negatives", type=int, default=7, help="hard negatives per query (K)")
    p.add_argument(
        "--length-scale",
        type=float,
        default=None,
        help="multiply the paper's length ranges (queries 20-60, passages 80-400); "
        "default: tiny 0.5, mistral-7b-width 1",
    )
    p.add_argument("--max-length", type=int, default=512, help="token cap per text")
    p.add_argument("--layout", choices=LAYOUTS, default="buckets", help="ours' layout")
    p.add_argument("--bucket-size", type=int, default=8, help="buckets: texts per call")
    p.add_argument("--grad-cache", choices=["on", "off", "both"], default="both")
    p.add_argument(
        "--compare-layouts",
        action="store_true",
        help="pair ours' pad512 and packed layouts on the same batches (no baseline)",
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.1, help="NV-Embed: 0.1")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--weights",
        choices=["shared", "independent"],
        default=None,
        help="shared: ours starts from the baseline's weights and their embeddings are "
        "compared; independent: each its own (default: tiny shared, else independent)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--profile", metavar="DIR", help="one more step each under torch.profiler")
    p.add_argument("--output", required=True, help="RESULT.json (and RESULT.md)")
    return p.parse_args(argv)


def configure(args):
    """(`TrainingConfig` of ours, the batches' `Shape`, warm-up steps, weights) from the flags."""
    from megatron_nvembed.core.config import (
        EmbeddingModelConfig,
        ModelConfig,
        ParallelConfig,
        PoolingConfig,
    )
    from megatron_nvembed.data.config import DataConfig
    from megatron_nvembed.loss.config import ContrastiveLossConfig
    from megatron_nvembed.training.config import LoRAConfig, OptimizerConfig, TrainingConfig

    preset = PRESETS[args.preset]
    layers = args.layers if args.layers is not None else preset["model"]["num_layers"]
    model = dict(preset["model"], num_layers=layers)
    scale = args.length_scale if args.length_scale is not None else preset["length_scale"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    batch = args.batch_size or preset["batch_size"]
    for name, value, least in (
        ("layers", model["num_layers"], 1),
        ("steps", args.steps, 1),
        ("warmup", warmup, 0),
        ("repeats", args.repeats, 1),
        ("micro-batches", args.micro_batches, 1),
        ("negatives", args.negatives, 0),
        ("lora-rank", args.lora_rank, 1),
        ("batch-size", batch, 1),
        ("bucket-size", args.bucket_size, 1),
    ):
        if value < least:
            raise SystemExit(f"--{name} must be >= {least}, got {value}")
    if scale <= 0:
        raise SystemExit(f"--length-scale must be > 0, got {scale}")

    def lengths(lo, hi):
        return (max(4, round(lo * scale)), max(4, round(hi * scale)))

    variants = 2 if args.compare_layouts else 1
    variants *= 2 if args.grad_cache == "both" else 1
    cfg = TrainingConfig(
        recipe="bench",
        model=EmbeddingModelConfig(
            model=ModelConfig(
                **model, mask_type="bidirectional", attention_backend="sdpa", bf16=args.cuda
            ),
            pooling=PoolingConfig(type="latent", **preset["pooling"]),
            parallel=ParallelConfig(),
        ),
        lora=LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout),
        data=DataConfig(
            train_data=["synthetic (bench/train_step.py)"],
            num_negatives=args.negatives,
            seq_length=args.max_length,
            length_bucket_size=args.bucket_size,
            micro_batch_size=batch,
            global_batch_size=batch * args.micro_batches,
        ),
        optimizer=OptimizerConfig(
            # every ours variant steps the one optimizer: the schedule spans all their steps
            train_iters=variants * (warmup + args.steps * args.repeats) + 1,
            lr=args.lr,
            lr_warmup_iters=0,
        ),
        loss=ContrastiveLossConfig(temperature=args.temperature),
        seed=args.seed,
    )
    shape = Shape(
        batch_size=batch,
        negatives=args.negatives,
        micro_batches=args.micro_batches,
        query_len=lengths(20, 60),
        passage_len=lengths(80, 400),
        instruction_len=lengths(8, 16),
        max_length=args.max_length,
        vocab_size=model["vocab_size"],
        seed=args.seed,
    )
    return cfg, shape, warmup, args.weights or preset["weights"]


def build(args, cfg, weights: str, device):
    """{name: implementation} in this process, and the (ours, reference) pairs to compare."""
    from megatron_nvembed.testing import init_single_process_megatron

    pg = init_single_process_megatron(seed=cfg.seed)
    settings = {"both": [False, True], "off": [False], "on": [True]}[args.grad_cache]
    gc = lambda on: f"gc-{'on' if on else 'off'}"  # noqa: E731
    if args.compare_layouts:
        ours = Ours(cfg, pg, device)
        impls = {f"{layout}-{gc(g)}": OursStep(ours, layout, g) for g in settings
                 for layout in ("pad512", "packed")}  # fmt: skip
        return impls, [(f"packed-{gc(g)}", f"pad512-{gc(g)}") for g in settings]
    dtype = torch.bfloat16 if args.cuda else torch.float32
    ref = hf_reference(cfg.model, cfg.seed, device, dtype)
    state = ref.hf_state_dict() if weights == "shared" else None
    ours = Ours(cfg, pg, device, weights=state)
    del state
    impls = {f"ours-{gc(g)}": OursStep(ours, args.layout, g) for g in settings}
    impls["baseline"] = Baseline(cfg, ref, device, cfg.optimizer.train_iters)
    return impls, [(name, "baseline") for name in impls if name != "baseline"]


def timed_step(impl, micro_batches, fshape, device) -> dict:
    """One step of `impl`: wall and process CPU time, and the trainer's statistics of it."""
    from megatron_nvembed.training.metrics import StepStatistics

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    wall, cpu = time.perf_counter(), time.process_time()
    loss, batches = impl.step(micro_batches)
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finite = torch.zeros((), device=device)  # the trainer's non-finite check is not run here
    stats = StepStatistics.reduce(
        loss, batches, fshape, True, contributes=True, nonfinite_grads=finite, sigterm=False,
        over_time=False, device=device,
    )  # fmt: skip
    out = dict(seconds=wall, cpu_seconds=cpu, loss=stats.loss, tokens=stats.tokens,
               padded=stats.padded, sequences=stats.sequences, flops=stats.flops)  # fmt: skip
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    return out


def run_paired(impls: dict, inputs: dict, schedule: list, fshape, device) -> dict:
    """Steps every implementation on each batch of `schedule` ([(index, timed)]) in turn, the
    first one rotating; returns {name: [record of each timed step]}."""
    names, records = list(impls), {name: [] for name in impls}
    for k, (index, timed) in enumerate(schedule):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            impl = impls[name]
            record = timed_step(impl, inputs[impl.layout][index], fshape, device)
            print(f"[bench] batch {index} {name}: {record['seconds']:.2f} s", file=sys.stderr)
            if timed:
                records[name].append(record)
    return records


def summarize(impl, steps: list[dict]) -> dict:
    med = statistics.median

    def rate(key, per="seconds"):
        return med(s[key] / s[per] for s in steps)

    peaks = [s["peak_bytes"] for s in steps if "peak_bytes" in s]
    return dict(
        layout=impl.layout,
        layout_description=LAYOUT_DOC[impl.layout],
        grad_cache=impl.grad_cache,
        step_seconds_median=med(s["seconds"] for s in steps),
        step_cpu_seconds_median=med(s["cpu_seconds"] for s in steps),
        tokens_per_s=rate("tokens"),
        tokens_per_cpu_s=rate("tokens", "cpu_seconds"),
        padded_tokens_per_s=rate("padded"),
        sequences_per_s=rate("sequences"),
        model_tflops_per_s=rate("flops") / 1e12,
        real_tokens_per_step=statistics.mean(s["tokens"] for s in steps),
        padded_tokens_per_step=statistics.mean(s["padded"] for s in steps),
        padding_fraction=1 - sum(s["tokens"] for s in steps) / sum(s["padded"] for s in steps),
        step_peak_memory_bytes=max(peaks) if peaks else None,
        trainable_parameters=impl.params,
        total_parameters=impl.total_params,
        step_seconds=[s["seconds"] for s in steps],
        step_cpu_seconds=[s["cpu_seconds"] for s in steps],
        losses=[s["loss"] for s in steps],
    )


def compare(a: list[dict], b: list[dict], emb_a, emb_b) -> dict:
    """Implementation a against b, step by step (the same batch at the same index)."""

    def paired(per):
        return statistics.median(
            (x["tokens"] / x[per]) / (y["tokens"] / y[per]) for x, y in zip(a, b)
        )

    return dict(
        tokens_per_s_paired=paired("seconds"),
        tokens_per_cpu_s_paired=paired("cpu_seconds"),
        parity_max_abs=None if emb_a is None else float((emb_a - emb_b).abs().max()),
    )


def profile(impls: dict, inputs: dict, index: int, out_dir: str, cuda: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name, impl in impls.items():
        with profile(activities=activities) as prof:
            impl.step(inputs[impl.layout][index])
            if cuda:
                torch.cuda.synchronize()
        sort = "cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
        (Path(out_dir) / f"{name}.txt").write_text(table)


def machine_info(device) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info = dict(
        cpu_model=cpu,
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        device=device.type,
        device_name=cpu if device.type == "cpu" else torch.cuda.get_device_name(device),
    )
    for pkg in ("transformers", "peft", "megatron.core"):
        info[pkg] = __import__(pkg, fromlist=["__version__"]).__version__
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    args.cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if not args.cuda and torch.cuda.is_available():
        # megatron_nvembed places models on CUDA whenever it exists (cpu_support.cpu_mode).
        raise SystemExit("--device cpu on a CUDA machine: run with CUDA_VISIBLE_DEVICES=''")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_before = os.getloadavg()
    cfg, shape, warmup, weights = configure(args)
    device = torch.device("cuda", torch.cuda.current_device()) if args.cuda else torch.device("cpu")
    impls, pairs = build(args, cfg, weights, device)
    texts = [synthetic_texts(shape, i) for i in range(warmup + args.steps)]
    inputs = {
        layout: [[micro_batch(*mb, args.max_length, layout == "pad512") for mb in step]
                 for step in texts]
        for layout in {impl.layout for impl in impls.values()}
    }  # fmt: skip
    # Batch 0's first micro-batch, eval mode, before any update: do the pairs compute alike?
    emb = {}
    if args.compare_layouts or weights == "shared":
        emb = {n: impls[n].embed(inputs[impls[n].layout][0][0]) for pair in pairs for n in pair}
    timed = [(warmup + i, True) for _ in range(args.repeats) for i in range(args.steps)]
    fshape = flop_shape(cfg.model, cfg.lora.rank)
    records = run_paired(impls, inputs, [(i, False) for i in range(warmup)] + timed, fshape, device)
    if args.profile:
        profile(impls, inputs, warmup, args.profile, args.cuda)
    machine = machine_info(device)
    machine["load_average_before_after"] = [list(load_before), list(os.getloadavg())]
    peak = args.peak_tflops
    if peak is None and args.cuda:
        peak = gpu_peak_bf16_tflops(machine["device_name"])
    results = {name: summarize(impl, records[name]) for name, impl in impls.items()}
    for r in results.values():
        r["mfu"] = None if peak is None else r["model_tflops_per_s"] / peak
    ratios = {
        f"{a} / {b}": dict(
            compare(records[a], records[b], emb.get(a), emb.get(b)),
            tokens_per_s_of_medians=results[a]["tokens_per_s"] / results[b]["tokens_per_s"],
        )
        for a, b in pairs
    }
    memory = (
        "step_peak_memory_bytes: per step, torch.cuda.max_memory_allocated minus the memory "
        "allocated just before it (activations, gradients, optimizer temporaries), max over steps"
        if args.cuda
        else "CPU: every implementation shares this process, so RSS cannot be split between "
        "them; max_rss_bytes is the process peak (getrusage), weights and imports included"
    )
    machine["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = dict(
        vars(args),
        warmup=warmup,
        weights=weights,
        shape=asdict(shape),
        flop_shape=fshape.to_dict(),
        peak_tflops=peak,
        memory_method=memory,
        mode="one process, implementations alternating step by step (first one rotating)",
        trainer_config=cfg.to_dict(),
        command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    )
    report = dict(results=results, ratios=ratios, machine=machine, config=config)
    out = Path(args.output)
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    text = render(out, report)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
