"""The README's quickstart runs end to end and its TP=2 embeddings equal the reference.

Runs `examples/quickstart.py` (2 gloo processes) into a temporary folder and checks summary.json:
3 x 3 scores, unit-norm embeddings imply scores in [-1, 1], parity <= 1e-5.

Run alone: pytest tests/functional/test_quickstart.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.functional
def test_quickstart_writes_summary(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tensor_model_parallel_size"] == 2
    assert summary["max_abs_diff_vs_reference"] <= 1e-5
    scores = summary["scores"]
    assert len(scores) == 3 and all(len(r) == 3 for r in scores)
    assert all(-1.0 - 1e-6 <= s <= 1.0 + 1e-6 for r in scores for s in r)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
