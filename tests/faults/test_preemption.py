"""Preemption and killed ranks, through the launcher users run (`examples/pretrain_nvembed.sh`,
torchrun, 2 gloo processes, the tiny recipe), as one job relaunched on its own `--save`.

- SIGTERM to torchrun after an earlier save (torchrun forwards it to each worker's process
  group), and SIGTERM to torchrun and every worker at once (as SLURM's `--signal` delivers it):
  a complete checkpoint at the last logged iteration (every shard its metadata names, in full;
  every rank's RNG file), exit code 0, no temporary folder. (SIGTERM straight to a worker is part
  of the second case.)
- SIGKILL of one rank, or of all, at a random moment of a run that saves every iteration (so
  most kills land in or near a save; the seed is printed, `FAULTS_SEED=N` replays it): the
  launcher fails in bounded time (with torchrun's shutdown timeout raised to an hour, only the
  surviving ranks' seeing the dead peer can end the launch before the process group's 30-minute
  timeout; a 15-minute guard tells the two apart, no clock is read), and the latest checkpoint is
  complete and resumes.
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

from megatron_nvembed.checkpoint.safety import verify_checkpoint_folder
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


def _launch(args: list[str], **env_overrides: str) -> subprocess.Popen:
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable, **env_overrides}
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


# A hang guard only (a launch logs its first iterations within a minute even on a loaded machine).
def _wait_for_iterations(proc, log: Path, n: int, timeout: float = 900) -> None:
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


def _complete(save: Path, saved: int) -> None:
    """The checkpoint of iteration `saved` is complete: every shard its metadata names is there
    in full (and nothing unsafe), the training state names it, each rank's RNG file exists."""
    folder = save / f"iter_{saved:07d}"
    verify_checkpoint_folder(folder)
    assert json.loads((folder / "train_state.json").read_text())["iteration"] == saved
    assert len(list((folder / "rng").iterdir())) == 2


def _saved_and_exited_0(save: Path, phase: dict) -> None:
    """A SIGTERM phase: launcher exit 0 after every worker did, a complete checkpoint at the
    last logged iteration, no temporary folder. (No clock: a worker still saving when torchrun's
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT runs out is killed, and the launcher then exits non-zero.)"""
    assert phase["rc"] == 0, phase["text"][-4000:]
    assert "SIGTERM: all 2 worker(s) of this node exited 0" in phase["text"]
    assert phase["tracker"] == phase["last_logged"], phase
    assert not phase["left"]
    _complete(save, phase["tracker"])


@pytest.fixture(scope="module")
def chain(synthetic, tmp_path_factory):
    """One job, three launches on one `--save` / `--load` folder (each launch costs the
    megatron-core import of two processes, so the faults follow each other):

    1. SIGTERM to torchrun after the save at iteration 2;
    2. relaunch: it resumes from 1's checkpoint; SIGKILL of one rank or of both (the seed picks,
       and when) while it saves every iteration;
    3. relaunch: it resumes from the checkpoint the kill left; SIGTERM to torchrun and to every
       worker at once, as SLURM's --signal delivers it.
    """
    seed = int(os.environ.get("FAULTS_SEED", random.randrange(2**31)))
    print(f"FAULTS_SEED={seed}")
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("chain")
    save = tmp / "ckpt"
    logs = [tmp / f"log{i}.jsonl" for i in (1, 2, 3)]  # one per launch
    out: dict = {"seed": seed}

    def sigterm(pids, proc, phase, log):
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        text = proc.communicate(timeout=600)[0]  # a hang guard only
        out[phase] = {
            "rc": proc.returncode,
            "text": text,
            "last_logged": max(_logged(log)),
            "tracker": _tracker(save),
            "left": sorted(
                p.name for p in save.iterdir() if p.name.endswith((".tmp", ".replaced"))
            ),
        }

    proc = _launch(_args(synthetic, save, logs[0], train_iters=100000, save_interval=2))
    _wait_for_iterations(proc, logs[0], 4)  # the save at iteration 2 happened
    out["sigterm_saved_before"] = _tracker(save)
    sigterm([proc.pid], proc, "sigterm_torchrun", logs[0])

    # torchrun's shutdown timeout raised to an hour: a rank that never saw its peer die would
    # keep the launch alive for the process group's 30-minute timeout at least, so only that
    # detection (seconds) ends it within the 15 minutes given below.
    proc = _launch(
        _args(synthetic, save, logs[1], train_iters=100000, save_interval=1),
        TORCH_ELASTIC_SHUTDOWN_TIMEOUT="3600",
    )
    _wait_for_iterations(proc, logs[1], 3)
    time.sleep(rng.uniform(0.0, 1.5))
    workers = _workers(proc)
    victims = [rng.choice(workers)] if rng.random() < 0.5 else workers
    for victim in victims:
        os.kill(victim, signal.SIGKILL)
    try:
        text, ended = proc.communicate(timeout=900)[0], True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: torchrun and the workers
        text, ended = proc.communicate()[0], False
    out["sigkill"] = {
        "victims": len(victims),
        "ended": ended,
        "rc": proc.returncode,
        "text": text,
        "tracker": _tracker(save),
    }

    proc = _launch(_args(synthetic, save, logs[2], train_iters=100000, save_interval=50))
    _wait_for_iterations(proc, logs[2], 2)
    workers = _workers(proc)
    out["workers"] = len(workers)
    sigterm([proc.pid, *workers], proc, "sigterm_all", logs[2])
    return save, out


def test_sigterm_to_torchrun_after_a_save_saves_completely_and_exits_0(chain):
    """Fault: SIGTERM to torchrun after earlier saves (it forwards the signal to each worker's process
        group).
    Happens: Every rank finishes its iteration and saves a complete checkpoint at the last logged
        iteration (every shard its metadata names, in full; every rank's RNG file); exit 0; no
        temporary folder.
    Do: Relaunch the same command (`--load` = `--save`); under SLURM the job requeues itself."""
    save, out = chain
    phase = out["sigterm_torchrun"]
    assert out["sigterm_saved_before"] >= 2
    _saved_and_exited_0(save, phase)


def test_sigkill_of_ranks_fails_the_launch_in_bounded_time_and_the_checkpoint_resumes(chain):
    """Fault: SIGKILL of one rank, or of all (the seed picks), at a random moment of a run saving
        every iteration (`FAULTS_SEED=N` replays).
    Happens: The launch fails as soon as the surviving ranks see the dead peer (seconds, not the
        30-minute timeout); the latest checkpoint is complete and the next launch resumes from it.
    Do: Relaunch; a leftover `iter_N.tmp` is removed by the next save of that iteration."""
    save, out = chain
    kill, seed = out["sigkill"], out["seed"]
    assert f"resumed at iteration {out['sigterm_torchrun']['tracker']}" in kill["text"], seed
    assert kill["ended"], (seed, "the launch outlived its ranks by 15 minutes")
    assert kill["rc"] not in (0, None), (seed, kill["text"][-3000:])
    _complete(save, kill["tracker"])
    # The next launch resumes from the checkpoint the kill left.
    assert f"resumed at iteration {kill['tracker']}" in out["sigterm_all"]["text"], seed


def test_sigterm_to_torchrun_and_every_worker_saves_completely_and_exits_0(chain):
    """Fault: SIGTERM to torchrun and every worker at once (as SLURM's `--signal=TERM@300` reaches
        every process of the step).
    Happens: The same as SIGTERM to torchrun alone: a complete checkpoint, exit 0.
    Do: Relaunch the same command."""
    save, out = chain
    phase = out["sigterm_all"]
    assert out["workers"] == 2
    _saved_and_exited_0(save, phase)
