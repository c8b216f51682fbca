"""The launcher as users run it: two torchrun agents on localhost as two nodes.

`examples/pretrain_nvembed.sh` started twice with NNODES=2, NODE_RANK=0/1 (one process per
"node") forms one DP=2 job; the tiny recipe's loss goes down. (SIGTERM and SIGKILL through the
launcher: tests/faults/test_preemption.py.)
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_nvembed.core.launch import free_port
from megatron_nvembed.testing import write_synthetic_retrieval

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_retrieval(
        tmp_path_factory.mktemp("syn"), num_topics=8, train_per_topic=12
    )


def _args(data, **extra):
    args = [
        "--recipe",
        "tiny",
        "--train-data",
        data["train"],
        "--tokenizer",
        data["tokenizer"],
        "--global-batch-size",
        "8",
        "--micro-batch-size",
        "2",
        "--lr-warmup-iters",
        "1",
    ]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.mark.functional
def test_two_nodes_on_localhost_train_one_job_and_loss_goes_down(synthetic, tmp_path):
    port = str(free_port())
    env = {
        **os.environ,
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "PYTHON": sys.executable,  # the flag check and the launcher wrapper run with this Python
    }
    log = tmp_path / "log.jsonl"
    args = _args(synthetic, train_iters=12, log_interval=1, log_json=log)
    procs = [
        subprocess.Popen(
            ["bash", str(ROOT / "examples" / "pretrain_nvembed.sh"), *args],
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "TP=1 PP=1 DP=2" in outs[0]  # one job over both "nodes"
    # Every line a user watches is in node 0's output (global rank 0), none in node 1's.
    lines = [ln for ln in outs[0].splitlines() if re.search(r"iteration +\d+/12 \|", ln)]
    assert len(lines) == 12, outs[0][-3000:]
    assert not re.search(r"iteration +\d+/12 \|", outs[1]), outs[1][-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 12
    # Loss goes down on the tiny recipe: last three iterations well below the first three.
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert all(r["in_batch_pool_queries"] == 8 for r in records)  # the whole global batch
