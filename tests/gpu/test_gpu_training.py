"""Training on a GPU: the tiny recipe in bf16 with NCCL (one process through the entry point),
GradCache on, then an exact resume. Skipped without CUDA. On a GPU machine: `pytest tests/gpu -q`.

Checks: every logged loss is finite, the loss goes down over 12 steps (last 3 below 0.8 x first
3), the log carries CUDA peak memory and a FLOP estimate, and a run resumed at iteration 6 logs
the losses of the straight run for 7-8 (bf16: within 1e-3 relative; GPU reductions may differ in
the last bits between runs).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_nvembed.testing import write_synthetic_retrieval

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _train(data, *extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "pretrain_nvembed.py"),
            "--recipe",
            "tiny",
            "--bf16",
            "--train-data",
            data["train"],
            "--tokenizer",
            data["tokenizer"],
            "--lr-warmup-iters",
            "2",
            "--log-interval",
            "1",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_tiny_recipe_bf16_on_cuda_trains_and_resumes(tmp_path):
    data = write_synthetic_retrieval(tmp_path / "syn", num_topics=8, train_per_topic=24)
    _train(
        data,
        "--train-iters",
        "12",
        "--save",
        str(tmp_path / "a"),
        "--save-interval",
        "6",
        "--log-json",
        str(tmp_path / "a.jsonl"),
    )
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "iter_0000012")
    (tmp_path / "b" / "latest_checkpointed_iteration.txt").write_text("6")
    _train(
        data,
        "--train-iters",
        "8",
        "--lr-decay-iters",  # run a's schedule (a resume refuses another one)
        "12",
        "--save",
        str(tmp_path / "b"),
        "--load",
        str(tmp_path / "b"),
        "--log-json",
        str(tmp_path / "b.jsonl"),
    )
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = {
        r["iteration"]: r for r in map(json.loads, (tmp_path / "b.jsonl").read_text().splitlines())
    }
    losses = [r["loss"] for r in a]
    assert len(losses) == 12 and all(abs(v) < float("inf") for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    for it in (7, 8):
        assert b[it]["loss"] == pytest.approx(a[it - 1]["loss"], rel=1e-3)
    assert a[-1]["peak_memory_kind"] == "cuda_max_allocated" and a[-1]["tflops"] > 0
