"""A real one-node SLURM for the `slurm` tests (tests/slurm/cluster.sh: Debian's slurmctld,
slurmd and munge). Started once per test process, stopped by pid at the end. Where it cannot be
started (not root, no apt-get) the tests skip, except under `CI=true`, where they fail."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = Path(__file__).resolve().parent / "cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}  # fmt: skip


@dataclass
class Slurm:
    """The running cluster: `env` has SLURM_CONF (and PYTHON: the jobs' interpreter is this one)."""

    conf: Path
    env: dict[str, str]

    def run(self, *argv: str, check: bool = True) -> str:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)}: exit {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def sbatch(self, *argv: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submits; returns the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *argv], cwd=cwd, env={**self.env, **(env or {})},
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        fields = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float = 600) -> dict[str, str]:
        """Waits until the job reaches a final state (requeues pass through); returns its fields.

        Raises:
            TimeoutError: naming the job's state.
        """
        deadline = time.monotonic() + timeout
        fields = self.job(job_id)
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields.get("JobState") in FINAL_STATES:
                return fields
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {fields}")

    def wait_for_line(self, path: Path, pattern: str, job_id: str, timeout: float = 600) -> None:
        """Waits until `path` holds a line containing `pattern` while the job runs."""
        import re

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and re.search(pattern, path.read_text(errors="replace")):
                return
            state = self.job(job_id).get("JobState")
            if state in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended ({state}) before {pattern!r}: "
                                     + (path.read_text()[-3000:] if path.exists() else "no output"))  # fmt: skip
            time.sleep(0.5)
        raise TimeoutError(f"{pattern!r} not in {path} after {timeout} s")


@pytest.fixture(scope="session")
def slurm():
    # A short path: munge's socket lives in it (a UNIX socket path is at most 107 bytes).
    folder = Path(tempfile.mkdtemp(prefix="nvembed-slurm-"))
    proc = subprocess.run(["bash", str(CLUSTER), "up", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"no SLURM: tests/slurm/cluster.sh up failed: {proc.stderr.strip()[-2000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    conf = folder / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf), "PYTHON": sys.executable}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    try:
        yield Slurm(conf, env)
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(folder)], capture_output=True)
