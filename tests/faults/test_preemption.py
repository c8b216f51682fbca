"""Preemption and killed ranks, through the launcher users run (`examples/pretrain_nvembed.sh`,
torchrun, 2 gloo processes, the tiny recipe).

- SIGTERM to torchrun after an earlier save (torchrun forwards it to each worker's process
  group), and SIGTERM to torchrun and every worker at once (as SLURM's `--signal` delivers it):
  a complete checkpoint at the last logged iteration (every shard its metadata names, in full;
  every rank's RNG file), exit code 0, no temporary folder. (SIGTERM straight to a worker is part
  of the second case.)
- SIGKILL of one rank, or of all, at a random moment of a run that saves every iteration (so
  most kills land in or near a save; the seed is printed, `FAULTS_SEED=N` replays it): the
  launcher fails within a bounded time, and the latest checkpoint is complete and resumes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_nvembed.checkpoint_safety import verify_checkpoint_folder
from megatron_nvembed.testing import write_synthetic_retrieval

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_retrieval(
        tmp_path_factory.mktemp("syn"), num_topics=8, train_per_topic=12
    )


def _args(data, save: Path, log: Path, **extra) -> list[str]:
    args = [
        "--recipe", "tiny", "--train-data", data["train"], "--tokenizer", data["tokenizer"],
        "--global-batch-size", "8", "--micro-batch-size", "2", "--lr-warmup-iters", "1",
        # One schedule for every run here, however long: a resume keeps it.
        "--lr-decay-iters", "1000", "--log-interval", "1", "--log-json", str(log),
        "--save", str(save), "--load", str(save),
    ]  # fmt: skip
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable}
    env.pop("MASTER_PORT", None)
    return subprocess.Popen(
        ["bash", str(ROOT / "examples" / "pretrain_nvembed.sh"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def _logged(log: Path) -> dict[int, float]:
    if not log.is_file():
        return {}
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["iteration"]: r["loss"] for r in records}


def _wait_for_iterations(proc, log: Path, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(_logged(log)) >= n:
            return
        time.sleep(0.2)
    out = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
    pytest.fail(f"the run did not reach iteration {n}: {out[-3000:]}")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _workers(proc) -> list[int]:
    """The pids of the training processes (`pretrain_nvembed.py` under torchrun)."""
    pids = []
    for pid in _descendants(proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"pretrain_nvembed.py") for part in cmd) and b"-m" not in cmd:
            pids.append(pid)
    return pids


def _tracker(save: Path) -> int:
    return int((save / "latest_checkpointed_iteration.txt").read_text())


@pytest.mark.parametrize("target", ["torchrun", "torchrun_and_workers"])
def test_sigterm_through_torchrun_after_a_save_saves_completely_and_exits_0(
    synthetic, tmp_path, target
):
    save, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    proc = _launch(_args(synthetic, save, log, train_iters=100000, save_interval=2))
    _wait_for_iterations(proc, log, 4)  # the save at iteration 2 happened
    assert _tracker(save) >= 2
    pids = [proc.pid] + (_workers(proc) if target == "torchrun_and_workers" else [])
    if target == "torchrun_and_workers":
        assert len(pids) == 3, pids
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    sent = time.time()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    assert time.time() - sent < 120
    assert "SIGTERM: all 2 worker(s) of this node exited 0" in out
    logged = _logged(log)
    saved = _tracker(save)
    assert saved == max(logged), (saved, sorted(logged))
    assert not [p.name for p in save.iterdir() if p.name.endswith((".tmp", ".replaced"))]
    state = json.loads((save / f"iter_{saved:07d}" / "train_state.json").read_text())
    assert state["iteration"] == saved
    assert len(list((save / f"iter_{saved:07d}" / "rng").iterdir())) == 2
    if target != "torchrun":
        return
    # Complete: every shard the metadata names is there in full, and nothing unsafe (the resume
    # of such a checkpoint: the SIGKILL test below and tests/distributed/test_training.py).
    verify_checkpoint_folder(save / f"iter_{saved:07d}")


@pytest.mark.parametrize("victims", ["one", "all"])
def test_sigkill_of_ranks_fails_the_launch_in_bounded_time_and_the_latest_checkpoint_resumes(
    synthetic, tmp_path, victims
):
    seed = int(os.environ.get("FAULTS_SEED", random.randrange(2**31)))
    print(f"FAULTS_SEED={seed}")
    rng = random.Random(seed)
    save, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    proc = _launch(_args(synthetic, save, log, train_iters=100000, save_interval=1))
    _wait_for_iterations(proc, log, 3)
    time.sleep(rng.uniform(0.0, 1.5))
    workers = _workers(proc)
    for victim in [rng.choice(workers)] if victims == "one" else workers:
        os.kill(victim, signal.SIGKILL)
    killed = time.time()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode not in (0, None), out[-3000:]
    assert time.time() - killed < 120, f"seed {seed}"
    saved = _tracker(save)
    folder = save / f"iter_{saved:07d}"
    verify_checkpoint_folder(folder)
    assert (folder / "train_state.json").is_file()
    assert len(list((folder / "rng").iterdir())) == 2
    if victims == "all":
        return  # the resume of a checkpoint left by a kill is the "one" case's
    # The latest checkpoint resumes: one more iteration from it.
    resumed = _launch(_args(synthetic, save, log, train_iters=saved + 1))
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, f"seed {seed}: {out[-4000:]}"
    assert f"resumed at iteration {saved}" in out
    assert _tracker(save) == saved + 1
