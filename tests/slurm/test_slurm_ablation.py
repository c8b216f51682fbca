"""tools/ablate.py --run slurm on a real one-node SLURM (tests/slurm/conftest.py), against a local
run of the same plan.

The grid: 2 cells of one base on the synthetic retrieval task, recipe tiny, 1 gloo process per
cell, told apart by two objectives that are training lengths: `short` (20 iterations) and `long`
(LONG_ITERS). The scripts get `--slurm-time 10 --slurm-signal-lead 90` (written into every job
script as `--time` and `--signal=TERM@90`; SLURM's delivery of that signal before a time limit is
tested with the same launcher in test_slurm_training.py). Once the long cell logs its first
iteration, its job is preempted: `scancel --signal=TERM` on its training step, the signal SLURM
sends at the --signal time or on preemption. Training saves and the job requeues itself
(examples/slurm_train.sh); the requeued run resumes from the checkpoint and finishes the cell. The
short cell runs once. Meanwhile the local run trains the same plan in one go.

Proves: both cell jobs end COMPLETED with done.json and each step's seconds; the long cell's job
restarted, its training log shows the signal's save and the resume from that iteration, and its
checkpoint reached LONG_ITERS; the table of the SLURM run (ablation.csv after --collect) has the
local run's cells, columns and scores (within 1e-6): an interrupted, requeued and resumed
training ends where an uninterrupted one does.

Run alone: pytest tests/slurm/test_slurm_ablation.py   (about 2 minutes on 2 idle cores)
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import mteb  # noqa: F401  (the test extra installs it; the cells are evaluated with it)

from megatron_nvembed.checkpoint.store import latest_iteration

ROOT = Path(__file__).resolve().parents[2]
LONG_ITERS = 120  # 0.1 to 0.5 s each: the signal lands in training
LEAD = 90  # --slurm-signal-lead
CELL = "single-stage-no-inbatch_mean_bidirectional"
SHORT, LONG = f"{CELL}_short", f"{CELL}_long"


def _grid_args(tmp: Path) -> list[str]:
    """The plan's flags (data and a tiny decoder written under `tmp`), without --out and --run."""
    from transformers import AutoTokenizer

    from megatron_nvembed.testing import save_tiny_hf_decoder, write_synthetic_retrieval

    data = write_synthetic_retrieval(tmp / "data")
    save_tiny_hf_decoder(tmp / "hf", AutoTokenizer.from_pretrained(data["tokenizer"]))
    return [
        "--base-hf", str(tmp / "hf"), "--stage1-data", data["train"],
        "--eval-beir", data["eval"], "--instruction", data["instruction"], "--recipe", "tiny",
        "--grid", "pooling=mean", "mask=bidirectional", "schedule=single-stage-no-inbatch",
        "objective=short,long",
        "--objective", "short=--train-iters 20", f"long=--train-iters {LONG_ITERS}",
        "--nproc", "1",
    ]  # fmt: skip


def _ablate(*args: str, env: dict | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "ablate.py"), *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _table(out: Path) -> list[dict[str, str]]:
    with open(out / "ablation.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_requeued_cell_resumes_and_matches_a_local_run(slurm, tmp_path):
    """Fault: An ablation cell's SLURM job is preempted midway (`scancel --signal=TERM` on its
        training step).
    Happens: Training saves, the job requeues itself, the requeued run resumes and finishes the
        cell; the ablation table equals an uninterrupted local run's (1e-6).
    Do: Nothing: the cell resumes itself."""
    grid = _grid_args(tmp_path)
    extra = ["--", "--lr-warmup-iters", "1"]
    local_out, slurm_out = tmp_path / "local", tmp_path / "slurm"
    # the local run trains the same plan meanwhile (its cells' in-process evaluation: --nproc 1)
    local_log = tmp_path / "local.log"
    with open(local_log, "w") as log:
        local = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "ablate.py"), *grid, "--out", str(local_out),
             "--run", "local", *extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    try:
        _ablate(
            *grid, "--out", str(slurm_out), "--run", "slurm", "--slurm-gpus-per-node", "0",
            "--slurm-time", "10", "--slurm-signal-lead", str(LEAD), "--sbatch=--cpus-per-task=1",
            *extra, env=slurm.env,
        )  # fmt: skip
        submit = slurm_out / "slurm" / "submit_all.sh"
        # submit_all.sh prints the cell jobs' ids in the order of its sbatch lines
        ids = re.findall(r"Submitted batch job (\d+)", slurm.run("bash", str(submit)))
        scripts = re.findall(r"afterok:\$BASES \S*/([^/\s]+)\.sbatch", submit.read_text())
        assert sorted(scripts) == sorted([SHORT, LONG]) and len(ids) == 2
        ids = dict(zip(scripts, ids))
        long_log = slurm_out / "cells" / LONG / "logs" / "train.log"
        for cell in (SHORT, LONG):
            script = (slurm_out / "slurm" / f"{cell}.sbatch").read_text()
            assert "#SBATCH --time=10\n" in script and f"#SBATCH --signal=TERM@{LEAD}\n" in script
        slurm.wait_for_line(long_log, rf"iteration +\d+/{LONG_ITERS} \|", ids[LONG], timeout=300)
        slurm.run("scancel", "--signal=TERM", ids[LONG])  # the job's steps: training's
        jobs = {cell: slurm.wait(job, timeout=420) for cell, job in ids.items()}
        local.wait(timeout=420)
    finally:
        if local.poll() is None:
            local.kill()
    assert local.returncode == 0, local_log.read_text()[-4000:]

    logs = {c: (slurm_out / "cells" / c / "logs" / "train.log").read_text() for c in jobs}
    for cell, job in jobs.items():
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (job, logs[cell][-3000:])
        done = json.loads((slurm_out / "cells" / cell / "done.json").read_text())
        assert {k: type(v) for k, v in done["seconds"].items()} == {"train": int, "eval": int}
    # the long cell: stopped by the signal after a save, requeued, resumed from that iteration
    assert int(jobs[LONG]["Restarts"]) >= 1, jobs[LONG]
    saved = re.findall(r"SIGTERM received: saving at iteration (\d+)", logs[LONG])
    resumed = re.findall(r"resumed at iteration (\d+)", logs[LONG])
    assert saved and saved == resumed and 0 < int(saved[0]) < LONG_ITERS, logs[LONG][-3000:]
    assert f"job {ids[LONG]} requeued" in logs[LONG]
    assert latest_iteration(slurm_out / "cells" / LONG / "train") == LONG_ITERS

    _ablate("--collect", "--out", str(slurm_out), env=slurm.env)
    local_rows, slurm_rows = _table(local_out), _table(slurm_out)
    assert [r["cell"] for r in slurm_rows] == [r["cell"] for r in local_rows]
    assert sorted(r["cell"] for r in local_rows) == sorted([SHORT, LONG])
    assert list(slurm_rows[0]) == list(local_rows[0])
    assert "status" not in slurm_rows[0]  # no incomplete cell
    for got, want in zip(slurm_rows, local_rows):
        for column, value in want.items():
            if column in ("cell", "schedule", "pooling", "mask", "objective"):
                assert got[column] == value
            else:
                assert got[column] != "" and abs(float(got[column]) - float(value)) <= 1e-6, (
                    column, got, want,
                )  # fmt: skip
