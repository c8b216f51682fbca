"""The README's quickstart trains, improves held-out retrieval and shows its progress as it goes.

Runs `examples/quickstart.py` (import-hf, evaluation, stage 1 and stage 2 with 2 gloo processes
under torchrun, export-hf with LoRA merged, evaluation of the export) into a temporary folder and
checks:
- summary.json: nDCG@10 after >= 0.6 and at least 0.2 above before (the issue's bar), the
  stage-1 loss at least halved, files written atomically; `ndcg_at_10_chance` equal to a seeded
  Monte-Carlo estimate over random rankings of the held-out split computed here.
- the console: every step prints its log path before any of its output and "done in" after it;
  every training iteration line of the stage-1 log is echoed, in order; no Python warning line is
  echoed, and every echoed line is in the step's log; the chance and stage-2 loss explanations
  are printed.
- the echo streams: `run` echoes a step's line while the step still runs (a step that waits for
  the test to see its first line before it prints the second; no clock involved).

Run alone: pytest tests/functional/test_quickstart.py   (103 s on 2 cores at load average 3,
158 s at load average 35 -> 7)
"""

import importlib.util
import json
import math
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["import-hf", "eval-before", "stage 1", "stage 2", "export-hf", "eval-after"]
ECHO = re.compile(r"^  \[\s*(\d+\.\d)s\] (.*)$")


def monte_carlo_ndcg_at_10(beir_dir: Path, permutations: int = 3000, seed: int = 0) -> float:
    """Mean nDCG@10 over queries of random rankings of the corpus (binary gains, log2 discount).

    On the quickstart's split every document is relevant to the 2 queries of its topic only, so
    the mean over queries is the same for every ranking and the estimate is exact; it checks the
    quickstart's formula (discounts, ideal DCG, relevant share) by a different computation."""
    docs = [json.loads(line)["_id"] for line in (beir_dir / "corpus.jsonl").open() if line.strip()]
    relevant: dict[str, set[str]] = {}
    for line in list((beir_dir / "qrels" / "test.tsv").open())[1:]:
        q, d, score = line.split()
        if float(score) > 0:
            relevant.setdefault(q, set()).add(d)
    rng = random.Random(seed)
    total, count = 0.0, 0
    for _ in range(permutations):
        ranking = rng.sample(docs, len(docs))[:10]
        for rel in relevant.values():
            dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranking) if d in rel)
            ideal = sum(1 / math.log2(i + 2) for i in range(min(len(rel), 10)))
            total += dcg / ideal
            count += 1
    return total / count


def step_blocks(stdout: str) -> dict[str, list[str]]:
    """Console lines of each step, from its "-- NAME: log PATH" line to its "done in" line."""
    blocks, current = {}, None
    for line in stdout.splitlines():
        m = re.match(r"^-- (.+?): log (\S+)$", line)
        if m:
            current = m.group(1)
            blocks[current] = [line]
        elif current is not None:
            blocks[current].append(line)
            if line.startswith("  done in "):
                current = None
    return blocks


@pytest.mark.functional
def test_quickstart_trains_and_improves_retrieval(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    before, after = summary["ndcg_at_10_before"], summary["ndcg_at_10_after"]
    assert after >= 0.6 and after >= before + 0.2, summary
    s1 = summary["stage1_loss_first_last"]
    assert s1[1] < 0.5 * s1[0]  # stage 1 learns (stage 2 starts near zero loss on this toy task)
    assert (tmp_path / "hf_final" / "config.json").is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically

    # Chance: the quickstart's exact value against a Monte-Carlo estimate over random rankings.
    chance = summary["ndcg_at_10_chance"]
    estimate = monte_carlo_ndcg_at_10(tmp_path / "data" / "eval")
    assert abs(chance - estimate) < 0.01, (chance, estimate)
    assert 0.05 < chance < 0.4 and after > chance + 0.3, summary

    out = proc.stdout
    blocks = step_blocks(out)
    assert list(blocks) == STEPS, list(blocks)
    for name, block in blocks.items():
        m = re.match(r"^-- .+?: log (\S+)$", block[0])
        log = Path(m.group(1))
        assert log.parent == tmp_path / "logs" and log.is_file(), block[0]
        assert block[1].startswith("$ "), block[:2]  # the command, then its output
        assert block[-1].startswith("  done in "), (name, block[-3:])
        echoed = [ECHO.match(line) for line in block[2:-1]]
        assert all(echoed), (name, block)  # the step's own lines all carry their elapsed time
        text = log.read_text()
        for e in echoed:
            assert not re.match(r"^\S.*:\d+: [A-Za-z]*Warning: ", e.group(2)), e.group(0)
            if not e.group(2).startswith("still running: "):
                assert e.group(2) in text, (name, e.group(0))  # echoed lines come from the log

    # Stage 1: every iteration line of the log is echoed, as it came.
    iteration = re.compile(r"iteration\s+(\d+)\S*\s.*?\bloss ([-+.\deE]+)")
    in_log = iteration.findall((tmp_path / "logs" / "stage1.log").read_text())
    logged = [json.loads(line) for line in (tmp_path / "stage1.jsonl").open() if line.strip()]
    assert len(in_log) == len([r for r in logged if "loss" in r]) >= 2, in_log
    echoed = [
        (float(m.group(1)), iteration.search(m.group(2)).groups())
        for m in map(ECHO.match, blocks["stage 1"][2:-1])
        if iteration.search(m.group(2))
    ]
    assert [e[1] for e in echoed] == in_log, (echoed, in_log)
    # Evaluation: its progress and its result are echoed.
    for name in ("eval-before", "eval-after"):
        assert any("ndcg_at_10" in line for line in blocks[name]), blocks[name]
        assert any(re.search(r"query: \d+ texts", line) for line in blocks[name]), blocks[name]

    # The numbers are explained.
    assert f"| random ranking (chance) | {chance:.4f} |" in out
    assert re.search(r"chance: .*2 relevant documents among 32.*" + f"{chance:.4f}", out), out
    assert "why stage 2's loss is small: in-batch negatives are off in stage 2" in out
    assert re.search(r"\d+(\.\d+)?-?[\d.]* candidates per query.* against 64 in stage 1", out)
    assert "why it may rise: " in out


# A step that prints a line (unflushed: `run` must make the step's Python unbuffered), then waits
# until the file named by its argument exists, then prints a second line.
_WAITING_STEP = """
import pathlib, sys, time
print("iteration 1 | loss 1.0")
while not pathlib.Path(sys.argv[1]).exists():
    time.sleep(0.01)
print("iteration 2 | loss 0.5")
"""


def test_run_echoes_each_line_while_the_step_runs(tmp_path, capsys, monkeypatch):
    """`run` (examples/quickstart.py) echoes the first line of a step that cannot end before the
    test has seen that line: the echo streams by causality, on any machine. Then the second line
    and "done in" follow, and the log holds both lines."""
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    # registered as an import would, so its dataclasses can resolve their module
    monkeypatch.setitem(sys.modules, spec.name, quickstart)
    spec.loader.exec_module(quickstart)
    go, log = tmp_path / "go", tmp_path / "step.log"
    cmd = [sys.executable, "-c", _WAITING_STEP, str(go)]
    step = threading.Thread(target=quickstart.run, args=("waiting", cmd, log), daemon=True)
    step.start()
    seen, deadline = "", time.monotonic() + 600  # a hang guard only: the line comes in seconds
    while "s] iteration 1 | loss 1.0" not in seen:  # the echo (not the command line)
        assert step.is_alive() and time.monotonic() < deadline, seen
        time.sleep(0.01)
        seen += capsys.readouterr().out
    assert "s] iteration 2" not in seen  # the step is still waiting for `go`
    go.touch()
    step.join(timeout=600)
    assert not step.is_alive()
    seen += capsys.readouterr().out
    assert re.search(r"\] iteration 2 \| loss 0\.5\n  done in ", seen), seen
    assert log.read_text().splitlines() == ["iteration 1 | loss 1.0", "iteration 2 | loss 0.5"]
