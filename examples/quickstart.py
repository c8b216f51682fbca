"""Quickstart: the whole NV-Embed recipe at toy scale on CPU, with the commands a cluster run uses.

1. Data: a synthetic retrieval task (query words and document words of a topic never overlap, so
   an untrained model ranks near chance), its held-out BEIR split, and a word-level tokenizer.
2. A tiny random Mistral in transformers' format stands in for the pretrained LLM;
   `tools/convert_checkpoint.py import-hf` turns it into a megatron checkpoint with a new
   latent-attention pooling head.
3. Retrieval on the held-out split before training (`tools/evaluate_mteb.py --beir-dir`).
4. Stage 1 (`examples/pretrain_nvembed.sh --recipe tiny`): 2 processes, in-batch + hard
   negatives over the whole global batch (GradCache), full fine-tuning.
5. Stage 2 (`--recipe tiny --stage 2`): from the stage-1 weights, LoRA rank 8, a two-dataset
   blend, in-batch negatives off.
6. `export-hf` (LoRA merged) and retrieval on the held-out split with the exported model.

Writes `$OUT_DIR/summary.json` with `ndcg_at_10_before` and `ndcg_at_10_after`.
Run: bash examples/quickstart.sh   (or: python examples/quickstart.py --out-dir quickstart_out)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Runs one step, echoing the command; its output goes to `log` (tail shown on failure)."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(f"step failed (exit {proc.returncode}), see {log}:\n" + "\n".join(tail))
    print(f"  done in {seconds:.1f}s (log: {log})", flush=True)
    return seconds


def read_ndcg(eval_dir: Path) -> float:
    summary = json.loads((eval_dir / "summary.json").read_text())
    return float(summary["tasks"]["eval"]["ndcg_at_10"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.environ.get("OUT_DIR", "quickstart_out"))
    parser.add_argument("--nproc", type=int, default=2, help="training processes (gloo on CPU)")
    args = parser.parse_args()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    py = sys.executable
    env = {"NPROC_PER_NODE": str(args.nproc), "TORCHRUN": f"{py} -m torch.distributed.run"}
    timings = {}
    wall = time.perf_counter()

    print("== 1. synthetic retrieval data, held-out split, tokenizer; tiny HF decoder", flush=True)
    from megatron_nvembed.testing import save_tiny_hf_decoder, write_synthetic_retrieval

    data = write_synthetic_retrieval(out / "data")
    save_tiny_hf_decoder(out / "hf_base", data["tokenizer"])
    instruction = data["instruction"]

    print("== 2. import the HF decoder as a megatron checkpoint with a latent-attention head")
    timings["import_hf"] = run(
        [
            py,
            "tools/convert_checkpoint.py",
            "import-hf",
            "--hf-dir",
            str(out / "hf_base"),
            "--save",
            str(out / "ckpt" / "base"),
            "--pooling",
            "latent",
        ],
        logs / "import_hf.log",
    )

    print("== 3. held-out retrieval before training")
    timings["eval_before"] = run(
        [
            py,
            "tools/evaluate_mteb.py",
            "--model",
            str(out / "ckpt" / "base"),
            "--beir-dir",
            data["eval"],
            "--instruction",
            instruction,
            "--output",
            str(out / "eval_before"),
        ],
        logs / "eval_before.log",
    )
    before = read_ndcg(out / "eval_before")
    print(f"  nDCG@10 before training: {before:.4f}")

    print(f"== 4. stage 1: {args.nproc} processes, in-batch + hard negatives, GradCache")
    timings["stage1"] = run(
        [
            "bash",
            "examples/pretrain_nvembed.sh",
            "--recipe",
            "tiny",
            "--pretrained-checkpoint",
            str(out / "ckpt" / "base"),
            "--train-data",
            data["train"],
            "--save",
            str(out / "ckpt" / "stage1"),
            "--log-json",
            str(out / "stage1.jsonl"),
        ],
        logs / "stage1.log",
        env,
    )

    print("== 5. stage 2: from stage 1, LoRA rank 8, two-dataset blend, in-batch negatives off")
    timings["stage2"] = run(
        [
            "bash",
            "examples/pretrain_nvembed.sh",
            "--recipe",
            "tiny",
            "--stage",
            "2",
            "--pretrained-checkpoint",
            str(out / "ckpt" / "stage1"),
            "--train-data",
            "0.5",
            data["train"],
            "0.5",
            data["train_pairs"],
            "--save",
            str(out / "ckpt" / "stage2"),
            "--log-json",
            str(out / "stage2.jsonl"),
        ],
        logs / "stage2.log",
        env,
    )

    print("== 6. export to the NV-Embed HF format (LoRA merged) and evaluate it")
    timings["export_hf"] = run(
        [
            py,
            "tools/convert_checkpoint.py",
            "export-hf",
            "--load",
            str(out / "ckpt" / "stage2"),
            "--hf-dir",
            str(out / "hf_final"),
            "--dtype",
            "float32",
        ],
        logs / "export_hf.log",
    )
    timings["eval_after"] = run(
        [
            py,
            "tools/evaluate_mteb.py",
            "--model",
            str(out / "hf_final"),
            "--beir-dir",
            data["eval"],
            "--instruction",
            instruction,
            "--output",
            str(out / "eval_after"),
        ],
        logs / "eval_after.log",
    )
    after = read_ndcg(out / "eval_after")

    def losses(path):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return [r["loss"] for r in rows if "loss" in r]

    s1, s2 = losses(out / "stage1.jsonl"), losses(out / "stage2.jsonl")
    summary = {
        "ndcg_at_10_before": before,
        "ndcg_at_10_after": after,
        "stage1_loss_first_last": [s1[0], s1[-1]],
        "stage2_loss_first_last": [s2[0], s2[-1]],
        "processes": args.nproc,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.perf_counter() - wall, 1),
        "exported_model": str(out / "hf_final"),
    }
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    print()
    print("| held-out retrieval | nDCG@10 |")
    print("|---|---|")
    print(f"| before training | {before:.4f} |")
    print(f"| after stage 1 + stage 2 | {after:.4f} |")
    print(f"stage-1 loss {s1[0]:.3f} -> {s1[-1]:.3f}; stage-2 loss {s2[0]:.3f} -> {s2[-1]:.3f}")
    print(f"wrote {out / 'summary.json'} ({summary['total_seconds']}s in all)")
    if not (after >= 0.6 and after >= before + 0.2):
        sys.exit(
            f"quickstart check failed: nDCG@10 {before:.3f} -> {after:.3f} "
            "(expected >= 0.6 and at least +0.2)"
        )


if __name__ == "__main__":
    main()
