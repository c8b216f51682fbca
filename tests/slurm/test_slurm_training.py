"""`examples/pretrain_nvembed.slurm` submitted to a real one-node SLURM (gloo processes on the
CPU), as a user submits it: from another folder, with extra flags, relative paths.

The jobs are submitted together once (module fixture) and run side by side on the node:
- `reference`: 60 uninterrupted iterations (2 processes);
- `requeued`: the same command, requeued with `scontrol requeue` as soon as it logged 5
  iterations (the fixture's poll, every 0.2 s: 60 iterations take about 20 s on an idle machine);
  it saves on the SIGTERM, the requeued run resumes at the saved iteration, and every loss equals
  the reference's (1e-6);
- `time_limit`: `--time=3 --signal=TERM@60`, the first run starting its launcher checks 100 s
  late so that the signal lands in it: it saves and requeues itself; the requeued run (its limit
  raised to 10 minutes once the requeue is seen, as a start can take most of 3 minutes on a
  loaded machine) resumes and finishes every iteration;
- `early_signal`: a SIGTERM while the launcher still checks its input (before torchrun): the job
  requeues itself and its next run trains to the end.
`reference` and `requeued` run at the same time on the one node, each on its own port.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest

from megatron_nvembed.testing import write_synthetic_retrieval
from tests.slurm.conftest import FINAL_STATES

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "pretrain_nvembed.slurm"
CPU_NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]


def _flags(save: str, iters: int) -> list[str]:
    """Training flags with paths relative to the submission folder."""
    return [
        "--recipe", "tiny", "--train-data", "data/train.jsonl", "--tokenizer", "data/tokenizer",
        "--global-batch-size", "8", "--micro-batch-size", "2", "--lr-warmup-iters", "1",
        "--lr-decay-iters", "1000", "--log-interval", "1", "--train-iters", str(iters),
        "--save", save, "--load", save, "--log-json", f"{save}/log.jsonl",
    ]  # fmt: skip


def _losses(log: Path) -> dict[int, float]:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory):
    """Submits the four jobs from a folder outside the checkout and signals them as the module
    docstring says; returns (folder, job ids, whether `reference` and `requeued` were RUNNING at
    once, the last iteration `requeued` had logged when it was requeued)."""
    home = tmp_path_factory.mktemp("submit")
    write_synthetic_retrieval(home / "data", num_topics=8, train_per_topic=12)
    two = {"NPROC_PER_NODE": "2"}
    python = slurm.env["PYTHON"]
    ids = {
        "reference": slurm.sbatch(*CPU_NODE, str(SCRIPT), *_flags("ref", 60), cwd=home, env=two),
        "requeued": slurm.sbatch(*CPU_NODE, str(SCRIPT), *_flags("req", 60), cwd=home, env=two),
        # Each run has 120 s before the signal (3 min limit, 60 s lead). The first run's launcher
        # checks start 100 s late (a sleep, no CPU): the signal lands in that run, before its 100
        # iterations can end, on any machine; a later run has the whole 120 s.
        "time_limit": slurm.sbatch(
            *CPU_NODE,
            "--time=3",
            "--signal=TERM@60",
            str(SCRIPT),
            *_flags("tl", 100),
            cwd=home,
            env={**two, "PYTHON": _slow_python(home, "tl", 100, python)},
        ),  # fmt: skip
        # The first run's checks wait for the test's signal (a sleep of 120 s, no CPU).
        "early_signal": slurm.sbatch(
            *CPU_NODE,
            str(SCRIPT),
            *_flags("early", 4),
            cwd=home,
            env={**two, "PYTHON": _slow_python(home, "early", 120, python)},
        ),  # fmt: skip
    }
    # One poll, until every job got what it waits for:
    # - `requeued` is requeued (`scontrol requeue`: SIGTERM, as a preemption) once it logged its
    #   5th iteration, here and not in a test, which would start after this loop;
    # - both 2-process jobs are seen RUNNING on the one node at once;
    # - the early-signal job started its (sleeping) checks, which then get SIGTERM on every
    #   process of the job's step (`scancel --signal=TERM`), as a preemption that lands as a job
    #   starts.
    deadline, together, ended, signalled = time.monotonic() + 600, False, False, False
    limit_raised, preempted_at = False, None
    while time.monotonic() < deadline and not (
        (together or ended) and signalled and limit_raised and preempted_at is not None
    ):
        if preempted_at is None:
            # (a line may be half-written while it is read: the numbers alone are taken)
            logged = re.findall(r'"iteration": (\d+)', _text(home / "req" / "log.jsonl"))
            if len(logged) >= 5:
                slurm.run("scontrol", "requeue", ids["requeued"])
                preempted_at = max(map(int, logged))
        if not limit_raised and "requeued, it resumes" in _text(_out(home, ids["time_limit"])):
            # The time limit stopped the first run, which saved and requeued the job. A run of a
            # real job gets its whole limit; this one is 3 minutes, and on a loaded machine a
            # start alone can take most of it: the requeued run gets 10 minutes to finish.
            slurm.run("scontrol", "update", f"JobId={ids['time_limit']}", "TimeLimit=10")
            limit_raised = True
        if not (together or ended):
            states = {slurm.job(ids[n]).get("JobState") for n in ("reference", "requeued")}
            together, ended = states == {"RUNNING"}, bool(states & FINAL_STATES)
        if not signalled and (home / "early.started").exists():
            slurm.run("scancel", "--signal=TERM", ids["early_signal"])
            signalled = True
        time.sleep(0.2)
    assert signalled, "the early-signal job never started its checks"
    assert preempted_at is not None, "the requeued job never logged 5 iterations"
    return home, ids, together, preempted_at


def _slow_python(home: Path, name: str, seconds: int, python: str) -> str:
    """An interpreter for the launcher (`PYTHON`) whose first `--check-args` call in this folder
    sleeps `seconds` after writing `<name>.started`; every other call is `python`."""
    path = home / f"{name}_python.sh"
    path.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$*" == *--check-args* && ! -f {name}.started ]]; then\n'
        f"  touch {name}.started; sleep {seconds}\n"
        "fi\n"
        f'exec {shlex.quote(python)} "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _out(home: Path, job_id: str) -> Path:
    return home / f"nvembed-{job_id}.out"  # --output=%x-%j.out in the submission folder


def _completed(slurm, job_id: str, home: Path, timeout: float = 900) -> dict[str, str]:
    fields = slurm.wait(job_id, timeout)
    text = _out(home, job_id).read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, text[-4000:])
    return fields


def test_requeued_job_resumes_at_its_save_with_the_losses_of_an_uninterrupted_run(slurm, jobs):
    """Fault: `scontrol requeue` of a running training job (a real one-node SLURM).
    Happens: Every rank saves within KillWait; the requeued run resumes at the saved iteration; the
        log keeps both runs; every loss equals an uninterrupted run's (1e-6).
    Do: Nothing: the job resumes itself."""
    home, ids, _, preempted_at = jobs
    job = ids["requeued"]
    assert preempted_at < 60, "the job logged all 60 iterations before the test requeued it"
    fields = _completed(slurm, job, home)
    _completed(slurm, ids["reference"], home)
    text = _out(home, job).read_text()
    assert fields["Restarts"] == "1", text[-3000:]
    # The first run's output is kept (--open-mode=append): both runs' launcher lines are there.
    assert f"slurm_train: job {job} (restart 0)" in text
    assert f"slurm_train: job {job} (restart 1)" in text
    found = re.search(r"SIGTERM received: saving at iteration (\d+)", text)
    assert found, text[-3000:]
    saved = int(found.group(1))
    assert preempted_at <= saved < 60
    assert f"resumed at iteration {saved} with every rank's RNG state" in text
    requeued, reference = _losses(home / "req" / "log.jsonl"), _losses(home / "ref" / "log.jsonl")
    assert sorted(requeued) == sorted(reference) == list(range(1, 61))
    for it in reference:
        assert requeued[it] == pytest.approx(reference[it], abs=1e-6), it


def test_two_jobs_share_the_node_each_on_its_own_port(slurm, jobs):
    """Fault: Two training jobs on one node at once.
    Happens: Each takes its own port (20000 + job id % 40000); both complete.
    Do: Nothing."""
    home, ids, *_ = jobs
    a, b = ids["reference"], ids["requeued"]
    _completed(slurm, a, home)
    _completed(slurm, b, home)
    ports = set()
    for job in (a, b):
        first = re.search(r"master \S+:(\d+)", _out(home, job).read_text())
        ports.add(first.group(1))
    assert len(ports) == 2
    assert jobs[2], "the two jobs were never RUNNING at the same time"


def test_time_limit_signal_saves_requeues_and_finishes_every_iteration(slurm, jobs):
    """Fault: The job reaches its time limit (`--time=3 --signal=TERM@60`).
    Happens: The run saves on the signal, requeues itself (after the launcher's exit 75) and the
        last run finishes every iteration; COMPLETED, exit 0.
    Do: Nothing; a job that reaches its limit before the save ends (TIMEOUT) is not requeued: raise
        the `--signal` lead and resubmit."""
    home, ids, *_ = jobs
    job = ids["time_limit"]
    fields = _completed(slurm, job, home, timeout=1200)
    text = _out(home, job).read_text()
    assert int(fields["Restarts"]) >= 1, text[-3000:]
    assert "requeued, it resumes from the checkpoint" in text
    assert sorted(_losses(home / "tl" / "log.jsonl")) == list(range(1, 101))
    assert (home / "tl" / "latest_checkpointed_iteration.txt").read_text().strip() == "100"


def test_signal_during_the_launcher_checks_requeues_and_the_next_run_trains(slurm, jobs):
    """Fault: SIGTERM while the launcher checks its input, before torchrun.
    Happens: Exit 75 without starting training; the job requeues and the next run trains to the
        end.
    Do: Nothing: the job resumes itself."""
    home, ids, *_ = jobs
    job = ids["early_signal"]  # signalled by the fixture during its first run's checks
    fields = _completed(slurm, job, home)
    text = _out(home, job).read_text()
    assert fields["Restarts"] == "1", text[-3000:]
    assert "SIGTERM before training started: nothing to save" in text
    assert sorted(_losses(home / "early" / "log.jsonl")) == [1, 2, 3, 4]


def test_gpu_count_is_read_from_every_form_slurm_gives_it_in(slurm, tmp_path):
    """Inside a job, `slurm_train.sh` reads SLURM_GPUS_PER_NODE as SLURM writes it ("8",
    "gpu:8", "h100:8", "gpu:h100:8"); none or 0 means a CPU node (the launcher's own count);
    anything else is refused naming the variables. (`--help` ends each launch before torchrun.)"""
    train = shlex.quote(str(ROOT / "examples" / "slurm_train.sh"))
    forms = ["8", "gpu:8", "h100:8", "gpu:h100:8", "0", ""]
    body = "".join(
        f"SLURM_GPUS_PER_NODE={shlex.quote(g)} bash {train} --help >/dev/null\n" for g in forms
    )
    body += f"SLURM_GPUS_PER_NODE=gpu:x bash {train} --help; echo exit=$?\n"
    script = tmp_path / "forms.sh"
    script.write_text("#!/usr/bin/env bash\nset -u\n" + body)
    job = slurm.sbatch(*CPU_NODE, "--output=forms.out", str(script), cwd=tmp_path)
    fields = slurm.wait(job, 300)
    text = (tmp_path / "forms.out").read_text()
    assert fields["JobState"] == "COMPLETED", text
    counts = re.findall(r"GPUs per node (\S+),", text)
    assert counts == ["8", "8", "8", "8", "none", "none"], text
    assert "cannot read a GPU count from SLURM_GPUS_PER_NODE='gpu:x'" in text
    assert "exit=2" in text
