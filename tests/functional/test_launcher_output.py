"""`examples/pretrain_nvembed.sh` with 2 processes: one rank speaks, and bad input is one line.

- A 2-iteration tiny run: each message once (the start-up lines and "training finished" from
  rank 0, each loss line from the reporting rank), the missing-kernel note once, no
  megatron-core / torch warnings, no "0 global batches" line.
- A malformed record found after torchrun started: one "error: FILE:LINE: ..." line, exit code
  2, no traceback and no torchrun failure report.

Run alone: python3 -m pytest -q -n 0 tests/functional/test_launcher_output.py
"""

import os
import subprocess
from pathlib import Path

import pytest

from megatron_nvembed.testing import write_synthetic_retrieval

ROOT = Path(__file__).resolve().parents[2]


def _launch(*args):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "NPROC_PER_NODE": "2"}
    env.pop("TORCHRUN", None)
    env.pop("MASTER_PORT", None)
    return subprocess.run(
        ["bash", str(ROOT / "examples" / "pretrain_nvembed.sh"), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.functional
def test_each_message_once_and_no_third_party_noise(tmp_path):
    data = write_synthetic_retrieval(tmp_path / "syn", num_topics=4, train_per_topic=8)
    proc = _launch(
        "--recipe", "tiny", "--train-data", data["train"], "--tokenizer", data["tokenizer"],
        "--global-batch-size", 8, "--micro-batch-size", 2, "--train-iters", 2,
        "--lr-warmup-iters", 1, "--log-interval", 1,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = [line.split(" ", 1)[-1] for line in out.splitlines()]  # without the timestamp
    repeated = {line for line in lines if lines.count(line) > 1 and line.strip()}
    assert not repeated, repeated
    assert out.count("training finished at iteration 2") == 1
    assert out.count("iteration      1/2") == 1 and out.count("iteration      2/2") == 1
    assert sum("not installed" in line for line in lines) <= 1  # the one kernel note
    assert "Warning" not in out and "warnings.warn" not in out, out
    assert "0 global batches" not in out


@pytest.mark.functional
def test_bad_record_after_start_is_one_error_and_exit_code_2(tmp_path):
    data = write_synthetic_retrieval(tmp_path / "syn", num_topics=4, train_per_topic=8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        Path(data["train"]).read_text().splitlines()[0] + "\n" + '{"query": 3}\n',
        encoding="utf-8",
    )
    proc = _launch("--recipe", "tiny", "--train-data", bad, "--tokenizer", data["tokenizer"])
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: {bad}:2: key 'query' must be a string, got int"], proc.stderr
    assert "Traceback" not in proc.stderr and "exitcode" not in proc.stderr
