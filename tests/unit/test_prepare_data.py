"""tools/prepare_data.py after a kill: a run SIGKILLed while its output's temporary file exists
leaves that `.OUT.*.tmp` (and no OUT); the rerun removes it, leaves other files' temporaries in the
same folder alone, and writes OUT byte for byte as an uninterrupted run does.

Run alone: pytest tests/unit/test_prepare_data.py
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults  # a kill

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "prepare_data.py"

# Runs the tool with json.dumps halted for good at the third record written: the output's
# temporary file then exists, holding part of the records, until the test kills the process
# (however late the test gets to it: the tool cannot move on by itself).
HOOK = """
import json, runpy, sys, threading
marker, real, seen = sys.argv[1], json.dumps, [0]
def dumps(obj, *args, **kwargs):
    if isinstance(obj, dict) and "query" in obj:
        seen[0] += 1
        if seen[0] == 3:
            open(marker, "w").close()
            threading.Event().wait()
    return real(obj, *args, **kwargs)
json.dumps = dumps
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rerun_after_kill_removes_temporaries_and_writes_the_same_output(tmp_path, capsys):
    src = tmp_path / "cls.jsonl"
    src.write_text(
        "".join(
            json.dumps({"text": f"review number {i} {'good' if i % 3 else 'bad'}", "label": i % 3})
            + "\n"
            for i in range(60)
        )
    )

    def args(out):
        return [
            "classification",
            "--input",
            str(src),
            "--output",
            str(out),
            "--task",
            "ImdbClassification",
            "--positive",
            "example",
            "--num-negatives",
            "3",
        ]

    tool = _tool()
    reference = tmp_path / "reference" / "out.jsonl"
    assert tool.main(args(reference)) == 0

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    out = out_dir / "out.jsonl"
    # another writer's live temporary in the same folder: not this run's to remove
    other = out_dir / ".other.jsonl.abc123.tmp"
    other.write_text("someone else's half-written file")
    marker = tmp_path / "writing"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOOK, str(marker), str(TOOL), *args(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # a hang guard only: the tool gets there in seconds, and halts there until killed
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the tool never reached its write"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    stale = sorted(out_dir.glob(".out.jsonl.*.tmp"))
    assert len(stale) == 1 and not out.exists()  # what a kill leaves: a temporary, no output

    capsys.readouterr()
    assert tool.main(args(out)) == 0
    assert "removed 1 temporary file(s)" in capsys.readouterr().err
    assert sorted(out_dir.glob(".out.jsonl.*.tmp")) == []
    assert other.exists()
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == [".other.jsonl.abc123.tmp", "out.jsonl"]
