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


@pytest.mark.functional
@pytest.mark.parametrize("env", [{"NPROC_PER_NODE": "0"}, {"GPUS_PER_NODE": "0"}])
def test_zero_processes_per_node_is_refused_before_torchrun(tmp_path, env):
    data = write_synthetic_retrieval(tmp_path / "syn", num_topics=4, train_per_topic=8)
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "pretrain_nvembed.sh"), "--recipe", "tiny",
         "--train-data", data["train"], "--tokenizer", data["tokenizer"]],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "must be at least 1, got 0" in proc.stderr
    assert "launching" not in proc.stderr  # torchrun never started


@pytest.mark.functional
def test_sigterm_during_the_checks_stops_before_torchrun_with_the_signal_exit_code(tmp_path):
    """The launcher's interpreter for its checks sleeps (a stand-in for a slow start): SIGTERM
    then lands in the checks, and the launcher exits NVEMBED_SIGNAL_EXIT without starting
    torchrun (143 when it is unset)."""
    import signal
    import sys
    import time

    data = write_synthetic_retrieval(tmp_path / "syn", num_topics=4, train_per_topic=8)
    slow = tmp_path / "python.sh"
    slow.write_text(
        f'#!/usr/bin/env bash\ntouch {tmp_path}/started\nsleep 60\nexec {sys.executable} "$@"\n'
    )
    slow.chmod(0o755)
    for code, expected in (("75", 75), (None, 143)):
        (tmp_path / "started").unlink(missing_ok=True)
        env = {**os.environ, "PYTHON": str(slow), "NPROC_PER_NODE": "2"}
        env.pop("NVEMBED_SIGNAL_EXIT", None)
        if code:
            env["NVEMBED_SIGNAL_EXIT"] = code
        proc = subprocess.Popen(
            ["bash", str(ROOT / "examples" / "pretrain_nvembed.sh"), "--recipe", "tiny",
             "--train-data", data["train"], "--tokenizer", data["tokenizer"]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # as SLURM signals every process of a step
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == expected, out
        assert "SIGTERM before training started: nothing to save" in out
        assert "launching" not in out
