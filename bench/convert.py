#!/usr/bin/env python3
"""Memory and time of the checkpoint conversions against model depth, at Mistral-7B's width.

  python bench/convert.py [--layers 2 8 32] [--work-dir /tmp/convert-bench]
        [--output bench/results/convert-cpu.json]

For each depth L a synthetic bf16 transformers checkpoint of Mistral-7B's shape (hidden 4096,
intermediate 14336, 32 heads, 8 KV heads, vocab 32000) with L layers is written locally (random
values, one tensor at a time, 5 GB safetensors shards as published models have), with a small
tokenizer that appends its end token (so the sentence-transformers export applies). Then, each
as its own process, as a user runs them:

- import-hf  (`tools/convert_checkpoint.py import-hf`, eos pooling, causal mask: no new head);
- export-hf --format nvembed, and --format sentence-transformers;
- merge-lora --peft-dir, of a LoRA checkpoint (rank 16 adapters on every layer, random values,
  written from the imported checkpoint by the bench, not measured);
- reshard: the TP=1 checkpoint loaded into a TP=2 model (two gloo processes, the model's storage
  allocated without initialisation, `store.load_checkpoint`, as a training run at another
  layout loads it). Its peak is reported beside the model's own bytes per process.

Reported per step: peak resident memory of the process tree (all processes summed, sampled every
50 ms), wall time, bytes read and written (folder sizes), the input/output byte ratio; and per
step the growth of the peak per layer between depths. Outputs are deleted as soon as measured
(32 layers need about 45 GB of disk at a time). `copy` is the reference: the source folder
copied with `shutil.copytree` (the same bytes read and written, no conversion).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISTRAL = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32000,
)
SHARD_BYTES = 5 * 10**9
TEXTS = ["how do plants make food", "paris is the capital of france", "the sky is blue"]


def _machine() -> dict:
    import psutil
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def make_source(out: Path, layers: int, seed: int = 0) -> Path:
    """A bf16 transformers `MistralModel` folder with `layers` layers, written tensor by tensor."""
    import torch

    from megatron_nvembed.conversion.hf_weights import write_safetensors_shards
    from megatron_nvembed.testing.st_folders import build_qwen3_embedding_tokenizer

    out.mkdir(parents=True)
    m = MISTRAL
    h, f, kv = m["hidden_size"], m["intermediate_size"], m["num_key_value_heads"] * m["head_dim"]
    shapes = {"embed_tokens.weight": (m["vocab_size"], h), "norm.weight": (h,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    layout = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    gen = torch.Generator().manual_seed(seed)

    def produce(key: str):
        if key.endswith("norm.weight"):
            return torch.ones(shapes[key], dtype=torch.bfloat16)
        return (torch.randn(shapes[key], generator=gen) * 0.02).to(torch.bfloat16)

    write_safetensors_shards(layout, out, SHARD_BYTES, produce)
    config = dict(
        MISTRAL,
        architectures=["MistralModel"],
        model_type="mistral",
        num_hidden_layers=layers,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    build_qwen3_embedding_tokenizer(TEXTS, out)
    return out


def make_lora_checkpoint(src: Path, out: Path, rank: int = 16) -> None:
    """`src` (a plain checkpoint) with rank-`rank` adapters on every layer (B non-zero)."""
    import torch

    from megatron_nvembed.checkpoint.lazy import CheckpointTensors, meta_model
    from megatron_nvembed.checkpoint.store import TOKENIZER_DIR, save_checkpoint
    from megatron_nvembed.core.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1)
    reader = CheckpointTensors(src)
    lora = {"rank": rank, "alpha": 32.0, "dropout": 0.0}
    model = meta_model(reader.cfg, reader.dtype, lora=lora)
    gen = torch.Generator().manual_seed(1)

    def value(name: str):
        p = dict(model.named_parameters())[name]
        if name.endswith((".lora_A", ".lora_B")):
            return (torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype)
        return reader.read([name.replace(".base.weight", ".weight")])[
            name.replace(".base.weight", ".weight")
        ]

    save_checkpoint(model, reader.cfg, out, iteration=0, lora=lora, values=value)
    shutil.copytree(src / TOKENIZER_DIR, out / TOKENIZER_DIR)


class TreePeak:
    """Peak summed RSS of a process and its descendants, sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                self.peak = max(self.peak, total)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_step(name: str, cmd: list[str], reads: list[Path], writes: list[Path]) -> dict:
    """Runs one conversion as a user would; peak tree RSS, wall time, bytes."""
    print(f"  {name}: {' '.join(str(c) for c in cmd[1:])}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    peak = TreePeak(proc.pid)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    rss = peak.stop()
    if proc.returncode != 0:
        sys.stderr.write(out.decode(errors="replace")[-4000:])
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    read = sum(folder_bytes(p) for p in reads)
    written = sum(folder_bytes(p) for p in writes)
    row = {
        "peak_rss_gib": round(rss / 2**30, 3),
        "wall_s": round(wall, 1),
        "read_gb": round(read / 1e9, 3),
        "written_gb": round(written / 1e9, 3),
        "gb_per_s": round((read + written) / 1e9 / wall, 3),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    # ranks print into one pipe at once, so records may run together: each ends with ";"
    model = [int(n) for _, n in re.findall(r"MODEL_BYTES (\d+) (\d+);", out.decode())]
    if model:  # the reshard worker: the model's own bytes, summed over its processes
        row["model_gib"] = round(sum(model) / 2**30, 3)
        row["beyond_model_gib"] = round((rss - sum(model)) / 2**30, 3)
    print(f"    {row}", flush=True)
    return row


RESHARD_WORKER = """
import sys, resource, torch
from megatron_nvembed.core.launch import run_distributed

def worker(rank, world, ckpt):
    from megatron_nvembed.checkpoint.lazy import saved_dtype
    from megatron_nvembed.checkpoint.store import iteration_dir, latest_iteration, load_checkpoint, read_config
    from megatron_nvembed.core.config import ParallelConfig
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.model.build import build_model
    cfg = read_config(ckpt)
    cfg.parallel = ParallelConfig(world, 1)
    pg = initialize_model_parallel(world, 1)
    dtype = saved_dtype(iteration_dir(ckpt, latest_iteration(ckpt)))
    with torch.device("meta"):
        model = build_model(cfg, pg, params_dtype=dtype)
    model.to_empty(device="cpu")
    load_checkpoint(model, ckpt)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"MODEL_BYTES {rank} {nbytes};", flush=True)

if __name__ == "__main__":
    run_distributed(worker, int(sys.argv[2]), sys.argv[1])
"""


def bench_depth(layers: int, work: Path) -> dict:
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    d = work / f"L{layers}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    print(f"L={layers}: writing the synthetic source", flush=True)
    t0 = time.perf_counter()
    src = make_source(d / "src", layers)
    rows = {"source_gb": round(folder_bytes(src) / 1e9, 3)}
    print(f"  source {rows['source_gb']} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    # The reference speed of this disk: copying the source (read + write, page cache dropped
    # by nothing: as warm as the conversions' reads).
    t0 = time.perf_counter()
    shutil.copytree(src, d / "copy")
    copy_s = time.perf_counter() - t0
    rows["copy"] = {
        "wall_s": round(copy_s, 1),
        "gb_per_s": round(2 * folder_bytes(src) / 1e9 / copy_s, 3),
    }
    shutil.rmtree(d / "copy")
    print(f"  copy {rows['copy']}", flush=True)
    ck = d / "ckpt"
    common = ["--pooling", "eos", "--mask-type", "causal"]
    rows["import-hf"] = run_step(
        "import-hf",
        [*tool, "import-hf", "--hf-dir", str(src), "--save", str(ck), *common],
        [src],
        [ck],
    )
    rows["checkpoint_over_source"] = round(folder_bytes(ck) / folder_bytes(src), 4)
    shutil.rmtree(src)
    for fmt in ("nvembed", "sentence-transformers"):
        out = d / f"export-{fmt}"
        rows[f"export-hf {fmt}"] = run_step(
            f"export-hf {fmt}",
            [*tool, "export-hf", "--load", str(ck), "--hf-dir", str(out), "--format", fmt],
            [ck],
            [out],
        )
        shutil.rmtree(out)
    lora_ck = d / "lora"
    script = (
        "import sys; sys.path.insert(0, 'bench'); from convert import make_lora_checkpoint; "
        f"make_lora_checkpoint(__import__('pathlib').Path({str(ck)!r}), "
        f"__import__('pathlib').Path({str(lora_ck)!r}))"
    )
    subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    merged, peft = d / "merged", d / "peft"
    rows["merge-lora"] = run_step(
        "merge-lora",
        [
            *tool,
            "merge-lora",
            "--load",
            str(lora_ck),
            "--save",
            str(merged),
            "--peft-dir",
            str(peft),
            "--peft-base-model",
            "base-model",
        ],
        [lora_ck],
        [merged, peft],
    )
    shutil.rmtree(merged)
    shutil.rmtree(peft)
    shutil.rmtree(lora_ck)
    worker = d / "reshard_worker.py"
    worker.write_text(RESHARD_WORKER)
    rows["reshard TP1->TP2"] = run_step(
        "reshard TP1->TP2", [sys.executable, str(worker), str(ck), "2"], [ck], []
    )
    shutil.rmtree(d)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--work-dir", default="/tmp/convert-bench")
    p.add_argument("--output", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    result = {"machine": _machine(), "shape": MISTRAL, "dtype": "bfloat16", "depths": {}}
    for layers in args.layers:
        result["depths"][layers] = bench_depth(layers, work)
    depths = sorted(result["depths"])
    growth = {}
    for a, b in zip(depths, depths[1:]):
        for step, row in result["depths"][b].items():
            if isinstance(row, dict) and "peak_rss_gib" in row:
                before = result["depths"][a][step]["peak_rss_gib"]
                per_layer = (row["peak_rss_gib"] - before) / (b - a)
                growth.setdefault(step, {})[f"L{a}->L{b}"] = round(per_layer, 4)
    result["peak_growth_gib_per_layer"] = growth
    write_result(result, args.output)
    return 0


def write_result(result: dict, output: str | None) -> None:
    """Prints the result JSON, and writes it to `output` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if output:
        Path(output).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
